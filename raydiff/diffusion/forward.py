"""The forward (noising) process q(z_t | z0) with Difformer's noise factor (docs/design.md §2)."""

from __future__ import annotations

import torch

from raydiff.diffusion.schedules import NoiseSchedule


def q_sample(schedule: NoiseSchedule, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             noise_factor: float = 1.0) -> torch.Tensor:
    """z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) F eps.   z0, noise: (B, L, d); t: (B,)."""
    abar = schedule.gather(schedule.alphas_cumprod, t, z0)  # (B, 1, 1)
    return abar.sqrt() * z0 + (1.0 - abar).sqrt() * noise_factor * noise


def perturb_embedding(schedule: NoiseSchedule, embedded: torch.Tensor,
                      noise: torch.Tensor) -> torch.Tensor:
    """Diffusion-LM's noisy target z0 = E[w] + sqrt(b_0) eps0.   (B, L, d)."""
    return embedded + schedule.sqrt_beta_0 * noise
