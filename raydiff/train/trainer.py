"""Training on Ray Train V2: the engine and loop of `raydiff.train.loop` on every worker, DDP
through `prepare_model` (gloo on CPU, NCCL on GPU), data from the prepared Parquet shards
through `get_dataset_shard`, checkpoints through `ray.train.report` from rank 0.

    runs/<run_name>/            (train.output_dir, or ray.storage_path)
      config.yaml  metrics.jsonl  workers.json  balance.jsonl  tensorboard/
      step_00001000/            state.pt, config.yaml, tokenizer/ (as checkpoint.py writes)

Local batches may differ between workers (`raydiff.train.balance`); the workers read the train
split through `raydiff.train.ingest`; the driver shows and logs the reports through
`raydiff.train.monitor`.

Re-running the same run name resumes from the latest checkpoint (a new TorchTrainer with the
same RunConfig name and storage path).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from raydiff.config import Config, build_config
from raydiff.data.batches import chunk_batches
from raydiff.data.pipeline import prepare
from raydiff.data.prepared import open_prepared, read_split_blocks, training_datasets
from raydiff.data.tokenizer import load_tokenizer
from raydiff.errors import RaydiffError
from raydiff.runtime import start_ray
from raydiff.train.balance import BalancedBatches, PlacedBatch, Throttle, gather_rows
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
from raydiff.train.kinds import ENGINES
from raydiff.train.loop import LoopResult, train_loop
from raydiff.train.precision import group_precision, resolve_precision

# Tune trial drivers (which only build and fit a TorchTrainer) hold this custom resource rather
# than a CPU, so that on a small cluster the CPUs go to training workers (two trial drivers
# holding the only two CPUs deadlock: no worker can start).
# reported per worker (`<name>_rank<i>`) as well; tokens_per_s also summed, the rest averaged
PER_WORKER_METRICS = ("tokens_per_s", "local_batch")
log = logging.getLogger(__name__)
STOPPED_FILE = "stopped.json"  # why a run stopped before max_steps (NaN/inf loss)


# ----------------------------------------------------------------------------- on each worker


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
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if checkpoint_state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint_files(Path(tmp), checkpoint_state, self.cfg, self.tokenizer)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"step_{int(metrics['step']):08d}")


def _crash_when_due(batches: Iterator[PlacedBatch], engine, cfg: Config, rank: int,
                    run_dir: Path) -> Iterator[PlacedBatch]:
    """Test hook (`debug.crash_rank`, `debug.crash_at_step`): this worker's process dies
    before that step, once per run (a marker file remembers it across restarts)."""
    marker = run_dir / f".crashed_rank{rank}_step{cfg.debug.crash_at_step}"
    for placed in batches:
        if (rank == cfg.debug.crash_rank and engine.step + 1 == cfg.debug.crash_at_step
                and not marker.exists()):
            marker.touch()
            os._exit(1)
        yield placed


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


def worker_loop(config: dict) -> None:
    """The per-worker function TorchTrainer runs."""
    import ray.train
    import ray.train.torch

    from raydiff.train.ingest import RowStream

    cfg = build_config(config["cfg"], origin="ray worker")
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

    engine = ENGINES[config["kind"]](cfg, config["vocab_size"], device, precision,
                                     seed=cfg.train.seed, wrap_model=ray.train.torch.prepare_model)
    run_dir = Path(config["run_dir"])
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
        on_rebalance=_balance_log(run_dir) if rank == 0 else None)
    if cfg.debug.nan_rank == rank and cfg.debug.nan_at_step:
        _poison_when_due(engine, cfg.debug.nan_at_step)
    if cfg.debug.crash_at_step:
        train_batches = _crash_when_due(train_batches, engine, cfg, rank, run_dir)
    valid = read_split_blocks(config["data_path"], "valid", cfg.data)

    def valid_batches():
        return chunk_batches(valid, cfg.train.batch_size, cfg.train.eval_batches)

    record_placement(run_dir, rank, world_size, device)
    tokenizer = load_tokenizer(config["tokenizer_dir"])
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


def _poison_when_due(engine, step: int) -> None:
    """Test hook (`debug.nan_rank`, `debug.nan_at_step`): this worker's training forward pass
    returns NaN at that step, as a diverging run would."""
    def poison(module, args, output):
        if torch.is_grad_enabled() and engine.step + 1 == step:
            return output * float("nan")
        return output
    engine.model.register_forward_hook(poison)


def _balance_log(run_dir: Path):
    """Appends each speed measurement and the local batch sizes it gave to balance.jsonl."""
    def log(step: int, speeds: list[float], sizes: list[int]) -> None:
        with open(run_dir / "balance.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "samples_per_s": speeds, "local_batch": sizes})
                    + "\n")
    return log


# ----------------------------------------------------------------------------- on the driver


@dataclass
class RayRun:
    run_dir: Path
    result: LoopResult | None
    last_checkpoint: Path | None
    metrics: dict


def worker_resources(cfg: Config) -> dict[str, float]:
    """What one training worker holds (GPUs are added by Ray Train when ray.use_gpu)."""
    return {"CPU": cfg.ray.cpus_per_worker, **cfg.ray.worker_resources}


def check_resources(cfg: Config) -> None:
    """Fail at once, in one line, where Train would otherwise wait for resources forever."""
    import ray

    total = ray.cluster_resources()
    for name, amount in cfg.ray.worker_resources.items():
        if total.get(name, 0) < amount * cfg.ray.num_workers:
            raise RaydiffError(
                f"ray.worker_resources.{name}={amount:g} x ray.num_workers="
                f"{cfg.ray.num_workers} needs {amount * cfg.ray.num_workers:g}; the cluster "
                f"has {total.get(name, 0):g}")
    if cfg.ray.accelerator_type and not total.get(f"accelerator_type:{cfg.ray.accelerator_type}"):
        raise RaydiffError(f"ray.accelerator_type={cfg.ray.accelerator_type}: no node of the "
                         f"cluster has that GPU")
    need_cpu = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    if need_cpu > total.get("CPU", 0):
        raise RaydiffError(
            f"ray.num_workers={cfg.ray.num_workers} x ray.cpus_per_worker="
            f"{cfg.ray.cpus_per_worker} needs {need_cpu:g} CPUs; the cluster has "
            f"{total.get('CPU', 0):g}")
    if cfg.ray.use_gpu and cfg.ray.num_workers > total.get("GPU", 0):
        raise RaydiffError(f"ray.use_gpu=true with ray.num_workers={cfg.ray.num_workers}, but the "
                         f"cluster has {total.get('GPU', 0):g} GPUs")


def prepared_data(cfg: Config):
    """Prepare `cfg.data` if needed (cached by fingerprint); returns (path, manifest)."""
    prepared = prepare(cfg.data)  # a no-op when the prepared output exists
    location, manifest = open_prepared(prepared.path, cfg.data)
    if location.is_s3:
        raise RaydiffError("data.out_dir on s3:// is not supported by `raydiff train` yet; "
                         "prepare to a local or shared path")
    return prepared.path, manifest


def train_split(cfg: Config, data_path: str):
    """The prepared train split as a Ray Dataset, materialized in the object store when
    `ray.cache_train_split` says so."""
    import ray

    dataset = training_datasets(data_path, cfg.data, splits=("train",))["train"]
    cache = cfg.ray.cache_train_split
    if cache is None:
        _, manifest = open_prepared(data_path, cfg.data)
        # input_ids + attention_mask, int64 at most
        size = manifest["splits"]["train"]["segments"] * cfg.data.seq_len * 2 * 8
        cache = size <= ray.cluster_resources().get("object_store_memory", 0) / 4
    return dataset.materialize() if cache else dataset


def build_trainer(cfg: Config, data_path: str, vocab_size: int, run_dir: Path, *,
                  kind: str = "diffusion", callbacks=()):
    """A TorchTrainer of `kind` whose Ray Train run is `run_dir` (storage = its parent, name =
    its name: the same directory again resumes from its latest checkpoint)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raydiff.train.ingest import UnevenSplit

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    return TorchTrainer(
        worker_loop,
        train_loop_config={
            "cfg": cfg.to_dict(), "kind": kind, "vocab_size": vocab_size,
            "data_path": data_path, "tokenizer_dir": f"{data_path}/tokenizer",
            "run_dir": str(run_dir)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
            accelerator_type=cfg.ray.accelerator_type,
            resources_per_worker=worker_resources(cfg)),
        run_config=ray.train.RunConfig(
            name=run_dir.name, storage_path=str(run_dir.parent), callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep)),
        datasets={"train": train_split(cfg, data_path)},
        dataset_config=UnevenSplit(("train",)),
    )


def read_reports(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ray_run_directory(cfg: Config) -> Path:
    """Where a Ray Train run of `cfg` lives: <ray.storage_path or train.output_dir>/<run_name>."""
    storage = Path(cfg.ray.storage_path or cfg.train.output_dir).expanduser().resolve()
    return storage / cfg.train.run_name


def train_on_ray(cfg: Config, kind: str = "diffusion", console=None) -> RayRun:
    """Prepare the data if needed, then fit a TorchTrainer of `kind` (see
    `raydiff.train.kinds`), showing its progress on `console` (a rich Console) and logging it to
    TensorBoard; returns where things are."""
    from raydiff.train.monitor import RunMonitor

    start_ray(cfg.ray.address, connect_timeout_s=cfg.ray.connect_timeout_s)
    check_resources(cfg)
    data_path, manifest = prepared_data(cfg)
    run_dir = ray_run_directory(cfg)
    if run_dir.exists():  # damaged checkpoints named here; none intact: stop before the fit
        good_checkpoint(run_dir)
    (run_dir / STOPPED_FILE).unlink(missing_ok=True)
    with RunMonitor(run_dir, cfg.train.max_steps, console) as monitor:
        build_trainer(cfg, data_path, manifest["vocab_size"], run_dir, kind=kind,
                      callbacks=[monitor.callback()]).fit()
    stopped = run_dir / STOPPED_FILE
    if stopped.exists():
        raise NonFiniteLossError(json.loads(stopped.read_text())["reason"])
    reports = read_reports(run_dir)
    return RayRun(run_dir, None, latest_checkpoint(run_dir), reports[-1] if reports else {})
