"""The training objective of stabilised Diffusion-LM (docs/design.md §4), per example, over non-PAD tokens.

total = mse + CE + tT, where CE is the rounding loss CE(logits(z0), w) of Diffusion-LM or the
anchor loss CE(logits(x0hat), w) of Difformer. Gradients reach E from every term. Averages
follow Diffusion-LM's `mean_flat`: over embedding dimensions, then over the example's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from raydiff.diffusion.forward import perturb_embedding, q_sample
from raydiff.diffusion.schedules import NoiseSchedule


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over non-PAD positions per example.   values, mask: (B, L) -> (B,)"""
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


@dataclass
class LossTerms:
    """Per-example terms, each (B,). `total` is what is optimised; the rest is for logging."""

    total: torch.Tensor
    mse: torch.Tensor
    t_T: torch.Tensor
    ce: torch.Tensor  # the CE term in `total` (rounding or anchor)
    rounding_ce: torch.Tensor
    anchor_ce: torch.Tensor
    token_accuracy: torch.Tensor  # argmax(logits(x0hat)) == w
    z0_sq: torch.Tensor  # mean squared entry of the clean z0, the scale mse is read against


def _token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L, V), (B, L) -> (B, L) cross-entropy, computed in float32 over contiguous rows."""
    flat = F.cross_entropy(logits.float().flatten(0, 1), input_ids.flatten(), reduction="none")
    return flat.view(input_ids.shape)


def diffusion_losses(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    t: torch.Tensor,
    *,
    loss: Literal["rounding", "anchor"] = "anchor",
    noise_factor: float = 1.0,
    perturb_z0: bool = True,
    self_condition: bool = False,
    generator: torch.Generator | None = None,
    noise: tuple[torch.Tensor, torch.Tensor] | None = None,
    use_self_cond: bool | None = None,
) -> LossTerms:
    """Loss terms for token ids (B, L) at timesteps t (B,); `model` is a `Denoiser` (or a DDP
    wrapper of one: only its forward is called through the wrapper).

    Randomness comes from `generator`, or explicitly: `noise` = (eps0, eps), each (B, L, d), for
    the z0 perturbation and the forward process, and `use_self_cond` for the self-conditioning
    coin (distributed workers draw these for the global batch and take their slice)."""
    net = getattr(model, "module", model)
    device = input_ids.device
    clean = net.embed(input_ids)  # E[w]: (B, L, d)

    def randn_like(x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, device="cpu").to(device, x.dtype)

    eps0, eps = noise if noise is not None else (randn_like(clean), randn_like(clean))
    z0 = perturb_embedding(schedule, clean, eps0.to(device, clean.dtype)) if perturb_z0 else clean
    z_t = q_sample(schedule, z0, t, eps.to(device, z0.dtype), noise_factor)
    model_t = schedule.model_time(t)

    if use_self_cond is None:
        use_self_cond = self_condition and torch.rand((), generator=generator).item() < 0.5
    self_cond = None
    if self_condition and use_self_cond:
        with torch.no_grad():  # Strudel et al.: half the time, condition on a detached guess
            self_cond = model(z_t, model_t, attention_mask).detach()
    x0_hat = model(z_t, model_t, attention_mask, self_cond)  # (B, L, d)

    # at t = 0 the target is the clean embedding, elsewhere the (possibly perturbed) z0
    target = torch.where((t == 0)[:, None, None], clean, z0)
    mse = masked_mean((x0_hat.float() - target.float()).pow(2).mean(dim=-1), attention_mask)
    abar_last = schedule.alphas_cumprod[-1].item()
    t_T = masked_mean((abar_last * z0.float().pow(2)).mean(dim=-1), attention_mask)

    # the CE term that is not optimised is still logged: it shows which regime a run is in
    with torch.set_grad_enabled(loss == "anchor" and torch.is_grad_enabled()):
        x0_logits = net.logits(x0_hat)  # (B, L, V)
        anchor_ce = masked_mean(_token_ce(x0_logits, input_ids), attention_mask)
    with torch.set_grad_enabled(loss == "rounding" and torch.is_grad_enabled()):
        rounding_ce = masked_mean(_token_ce(net.logits(z0), input_ids), attention_mask)
    ce = rounding_ce if loss == "rounding" else anchor_ce

    with torch.no_grad():
        correct = (x0_logits.argmax(dim=-1) == input_ids).float()
        token_accuracy = masked_mean(correct, attention_mask)
        z0_sq = masked_mean(clean.float().pow(2).mean(dim=-1), attention_mask)

    return LossTerms(total=mse + ce + t_T, mse=mse, t_T=t_T, ce=ce, rounding_ce=rounding_ce,
                     anchor_ce=anchor_ce, token_accuracy=token_accuracy, z0_sq=z0_sq)
