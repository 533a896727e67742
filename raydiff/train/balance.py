"""Throughput-balanced local batches for DDP groups of unequal devices (A100 beside T4).

Worker i takes b_i rows of the global batch G, b_i proportional to its measured samples/s, and
weights its loss by b_i * W / G, so that DDP's gradient average equals the gradient of the whole
global batch (see `DiffusionEngine.train_step`). Speeds are measured by timed forward/backward
passes outside the all-reduce (DDP's `no_sync`), on a forked RNG, so a measurement changes no
state: a balanced run takes exactly the steps an equal one takes, only faster.

No Ray here: the collectives are torch.distributed's, the rows come from any `RowStream`.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from raydiff.diffusion import Batch
from raydiff.errors import RaydiffError

if TYPE_CHECKING:
    from raydiff.train.kinds import Engine


class PlacedBatch(NamedTuple):
    """A worker's rows and where they sit in the global batch of this step."""

    batch: Batch
    loss_weight: float = 1.0  # local * world_size / global_batch
    global_batch: int | None = None  # None: this batch is the whole global batch
    offset: int = 0


def split_batch(global_batch: int, shares: Sequence[float]) -> list[int]:
    """Local batch sizes proportional to `shares`, each at least 1, summing to `global_batch`
    (the rows that rounding down leaves go to the workers it shortened most)."""
    if global_batch < len(shares):
        raise RaydiffError(f"train.batch_size={global_batch} is smaller than the number of "
                           f"workers ({len(shares)})")
    if any(not s > 0 for s in shares):
        raise RaydiffError(f"batch shares must be positive, got {list(shares)}")
    exact = [global_batch * s / sum(shares) for s in shares]
    sizes = [max(1, int(e)) for e in exact]
    while sum(sizes) > global_batch:  # only where the one-row minimum lifted someone
        sizes[sizes.index(max(sizes))] -= 1
    most_short = sorted(range(len(sizes)), key=lambda i: sizes[i] - exact[i])
    for i in most_short[:global_batch - sum(sizes)]:
        sizes[i] += 1
    return sizes


def placements(sizes: Sequence[int]) -> list[tuple[float, int, int]]:
    """(loss_weight, global_batch, offset) of every worker for these local sizes."""
    total, world = sum(sizes), len(sizes)
    offsets = [sum(sizes[:i]) for i in range(world)]
    return [(b * world / total, total, o) for b, o in zip(sizes, offsets, strict=True)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_samples_per_s(engine: Engine, batch: Batch, passes: int) -> float:
    """This worker's compute speed on `batch`: the median of `passes` timed forward/backward
    passes (after one warm-up) without the all-reduce. Weights, gradients, optimizer and every
    RNG are left as they were."""
    no_sync = getattr(engine.train_model, "no_sync", contextlib.nullcontext)
    devices = [engine.device] if engine.device.type == "cuda" else []
    times = []
    with torch.random.fork_rng(devices=devices), no_sync():
        for i in range(passes + 1):
            _synchronize(engine.device)
            start = time.perf_counter()
            engine.probe_loss(batch).backward()
            _synchronize(engine.device)
            if i:
                times.append(time.perf_counter() - start)
            engine.optimizer.zero_grad(set_to_none=True)
    return len(batch["input_ids"]) / statistics.median(times)


def gather_rows(row: Sequence[float], rank: int, world_size: int) -> torch.Tensor:
    """Every rank's `row`, (world_size, len(row)) float64, through one SUM all-reduce in which
    each rank fills its own row."""
    rows = torch.zeros(world_size, len(row), dtype=torch.float64)
    rows[rank] = torch.tensor([float(v) for v in row], dtype=torch.float64)
    if world_size > 1:
        torch.distributed.all_reduce(rows)
    return rows


class StopRequested(Exception):
    """A rank asked the group to stop (a preemption notice): every rank raises this before the
    same step, so that all can checkpoint the state they share and end together."""


def agree(has_rows: bool, stop: bool, world_size: int, step: int) -> bool:
    """Whether every rank has its rows for the step after `step`; raises `StopRequested` on
    every rank when any asks to stop. One tiny MAX all-reduce: the collective each step runs
    before it starts."""
    if world_size > 1:
        value = torch.tensor([int(not has_rows), int(stop)], dtype=torch.int32)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        missing, stopping = value.tolist()
        has_rows, stop = not missing, bool(stopping)
    if stop:
        raise StopRequested(f"stop requested before step {step + 1}")
    return has_rows


class BalancedBatches:
    """This worker's `PlacedBatch`es, step after step, from its `RowStream`.

    Local sizes are `shares`-proportional when fixed shares are given, equal when `balance` is
    "equal", and follow the measured speeds (re-measured every `rebalance_every` steps, 0 =
    once) when it is "throughput". Every step all ranks agree that each has its rows; when one
    runs out, all start the next epoch together (dropping the others' tails), so no rank waits
    in an all-reduce that another never joins. The same agreement carries `stop_requested`:
    when it holds on any rank, every rank raises `StopRequested` before the step.
    """

    def __init__(self, stream, engine: Engine, global_batch: int, rank: int, world_size: int, *,
                 balance: str = "equal", shares: Sequence[float] = (), rebalance_every: int = 0,
                 probe_passes: int = 3,
                 on_rebalance: Callable[[int, list[float], list[int]], None] | None = None,
                 measure: Callable[[Batch], float] | None = None,
                 stop_requested: Callable[[], bool] = lambda: False):
        self.stream, self.engine = stream, engine
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.balance, self.rebalance_every = balance, rebalance_every
        self.sizes = split_batch(global_batch, list(shares) or [1.0] * world_size)
        self.on_rebalance = on_rebalance  # (step, samples/s per rank, local batch sizes)
        # this rank's samples/s on a probe batch; tests inject fixed speeds here
        self.measure = measure or (lambda batch: measure_samples_per_s(engine, batch,
                                                                       probe_passes))
        self.speeds: list[float] = []  # samples/s per rank, from the latest measurement
        self._measured_at: int | None = None
        self.stop_requested = stop_requested

    def _due(self) -> bool:
        if self.balance != "throughput":
            return False
        if self._measured_at is None:
            return True
        return bool(self.rebalance_every) and (
            self.engine.step - self._measured_at >= self.rebalance_every)

    def _rows(self, size: int) -> Batch:
        for _ in range(2):  # this epoch's rows, else the next epoch's
            if agree(self.stream.has(size), self.stop_requested(), self.world_size,
                     self.engine.step):
                return self.stream.take(size)
            self.stream.next_epoch()
        raise RaydiffError(f"a fresh epoch cannot fill a local batch of {size} rows on every "
                           f"worker: the train split is too small for train.batch_size="
                           f"{self.global_batch}")

    def _rebalance(self) -> None:
        probe = self._rows(self.sizes[self.rank])
        speed = self.measure(probe)
        self.speeds = gather_rows([speed], self.rank, self.world_size)[:, 0].tolist()
        self.sizes = split_batch(self.global_batch, self.speeds)
        self._measured_at = self.engine.step
        if self.on_rebalance is not None:
            self.on_rebalance(self.engine.step, self.speeds, self.sizes)

    def __iter__(self) -> Iterator[PlacedBatch]:
        return self

    def __next__(self) -> PlacedBatch:
        if self._due():
            self._rebalance()
        batch = self._rows(self.sizes[self.rank])
        return PlacedBatch(batch, *placements(self.sizes)[self.rank])
