"""The schedule object everything reads abar from (docs/design.md §1).

`NoiseSchedule` turns the float64 betas of `raydiff.diffusion.betas` into the float64 torch
tensors that the forward process, the losses and the samplers index by timestep. Nothing
downstream hard-codes a schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from raydiff.diffusion.betas import get_named_beta_schedule


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
    # what the training loss reads every step, as Python floats: read off a tensor each step,
    # they would be a host read (a wait on a GPU, a break in a compiled graph)
    sqrt_beta_0: float  # sqrt(b_0), the scale of the z0 perturbation
    abar_last: float  # abar_{T-1}, the signal left at the last step (the tT term)
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
                   as_t(coef_x0), as_t(coef_zt), float(np.sqrt(betas[0])), float(abar[-1]), name)

    @classmethod
    def named(cls, name: str, num_steps: int) -> NoiseSchedule:
        return cls.from_betas(get_named_beta_schedule(name, num_steps), name)

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """The same schedule with its tables on `device` (gathered there by timestep every step,
        they are copied there once)."""
        tables = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                  if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **tables)

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
