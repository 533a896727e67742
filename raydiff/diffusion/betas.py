"""The six named beta schedules of docs/design.md §1, as float64 numpy arrays.

Betas are computed exactly as Diffusion-LM defines them. This module needs numpy only (no
torch), so that the configuration can validate schedule names and lengths against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

SCHEDULE_NAMES = ("linear", "cosine", "sqrt", "trunc_cos", "trunc_lin", "pw_lin")
PW_LIN_WARMUP_STEPS = 10  # pw_lin's first segment is a count of steps, not a fraction of T
MAX_BETA = 0.999


def _betas_from_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float]) -> np.ndarray:
    """b_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999) for i = 0..T-1."""
    return np.array([
        min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), MAX_BETA)
        for i in range(num_steps)
    ], dtype=np.float64)


def _cosine_abar(s: float) -> float:
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def _sqrt_abar(s: float) -> float:
    return 1 - math.sqrt(s + 0.0001)


def _trunc_cos_abar(s: float) -> float:
    return math.cos((s + 0.1) / 1.1 * math.pi / 2) ** 2


def _trunc_cos(num_steps: int) -> np.ndarray:
    # starts from abar(0) itself and never reaches s = 1
    betas = [min(1 - _trunc_cos_abar(0.0), MAX_BETA)]
    betas += [
        min(1 - _trunc_cos_abar((i + 1) / num_steps) / _trunc_cos_abar(i / num_steps), MAX_BETA)
        for i in range(num_steps - 1)
    ]
    return np.array(betas, dtype=np.float64)


def _pw_lin(num_steps: int, scale: float) -> np.ndarray:
    warmup = np.linspace(scale * 1e-4 + 0.01, scale * 1e-4, PW_LIN_WARMUP_STEPS, dtype=np.float64)
    rest = np.linspace(scale * 1e-4, scale * 0.02, num_steps - PW_LIN_WARMUP_STEPS,
                       dtype=np.float64)
    return np.concatenate([warmup, rest])


def _named_betas(name: str, num_steps: int) -> np.ndarray:
    scale = 1000 / num_steps
    if name == "linear":
        return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
    if name == "cosine":
        return _betas_from_alpha_bar(num_steps, _cosine_abar)
    if name == "sqrt":
        return _betas_from_alpha_bar(num_steps, _sqrt_abar)
    if name == "trunc_cos":
        return _trunc_cos(num_steps)
    if name == "trunc_lin":
        return np.linspace(scale * 1e-4 + 0.01, scale * 0.02 + 0.01, num_steps, dtype=np.float64)
    if name == "pw_lin":
        return _pw_lin(num_steps, scale)
    raise AssertionError(name)


def min_num_steps(name: str) -> int:
    """The smallest T a schedule is defined for: pw_lin's warm-up segment is a count of steps."""
    return PW_LIN_WARMUP_STEPS + 1 if name == "pw_lin" else 2


def get_named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """float64 betas of shape (num_steps,) for one of `SCHEDULE_NAMES`."""
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"unknown beta schedule {name!r}; valid: {', '.join(SCHEDULE_NAMES)}")
    if num_steps < min_num_steps(name):
        raise ValueError(f"{name} needs num_steps > {min_num_steps(name) - 1}, got {num_steps}")
    return _named_betas(name, num_steps)
