"""Reverse-process samplers (docs/design.md §5): DDPM ancestral and respaced DDIM, with optional
clamping to the nearest embedding and self-conditioning.

Both walk a decreasing list of timesteps. DDPM visits every t and draws z_{t-1} from the
posterior q(z_{t-1} | z_t, x0hat). DDIM visits a sub-sequence and jumps from abar_t straight to
abar_{t'} of the *previous timestep in the sub-sequence* (not abar_{t-1}); eta = 1 with all T
steps is exactly DDPM, eta = 0 is deterministic. The noise factor F scales every injected noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from raydiff.diffusion.schedules import NoiseSchedule


def respaced_timesteps(num_steps: int, sample_steps: int) -> list[int]:
    """`sample_steps` timesteps evenly spread over 0..T-1, decreasing, starting at T-1, ending at 0."""
    if not 1 <= sample_steps <= num_steps:
        raise ValueError(f"sample_steps must be in [1, {num_steps}], got {sample_steps}")
    if sample_steps == 1:
        return [num_steps - 1]
    steps = np.round(np.linspace(0, num_steps - 1, sample_steps)).astype(int)
    return sorted(set(steps.tolist()), reverse=True)


def nearest_embedding(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Replace each vector by its nearest (L2) row of the table.   (B, L, d), (V, d) -> (B, L, d)"""
    work = torch.promote_types(torch.promote_types(x.dtype, table.dtype), torch.float32)
    flat = x.reshape(-1, x.shape[-1]).to(work)  # (N, d), in float32 at least
    table = table.to(work)
    dist = table.pow(2).sum(-1)[None, :] - 2 * flat @ table.t()  # ||x - e||^2 - ||x||^2: (N, V)
    return table[dist.argmin(dim=-1)].reshape(x.shape).to(x.dtype)


def ddpm_step(schedule: NoiseSchedule, z_t: torch.Tensor, x0_hat: torch.Tensor, t: int,
              noise: torch.Tensor, noise_factor: float = 1.0) -> torch.Tensor:
    """One ancestral step z_t -> z_{t-1} ~ q(z_{t-1} | z_t, x0hat)."""
    mean = (schedule.posterior_mean_coef_x0[t].item() * x0_hat
            + schedule.posterior_mean_coef_zt[t].item() * z_t)
    return mean + math.sqrt(schedule.posterior_variance[t].item()) * noise_factor * noise


def ddim_step(z_t: torch.Tensor, x0_hat: torch.Tensor, abar_t: float, abar_prev: float,
              eta: float, noise: torch.Tensor, noise_factor: float = 1.0) -> torch.Tensor:
    """One generalised (DDIM) jump from abar_t to abar_prev = abar of the next timestep visited."""
    sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    # the noise direction implied by z_t and x0hat, in units of F: (z_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)
    direction = (z_t - math.sqrt(abar_t) * x0_hat) / math.sqrt(1 - abar_t)
    return (math.sqrt(abar_prev) * x0_hat
            + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * direction
            + sigma * noise_factor * noise)


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (B, L) argmax of logits(x0hat) at the last step
    x0: torch.Tensor  # (B, L, d) the final x0hat


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    shape: tuple[int, int, int],
    *,
    sampler: Literal["ddpm", "ddim"] = "ddim",
    sample_steps: int | None = None,
    eta: float = 0.0,
    clamp: bool = True,
    clamp_below: float = 1.0,
    noise_factor: float = 1.0,
    self_condition: bool = False,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> SampleOutput:
    """Generate `shape` = (B, L, d) from pure noise with a `Denoiser`.

    Noise is drawn on the CPU from `generator` in a fixed order (z_T, then one draw per step
    except the last), so two samplers given equal generators see the same noise. The state
    z_t is kept in the dtype of the model's weights (float64 for a `.double()` model).
    """
    if sampler == "ddpm":
        timesteps = list(range(schedule.num_steps - 1, -1, -1))
    elif sampler == "ddim":
        timesteps = respaced_timesteps(
            schedule.num_steps, min(sample_steps or schedule.num_steps, schedule.num_steps))
    else:
        raise ValueError(f"unknown sampler {sampler!r}; valid: ddpm, ddim")

    abar = schedule.alphas_cumprod
    table = model.embedding_table()
    dtype = table.dtype

    def randn() -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device, dtype)

    z = noise_factor * randn()  # z_T ~ N(0, F^2 I)
    x0_hat = torch.zeros_like(z)
    for i, t in enumerate(timesteps):
        model_t = schedule.model_time(torch.full((shape[0],), t, device=device)).to(dtype)
        x0_hat = model(z, model_t, attention_mask, x0_hat if self_condition else None)
        if clamp and t < clamp_below * schedule.num_steps:
            x0_hat = nearest_embedding(x0_hat, table)
        if i == len(timesteps) - 1:
            break
        if sampler == "ddpm":
            z = ddpm_step(schedule, z, x0_hat, t, randn(), noise_factor)
        else:
            t_prev = timesteps[i + 1]
            z = ddim_step(z, x0_hat, abar[t].item(), abar[t_prev].item(), eta, randn(),
                          noise_factor)
    return SampleOutput(tokens=model.logits(x0_hat).argmax(dim=-1), x0=x0_hat)
