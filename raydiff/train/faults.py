"""Faults injected on purpose (the `debug` config section), for tests and benchmarks: a worker
process that dies at a step, a training loss that turns NaN, a worker that computes slower, a
worker that holds while a file exists, steps paced by a sleep, a data order that no resize
changes. Nothing here runs unless a `debug.*` key asks for it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from raydiff.config import DebugConfig
from raydiff.data.batches import iterate_batches
from raydiff.train.balance import PlacedBatch, agree, placements, split_batch
from raydiff.train.kinds import Engine


def crash_when_due(batches: Iterator[PlacedBatch], engine: Engine, cfg: DebugConfig,
                   rank: int, run_dir: Path) -> Iterator[PlacedBatch]:
    """Test hook (`debug.crash_rank`, `debug.crash_at_step`): this worker's process dies
    before that step, once per run (a marker file remembers it across restarts)."""
    marker = run_dir / f".crashed_rank{rank}_step{cfg.crash_at_step}"
    for placed in batches:
        if (rank == cfg.crash_rank and engine.step + 1 == cfg.crash_at_step
                and not marker.exists()):
            marker.touch()
            os._exit(1)
        yield placed


def hold_while_file_exists(batches: Iterator[PlacedBatch], path: Path,
                           poll_s: float = 0.2) -> Iterator[PlacedBatch]:
    """Test hook (`debug.hold_file`): before each step, wait while `path` exists, so that a
    test can keep chosen runs from finishing until it has acted (no clock involved)."""
    for placed in batches:
        while path.exists():
            time.sleep(poll_s)
        yield placed


def paced(batches: Iterator[PlacedBatch], seconds: float) -> Iterator[PlacedBatch]:
    """Test hook (`debug.step_sleep_s`): sleep after each step, so that a test acting on a
    cluster mid-run (removing a node, a SIGTERM) finds the run still going."""
    for placed in batches:
        yield placed
        time.sleep(seconds)


def fixed_order_batches(blocks: dict, engine: Engine, global_batch: int, rank: int,
                        world_size: int, seed: int,
                        stop_requested: Callable[[], bool]) -> Iterator[PlacedBatch]:
    """Test hook (`debug.fixed_data_order`): the global batches local training takes (a pure
    function of (seed, step), `iterate_batches`), from the step the engine resumed at, each
    rank taking its slice of equal local batches. A run resumed on another world size then
    sees exactly the batches an uninterrupted one does. The ranks agree on `stop_requested`
    before each step as `BalancedBatches` does."""
    sizes = split_batch(global_batch, [1.0] * world_size)
    weight, total, offset = placements(sizes)[rank]
    mine = slice(offset, offset + sizes[rank])
    for batch in iterate_batches(blocks, global_batch, seed=seed, start=engine.step):
        agree(True, stop_requested(), world_size, engine.step)
        yield PlacedBatch({k: v[mine] for k, v in batch.items()}, weight, total, offset)


def poison_when_due(engine: Engine, step: int) -> None:
    """Test hook (`debug.nan_rank`, `debug.nan_at_step`): this worker's training forward pass
    returns NaN at that step, as a diverging run would."""
    def poison(module, args, output):
        if torch.is_grad_enabled() and engine.step + 1 == step:
            return output * float("nan")
        return output
    engine.model.register_forward_hook(poison)


class Throttle:
    """Benchmark and test knob (`debug.slow_factor`): makes this worker's compute `factor`
    times slower, as a slower GPU would, by sleeping inside every forward pass of `model` for
    (factor - 1) x 3 x its duration (a backward costs about two forwards). The sleep happens
    before the gradients reach the all-reduce, so the other workers wait for it."""

    def __init__(self, model: nn.Module, factor: float,
                 clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep):
        self.factor, self.clock, self.sleep, self._start = factor, clock, sleep, 0.0
        model.register_forward_pre_hook(self._before)
        model.register_forward_hook(self._after)

    def _before(self, module, args) -> None:
        self._start = self.clock()

    def _after(self, module, args, output) -> None:
        if torch.is_grad_enabled():  # training and probe passes, not validation
            self.sleep((self.factor - 1) * 3 * (self.clock() - self._start))
