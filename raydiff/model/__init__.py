"""Single-device model code: the diffusion denoiser (no Ray here)."""

from raydiff.model.denoiser import Denoiser

__all__ = ["Denoiser"]
