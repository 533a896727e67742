"""Building a `Config`: YAML files in `configs/`, dotted `key=value` overrides, validation.

Every value is checked against its type and bounds when the tree is built, and every problem is
a one-line `ConfigError` naming the offending key (never a credential's value).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from raydiff.config.schema import SECRET_KEYS, Config, ConfigError
from raydiff.diffusion.betas import min_num_steps


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
            what = "<hidden>" if any(k in item for k in SECRET_KEYS) else repr(item)
            raise ConfigError(f"override {what}: expected dotted key=value, "
                              f"e.g. train.max_steps=100")
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


def did_you_mean(key: str, valid: typing.Sequence[str] | None = None) -> str:
    """" (did you mean 'optim.lr'?)" for the closest of `valid` (default: every config key),
    else the key whose leaf is closest (a right name under a wrong section); "" if none."""
    valid = config_keys() if valid is None else valid
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not close:
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in config_keys()}
        hit = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_leaf), n=1, cutoff=0.75)
        close = [by_leaf[hit[0]]] if hit else []
    return f" (did you mean '{close[0]}'?)" if close else ""


def _unknown_key(key: str, valid: list[str], origin: str) -> ConfigError:
    return ConfigError(f"{origin}: unknown key '{key}'{did_you_mean(key, valid)}")


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
        if len(inner) == 1:
            return _coerce(value, inner[0], key, origin)
        for option in inner:  # `int | list`: the first type the value has
            with contextlib.suppress(ConfigError):
                return _coerce(value, option, key, origin)
        names = " or ".join(getattr(a, "__name__", str(a)) for a in inner)
        raise ConfigError(f"{origin}: {key} must be {names}, got {shown(key, value)} "
                          f"({type(value).__name__})")
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
        with contextlib.suppress(ValueError):  # YAML 1.1 reads `1e-4` (no dot) as a string
            value, ok = float(value), True
    if not ok:
        name = getattr(expected, "__name__", str(expected))
        raise ConfigError(f"{origin}: {key} must be {name}, got {shown(key, value)} "
                          f"({type(value).__name__})")
    if expected is float:
        value = float(value)
        if not math.isfinite(value):  # NaN passes every `<=` bound, inf most of them
            raise ConfigError(f"{origin}: {key}={value!r} must be a finite number")
    return value


def shown(key: str, value: Any) -> str:
    """How an error message may show `key`'s value: credentials never, whatever their type."""
    return "<hidden>" if key in SECRET_KEYS else repr(value)


def _finite_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _check_consistency(cfg: Config, origin: str) -> None:
    """Constraints that span several keys; each error names the key to change."""
    d, m = cfg.diffusion, cfg.model
    if d.num_steps < min_num_steps(d.schedule):
        raise ConfigError(f"{origin}: diffusion.num_steps={d.num_steps} must be > "
                          f"{min_num_steps(d.schedule) - 1} for {d.schedule}")
    if m.hidden_size % m.num_heads:
        raise ConfigError(
            f"{origin}: model.num_heads={m.num_heads} must divide "
            f"model.hidden_size={m.hidden_size}")
    if cfg.ray.accelerator_type and not cfg.ray.use_gpu:
        raise ConfigError(f"{origin}: ray.accelerator_type={cfg.ray.accelerator_type} needs "
                          f"ray.use_gpu=true")
    for name, amount in cfg.ray.worker_resources.items():
        if not _finite_number(amount) or amount <= 0:
            raise ConfigError(f"{origin}: ray.worker_resources.{name} must be a positive "
                              f"number, got {amount!r}")
    _check_num_workers(cfg.ray.num_workers, origin)
    for key, per_worker in (("ray.batch_shares", cfg.ray.batch_shares),
                            ("debug.probe_speeds", cfg.debug.probe_speeds)):
        if per_worker and cfg.ray.elastic:
            raise ConfigError(f"{origin}: {key} fixes one number per worker; an elastic "
                              f"ray.num_workers={cfg.ray.num_workers} has no fixed count (use "
                              f"ray.batch_balance=throughput)")
        if per_worker and (len(per_worker) != max(cfg.ray.num_workers, 1) or any(
                not _finite_number(v) or v <= 0 for v in per_worker)):
            raise ConfigError(f"{origin}: {key}={per_worker!r} needs one positive number per "
                              f"worker (ray.num_workers={cfg.ray.num_workers})")
    if cfg.train.batch_size < cfg.ray.max_workers:
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


def _check_num_workers(value: int | list, origin: str) -> None:
    """An int >= 0, or [min, max] with 1 <= min <= max."""
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{origin}: ray.num_workers={value!r} must be >= 0")
        return
    if (len(value) != 2 or any(not isinstance(v, int) or isinstance(v, bool) for v in value)
            or not 1 <= value[0] <= value[1]):
        raise ConfigError(f"{origin}: ray.num_workers={value!r} must be an int or [min, max] "
                          f"with 1 <= min <= max")


def _check_bounds(value: Any, bounds: typing.Mapping[str, float], key: str, origin: str) -> None:
    if value is None:
        return
    if "ge" in bounds and value < bounds["ge"]:
        raise ConfigError(f"{origin}: {key}={value!r} must be >= {bounds['ge']}")
    if "gt" in bounds and value <= bounds["gt"]:
        raise ConfigError(f"{origin}: {key}={value!r} must be > {bounds['gt']}")
    if "le" in bounds and value > bounds["le"]:
        raise ConfigError(f"{origin}: {key}={value!r} must be <= {bounds['le']}")
