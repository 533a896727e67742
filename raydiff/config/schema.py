"""The typed config tree: one dataclass per component's section, each field with its type, its
default and (through `_field`) its numeric bounds, which `raydiff.config.load` enforces."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from raydiff.diffusion.betas import SCHEDULE_NAMES
from raydiff.errors import RaydiffError

LossName = Literal["none", "rounding", "anchor"]  # the CE term of docs/design.md §4


class ConfigError(RaydiffError):
    """A bad config file, key or value; the message is one line and names the key."""


def _field(default: Any, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None) -> Any:
    """A dataclass field with numeric bounds that `_check_bounds` enforces."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le)) if v is not None}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=bounds)
    return field(default=default, metadata=bounds)


@dataclass
class ModelConfig:
    """The denoiser (docs/design.md §3): a BERT encoder built from this config, never pretrained."""

    embed_dim: int = _field(128, ge=1)  # d: width of the diffusion (embedding) space
    hidden_size: int = _field(768, ge=1)  # H: transformer width
    num_layers: int = _field(12, ge=1)
    num_heads: int = _field(12, ge=1)
    intermediate_size: int = _field(3072, ge=1)
    dropout: float = _field(0.1, ge=0.0, le=1.0)
    time_embed_dim: int = _field(128, ge=2)
    # Difformer's embedding LayerNorm: on E[w] (before_proj), on up(z_t)+pos+time (after_proj).
    embed_norm: Literal["none", "before_proj", "after_proj"] = "after_proj"
    embed_norm_affine: bool = True
    # std of the N(0, s^2) init of the embedding table; 1.0 is nn.Embedding's (and the
    # reference code bases') default. It decides whether the rounding CE is ever non-zero.
    embed_init_std: float = _field(1.0, gt=0.0)


@dataclass
class DiffusionConfig:
    """The diffusion process, loss and sampler defaults (docs/design.md §1, §2, §4, §5)."""

    schedule: Literal[SCHEDULE_NAMES] = "pw_lin"
    num_steps: int = _field(2000, ge=2)  # T
    noise_factor: float = _field(1.0, gt=0.0)  # Difformer's F
    perturb_z0: bool = True  # z0 = E[w] + sqrt(b_0) eps0 (Diffusion-LM)
    loss: LossName = "anchor"  # none: mse + tT only, the collapse study's positive control
    timestep_sampling: Literal["uniform", "loss_second_moment"] = "uniform"
    self_condition: bool = False
    sampler: Literal["ddpm", "ddim"] = "ddim"
    sample_steps: int = _field(200, ge=1)  # ddim sub-sequence length, capped at num_steps
    eta: float = _field(0.0, ge=0.0, le=1.0)
    clamp: bool = True  # replace x0hat by its nearest embedding row while sampling
    # ... only at the steps whose t is below this fraction of T (1: every step, Diffusion-LM's
    # clamping trick; smaller leaves the high-noise steps unclamped: docs/design.md §5)
    clamp_below: float = _field(1.0, gt=0.0, le=1.0)


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes fixed-length token blocks."""

    # "synthetic" (a generated toy news corpus), a local file/dir/glob, an s3:// URI, or a
    # Hugging Face hub dataset id (cc_news, ucirvine/reuters21578, ...)
    source: str = "synthetic"
    out_dir: str = "data_cache"  # local path or s3:// URI
    text_column: str = "text"
    title_column: str | None = None  # prepended to the text when set
    id_column: str = "id"  # article id (split assignment); line position when absent
    hub_config: str | None = None  # e.g. ModApte for ucirvine/reuters21578
    hub_split: str = "train"
    hub_data_files: str | None = None  # for hub builders such as "json" or "parquet"
    seq_len: int = _field(32, ge=2)
    vocab_size: int = _field(10000, ge=8)
    lowercase: bool = True
    remove_tickers: bool = True  # Reuters company tags such as <IBM>
    boilerplate_patterns: list = _field([])  # extra regexes removed from every article
    min_words: int = _field(3, ge=1)
    max_words: int = _field(256, ge=1)
    pack: bool = False  # pack consecutive segments of an article into full blocks
    valid_fraction: float = _field(0.05, ge=0.0, le=0.5)
    test_fraction: float = _field(0.05, ge=0.0, le=0.5)
    max_articles: int | None = _field(None, ge=1)
    synthetic_size: int = _field(2000, ge=10)  # articles of the "synthetic" source
    shard_rows: int = _field(50_000, ge=1)  # rows per Parquet shard, at most
    strict: bool = False  # any damaged file or skipped line fails `prepare` (else counted)
    seed: int = 0
    # S3: endpoint/region/credentials; unset credentials come from the standard AWS variables
    s3_endpoint: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None


SECRET_KEYS = ("data.s3_access_key_id", "data.s3_secret_access_key")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then linear annealing to zero, clipping and an EMA."""

    lr: float = _field(1e-4, gt=0.0)
    weight_decay: float = _field(0.0008, ge=0.0)
    beta1: float = _field(0.9, ge=0.0, le=1.0)
    beta2: float = _field(0.999, ge=0.0, le=1.0)
    eps: float = _field(1e-8, gt=0.0)
    warmup_steps: int = _field(0, ge=0)
    anneal_steps: int = _field(25000, ge=1)  # LR reaches 0 here
    grad_clip: float = _field(1.0, ge=0.0)  # 0 disables clipping
    ema_decay: float = _field(0.9999, ge=0.0, le=1.0)


@dataclass
class TrainConfig:
    """The training loop: steps, evaluation, checkpoints, precision, where runs live."""

    batch_size: int = _field(64, ge=1)  # global batch
    max_steps: int = _field(25000, ge=1)
    log_every: int = _field(50, ge=1)
    eval_every: int = _field(500, ge=1)
    eval_batches: int = _field(8, ge=1)
    eval_ema: bool = True  # validate with the EMA weights
    checkpoint_every: int = _field(1000, ge=1)
    checkpoints_to_keep: int = _field(3, ge=1)  # the newest ones, on both paths
    patience: int = _field(0, ge=0)  # evaluations without improvement before stopping; 0 = off
    # stop at the first report after this many seconds of training in this process, with a
    # checkpoint (a fixed time budget: benchmarks, the GPU study); 0 = off
    time_limit_s: float = _field(0.0, ge=0.0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = _field(None, ge=1)  # torch intra-op threads on CPU
    # torch.compile the training objective (forward process, denoiser, loss terms): "off", or a
    # torch.compile mode ("default"; "reduce-overhead" adds CUDA graphs on GPUs). Pays back its
    # compile time on long runs only
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    seed: int = 0
    output_dir: str = "runs"
    run_name: str = "default"


@dataclass
class RayConfig:
    """Where training runs: the embedded local Ray or a cluster."""

    address: str | None = None  # None: RAY_ADDRESS, else a local Ray sized to this machine
    connect_timeout_s: float = _field(20.0, gt=0.0)  # how long an address may take to answer
    # a fixed size, or [min, max]: an elastic group that starts with what the cluster has (at
    # least min), shrinks when workers are lost and grows back when resources return
    num_workers: int | list = 1
    elastic_resize_interval_s: float = _field(60.0, gt=0.0)  # how often Ray considers growing
    use_gpu: bool = False
    cpus_per_worker: float = _field(1.0, gt=0.0)
    # GPU model the workers need (Ray's accelerator_type:<T>, e.g. A100, A10G, T4); use_gpu only
    accelerator_type: str | None = None
    # custom resources each worker holds, e.g. {"raydiff_slot": 1}; node types advertise them
    worker_resources: dict = _field({})
    storage_path: str | None = None  # where runs and checkpoints go; default train.output_dir
    # worker-group restarts from the latest checkpoint (lost workers, preemption notices);
    # -1: unlimited (preemptible clusters)
    max_failures: int = _field(0, ge=-1)
    # How train.batch_size is split over the workers: "equal", or "throughput" (each worker's
    # share follows its measured samples/s: mixed GPU types). Fixed `batch_shares` (one
    # positive number per worker, e.g. [3, 1]) override both.
    batch_balance: Literal["equal", "throughput"] = "equal"
    batch_shares: list = _field([])
    rebalance_every: int = _field(500, ge=0)  # steps between speed measurements; 0 = once
    # Keep the train split in Ray's object store, read once, rather than re-reading the Parquet
    # shards every epoch (a second or more per epoch on small machines); null (auto): when it
    # takes at most a quarter of the cluster's object store
    cache_train_split: bool | None = None
    balance_probe_passes: int = _field(3, ge=1)  # timed forward/backward passes per measurement

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[-1] if self.elastic else self.num_workers

    @property
    def scaling_workers(self) -> int | tuple[int, int]:
        """What Ray Train's ScalingConfig(num_workers=...) takes."""
        return (self.min_workers, self.max_workers) if self.elastic else self.num_workers


@dataclass
class DebugConfig:
    """Fault and slowness injection for tests and benchmarks; leave alone for real training."""

    crash_rank: int = -1  # this worker's process dies ...
    crash_at_step: int = _field(0, ge=0)  # ... when it reaches this step (once per run; 0 = off)
    slow_rank: int = -1  # this worker computes `slow_factor` times slower (train.faults.Throttle)
    slow_factor: float = _field(1.0, ge=1.0)
    nan_rank: int = -1  # this worker's training loss turns NaN ...
    nan_at_step: int = _field(0, ge=0)  # ... at this step (0 = off)
    hold_file: str = ""  # Ray workers wait before each step while this file exists
    probe_speeds: list[float] = field(default_factory=list)  # samples/s per rank reported by
    # ray.batch_balance=throughput instead of measuring them (tests: a decision without clocks)
    step_sleep_s: float = _field(0.0, ge=0.0)  # Ray workers sleep this long after each step
    # Ray workers read the train split in one order fixed by (train.seed, step), whatever the
    # world size (equal local batches): a resize or resume then changes no batch (tests)
    fixed_data_order: bool = False


@dataclass
class ReferenceConfig:
    """The reference autoregressive LM that scores generated text (GPT-2 architecture from
    `transformers`, trained from scratch on the same data and tokenizer)."""

    hidden_size: int = _field(256, ge=1)
    num_layers: int = _field(4, ge=1)
    num_heads: int = _field(4, ge=1)
    dropout: float = _field(0.1, ge=0.0, le=1.0)


@dataclass
class TuneConfig:
    """The Ray Tune ablation (`raydiff tune`): a search space over any dotted config key, each
    trial a Ray Train run of `ray.num_workers` workers, ASHA or FIFO early stopping."""

    output_dir: str = "tune_runs"  # experiments go to <output_dir>/<train.run_name>
    metric: str = "val_mse"  # what ASHA and "best" read (reported at every evaluation)
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["asha", "fifo"] = "asha"  # fifo: per-trial train.patience instead
    grace_period: int = _field(500, ge=1)  # ASHA: steps before a trial can be stopped
    reduction_factor: float = _field(2.0, gt=1.0)
    num_samples: int = _field(1, ge=1)  # repeats of the grid (random keys re-drawn each time)
    max_concurrent_trials: int | None = _field(None, ge=1)  # None: as many as the CPUs/GPUs fit
    # "steps to reach": the first evaluation with val_token_accuracy >= this ...
    accuracy_threshold: float = _field(0.5, ge=0.0, le=1.0)
    # ... and with `metric` at or past this (None: not reported)
    metric_threshold: float | None = None
    search_space: dict = _field({})  # dotted key -> {grid|choice: [...]} or {uniform|...: [lo, hi]}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def to_dict(self, redact: bool = False) -> dict[str, Any]:
        """The tree as plain dicts; `redact` blanks credentials (for anything written out)."""
        tree = dataclasses.asdict(self)
        if redact:
            for key in SECRET_KEYS:
                section, name = key.split(".")
                if tree[section][name] is not None:
                    tree[section][name] = None
        return tree

    def save(self, path: str | Path) -> None:
        """Write the resolved tree as YAML, credentials left out, atomically."""
        from raydiff.files import write_atomic

        write_atomic(path, yaml.safe_dump(self.to_dict(redact=True), sort_keys=False))
