"""What the driver shows and records while a Ray Train run goes: every report, live, as a rich
progress bar and as TensorBoard scalars (`<run_dir>/tensorboard`, through tensorboardX, which
Ray Tune's own logger uses as well), and every change of worker group (a resize of an elastic
group, a restart after a lost worker or a preemption) as a line in the log and a row of
`<run_dir>/resizes.jsonl`.

Reports reach the driver through Ray, wherever the workers run: a Train `UserCallback` in the
Train controller forwards each one into a `ray.util.queue.Queue`, which a thread here drains.
"""

from __future__ import annotations

import logging
import queue as stdlib_queue
import threading
from pathlib import Path

import ray.train
from ray.util.queue import Empty, Queue
from rich.console import Console

from raydiff.console import progress_bar
from raydiff.files import append_jsonl

SHOWN = ("loss", "mse", "val_loss", "val_mse", "val_token_accuracy")
# wall times and what a worker group says of itself: not curves
NOT_PLOTTED = ("time", "group_started_at", "resumed_from", "steps_repeated", "idle_s",
               "after_preemption")
RESIZES_FILE = "resizes.jsonl"
log = logging.getLogger(__name__)


def group_change(before: dict, after: dict) -> dict | None:
    """The `resizes.jsonl` row for two consecutive reports of different worker groups (None
    for the same group): old and new size, the step the new group resumed from, the steps it
    repeats (logged by the old group past that step: at most a checkpoint interval after a
    hard loss, none after a preemption notice), and the seconds without training, from the old
    group's last logged step to the new group's start (see `RayReporter`)."""
    if before.get("group_started_at") == after.get("group_started_at"):
        return None
    return {"step": int(after["resumed_from"]), "old_world_size": int(before["world_size"]),
            "new_world_size": int(after["world_size"]),
            "steps_repeated": int(after.get("steps_repeated", 0)),
            "seconds_without_training": round(after.get("idle_s", 0.0), 3),
            "preempted": bool(after.get("after_preemption"))}


class ForwardReports(ray.train.UserCallback):
    """Runs in the Train controller: puts rank 0's report (already averaged over the workers by
    `RayReporter`) on the driver's queue."""

    def __init__(self, reports: Queue):
        self.reports = reports

    def after_report(self, run_context, metrics, checkpoint):
        self.reports.put(metrics[0])


class RunMonitor:
    """`with RunMonitor(run_dir, max_steps, console) as monitor:` fit a trainer built with
    `monitor.callback()`; each report updates the bar and the TensorBoard log."""

    def __init__(self, run_dir: Path, max_steps: int, console: Console | None = None):
        self.run_dir, self.max_steps, self.console = run_dir, max_steps, console
        self._last: dict | None = None  # the previous report

    def callback(self) -> ForwardReports:
        return ForwardReports(self._reports)

    def __enter__(self) -> RunMonitor:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        from tensorboardX import SummaryWriter

        # on the driver's node, as Train's controller is: a lost worker node must not take the
        # queue (and with it the run's progress) down
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._reports = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        self._progress = None
        if self.console is not None:
            self._progress = progress_bar(self.console, training=True)
            self._task = self._progress.add_task("train", total=self.max_steps, info="")
            self._progress.start()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="raydiff-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self._writer.close()
        if self._progress is not None:
            self._progress.stop()
        self._reports.shutdown()

    def _drain(self) -> None:
        while True:
            try:
                report = self._reports.get(timeout=0.5)
            except (stdlib_queue.Empty, Empty):
                if self._done.is_set() and self._reports.empty():
                    return
                continue
            self._show(report)

    def _show(self, metrics: dict) -> None:
        step = int(metrics["step"])
        if "group_started_at" in metrics:
            self._note_group(metrics)
        for name, value in metrics.items():
            if name != "step" and name not in NOT_PLOTTED and isinstance(value, int | float):
                self._writer.add_scalar(name, value, step)
        self._writer.flush()
        if self._progress is not None:
            shown = " ".join(f"{k} {metrics[k]:.4f}" for k in SHOWN if k in metrics)
            self._progress.update(self._task, completed=step,
                                  info=f"{shown} {metrics.get('tokens_per_s', 0):.0f} tok/s")

    def _note_group(self, metrics: dict) -> None:
        change = group_change(self._last, metrics) if self._last is not None else None
        self._last = metrics
        if change is None:
            return
        append_jsonl(self.run_dir / RESIZES_FILE, change)
        line = (f"worker group {change['old_world_size']} -> {change['new_world_size']} at step "
                f"{change['step']}{' after a preemption notice' if change['preempted'] else ''}: "
                f"{change['seconds_without_training']:.1f} s without training, "
                f"{change['steps_repeated']} steps repeated")
        if self.console is not None:
            self.console.log(line)
        log.info(line)
