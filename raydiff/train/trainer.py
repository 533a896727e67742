"""Training on Ray Train V2, the driver's side: check that the workers fit, prepare the data,
build the TorchTrainer whose workers run `raydiff.train.worker`, fit it and show its progress.

    runs/<run_name>/            (train.output_dir, or ray.storage_path)
      config.yaml  metrics.jsonl  workers.json  balance.jsonl  tensorboard/
      step_00001000/            state.pt, config.yaml, tokenizer/ (as checkpoint.py writes)

Local batches may differ between workers (`raydiff.train.balance`); the workers read the train
split through `raydiff.train.ingest`; the driver shows and logs the reports through
`raydiff.train.monitor`.

Re-running the same run name resumes from the newest good checkpoint (a new TorchTrainer with
the same RunConfig name and storage path).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from raydiff.config import Config
from raydiff.data.pipeline import prepare
from raydiff.data.prepared import open_prepared, training_datasets
from raydiff.errors import RaydiffError
from raydiff.files import read_jsonl
from raydiff.runtime import start_ray
from raydiff.train.checkpoint import good_checkpoint, latest_checkpoint
from raydiff.train.engine import NonFiniteLossError
from raydiff.train.preemption import preemptible_torch_config
from raydiff.train.worker import STOPPED_FILE, WorkerArgs, worker_loop


@dataclass
class RayRun:
    run_dir: Path
    last_checkpoint: Path | None
    metrics: dict  # the last report


def worker_resources(cfg: Config) -> dict[str, float]:
    """What one training worker holds (GPUs are added by Ray Train when ray.use_gpu)."""
    return {"CPU": cfg.ray.cpus_per_worker, **cfg.ray.worker_resources}


def check_resources(cfg: Config) -> None:
    """Fail at once, in one line, where Train would otherwise wait for resources forever: the
    workers (an elastic group's min workers) must fit the cluster."""
    import ray

    total = ray.cluster_resources()
    count = cfg.ray.min_workers
    prefix, workers = "", f"ray.num_workers={count}"
    if cfg.ray.elastic:
        prefix = f"ray.num_workers={cfg.ray.num_workers}: min workers do not fit the cluster: "
        workers = str(count)
    for name, amount in cfg.ray.worker_resources.items():
        if total.get(name, 0) < amount * count:
            raise RaydiffError(
                f"{prefix}ray.worker_resources.{name}={amount:g} x {workers} needs "
                f"{amount * count:g}; the cluster has {total.get(name, 0):g}")
    if cfg.ray.accelerator_type and not total.get(f"accelerator_type:{cfg.ray.accelerator_type}"):
        raise RaydiffError(f"ray.accelerator_type={cfg.ray.accelerator_type}: no node of the "
                           f"cluster has that GPU")
    need_cpu = count * cfg.ray.cpus_per_worker
    if need_cpu > total.get("CPU", 0):
        raise RaydiffError(
            f"{prefix}{workers} x ray.cpus_per_worker={cfg.ray.cpus_per_worker} needs "
            f"{need_cpu:g} CPUs; the cluster has {total.get('CPU', 0):g}")
    if cfg.ray.use_gpu and count > total.get("GPU", 0):
        raise RaydiffError(f"{prefix}ray.use_gpu=true with {workers} workers, but the cluster "
                           f"has {total.get('GPU', 0):g} GPUs")


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
        train_loop_config={"args": WorkerArgs(cfg.to_dict(), kind, vocab_size, data_path,
                                              str(run_dir))},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.scaling_workers, use_gpu=cfg.ray.use_gpu,
            accelerator_type=cfg.ray.accelerator_type,
            resources_per_worker=worker_resources(cfg),
            elastic_resize_monitor_interval_s=cfg.ray.elastic_resize_interval_s),
        torch_config=preemptible_torch_config(),
        run_config=ray.train.RunConfig(
            name=run_dir.name, storage_path=str(run_dir.parent), callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep)),
        datasets={"train": train_split(cfg, data_path)},
        dataset_config=UnevenSplit(("train",)),
    )


def read_reports(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


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
    return RayRun(run_dir, latest_checkpoint(run_dir), reports[-1] if reports else {})
