"""Diffusion mathematics (docs/design.md §1-§5): pure torch/numpy, single device, no Ray."""

from raydiff.diffusion.forward import perturb_embedding, q_sample
from raydiff.diffusion.losses import LossTerms, diffusion_losses, masked_mean
from raydiff.diffusion.sampling import nearest_embedding, respaced_timesteps, sample
from raydiff.diffusion.schedules import SCHEDULE_NAMES, NoiseSchedule, get_named_beta_schedule
from raydiff.diffusion.timesteps import (
    LossSecondMomentSampler,
    UniformSampler,
    make_timestep_sampler,
)

__all__ = [
    "SCHEDULE_NAMES", "LossSecondMomentSampler", "LossTerms", "NoiseSchedule", "UniformSampler",
    "diffusion_losses", "get_named_beta_schedule", "make_timestep_sampler", "masked_mean",
    "nearest_embedding", "perturb_embedding", "q_sample", "respaced_timesteps", "sample",
]
