"""Diffusion mathematics (docs/design.md §1-§5): pure torch/numpy, single device, no Ray.

The public names below are imported on first use, so that `raydiff.diffusion.betas` (numpy
only) can be read by the configuration without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {  # public name -> the module that defines it
    "SCHEDULE_NAMES": "betas", "get_named_beta_schedule": "betas", "min_num_steps": "betas",
    "perturb_embedding": "forward", "q_sample": "forward",
    "Batch": "losses", "DiffusionObjective": "losses", "Draws": "losses", "LossSpec": "losses",
    "LossTerms": "losses", "diffusion_losses": "losses", "masked_mean": "losses",
    "nearest_embedding": "sampling", "respaced_timesteps": "sampling", "sample": "sampling",
    "NoiseSchedule": "schedules",
    "LossSecondMomentSampler": "timesteps", "UniformSampler": "timesteps",
    "make_timestep_sampler": "timesteps",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

