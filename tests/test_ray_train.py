"""Training on Ray Train V2 with DDP over gloo: a run, its checkpoints, resuming it,
throughput-balanced batches, a worker dying mid-run, and a NaN on one rank."""

import json
from pathlib import Path

import pytest

from raydiff.config import apply_overrides
from raydiff.data.prepared import open_prepared
from raydiff.train.checkpoint import latest_checkpoint, load_checkpoint
from raydiff.train.engine import NonFiniteLossError
from raydiff.train.trainer import check_resources, prepared_data, train_on_ray
from raydiff.train.worker import STOPPED_FILE
from tests.helpers.tensorboard import tensorboard_scalars

pytestmark = pytest.mark.timeout(600)


def _reports(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("prepared"))  # prepared once: runs share it by fingerprint


def _cfg(smoke_cfg, data_dir, **overrides):
    return apply_overrides(smoke_cfg, {
        "data.synthetic_size": 100, "data.out_dir": data_dir, "ray.num_workers": 2,
        "ray.cpus_per_worker": 0.5, "train.log_every": 5} | overrides)


def test_two_worker_ddp_run_checkpoints_and_resumes(ray_session, smoke_cfg, data_dir):
    cfg = _cfg(smoke_cfg, data_dir, **{
        "train.max_steps": 10, "train.eval_every": 10, "train.checkpoint_every": 10})
    first = train_on_ray(cfg)
    assert [r["step"] for r in _reports(first.run_dir)] == [5, 10]
    assert first.last_checkpoint.name == "step_00000010"
    state, saved_cfg, tokenizer, _ = load_checkpoint(first.run_dir)
    assert state["step"] == 10 and saved_cfg.ray.num_workers == 2 and len(tokenizer) > 10
    assert "val_mse" in _reports(first.run_dir)[-1]
    logged = tensorboard_scalars(first.run_dir / "tensorboard")  # through the driver's monitor
    assert logged["loss"] == pytest.approx({r["step"]: r["loss"] for r in _reports(first.run_dir)})
    assert set(logged["val_mse"]) == {10} and set(logged["tokens_per_s_rank1"]) == {5, 10}

    resumed = train_on_ray(apply_overrides(cfg, {"train.max_steps": 20}))
    steps = [r["step"] for r in _reports(resumed.run_dir)]
    assert steps == [5, 10, 15, 20]  # continued from step 10, not from 0
    assert latest_checkpoint(resumed.run_dir).name == "step_00000020"
    final, _, _, _ = load_checkpoint(resumed.run_dir)
    assert final["step"] == 20


def test_more_workers_than_cpus_fails_fast(ray_session, smoke_cfg):
    with pytest.raises(ValueError, match=r"ray.num_workers=8 .* needs 8 CPUs; the cluster has 2"):
        check_resources(apply_overrides(smoke_cfg, {"ray.num_workers": 8,
                                                    "ray.cpus_per_worker": 1.0}))
    with pytest.raises(ValueError, match="ray.use_gpu=true"):
        check_resources(apply_overrides(smoke_cfg, {"ray.use_gpu": True}))


def test_throughput_balance_gives_a_slow_worker_a_smaller_batch(ray_session, smoke_cfg, data_dir):
    """Rank 1 reports a third of rank 0's speed (injected: the decision is checked without a
    clock; scripts/bench_train.py measures real slow workers): every measurement splits the
    global batch 3:1, the workers take those rows, and the run crosses several epochs (the
    workers' unequal reads must not hang at an epoch's end)."""
    cfg = _cfg(smoke_cfg, data_dir, **{
        "train.max_steps": 30, "train.eval_every": 30, "train.checkpoint_every": 30,
        "ray.batch_balance": "throughput", "ray.rebalance_every": 10,
        "debug.probe_speeds": [3.0, 1.0]})
    run = train_on_ray(cfg)
    path, _ = prepared_data(cfg)
    _, manifest = open_prepared(path, cfg.data)
    assert 2 * manifest["splits"]["train"]["segments"] < 30 * 32  # at least two epochs

    measured = [json.loads(line) for line in (run.run_dir / "balance.jsonl").read_text().splitlines()]
    assert [m["step"] for m in measured] == [0, 10, 20]
    for m in measured:  # gathered in rank order, split in proportion
        assert m["samples_per_s"] == [3.0, 1.0] and m["local_batch"] == [24, 8]
    reports = _reports(run.run_dir)
    assert [r["step"] for r in reports][-1] == 30
    for r in reports:  # the rows each worker trained on
        assert (r["local_batch_rank0"], r["local_batch_rank1"]) == pytest.approx((24, 8))
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_s_rank0"] + r["tokens_per_s_rank1"])


def test_a_worker_that_dies_is_replaced_and_the_run_completes(ray_session, smoke_cfg, data_dir):
    cfg = _cfg(smoke_cfg, data_dir, **{
        "train.run_name": "crash", "train.max_steps": 20, "train.eval_every": 20,
        "train.checkpoint_every": 10, "ray.max_failures": 1,
        "debug.crash_rank": 1, "debug.crash_at_step": 14})
    run = train_on_ray(cfg)
    assert (run.run_dir / ".crashed_rank1_step14").exists()  # it did die
    steps = [r["step"] for r in _reports(run.run_dir)]
    # steps 11-13 were lost with the worker, none before the step-10 checkpoint
    assert steps == [5, 10, 15, 20]
    final, _, _, _ = load_checkpoint(run.run_dir)
    assert final["step"] == 20
    # the driver logged the restart (a new group of the same size, from step 10)
    restarts = [json.loads(line) for line in (run.run_dir / "resizes.jsonl").read_text().splitlines()]
    assert [(r["step"], r["old_world_size"], r["new_world_size"], r["preempted"])
            for r in restarts] == [(10, 2, 2, False)]
    assert {r["world_size"] for r in _reports(run.run_dir)} == {2}


def test_nan_on_one_rank_stops_every_rank_and_keeps_the_last_checkpoint(
        ray_session, smoke_cfg, data_dir):
    cfg = _cfg(smoke_cfg, data_dir, **{
        "train.run_name": "nan", "train.max_steps": 20, "train.eval_every": 20,
        "train.checkpoint_every": 5, "ray.max_failures": 2,  # must not replay the NaN
        "debug.nan_rank": 1, "debug.nan_at_step": 8})
    # rank 0's own loss is finite: its gradients are not, through the all-reduce
    with pytest.raises(NonFiniteLossError, match="step 8: .* gradient norm nan over the group"):
        train_on_ray(cfg)
    run_dir = Path(cfg.train.output_dir) / "nan"
    assert json.loads((run_dir / STOPPED_FILE).read_text())["step"] == 7
    ckpt = latest_checkpoint(run_dir)
    assert ckpt.name == "step_00000005"
    state, _, _, _ = load_checkpoint(ckpt)
    assert all(bool(v.isfinite().all()) for v in state["model"].values())
