"""Throughput-balanced local batches: the split, the speed probe that changes no state, the
slowness knob, the row stream and the NaN guard's rule (no Ray, one process)."""

import itertools

import numpy as np
import pytest
import torch

from raydiff.config import ConfigError, apply_overrides
from raydiff.train.balance import (
    BalancedBatches,
    StopRequested,
    measure_samples_per_s,
    placements,
    split_batch,
)
from raydiff.train.engine import DiffusionEngine, NonFiniteLossError
from raydiff.train.faults import Throttle
from raydiff.train.ingest import RowStream


@pytest.mark.parametrize(("total", "shares", "expected"), [
    (16, [3, 1], [12, 4]), (16, [1, 1], [8, 8]), (10, [1, 1, 1], [4, 3, 3]),
    (64, [312.0, 97.5, 160.2], [35, 11, 18]), (3, [1000, 1, 1], [1, 1, 1])])
def test_split_batch_is_proportional_positive_and_exact(total, shares, expected):
    sizes = split_batch(total, shares)
    assert sizes == expected and sum(sizes) == total and min(sizes) >= 1


def test_split_batch_refuses_impossible_requests():
    with pytest.raises(ValueError, match="smaller than the number of workers"):
        split_batch(2, [1, 1, 1])
    with pytest.raises(ValueError, match="must be positive"):
        split_batch(8, [1, 0])


def test_placements_weight_each_worker_by_its_share_of_the_global_batch():
    (w0, g0, o0), (w1, g1, o1) = placements([12, 4])
    assert (g0, g1, o0, o1) == (16, 16, 0, 12)
    assert w0 == pytest.approx(12 * 2 / 16) and w1 == pytest.approx(4 * 2 / 16)


def test_batch_shares_must_match_the_workers(smoke_cfg):
    with pytest.raises(ConfigError, match=r"ray.batch_shares=\[3, 1, 1\] needs one positive"):
        apply_overrides(smoke_cfg, {"ray.batch_shares": [3, 1, 1], "ray.num_workers": 2})


def _engine(cfg):
    torch.set_num_threads(1)
    return DiffusionEngine(cfg, 60, torch.device("cpu"), seed=0)


def _batch(rows=8, length=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 60, (rows, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_speed_probe_changes_no_state_and_sees_the_throttle(smoke_cfg):
    cfg = apply_overrides(smoke_cfg, {"data.seq_len": 32})
    engine = _engine(cfg)
    engine.train_step(_batch(rows=32, length=32, seed=1))  # optimizer state exists
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    rng, gen = torch.get_rng_state(), engine.generator.get_state()
    normal = measure_samples_per_s(engine, _batch(rows=32, length=32), passes=5)
    assert all(p.grad is None for p in engine.model.parameters())
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(engine.generator.get_state(), gen)
    for name, value in engine.model.state_dict().items():
        assert torch.equal(value, before[name]), name

    assert normal > 0


def test_throttle_sleeps_twice_a_forward_per_unit_of_slowdown_in_training_passes_only(smoke_cfg):
    """(factor - 1) x 3 x the forward's duration: the forward and its backward (two forwards'
    cost), factor times over. Clock and sleep are injected; scripts/bench_train.py measures
    the real slowdown."""
    engine = _engine(apply_overrides(smoke_cfg, {"data.seq_len": 16}))
    ticks, slept = itertools.chain([10.0, 10.5], itertools.count(20.0)), []
    Throttle(engine.model, factor=3.0, clock=lambda: next(ticks), sleep=slept.append)
    engine.probe_loss(_batch())  # a training pass: 0.5 s forward -> 3.0 s asleep
    with torch.no_grad():
        engine.evaluate([_batch()], use_ema=False)  # validation: the clock is read, no sleep
    assert slept == [pytest.approx(3.0)]


def test_throughput_balance_splits_by_the_measured_speeds(smoke_cfg):
    """The decision from injected speeds: re-measured every 2 steps, rows in proportion."""
    engine = _engine(apply_overrides(smoke_cfg, {"data.seq_len": 4}))
    speeds = iter([1.0, 1.0, 3.0])
    logged = []
    batches = BalancedBatches(RowStream(_Shard(rows=100)), engine, 8, 0, 1,
                              balance="throughput", rebalance_every=2,
                              on_rebalance=lambda *a: logged.append(a),
                              measure=lambda batch: next(speeds))
    for _ in range(5):
        placed = next(batches)
        assert placed.batch["input_ids"].shape == (8, 4) and placed.loss_weight == 1.0
        engine.step += 1
    assert [(step, speed) for step, speed, _ in logged] == [(0, [1.0]), (2, [1.0]), (4, [3.0])]


class _Shard:
    """The part of a Ray `DataIterator` that `RowStream` uses, over a fixed array."""

    def __init__(self, rows: int, length: int = 4):
        self.ids = np.arange(rows * length).reshape(rows, length)
        self.epochs = 0

    def iter_batches(self, batch_size, batch_format, local_shuffle_buffer_size,
                     local_shuffle_seed):
        self.epochs += 1
        for start in range(0, len(self.ids), batch_size):
            chunk = self.ids[start:start + batch_size]
            yield {"input_ids": chunk, "attention_mask": np.ones_like(chunk)}


def test_row_stream_serves_any_sizes_and_drops_only_the_tail():
    shard = _Shard(rows=10)
    stream = RowStream(shard, read_rows=3)
    first, second = stream.take(4), stream.take(5)
    assert first["input_ids"].shape == (4, 4) and second["input_ids"].shape == (5, 4)
    assert torch.equal(torch.cat([first["input_ids"], second["input_ids"]]),
                       torch.from_numpy(shard.ids[:9]))
    assert not stream.has(2)  # one row left
    stream.next_epoch()
    assert stream.has(10) and shard.epochs == 2


def test_balanced_batches_place_rows_and_refuse_a_too_small_split(smoke_cfg):
    engine = _engine(apply_overrides(smoke_cfg, {"data.seq_len": 4}))
    one = BalancedBatches(RowStream(_Shard(rows=10), read_rows=3), engine, 4, 0, 1)
    placed = [next(one) for _ in range(5)]  # 2 per epoch of 10 rows: crosses two boundaries
    assert all(p.batch["input_ids"].shape == (4, 4) for p in placed)
    assert placed[0].loss_weight == 1.0 and placed[0].global_batch == 4
    too_small = BalancedBatches(RowStream(_Shard(rows=3)), engine, 4, 0, 1)
    with pytest.raises(ValueError, match="too small for train.batch_size=4"):
        next(too_small)


class _Reports:
    """A `Reporter` that keeps what the loop hands it (one process: nothing to reduce)."""

    def __init__(self):
        self.rows: list[tuple[dict, dict | None]] = []

    def reduce(self, metrics):
        return metrics

    def report(self, metrics, checkpoint_state):
        self.rows.append((metrics, checkpoint_state))


@pytest.mark.parametrize(("stop_after", "checkpoint_every"), [(3, 10), (4, 2)])
def test_a_stop_request_reports_the_last_step_with_a_checkpoint_and_stops(
        smoke_cfg, stop_after, checkpoint_every):
    """A preemption notice (the flag SIGTERM sets) turns up after `stop_after` steps: the loop
    takes no further step, reports that step marked `preempted` with the engine's state (unless
    that step was just checkpointed: no second checkpoint of one step) and re-raises."""
    from raydiff.train.loop import train_loop

    cfg = apply_overrides(smoke_cfg, {"data.seq_len": 4, "train.log_every": 1,
                                      "train.checkpoint_every": checkpoint_every})
    engine = _engine(cfg)
    batches = BalancedBatches(RowStream(_Shard(rows=12), read_rows=8), engine, 4, 0, 1,
                              stop_requested=lambda: engine.step >= stop_after)
    reporter = _Reports()
    with pytest.raises(StopRequested, match=f"before step {stop_after + 1}"):
        train_loop(engine, batches, lambda: [], cfg.train, reporter)
    assert engine.step == stop_after
    last, state = reporter.rows[-1]
    assert last["preempted"] == 1.0 and last["step"] == stop_after
    assert [m["step"] for m, _ in reporter.rows] == [*range(1, stop_after + 1), stop_after]
    if stop_after % checkpoint_every:
        assert state is not None and state["step"] == stop_after
    else:  # the step's own checkpoint stands
        assert state is None and reporter.rows[-2][1]["step"] == stop_after


def test_nan_guard_raises_before_the_step_and_keeps_the_weights(smoke_cfg):
    engine = _engine(apply_overrides(smoke_cfg, {"data.seq_len": 16}))
    engine.train_step(_batch(seed=1))
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    engine.model.register_forward_hook(lambda module, args, output: output * float("nan"))
    with pytest.raises(NonFiniteLossError, match="step 2: loss is nan on this worker, gradient norm nan"):
        engine.train_step(_batch(seed=2))
    assert engine.step == 1
    for name, value in engine.model.state_dict().items():
        assert torch.equal(value, before[name]), name
