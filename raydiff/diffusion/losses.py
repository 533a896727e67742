"""The training objective of stabilised Diffusion-LM (docs/design.md §4), per example, over
non-PAD tokens.

total = mse + CE + tT, where CE is the rounding loss CE(logits(z0), w) of Diffusion-LM, the
anchor loss CE(logits(x0hat), w) of Difformer, or nothing ("none": the positive control of the
collapse study, whose denoising loss alone can be made small by shrinking the embeddings).
Gradients reach E from every term. Averages follow Diffusion-LM's `mean_flat`: over embedding
dimensions, then over the example's tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from raydiff.diffusion.forward import perturb_embedding, q_sample
from raydiff.diffusion.schedules import NoiseSchedule

if TYPE_CHECKING:
    from raydiff.config.schema import DiffusionConfig, LossName

Batch = Mapping[str, torch.Tensor]  # {"input_ids": (B, L) int64, "attention_mask": (B, L)}


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
    ce: torch.Tensor  # the CE term in `total` (rounding, anchor, or zeros for none)
    z0_sq: torch.Tensor  # mean squared entry of the clean z0, the scale mse is read against
    # diagnostics, None when not asked for (each costs a vocabulary-sized pass)
    rounding_ce: torch.Tensor | None = None
    anchor_ce: torch.Tensor | None = None
    token_accuracy: torch.Tensor | None = None  # argmax(logits(x0hat)) == w


@dataclass(frozen=True)
class LossSpec:
    """The objective's settings (docs/design.md §4), read once from `cfg.diffusion`."""

    loss: LossName = "anchor"  # the CE term in `total`; "none": mse + tT only
    noise_factor: float = 1.0  # F, Difformer's noise factor
    perturb_z0: bool = True  # z0 = E[w] + sqrt(b_0) eps0 rather than E[w]

    @classmethod
    def of(cls, d: DiffusionConfig) -> LossSpec:
        return cls(loss=d.loss, noise_factor=d.noise_factor, perturb_z0=d.perturb_z0)


@dataclass(frozen=True)
class Draws:
    """All the randomness of one evaluation of the loss. Distributed workers draw it for the
    global batch from the generator they share and each takes its rows (`draws[rows]`)."""

    t: torch.Tensor  # (B,) timesteps
    eps0: torch.Tensor  # (B, L, d) noise of the z0 perturbation
    eps: torch.Tensor  # (B, L, d) noise of the forward process
    self_cond: bool = False  # condition on a detached first guess this time (Strudel et al.)

    @classmethod
    def sample(cls, t: torch.Tensor, shape: tuple[int, int, int],
               generator: torch.Generator | None = None, self_condition: bool = False) -> Draws:
        """Noise of `shape` (B, L, d) on the CPU for timesteps t (B,), then, for a model with
        self-conditioning, the coin that is heads half the time. The order of the draws is part
        of the contract: the same generator state gives the same `Draws` on every worker."""
        eps0 = torch.randn(shape, generator=generator)
        eps = torch.randn(shape, generator=generator)
        coin = self_condition and torch.rand((), generator=generator).item() < 0.5
        return cls(t, eps0, eps, coin)

    def __getitem__(self, rows: slice) -> Draws:
        return Draws(self.t[rows], self.eps0[rows], self.eps[rows], self.self_cond)


def diffusion_losses(model: torch.nn.Module, schedule: NoiseSchedule, batch: Batch,
                     spec: LossSpec, draws: Draws, *, diagnostics: bool = True) -> LossTerms:
    """Loss terms of a batch of token ids (B, L) under `spec`, with the randomness of `draws`.
    `model` is a `Denoiser` (training wraps and compiles `DiffusionObjective` around it, not
    the denoiser). `diagnostics=False` skips what `total` does not need (the CE term that is
    not optimised, token accuracy): the same loss and gradients, less work."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # (B, L) each
    device = input_ids.device
    t = draws.t.to(device)  # (B,)
    clean = model.embed(input_ids)  # E[w]: (B, L, d)
    eps0, eps = draws.eps0.to(device, clean.dtype), draws.eps.to(device, clean.dtype)
    z0 = perturb_embedding(schedule, clean, eps0) if spec.perturb_z0 else clean
    z_t = q_sample(schedule, z0, t, eps, spec.noise_factor)
    model_t = schedule.model_time(t)

    self_cond = None
    if draws.self_cond:
        with torch.no_grad():  # Strudel et al.: half the time, condition on a detached guess
            self_cond = model(z_t, model_t, attention_mask).detach()
    x0_hat = model(z_t, model_t, attention_mask, self_cond)  # (B, L, d)

    # at t = 0 the target is the clean embedding, elsewhere the (possibly perturbed) z0
    target = torch.where((t == 0)[:, None, None], clean, z0)
    mse = masked_mean((x0_hat.float() - target.float()).pow(2).mean(dim=-1), attention_mask)
    t_T = masked_mean((schedule.abar_last * z0.float().pow(2)).mean(dim=-1), attention_mask)

    # the CE term that is not optimised is still logged as a diagnostic: it shows which regime a
    # run is in
    anchor_ce = rounding_ce = token_accuracy = None
    if spec.loss == "anchor" or diagnostics:
        with torch.set_grad_enabled(spec.loss == "anchor" and torch.is_grad_enabled()):
            anchor_ce = masked_mean(model.token_ce(x0_hat, input_ids), attention_mask)
    if spec.loss == "rounding" or diagnostics:
        with torch.set_grad_enabled(spec.loss == "rounding" and torch.is_grad_enabled()):
            rounding_ce = masked_mean(model.token_ce(z0, input_ids), attention_mask)
    if diagnostics:
        with torch.no_grad():
            correct = (model.logits(x0_hat).argmax(dim=-1) == input_ids).float()  # (B, L)
            token_accuracy = masked_mean(correct, attention_mask)
    ce = {"rounding": rounding_ce, "anchor": anchor_ce}.get(spec.loss)
    ce = torch.zeros_like(mse) if ce is None else ce
    with torch.no_grad():
        z0_sq = masked_mean(clean.float().pow(2).mean(dim=-1), attention_mask)

    return LossTerms(total=mse + ce + t_T, mse=mse, t_T=t_T, ce=ce, z0_sq=z0_sq,
                     rounding_ce=rounding_ce, anchor_ce=anchor_ce, token_accuracy=token_accuracy)


class DiffusionObjective(nn.Module):
    """`diffusion_losses` as a module around the denoiser: what a training step wraps (DDP) and
    compiles (`train.compile`). Compiled, the forward process, the denoiser and the loss terms
    are one graph and their backward another, rather than the denoiser's alone between eager
    loss code. Its parameters are the denoiser's, under `model.`."""

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, spec: LossSpec):
        super().__init__()
        self.model, self.schedule, self.spec = model, schedule, spec

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, t: torch.Tensor,
                eps0: torch.Tensor, eps: torch.Tensor, self_cond: bool = False,
                diagnostics: bool = True) -> LossTerms:
        """The terms of a batch (B, L) with the draws t (B,), eps0 and eps (B, L, d) and the
        self-conditioning coin; see `diffusion_losses`."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        return diffusion_losses(self.model, self.schedule, batch, self.spec,
                                Draws(t, eps0, eps, self_cond), diagnostics=diagnostics)
