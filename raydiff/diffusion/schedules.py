"""The six named beta schedules (docs/design.md §1) and the schedule object everything reads abar from.

Betas are computed in float64 with numpy, exactly as Diffusion-LM defines them; `NoiseSchedule`
turns them into the float64 torch tensors that the forward process, the losses and the samplers
index by timestep. Nothing downstream hard-codes a schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

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
    if num_steps <= PW_LIN_WARMUP_STEPS:
        raise ValueError(
            f"pw_lin needs num_steps > {PW_LIN_WARMUP_STEPS} (its warm-up is "
            f"{PW_LIN_WARMUP_STEPS} steps), got {num_steps}")
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


SCHEDULE_NAMES = ("linear", "cosine", "sqrt", "trunc_cos", "trunc_lin", "pw_lin")


def get_named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """float64 betas of shape (num_steps,) for one of `SCHEDULE_NAMES`."""
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"unknown beta schedule {name!r}; valid: {', '.join(SCHEDULE_NAMES)}")
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    return _named_betas(name, num_steps)


@dataclass(frozen=True)
class NoiseSchedule:
    """Per-timestep coefficients of the forward process and the DDPM posterior (all float64).

    Index t runs over 0..T-1; `alphas_cumprod_prev[0]` is 1 (abar_{-1}: no noise at all).
    """

    betas: torch.Tensor  # (T,)
    alphas_cumprod: torch.Tensor  # (T,) abar_t
    alphas_cumprod_prev: torch.Tensor  # (T,) abar_{t-1}
    posterior_variance: torch.Tensor  # (T,) var of q(z_{t-1} | z_t, z0), before F^2
    posterior_mean_coef_x0: torch.Tensor  # (T,) coefficient of z0 in its mean
    posterior_mean_coef_zt: torch.Tensor  # (T,) coefficient of z_t in its mean
    name: str = "custom"

    @classmethod
    def from_betas(cls, betas: np.ndarray, name: str = "custom") -> NoiseSchedule:
        betas = np.asarray(betas, dtype=np.float64)
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        coef_x0 = betas * np.sqrt(abar_prev) / (1.0 - abar)
        coef_zt = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        return cls(as_t(betas), as_t(abar), as_t(abar_prev), as_t(posterior_variance),
                   as_t(coef_x0), as_t(coef_zt), name)

    @classmethod
    def named(cls, name: str, num_steps: int) -> NoiseSchedule:
        return cls.from_betas(get_named_beta_schedule(name, num_steps), name)

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps as the denoiser sees them: rescaled to 0..1000 whatever T is.  (B,)"""
        return t.float() * (1000.0 / self.num_steps)

    def gather(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] shaped (B, 1, ..., 1) to broadcast against `like`, in `like`'s dtype."""
        out = values.to(t.device)[t].to(like.dtype)
        return out.view(-1, *([1] * (like.dim() - 1)))
