"""The per-worker training loop: steps, periodic reports, validation, checkpoints, early stop.

It knows nothing of Ray or of files: a `Reporter` receives every report (metrics, plus the
engine state when a checkpoint is due on the chief worker). Every worker calls `report` equally
often, which Ray Train's barrier-like `ray.train.report` requires.

When the batches raise `StopRequested` (every rank before the same step: a preemption notice),
the loop reports the last finished step, marked `preempted`, with a checkpoint unless that
step has one already, and re-raises.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from raydiff.config import TrainConfig
from raydiff.diffusion import Batch
from raydiff.train.balance import PlacedBatch, StopRequested
from raydiff.train.kinds import Engine


class Reporter(Protocol):
    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        """This report's metrics as the whole group sees them (identical on every rank)."""
        ...

    def report(self, metrics: dict[str, float], checkpoint_state: dict | None) -> None: ...


@dataclass
class LoopResult:
    step: int
    best_val_loss: float
    stopped_early: bool
    last_metrics: dict[str, float]


def host_values(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Python floats of a dict of 0-d tensors and numbers, the tensors read in one transfer
    (on a GPU, one synchronisation instead of one per metric and step)."""
    tensors = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    read = {}
    if tensors:
        stacked = torch.stack([values[k].float() for k in tensors])
        read = dict(zip(tensors, stacked.tolist(), strict=True))
    return {k: read[k] if k in read else float(v) for k, v in values.items()}


def _due(step: int, cfg: TrainConfig) -> tuple[bool, bool]:
    """(evaluate, checkpoint) after `step`: at their intervals and at the last step."""
    last = step == cfg.max_steps
    return step % cfg.eval_every == 0 or last, step % cfg.checkpoint_every == 0 or last


def _reports(step: int, cfg: TrainConfig) -> bool:
    """Whether the loop reports after `step` (a log, an evaluation or a checkpoint is due)."""
    return step % cfg.log_every == 0 or any(_due(step, cfg))


def _window_metrics(window: dict, counts: dict[str, int], step: int,
                    elapsed: float) -> dict[str, float]:
    """A report's training metrics: the window's means, read from the device in one transfer,
    and its tokens/s."""
    window = host_values(window)
    metrics = {k: v / counts[k] for k, v in window.items() if k != "tokens"}
    return metrics | {"step": step, "tokens_per_s": window.get("tokens", 0.0) / max(elapsed, 1e-9)}


def train_loop(engine: Engine, train_batches: Iterator[PlacedBatch],
               valid_batches: Callable[[], Iterable[Batch]], cfg: TrainConfig, reporter: Reporter,
               *, is_chief: bool = True) -> LoopResult:
    """Train until `cfg.max_steps` (or early stopping). Each `PlacedBatch` says where this
    worker's rows sit in the step's global batch (see `DiffusionEngine.train_step`)."""
    best, evals_since_best, stopped_early = math.inf, 0, False
    window: dict[str, float] = {}
    counts: dict[str, int] = {}  # steps that measured each metric (diagnostics: report steps)
    window_start = loop_start = time.perf_counter()
    metrics: dict[str, float] = {}
    checkpointed = None  # the step of the last checkpoint reported
    while engine.step < cfg.max_steps:
        try:
            placed = next(train_batches)
        except StopRequested:
            metrics = _window_metrics(window, counts, engine.step,
                                      time.perf_counter() - window_start)
            metrics = reporter.reduce(metrics | {"preempted": 1.0})
            due = is_chief and checkpointed != engine.step
            reporter.report(metrics, engine.state_dict() if due else None)
            raise
        # raises on a NaN/inf loss (on every rank of a DDP group at the same step)
        step_metrics = engine.train_step(*placed, diagnostics=_reports(engine.step + 1, cfg))
        step_metrics["local_batch"] = len(placed.batch["input_ids"])
        for k, v in step_metrics.items():
            window[k] = window.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1

        step = engine.step
        do_eval, do_ckpt = _due(step, cfg)
        if not _reports(step, cfg):
            continue
        metrics = _window_metrics(window, counts, step, time.perf_counter() - window_start)
        if do_eval:
            metrics |= engine.evaluate(valid_batches(), use_ema=cfg.eval_ema)
        if cfg.time_limit_s:
            metrics["elapsed_s"] = time.perf_counter() - loop_start
        # every rank decides on the same numbers: devices of different types compute slightly
        # different validation losses, and ranks disagreeing about stopping would hang
        metrics = reporter.reduce(metrics)
        if do_eval:
            if metrics["val_loss"] < best:
                best, evals_since_best = metrics["val_loss"], 0
            else:
                evals_since_best += 1
            stopped_early = cfg.patience > 0 and evals_since_best >= cfg.patience
            metrics["best_val_loss"] = best
        out_of_time = bool(cfg.time_limit_s) and metrics["elapsed_s"] >= cfg.time_limit_s
        stopped_early = stopped_early or out_of_time
        do_ckpt = do_ckpt or stopped_early
        reporter.report(metrics, engine.state_dict() if do_ckpt and is_chief else None)
        checkpointed = step if do_ckpt else checkpointed
        window, counts, window_start = {}, {}, time.perf_counter()
        if stopped_early:
            break
    return LoopResult(engine.step, best, stopped_early, metrics)
