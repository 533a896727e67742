"""raydiff's config: the typed tree (`schema`) and how it is built and validated (`load`)."""

from raydiff.config.load import (
    apply_overrides,
    build_config,
    config_keys,
    did_you_mean,
    load_config,
    shown,
)
from raydiff.config.schema import (
    SECRET_KEYS,
    Config,
    ConfigError,
    DataConfig,
    DebugConfig,
    DiffusionConfig,
    ModelConfig,
    OptimConfig,
    RayConfig,
    ReferenceConfig,
    TrainConfig,
    TuneConfig,
)

__all__ = [
    "SECRET_KEYS", "Config", "ConfigError", "DataConfig", "DebugConfig", "DiffusionConfig",
    "ModelConfig", "OptimConfig", "RayConfig", "ReferenceConfig", "TrainConfig", "TuneConfig",
    "apply_overrides", "build_config", "config_keys", "did_you_mean", "load_config", "shown",
]
