"""What runs on each Ray Train worker: build the engine (DDP through `prepare_model`: gloo on
CPU, NCCL on GPU), resume from the run's newest good checkpoint, stream this worker's rows of
the train split (`raydiff.train.ingest`, batches balanced by `raydiff.train.balance`), and run
`raydiff.train.loop`, reporting through `ray.train.report` (checkpoints from rank 0)."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from raydiff.config import Config, build_config
from raydiff.data.batches import chunk_batches
from raydiff.data.prepared import read_split_blocks
from raydiff.data.tokenizer import load_tokenizer
from raydiff.files import append_jsonl
from raydiff.train.balance import BalancedBatches, gather_rows
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
from raydiff.train.faults import Throttle, crash_when_due, hold_while_file_exists, poison_when_due
from raydiff.train.kinds import ENGINES
from raydiff.train.loop import train_loop
from raydiff.train.precision import group_precision, resolve_precision

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
    stream = RowStream(ray.train.get_dataset_shard("train"), seed=cfg.train.seed + 1000 * rank)
    train_batches = BalancedBatches(
        stream, engine, cfg.train.batch_size, rank, world_size, balance=cfg.ray.batch_balance,
        shares=cfg.ray.batch_shares, rebalance_every=cfg.ray.rebalance_every,
        probe_passes=cfg.ray.balance_probe_passes,
        on_rebalance=_balance_log(run_dir) if rank == 0 else None,
        measure=(lambda batch: cfg.debug.probe_speeds[rank]) if cfg.debug.probe_speeds else None)
    if cfg.debug.nan_rank == rank and cfg.debug.nan_at_step:
        poison_when_due(engine, cfg.debug.nan_at_step)
    if cfg.debug.crash_at_step:
        train_batches = crash_when_due(train_batches, engine, cfg.debug, rank, run_dir)
    if cfg.debug.hold_file:
        train_batches = hold_while_file_exists(train_batches, Path(cfg.debug.hold_file))
    valid = read_split_blocks(args.data_path, "valid", cfg.data)

    def valid_batches():
        return chunk_batches(valid, cfg.train.batch_size, cfg.train.eval_batches)

    record_placement(run_dir, rank, world_size, device)
    tokenizer = load_tokenizer(f"{args.data_path}/tokenizer")
    reporter = RayReporter(cfg, run_dir, tokenizer, rank, world_size)
    try:
        train_loop(engine, train_batches, valid_batches, cfg.train, reporter, is_chief=rank == 0)
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
    it to `ray.train.report`, with the checkpoint when the chief has one."""

    def __init__(self, cfg: Config, run_dir: Path, tokenizer, rank: int, world_size: int):
        self.cfg, self.run_dir, self.tokenizer = cfg, run_dir, tokenizer
        self.rank, self.world_size = rank, world_size

    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        """Averages over the workers (tokens/s summed), plus each worker's own tokens/s and
        local batch. Every rank reports equally often, so these collectives always match."""
        step = metrics["step"]
        keys = sorted(k for k in metrics if k != "step")
        shared = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        if self.world_size > 1:
            torch.distributed.all_reduce(shared)
            shared /= self.world_size
        per_worker = gather_rows([metrics[k] for k in PER_WORKER_METRICS], self.rank,
                                 self.world_size)
        out = dict(zip(keys, shared.tolist(), strict=True)) | {"step": step}
        out["tokens_per_s"] = per_worker[:, 0].sum().item()
        del out["local_batch"]
        for rank, row in enumerate(per_worker.tolist()):
            out |= {f"{name}_rank{rank}": value
                    for name, value in zip(PER_WORKER_METRICS, row, strict=True)}
        return out

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
            "host": socket.gethostname(), "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else "cpu")}
    everyone = [mine]
    if world_size > 1 and torch.distributed.is_initialized():
        everyone = [None] * world_size
        torch.distributed.all_gather_object(everyone, mine)
    if rank == 0:
        (run_dir / "workers.json").write_text(json.dumps(everyone, indent=2))


def _balance_log(run_dir: Path):
    """Appends each speed measurement and the local batch sizes it gave to balance.jsonl."""
    def log(step: int, speeds: list[float], sizes: list[int]) -> None:
        append_jsonl(run_dir / "balance.jsonl",
                     {"step": step, "samples_per_s": speeds, "local_batch": sizes})
    return log
