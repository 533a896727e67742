"""The reference LM's training engine: the same contract as `DiffusionEngine` (`train_step`,
`evaluate`, `state_dict`, `step`), so the same loop, local runner and Ray Train worker drive it.

No Ray here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from raydiff.config import Config
from raydiff.diffusion import Batch
from raydiff.errors import RaydiffError
from raydiff.model.reference_lm import build_reference_lm, causal_lm_loss
from raydiff.train.engine import apply_gradients, build_optimizer, to_device, training_model
from raydiff.train.precision import autocast

REFERENCE_KIND = "reference_lm"  # stored in its checkpoints' state


class ReferenceEngine:
    kind = REFERENCE_KIND

    def __init__(self, cfg: Config, vocab_size: int, device: torch.device, precision: str = "fp32",
                 seed: int = 0, wrap_model: Callable[[nn.Module], nn.Module] | None = None):
        self.cfg, self.device, self.precision = cfg, device, precision
        with torch.random.fork_rng(devices=[]):  # identical initial weights on every worker
            torch.manual_seed(cfg.train.seed)
            self.model = build_reference_lm(cfg.reference, vocab_size, cfg.data.seq_len).to(device)
        self.train_model = training_model(self.model, wrap_model, cfg.train.compile)
        self.optimizer, self.lr_schedule = build_optimizer(self.model, cfg.optim)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.step = 0

    def train_step(self, batch: Batch, loss_weight: float = 1.0, global_batch: int | None = None,
                   offset: int = 0, diagnostics: bool = True) -> dict[str, torch.Tensor | float]:
        """One optimiser step: mean NLL per predicted token of this worker's batch, scaled by
        `loss_weight` (see `DiffusionEngine.train_step`). Metrics stay on the device."""
        loss = self.probe_loss(batch)
        grad_norm = apply_gradients(self.model, self.optimizer, self.scaler, loss, loss_weight,
                                    self.cfg.optim.grad_clip, self.step)
        lr = self.lr_schedule.get_last_lr()[0]
        self.lr_schedule.step()
        self.step += 1
        return {"loss": loss.detach(), "grad_norm": grad_norm.detach(), "lr": lr,
                "tokens": batch["attention_mask"].sum()}

    def probe_loss(self, batch: Batch) -> torch.Tensor:
        """The training loss of `batch` (no draws here, so what `train_step` minimises is what
        `train.balance` times)."""
        batch = to_device(batch, self.device)
        self.train_model.train()
        with autocast(self.precision, self.device):
            nll, count = causal_lm_loss(self.train_model, batch["input_ids"],
                                        batch["attention_mask"])
        return nll.sum() / count.sum().clamp(min=1)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch], use_ema: bool = True,
                 seed: int = 1234) -> dict[str, float]:
        """Validation NLL per predicted token and perplexity (`use_ema`, `seed`: unused, the
        reference LM keeps no EMA and evaluation draws nothing)."""
        self.model.eval()
        total_nll, total_tokens = 0.0, 0
        for batch in (to_device(b, self.device) for b in batches):
            nll, count = causal_lm_loss(self.model, batch["input_ids"], batch["attention_mask"])
            total_nll += nll.sum().item()
            total_tokens += int(count.sum().item())
        self.model.train()
        if total_tokens == 0:
            raise RaydiffError("evaluation got no tokens: is the validation split empty?")
        val_loss = total_nll / total_tokens
        return {"val_loss": val_loss, "val_ppl": math.exp(val_loss)}

    def state_dict(self) -> dict:
        return {
            "kind": self.kind, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict(), "step": self.step,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        torch.set_rng_state(state["torch_rng"])
