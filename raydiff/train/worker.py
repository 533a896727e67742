"""What runs on each Ray Train worker: build the engine (DDP through `prepare_model`: gloo on
CPU, NCCL on GPU), resume from the run's newest good checkpoint, stream this worker's rows of
the train split (`raydiff.train.ingest`, batches balanced by `raydiff.train.balance`), and run
`raydiff.train.loop`, reporting through `ray.train.report` (checkpoints from rank 0).

Everything here is derived from the world size of this (re)start, so that a checkpoint written
by N workers resumes on M: `train.batch_size` is the global batch, re-split over the workers
present; timesteps and noise are drawn for the global batch from a generator every worker
shares (its state is in the checkpoint), as are the LR schedule, the EMA and the step count.
A SIGTERM to any worker stops the group at the next step with a checkpoint
(`raydiff.train.preemption`)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from raydiff.config import Config, build_config
from raydiff.data.batches import chunk_batches
from raydiff.data.prepared import read_split_blocks
from raydiff.data.tokenizer import load_tokenizer
from raydiff.files import append_jsonl, read_jsonl, write_atomic
from raydiff.train.balance import BalancedBatches, PlacedBatch, StopRequested, gather_rows
from raydiff.train.checkpoint import (
    CheckpointError,
    checkpoint_step,
    good_checkpoint,
    latest_checkpoint,
    load_state,
    verify_checkpoint,
    write_checkpoint_files,
)
from raydiff.train.engine import NonFiniteLossError
from raydiff.train.faults import (
    Throttle,
    crash_when_due,
    fixed_order_batches,
    hold_while_file_exists,
    paced,
    poison_when_due,
)
from raydiff.train.kinds import ENGINES
from raydiff.train.loop import train_loop
from raydiff.train.precision import group_precision, resolve_precision
from raydiff.train.preemption import PreemptedError, notice_received

# reported per worker (`<name>_rank<i>`) as well; tokens_per_s also summed, the rest averaged
PER_WORKER_METRICS = ("tokens_per_s", "local_batch")
STOPPED_FILE = "stopped.json"  # why a run stopped before max_steps (NaN/inf loss)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerArgs:
    """What the driver hands every worker (through TorchTrainer's train_loop_config)."""

    cfg: dict  # the resolved config tree (`Config.to_dict()`), rebuilt and checked on the worker
    kind: str  # a key of `raydiff.train.kinds.ENGINES`
    vocab_size: int
    data_path: str  # the prepared output: its splits and tokenizer/
    run_dir: str


def worker_loop(config: dict) -> None:
    """The per-worker function TorchTrainer runs; `config` is `{"args": WorkerArgs}`."""
    import ray.train
    import ray.train.torch

    from raydiff.train.ingest import RowStream

    args: WorkerArgs = config["args"]
    cfg = build_config(args.cfg, origin="ray worker")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    precision = resolve_precision(cfg.train.precision, device)
    if cfg.train.precision == "auto" and world_size > 1 and torch.distributed.is_initialized():
        choices: list = [None] * world_size  # e.g. A100 workers pick bf16, T4 workers fp16
        torch.distributed.all_gather_object(choices, precision)
        precision = group_precision(choices)
    if cfg.train.num_threads and device.type == "cpu":
        torch.set_num_threads(cfg.train.num_threads)

    engine = ENGINES[args.kind](cfg, args.vocab_size, device, precision, seed=cfg.train.seed,
                             wrap_model=ray.train.torch.prepare_model)
    run_dir = Path(args.run_dir)
    state = _resume_state(ray.train.get_checkpoint(), run_dir)
    if state is not None:
        engine.load_state_dict(state)

    if cfg.debug.slow_rank == rank and cfg.debug.slow_factor > 1:
        Throttle(engine.model, cfg.debug.slow_factor)
    if cfg.debug.fixed_data_order:
        train_batches = fixed_order_batches(
            read_split_blocks(args.data_path, "train", cfg.data), engine, cfg.train.batch_size,
            rank, world_size, cfg.train.seed, notice_received)
    else:
        # a shuffle of its own after every restart: a run preempted often must not see the
        # head of its epoch again each time
        stream = RowStream(ray.train.get_dataset_shard("train"),
                           seed=cfg.train.seed + 1000 * rank + 7919 * engine.step)
        train_batches = BalancedBatches(
            stream, engine, cfg.train.batch_size, rank, world_size,
            balance=cfg.ray.batch_balance, shares=cfg.ray.batch_shares,
            rebalance_every=cfg.ray.rebalance_every, probe_passes=cfg.ray.balance_probe_passes,
            on_rebalance=_balance_log(run_dir) if rank == 0 else None,
            measure=(lambda batch: cfg.debug.probe_speeds[rank]) if cfg.debug.probe_speeds
            else None, stop_requested=notice_received)
    if cfg.debug.nan_rank == rank and cfg.debug.nan_at_step:
        poison_when_due(engine, cfg.debug.nan_at_step)
    if cfg.debug.crash_at_step:
        train_batches = crash_when_due(train_batches, engine, cfg.debug, rank, run_dir)
    if cfg.debug.hold_file:
        train_batches = hold_while_file_exists(train_batches, Path(cfg.debug.hold_file))
    if cfg.debug.step_sleep_s:
        train_batches = paced(train_batches, cfg.debug.step_sleep_s)
    valid = read_split_blocks(args.data_path, "valid", cfg.data)

    def valid_batches():
        return chunk_batches(valid, cfg.train.batch_size, cfg.train.eval_batches)

    record_placement(run_dir, rank, world_size, device)
    tokenizer = load_tokenizer(f"{args.data_path}/tokenizer")
    reporter = RayReporter(cfg, run_dir, tokenizer, rank, world_size, resumed_from=engine.step)
    train_batches = reporter.started(train_batches)
    try:
        train_loop(engine, train_batches, valid_batches, cfg.train, reporter, is_chief=rank == 0)
    except StopRequested:
        raise PreemptedError(
            f"rank {rank}: a worker of the group got SIGTERM; step {engine.step} is "
            f"checkpointed and the group stops (Ray Train restarts it from there)") from None
    except NonFiniteLossError as error:
        # every rank raises at the same step (the guard reads all-reduced gradients); ending
        # normally rather than failing keeps FailureConfig from replaying the same NaN
        if rank == 0:
            (run_dir / STOPPED_FILE).write_text(json.dumps(
                {"step": engine.step, "reason": str(error)}))


def _resume_state(checkpoint, run_dir: Path) -> dict | None:
    """The state to resume from: the newest good checkpoint of the run, whether or not Ray
    Train's controller registered it. (The controller collects reports by polling; a worker
    that dies right after reporting a checkpoint leaves it written to storage but unregistered,
    and the restarted group would otherwise start from an older one, or from scratch.) A
    damaged one is passed over with a warning in the worker's log; the driver named it
    already (`train_on_ray`)."""
    on_disk = latest_checkpoint(run_dir)
    if checkpoint is not None and (
            on_disk is None or checkpoint_step(checkpoint.path) > checkpoint_step(on_disk)):
        with checkpoint.as_directory() as directory:
            try:
                verify_checkpoint(Path(directory))
                return load_state(Path(directory))
            except CheckpointError as e:
                log.warning("skipping damaged checkpoint %s", e)
    ckpt = good_checkpoint(run_dir, warn=log.warning)
    return load_state(ckpt) if ckpt is not None else None


class RayReporter:
    """Averages each report over the workers, appends it to metrics.jsonl (rank 0) and hands
    it to `ray.train.report`, with the checkpoint when the chief has one. Every report also
    says which worker group made it: `world_size`, the step it resumed from and the wall time
    its first step started (`group_started_at`: when its first batch was in hand, so that the
    data stream's start-up counts as time without training), and the wall time of the report
    (`time`). Rank 0's also says what the group before it left in metrics.jsonl
    (`steps_repeated`: its last logged step past `resumed_from`; `idle_s`: from that row to
    this group's start; `after_preemption`: whether that row was a preemption notice's). The
    driver logs each change of group from these (`raydiff.train.monitor`)."""

    def __init__(self, cfg: Config, run_dir: Path, tokenizer, rank: int, world_size: int,
                 resumed_from: int = 0):
        self.cfg, self.run_dir, self.tokenizer = cfg, run_dir, tokenizer
        self.rank, self.world_size = rank, world_size
        self.group: dict[str, float] = {"world_size": world_size, "resumed_from": resumed_from}
        logged = read_jsonl(run_dir / "metrics.jsonl") if rank == 0 else []
        self._before = logged[-1] if logged and "time" in logged[-1] else None

    def started(self, batches: Iterator[PlacedBatch]) -> Iterator[PlacedBatch]:
        """`batches`, noting when the first one is in hand: this group's start."""
        for placed in batches:
            if "group_started_at" not in self.group:
                self.group["group_started_at"] = now = time.time()
                if self._before is not None:
                    self.group |= {
                        "steps_repeated": max(0, int(self._before["step"])
                                              - int(self.group["resumed_from"])),
                        "idle_s": now - self._before["time"],
                        "after_preemption": float(bool(self._before.get("preempted")))}
            yield placed

    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        """Averages over the workers (tokens/s summed), plus each worker's own tokens/s and
        local batch. Every rank reports equally often, so these collectives always match."""
        step = metrics["step"]
        keys = sorted(k for k in metrics if k != "step")
        shared = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        if self.world_size > 1:
            torch.distributed.all_reduce(shared)
            shared /= self.world_size
        per_worker = gather_rows([metrics.get(k, 0.0) for k in PER_WORKER_METRICS], self.rank,
                                 self.world_size)
        out = dict(zip(keys, shared.tolist(), strict=True)) | {"step": step}
        out["tokens_per_s"] = per_worker[:, 0].sum().item()
        out.pop("local_batch", None)
        for rank, row in enumerate(per_worker.tolist()):
            out |= {f"{name}_rank{rank}": value
                    for name, value in zip(PER_WORKER_METRICS, row, strict=True)}
        return out | self.group | {"time": time.time()}

    def report(self, metrics: dict[str, float], checkpoint_state: dict | None) -> None:
        import ray.train

        if self.rank == 0:
            append_jsonl(self.run_dir / "metrics.jsonl", metrics)
        if checkpoint_state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint_files(Path(tmp), checkpoint_state, self.cfg, self.tokenizer)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"step_{int(metrics['step']):08d}")


def record_placement(run_dir: Path, rank: int, world_size: int, device: torch.device) -> None:
    """Rank 0 writes where every worker runs (node, host, device) to workers.json."""
    import socket

    import ray

    mine = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(), "pid": os.getpid(), "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else "cpu")}
    everyone = [mine]
    if world_size > 1 and torch.distributed.is_initialized():
        everyone = [None] * world_size
        torch.distributed.all_gather_object(everyone, mine)
    if rank == 0:
        write_atomic(run_dir / "workers.json", json.dumps(everyone, indent=2))


def _balance_log(run_dir: Path):
    """Appends each speed measurement and the local batch sizes it gave to balance.jsonl."""
    def log(step: int, speeds: list[float], sizes: list[int]) -> None:
        append_jsonl(run_dir / "balance.jsonl",
                     {"step": step, "samples_per_s": speeds, "local_batch": sizes})
    return log
