"""The search space, declared in YAML over dotted config keys:

    tune:
      search_space:
        diffusion.schedule: {grid: [linear, cosine, sqrt, trunc_cos, trunc_lin, pw_lin]}
        diffusion.loss: {grid: [rounding, anchor]}
        diffusion.noise_factor: {uniform: [1.0, 4.0]}
        optim.lr: {loguniform: [1.0e-4, 1.0e-3]}
        model.num_layers: {randint: [2, 6]}          # [lo, hi): hi excluded, as Tune's
        model.embed_norm: {choice: [none, after_proj]}

Every key must be a config key and every value (or both ends of a range) a valid value for it:
mistakes fail before anything starts, in one line naming `tune.search_space.<key>`.
"""

from __future__ import annotations

from typing import Any

from raydiff.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_keys,
    did_you_mean,
    shown,
)

LISTS = ("grid", "choice")
RANGES = ("uniform", "loguniform", "randint")


def _check_value(base: Config, key: str, value: Any) -> None:
    try:
        apply_overrides(base, {key: value})
    except ConfigError as e:
        raise ConfigError(f"tune.search_space.{key}: value {shown(key, value)} is invalid: "
                          f"{str(e).split(': ', 1)[-1]}") from None


def validate_search_space(space: dict, base: Config) -> dict[str, tuple[str, list]]:
    """{key: (kind, values)} after checking keys, kinds and values against `base`."""
    if not isinstance(space, dict):
        raise ConfigError("tune.search_space must be a mapping of dotted config keys")
    known = set(config_keys())
    checked = {}
    for key, spec in space.items():
        where = f"tune.search_space.{key}"
        if key not in known:
            raise ConfigError(f"{where}: not a config key{did_you_mean(key)}")
        if key.startswith(("tune.", "ray.")):
            raise ConfigError(f"{where}: tune.* and ray.* keys set up the sweep itself and "
                              f"cannot be searched")
        if not (isinstance(spec, dict) and len(spec) == 1):
            raise ConfigError(f"{where}: expected one of {{grid|choice: [values]}} or "
                              f"{{uniform|loguniform|randint: [lo, hi]}}, got {spec!r}")
        (kind, values), = spec.items()
        if kind not in LISTS + RANGES:
            raise ConfigError(f"{where}: unknown kind {kind!r}; valid: "
                              f"{', '.join(LISTS + RANGES)}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {kind} needs a non-empty list, got {values!r}")
        if kind in RANGES:
            numeric = all(isinstance(v, int | float) and not isinstance(v, bool)
                          for v in values)
            if len(values) != 2 or not numeric or not values[0] < values[1]:
                raise ConfigError(f"{where}: {kind} needs [lo, hi] numbers with lo < hi, "
                                  f"got {values!r}")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError(f"{where}: loguniform needs lo > 0, got {values[0]!r}")
            if kind == "randint" and not all(isinstance(v, int) for v in values):
                raise ConfigError(f"{where}: randint needs integer ends, got {values!r}")
            ends = values if kind != "randint" else [values[0], values[1] - 1]
            for value in ends:
                _check_value(base, key, value)
        else:
            for value in values:
                _check_value(base, key, value)
        checked[key] = (kind, values)
    return checked


def param_space(space: dict, base: Config) -> dict[str, Any]:
    """The validated space as Ray Tune search domains, keyed by dotted config key."""
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v)}
    return {key: make[kind](values)
            for key, (kind, values) in validate_search_space(space, base).items()}


def trial_count(space: dict, base: Config, num_samples: int) -> int:
    """How many trials the space makes: the grid's size times `num_samples`."""
    count = num_samples
    for kind, values in validate_search_space(space, base).values():
        if kind == "grid":
            count *= len(values)
    return count
