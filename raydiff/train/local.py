"""Training in this one process (no Ray): the prepared data (the same `prepare` output a Ray run
reads, made in process when missing: `raydiff.data.local`) in memory, metrics and checkpoints
under `train.output_dir/train.run_name`. Re-running the same run name resumes from its newest
good checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from raydiff.config import Config
from raydiff.console import progress_bar
from raydiff.data.batches import chunk_batches, iterate_batches
from raydiff.data.local import prepare_local
from raydiff.data.prepared import prepared_tokenizer, read_split_blocks
from raydiff.errors import RaydiffError
from raydiff.files import append_jsonl
from raydiff.train.balance import PlacedBatch
from raydiff.train.checkpoint import (
    good_checkpoint,
    latest_checkpoint,
    load_state,
    save_checkpoint,
)
from raydiff.train.kinds import ENGINES
from raydiff.train.loop import LoopResult, train_loop
from raydiff.train.precision import resolve_precision


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RaydiffError("train.device=cuda but no CUDA device is visible")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class RunDirectoryReporter:
    """Appends each report to `metrics.jsonl`, writes checkpoints, drives a progress bar."""

    def __init__(self, run_dir: Path, cfg: Config, tokenizer, progress: Progress | None = None,
                 task=None):
        self.run_dir, self.cfg, self.tokenizer = run_dir, cfg, tokenizer
        self.progress, self.task = progress, task
        self.last_checkpoint: Path | None = latest_checkpoint(run_dir)

    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        return metrics  # one process: nothing to agree on

    def report(self, metrics: dict[str, float], checkpoint_state: dict | None) -> None:
        if checkpoint_state is not None:
            self.last_checkpoint = save_checkpoint(
                self.run_dir / "checkpoints", int(metrics["step"]), checkpoint_state, self.cfg,
                self.tokenizer, keep=self.cfg.train.checkpoints_to_keep)
        append_jsonl(self.run_dir / "metrics.jsonl", metrics)
        if self.progress is not None:
            shown = [f"{k} {metrics[k]:.4f}" for k in ("loss", "mse", "val_loss", "val_mse")
                     if k in metrics]
            self.progress.update(
                self.task, completed=metrics["step"],
                info=" ".join(shown) + f" {metrics['tokens_per_s']:.0f} tok/s")


@dataclass
class LocalRun:
    run_dir: Path
    result: LoopResult
    last_checkpoint: Path | None
    precision: str


def run_directory(cfg: Config) -> Path:
    return Path(cfg.train.output_dir).resolve() / cfg.train.run_name


def train_local(cfg: Config, console: Console | None = None, kind: str = "diffusion") -> LocalRun:
    """Train `cfg` in this process; `console=None` shows no progress. `kind` picks the model
    (see `raydiff.train.kinds`)."""
    device = pick_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    run_dir = run_directory(cfg)
    # the newest good checkpoint (each damaged newer one named in a warning); a run whose
    # checkpoints are all damaged stops here, before anything is written over them
    resume_from = good_checkpoint(run_dir) if run_dir.exists() else None
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")

    prepared = prepare_local(cfg.data)  # a no-op when the prepared output exists
    tokenizer = prepared_tokenizer(prepared.location)
    splits = {s: read_split_blocks(prepared.path, s, cfg.data) for s in ("train", "valid")}
    engine = ENGINES[kind](cfg, vocab_size=len(tokenizer), device=device,
                           precision=precision, seed=cfg.train.seed)
    if resume_from is not None:
        engine.load_state_dict(load_state(resume_from))

    # the data order is a pure function of (seed, step): skip what the resumed run consumed
    train_batches = map(PlacedBatch, iterate_batches(
        splits["train"], cfg.train.batch_size, seed=cfg.train.seed, start=engine.step))
    valid = splits["valid"] if len(splits["valid"]["input_ids"]) else splits["train"]

    def valid_batches():
        return chunk_batches(valid, cfg.train.batch_size, cfg.train.eval_batches)

    progress = None
    if console is not None:
        progress = progress_bar(console, training=True)
    task = progress.add_task("train", total=cfg.train.max_steps, completed=engine.step,
                             info="") if progress else None
    reporter = RunDirectoryReporter(run_dir, cfg, tokenizer, progress, task)
    if progress:
        progress.start()
    try:
        result = train_loop(engine, train_batches, valid_batches, cfg.train, reporter)
    finally:
        if progress:
            progress.stop()
    return LocalRun(run_dir, result, reporter.last_checkpoint, precision)
