"""What the driver shows and records while a Ray Train run goes: every report, live, as a rich
progress bar and as TensorBoard scalars (`<run_dir>/tensorboard`, through tensorboardX, which
Ray Tune's own logger uses as well).

Reports reach the driver through Ray, wherever the workers run: a Train `UserCallback` in the
Train controller forwards each one into a `ray.util.queue.Queue`, which a thread here drains.
"""

from __future__ import annotations

import queue as stdlib_queue
import threading
from pathlib import Path

import ray.train
from ray.util.queue import Empty, Queue
from rich.console import Console

from raydiff.console import progress_bar

SHOWN = ("loss", "mse", "val_loss", "val_mse", "val_token_accuracy")


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

    def callback(self) -> ForwardReports:
        return ForwardReports(self._reports)

    def __enter__(self) -> RunMonitor:
        from tensorboardX import SummaryWriter

        self._reports = Queue(actor_options={"num_cpus": 0})
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
        for name, value in metrics.items():
            if name != "step" and isinstance(value, int | float):
                self._writer.add_scalar(name, value, step)
        self._writer.flush()
        if self._progress is not None:
            shown = " ".join(f"{k} {metrics[k]:.4f}" for k in SHOWN if k in metrics)
            self._progress.update(self._task, completed=step,
                                  info=f"{shown} {metrics.get('tokens_per_s', 0):.0f} tok/s")
