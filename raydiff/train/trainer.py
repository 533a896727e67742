"""Training on Ray Train V2: the engine and loop of `raydiff.train.loop` on every worker, DDP
through `prepare_model` (gloo on CPU, NCCL on GPU), data from the prepared Parquet shards
through `get_dataset_shard`, checkpoints through `ray.train.report` from rank 0.

    runs/<run_name>/            (train.output_dir, or ray.storage_path)
      config.yaml  metrics.jsonl
      step_00001000/            state.pt, config.yaml, tokenizer/ (as checkpoint.py writes)

Re-running the same run name resumes from the latest checkpoint (a new TorchTrainer with the
same RunConfig name and storage path).
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from raydiff.config import Config, build_config
from raydiff.data.corpus import chunk_batches
from raydiff.data.pipeline import open_prepared, prepare, read_split_blocks, training_datasets
from raydiff.data.tokenizer import load_tokenizer
from raydiff.train.checkpoint import STATE_FILE, latest_checkpoint, write_checkpoint_files
from raydiff.train.kinds import ENGINES
from raydiff.train.loop import LoopResult, train_loop
from raydiff.train.precision import group_precision, resolve_precision

SUMMED_METRICS = ("tokens_per_s",)
# A Tune trial's driver (which only builds and fits a TorchTrainer) holds this custom resource
# rather than a CPU, so that on a small cluster the CPUs go to training workers (two trial
# drivers holding the only two CPUs deadlock: no worker can start).
TRIAL_DRIVER_RESOURCE = "raydiff_trial_driver"  # the rest are averaged over workers


# ----------------------------------------------------------------------------- on each worker


class RayReporter:
    """Averages each report over the workers, appends it to metrics.jsonl (rank 0) and hands
    it to `ray.train.report`, with the checkpoint when the chief has one."""

    def __init__(self, cfg: Config, run_dir: Path, tokenizer, rank: int, world_size: int):
        self.cfg, self.run_dir, self.tokenizer = cfg, run_dir, tokenizer
        self.rank, self.world_size = rank, world_size

    def _all_reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(values)  # gloo/NCCL: every rank reports equally often
        return {k: v if k in SUMMED_METRICS or k == "step" else v / self.world_size
                for k, v in zip(keys, values.tolist(), strict=True)} | {"step": metrics["step"]}

    def report(self, metrics: dict[str, float], checkpoint_state: dict | None) -> None:
        import ray.train

        metrics = self._all_reduce(metrics)
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


def _epochs(shard, batch_size: int) -> Iterator[dict]:
    """This worker's batches, epoch after epoch; the partial batch at an epoch's end is dropped
    so that every worker takes the same number of steps. (A resumed run starts a fresh epoch.)"""
    for epoch in itertools.count():
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                              local_shuffle_buffer_size=4 * batch_size,
                                              local_shuffle_seed=epoch):
            yield {"input_ids": batch["input_ids"].long(),
                   "attention_mask": batch["attention_mask"]}


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
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            engine.load_state_dict(torch.load(Path(directory) / STATE_FILE, weights_only=False,
                                              map_location="cpu"))

    local_batch = cfg.train.batch_size // world_size
    train_batches = _epochs(ray.train.get_dataset_shard("train"), local_batch)
    valid = read_split_blocks(config["data_path"], "valid", cfg.data)

    def valid_batches():
        return chunk_batches(valid, cfg.train.batch_size, cfg.train.eval_batches)

    record_placement(Path(config["run_dir"]), rank, world_size, device)
    tokenizer = load_tokenizer(config["tokenizer_dir"])
    reporter = RayReporter(cfg, Path(config["run_dir"]), tokenizer, rank, world_size)
    train_loop(engine, train_batches, valid_batches, cfg.train, reporter, is_chief=rank == 0,
               global_batch=local_batch * world_size, offset=rank * local_batch)


# ----------------------------------------------------------------------------- on the driver


@dataclass
class RayRun:
    run_dir: Path
    result: LoopResult | None
    last_checkpoint: Path | None
    metrics: dict


def start_ray(address: str | None) -> None:
    """Join `address` (or RAY_ADDRESS); without either, start a local Ray sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    # a local Ray advertises the resource Tune trial drivers hold instead of a CPU; cluster
    # nodes advertise it through their YAML (cluster/)
    resources = {TRIAL_DRIVER_RESOURCE: 1000} if address == "local" else None
    # the dashboard serves the State API, which Ray Train's PlacementGroupCleaner polls: without
    # it the workers' CPUs of a trial that Tune stopped are never released
    ray.init(address=address, include_dashboard=True, log_to_driver=False, resources=resources,
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})


def worker_resources(cfg: Config) -> dict[str, float]:
    """What one training worker holds (GPUs are added by Ray Train when ray.use_gpu)."""
    return {"CPU": cfg.ray.cpus_per_worker, **cfg.ray.worker_resources}


def check_resources(cfg: Config) -> None:
    """Fail at once, in one line, where Train would otherwise wait for resources forever."""
    import ray

    total = ray.cluster_resources()
    for name, amount in cfg.ray.worker_resources.items():
        if total.get(name, 0) < amount * cfg.ray.num_workers:
            raise ValueError(
                f"ray.worker_resources.{name}={amount:g} x ray.num_workers="
                f"{cfg.ray.num_workers} needs {amount * cfg.ray.num_workers:g}; the cluster "
                f"has {total.get(name, 0):g}")
    if cfg.ray.accelerator_type and not total.get(f"accelerator_type:{cfg.ray.accelerator_type}"):
        raise ValueError(f"ray.accelerator_type={cfg.ray.accelerator_type}: no node of the "
                         f"cluster has that GPU")
    need_cpu = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    if need_cpu > total.get("CPU", 0):
        raise ValueError(
            f"ray.num_workers={cfg.ray.num_workers} x ray.cpus_per_worker="
            f"{cfg.ray.cpus_per_worker} needs {need_cpu:g} CPUs; the cluster has "
            f"{total.get('CPU', 0):g}")
    if cfg.ray.use_gpu and cfg.ray.num_workers > total.get("GPU", 0):
        raise ValueError(f"ray.use_gpu=true with ray.num_workers={cfg.ray.num_workers}, but the "
                         f"cluster has {total.get('GPU', 0):g} GPUs")


def prepared_data(cfg: Config):
    """Prepare `cfg.data` if needed (cached by fingerprint); returns (path, manifest)."""
    prepared = prepare(cfg.data)  # a no-op when the prepared output exists
    location, manifest = open_prepared(prepared.path, cfg.data)
    if location.is_s3:
        raise ValueError("data.out_dir on s3:// is not supported by `raydiff train` yet; "
                         "prepare to a local or shared path")
    return prepared.path, manifest


def build_trainer(cfg: Config, data_path: str, vocab_size: int, run_dir: Path, *,
                  kind: str = "diffusion", callbacks=()):
    """A TorchTrainer of `kind` whose Ray Train run is `run_dir` (storage = its parent, name =
    its name: the same directory again resumes from its latest checkpoint)."""
    import ray.train
    from ray.train.torch import TorchTrainer

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
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.ray.checkpoints_to_keep)),
        datasets={"train": training_datasets(data_path, cfg.data, splits=("train",))["train"]},
    )


def read_reports(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_on_ray(cfg: Config, kind: str = "diffusion") -> RayRun:
    """Prepare the data if needed, then fit a TorchTrainer of `kind` (see
    `raydiff.train.kinds`); returns where things are."""
    start_ray(cfg.ray.address)
    check_resources(cfg)
    data_path, manifest = prepared_data(cfg)
    storage = Path(cfg.ray.storage_path or cfg.train.output_dir).expanduser().resolve()
    run_dir = storage / cfg.train.run_name
    build_trainer(cfg, data_path, manifest["vocab_size"], run_dir, kind=kind).fit()
    reports = read_reports(run_dir)
    return RayRun(run_dir, None, latest_checkpoint(run_dir), reports[-1] if reports else {})
