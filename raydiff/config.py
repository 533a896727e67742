"""The typed config tree: YAML files in `configs/`, dotted `key=value` overrides, validation.

One `Config` holds a section per component (model, diffusion, data, optim, train, ray, tune,
reference); each component takes its own section. Every value is checked against its type and bounds when
the tree is built, and every problem is a one-line `ConfigError` naming the offending key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
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
    """The denoiser (DESIGN 2.3): a BERT encoder built from this config, never pretrained."""

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
    """The diffusion process, loss and sampler defaults (DESIGN 2.1, 2.2, 2.4, 2.5)."""

    schedule: Literal["linear", "cosine", "sqrt", "trunc_cos", "trunc_lin", "pw_lin"] = "pw_lin"
    num_steps: int = _field(2000, ge=2)  # T
    noise_factor: float = _field(1.0, gt=0.0)  # Difformer's F
    perturb_z0: bool = True  # z0 = E[w] + sqrt(b_0) eps0 (Diffusion-LM)
    loss: Literal["rounding", "anchor"] = "anchor"
    timestep_sampling: Literal["uniform", "loss_second_moment"] = "uniform"
    self_condition: bool = False
    sampler: Literal["ddpm", "ddim"] = "ddim"
    sample_steps: int = _field(200, ge=1)  # ddim sub-sequence length, capped at num_steps
    eta: float = _field(0.0, ge=0.0, le=1.0)
    clamp: bool = True  # replace x0hat by its nearest embedding row while sampling


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
    patience: int = _field(0, ge=0)  # evaluations without improvement before stopping; 0 = off
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = _field(None, ge=1)  # torch intra-op threads on CPU
    seed: int = 0
    output_dir: str = "runs"
    run_name: str = "default"


@dataclass
class RayConfig:
    """Where training runs: the embedded local Ray or a cluster."""

    address: str | None = None  # None: a local Ray sized to this machine
    num_workers: int = _field(1, ge=0)
    use_gpu: bool = False
    cpus_per_worker: float = _field(1.0, gt=0.0)
    # GPU model the workers need (Ray's accelerator_type:<T>, e.g. A100, A10G, T4); use_gpu only
    accelerator_type: str | None = None
    # custom resources each worker holds, e.g. {"raydiff_slot": 1}; node types advertise them
    worker_resources: dict = _field({})
    storage_path: str | None = None  # where runs and checkpoints go; default train.output_dir
    max_failures: int = _field(0, ge=0)  # worker-group restarts from the latest checkpoint
    checkpoints_to_keep: int = _field(3, ge=1)
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


@dataclass
class DebugConfig:
    """Fault and slowness injection for tests and benchmarks; leave alone for real training."""

    crash_rank: int = -1  # this worker's process dies ...
    crash_at_step: int = _field(0, ge=0)  # ... when it reaches this step (once per run; 0 = off)
    slow_rank: int = -1  # this worker computes `slow_factor` times slower (train.balance.Throttle)
    slow_factor: float = _field(1.0, ge=1.0)
    nan_rank: int = -1  # this worker's training loss turns NaN ...
    nan_at_step: int = _field(0, ge=0)  # ... at this step (0 = off)


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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(redact=True), sort_keys=False))
        tmp.replace(path)


# --------------------------------------------------------------------------- building the tree


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Build a `Config` from a YAML file (or the defaults) and dotted `key=value` overrides."""
    raw: dict[str, Any] = {}
    origin = "command line"
    if path is not None:
        origin = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} invalid YAML") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected dotted key=value, e.g. train.max_steps=100")
        _set_dotted(raw, key.strip(), _parse_scalar(value))
    return build_config(raw, origin=origin)


def build_config(raw: dict[str, Any], origin: str = "config") -> Config:
    """Validate a nested dict into a `Config`; `origin` prefixes every error."""
    cfg = _build(Config, raw, prefix="", origin=origin)
    _check_consistency(cfg, origin)
    return cfg


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A new `Config` with dotted-key overrides applied (the syntax Tune and tests use)."""
    raw = cfg.to_dict()
    for key, value in overrides.items():
        _set_dotted(raw, key, value)
    return build_config(raw, origin="overrides")


def config_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every valid dotted leaf key, e.g. `diffusion.schedule`."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += config_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _parse_scalar(text: str) -> Any:
    """CLI values use YAML scalar syntax: `true`, `3`, `1e-4`, `null`, `[a, b]`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parents[: i + 1])} is not a section")
        node = child
    node[leaf] = value


def _unknown_key(key: str, valid: list[str], origin: str) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not close:  # a misspelt leaf under a wrong section still deserves a hint
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in config_keys()}
        hit = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
        close = [by_leaf[hit[0]]] if hit else []
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{origin}: unknown key '{key}'{hint}")


def _build(cls: type, raw: Any, prefix: str, origin: str) -> Any:
    section = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: '{section}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise _unknown_key(f"{prefix}{key}", [f"{prefix}{k}" for k in fields], origin)
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key, hint = prefix + name, hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], f"{key}.", origin)
        else:
            values[name] = _coerce(raw[name], hint, key, origin)
            _check_bounds(values[name], f.metadata, key, origin)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str, origin: str) -> Any:
    """Check `value` against a type hint, converting only where no information is lost."""
    origin_type, args = typing.get_origin(hint), typing.get_args(hint)
    if origin_type in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, origin)
    if origin_type is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{origin}: {key}={value!r} is not one of {choices}")
        return value
    expected = origin_type or hint
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
        list: isinstance(value, list),
    }.get(expected, True)
    if not ok and expected is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-4` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if not ok:
        name = getattr(expected, "__name__", str(expected))
        raise ConfigError(f"{origin}: {key} must be {name}, got {value!r} ({type(value).__name__})")
    return float(value) if expected is float else value


def _check_consistency(cfg: Config, origin: str) -> None:
    """Constraints that span several keys; each error names the key to change."""
    d, m = cfg.diffusion, cfg.model
    if d.schedule == "pw_lin" and d.num_steps <= 10:
        raise ConfigError(f"{origin}: diffusion.num_steps={d.num_steps} must be > 10 for pw_lin")
    if m.hidden_size % m.num_heads:
        raise ConfigError(
            f"{origin}: model.num_heads={m.num_heads} must divide "
            f"model.hidden_size={m.hidden_size}")
    if cfg.ray.accelerator_type and not cfg.ray.use_gpu:
        raise ConfigError(f"{origin}: ray.accelerator_type={cfg.ray.accelerator_type} needs "
                          f"ray.use_gpu=true")
    for name, amount in cfg.ray.worker_resources.items():
        if not isinstance(amount, int | float) or isinstance(amount, bool) or amount <= 0:
            raise ConfigError(f"{origin}: ray.worker_resources.{name} must be a positive "
                              f"number, got {amount!r}")
    shares = cfg.ray.batch_shares
    if shares and (len(shares) != max(cfg.ray.num_workers, 1) or any(
            isinstance(v, bool) or not isinstance(v, int | float) or v <= 0 for v in shares)):
        raise ConfigError(f"{origin}: ray.batch_shares={shares!r} needs one positive number per "
                          f"worker (ray.num_workers={cfg.ray.num_workers})")
    if cfg.train.batch_size < cfg.ray.num_workers:
        raise ConfigError(f"{origin}: train.batch_size={cfg.train.batch_size} is smaller than "
                          f"ray.num_workers={cfg.ray.num_workers}")
    r = cfg.reference
    if r.hidden_size % r.num_heads:
        raise ConfigError(
            f"{origin}: reference.num_heads={r.num_heads} must divide "
            f"reference.hidden_size={r.hidden_size}")
    if cfg.data.min_words > cfg.data.max_words:
        raise ConfigError(
            f"{origin}: data.min_words={cfg.data.min_words} exceeds "
            f"data.max_words={cfg.data.max_words}")
    if cfg.optim.warmup_steps >= cfg.optim.anneal_steps:
        raise ConfigError(
            f"{origin}: optim.warmup_steps={cfg.optim.warmup_steps} must be < "
            f"optim.anneal_steps={cfg.optim.anneal_steps}")


def _check_bounds(value: Any, bounds: typing.Mapping[str, float], key: str, origin: str) -> None:
    if value is None:
        return
    if "ge" in bounds and value < bounds["ge"]:
        raise ConfigError(f"{origin}: {key}={value!r} must be >= {bounds['ge']}")
    if "gt" in bounds and value <= bounds["gt"]:
        raise ConfigError(f"{origin}: {key}={value!r} must be > {bounds['gt']}")
    if "le" in bounds and value > bounds["le"]:
        raise ConfigError(f"{origin}: {key}={value!r} must be <= {bounds['le']}")
