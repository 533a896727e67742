"""One worker's training state and its step: model, EMA, AdamW, LR schedule, timestep sampler.

No Ray here. The Ray Train worker builds the same engine, passing `wrap_model` (DDP) and its
rank's seed; a single process passes neither.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from raydiff.config import Config, OptimConfig
from raydiff.diffusion import (
    Batch,
    DiffusionObjective,
    Draws,
    LossSpec,
    LossTerms,
    NoiseSchedule,
    diffusion_losses,
    make_timestep_sampler,
)
from raydiff.errors import RaydiffError
from raydiff.eval.metrics import embedding_diagnostics
from raydiff.model import Denoiser
from raydiff.train.ema import EMA
from raydiff.train.precision import autocast


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss. The step was not applied, so the weights (and every
    checkpoint already written) are those of the last good step."""


# fp16 halves its loss scale at every overflowing step; from 2**16 down to below 1 means the
# gradients have been non-finite for 17 steps in a row: the loss itself is broken
COLLAPSED_LOSS_SCALE = 1.0


def apply_gradients(model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, loss: torch.Tensor, loss_weight: float,
                    grad_clip: float, step: int) -> torch.Tensor:
    """Backward (DDP all-reduces the gradients here), clip and step; returns the gradient norm.

    The NaN guard decides on the all-reduced gradients, which every rank of a DDP group holds
    identically, so all ranks raise at the same step (a decision on the rank-local loss would
    let one rank stop while the others wait in the next all-reduce). A NaN/inf loss on any rank
    makes these gradients non-finite. Under fp16 an overflowing step is normal and skipped by
    the scaler; only a collapsed loss scale stops the run.
    """
    scaler.scale(loss * loss_weight).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf,
                                               foreach=True)  # one kernel a step on a CPU too
    broken = (scaler.get_scale() < COLLAPSED_LOSS_SCALE if scaler.is_enabled()
              else not torch.isfinite(grad_norm).item())
    if broken:
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"step {step + 1}: loss is {loss.item()} on this worker, "
                                 f"gradient norm {grad_norm.item()} over the group")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def global_losses(local: torch.Tensor, offset: int, total: int) -> torch.Tensor:
    """(total,) losses of the whole global batch from each worker's (local,) slice at
    `offset`: one SUM all-reduce where a DDP group runs, `local` itself otherwise. A learning
    timestep sampler must see the same losses on every worker, or their draws would part."""
    if len(local) == total:
        return local
    out = torch.zeros(total, dtype=torch.float32, device=local.device)
    out[offset:offset + len(local)] = local.float()
    torch.distributed.all_reduce(out)
    return out


def to_device(data: torch.Tensor | Batch, device: torch.device) -> torch.Tensor | Batch:
    """A tensor, or a batch's ids and mask, on `device`: to a GPU from pinned memory, without
    waiting (the step's one wait is the NaN guard's flag)."""
    if isinstance(data, torch.Tensor):
        if device.type != "cuda" or data.is_cuda:
            return data.to(device)
        return data.pin_memory().to(device, non_blocking=True)
    return {k: to_device(data[k], device) for k in ("input_ids", "attention_mask")}


def training_model(module: nn.Module, wrap_model: Callable[[nn.Module], nn.Module] | None,
                   compile_mode: str) -> nn.Module:
    """What trains: `module` (the model, or its training objective around it), wrapped (DDP on
    Ray) and compiled as asked. The bare model keeps the weights; EMA, evaluation and
    checkpoints use it, never the compiled one."""
    wrapped = wrap_model(module) if wrap_model else module
    return wrapped if compile_mode == "off" else torch.compile(wrapped, mode=compile_mode)


def linear_warmup_anneal(warmup_steps: int, anneal_steps: int) -> Callable[[int], float]:
    """LR multiplier: 0 -> 1 over `warmup_steps`, then 1 -> 0 linearly at `anneal_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (anneal_steps - step) / max(1, anneal_steps - warmup_steps))
    return factor


def build_optimizer(model: nn.Module, o: OptimConfig):
    """AdamW (one fused kernel for all parameters) and its warm-up + annealing LR schedule."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=o.eps, weight_decay=o.weight_decay, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_warmup_anneal(o.warmup_steps, o.anneal_steps))
    return optimizer, schedule


class DiffusionEngine:
    kind = "diffusion"  # stored in its checkpoints' state

    def __init__(self, cfg: Config, vocab_size: int, device: torch.device, precision: str = "fp32",
                 seed: int = 0, wrap_model: Callable[[nn.Module], nn.Module] | None = None):
        self.cfg, self.device, self.precision = cfg, device, precision
        with torch.random.fork_rng(devices=[]):  # identical initial weights on every worker
            torch.manual_seed(cfg.train.seed)
            self.model = Denoiser(cfg.model, vocab_size, cfg.data.seq_len,
                                  cfg.diffusion.self_condition).to(device)
        # the collapse diagnostics' yardstick, (V, d); the same on resume (the same seeded init)
        self.initial_table = self.model.embedding_table().detach().float().cpu().clone()
        self.ema = EMA(self.model, cfg.optim.ema_decay)
        # the tables on the device: the loss gathers them by timestep every step
        self.schedule = NoiseSchedule.named(cfg.diffusion.schedule,
                                            cfg.diffusion.num_steps).to(device)
        self.loss_spec = LossSpec.of(cfg.diffusion)
        self.train_model = training_model(
            DiffusionObjective(self.model, self.schedule, self.loss_spec), wrap_model,
            cfg.train.compile)
        self.timesteps = make_timestep_sampler(cfg.diffusion.timestep_sampling,
                                               cfg.diffusion.num_steps)
        # timesteps and noise: the same seed on every worker (see `train_step`)
        self.generator = torch.Generator().manual_seed(seed)

        self.optimizer, self.lr_schedule = build_optimizer(self.model, cfg.optim)
        # fp16 needs loss scaling; the same initial scale on every worker keeps the
        # all-reduced gradients on one scale
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.step = 0

    # ------------------------------------------------------------------ training

    def train_step(self, batch: Batch, loss_weight: float = 1.0, global_batch: int | None = None,
                   offset: int = 0, diagnostics: bool = True) -> dict[str, torch.Tensor | float]:
        """One optimiser step on this worker's (local) batch. Its metrics are 0-d tensors on the
        device (the loop reads them once per report), apart from the learning rate; with
        `diagnostics=False` (the steps no report reads) the CE term that is not optimised and
        token accuracy are skipped, the step itself unchanged.

        Distributed workers pass where their examples sit in the global batch (`global_batch`,
        `offset`) and `loss_weight` = local_batch * world_size / global_batch: timesteps and
        noise are drawn for the whole global batch from the generator all workers share, and
        each uses its slice, so that with DDP's gradient averaging W workers (equal or unequal
        local batches) take exactly the step one worker takes on the global batch.
        """
        batch = to_device(batch, self.device)
        local, length = batch["input_ids"].shape
        total = global_batch or local
        t_all, weights_all = self.timesteps.sample(total, "cpu", self.generator)
        draws = Draws.sample(t_all, self._noise_shape(total, length), self.generator,
                             self.cfg.diffusion.self_condition)
        mine = slice(offset, offset + local)
        terms = self._objective(batch, draws[mine], diagnostics)
        weights = to_device(weights_all[mine], self.device)
        loss = (terms.total * weights).mean()
        grad_norm = apply_gradients(self.model, self.optimizer, self.scaler, loss, loss_weight,
                                    self.cfg.optim.grad_clip, self.step)
        if self.timesteps.learns:  # every worker learns from the whole global batch
            self.timesteps.update(t_all, global_losses(terms.total.detach(), offset, total))
        lr = self.lr_schedule.get_last_lr()[0]
        self.lr_schedule.step()
        self.ema.update(self.model)
        self.step += 1

        with torch.no_grad():
            terms_out = {"mse": terms.mse, "ce": terms.ce, "tT": terms.t_T,
                         "rounding_ce": terms.rounding_ce, "anchor_ce": terms.anchor_ce,
                         "token_accuracy": terms.token_accuracy}
            return {"loss": loss.detach(), "grad_norm": grad_norm.detach(), "lr": lr,
                    "tokens": batch["attention_mask"].sum()} | {
                k: v.detach().mean() for k, v in terms_out.items() if v is not None}

    def probe_loss(self, batch: Batch) -> torch.Tensor:
        """A training loss of `batch` on throwaway draws: what `train.balance` times."""
        batch = to_device(batch, self.device)
        generator = torch.Generator().manual_seed(0)
        size, length = batch["input_ids"].shape
        t, weights = self.timesteps.sample(size, "cpu", generator)
        draws = Draws.sample(t, self._noise_shape(size, length), generator)
        terms = self._objective(batch, draws, diagnostics=False)
        return (terms.total * to_device(weights, self.device)).mean()

    def _objective(self, batch: Batch, draws: Draws, diagnostics: bool) -> LossTerms:
        """The loss terms through what trains (the objective, wrapped and compiled as asked),
        the draws moved to the device first."""
        t, eps0, eps = (to_device(x, self.device) for x in (draws.t, draws.eps0, draws.eps))
        self.train_model.train()
        with autocast(self.precision, self.device):
            return self.train_model(batch["input_ids"], batch["attention_mask"], t, eps0, eps,
                                    draws.self_cond, diagnostics)

    def _noise_shape(self, size: int, length: int) -> tuple[int, int, int]:
        return size, length, self.model.word_embedding.embedding_dim

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch], use_ema: bool = True,
                 seed: int = 1234) -> dict[str, float]:
        """Validation terms with t ~ uniform and noise from a fixed seed, so that every
        evaluation of every run sees the same draws. Means are over examples."""
        model = self.ema.model if use_ema else self.model
        was_training = model.training
        model.eval()
        generator = torch.Generator().manual_seed(seed)
        batches = list(batches)
        # the timestep whose abar is closest to 1/2: the same noise level for every schedule,
        # so the `_abar50` metrics compare runs with different schedules (raw val_mse does not)
        t_half = int((self.schedule.alphas_cumprod - 0.5).abs().argmin())
        sums: dict[str, float] = {}
        count = 0
        token_counts = torch.zeros(self.initial_table.shape[0], dtype=torch.long)
        for batch in batches:
            token_counts += torch.bincount(batch["input_ids"][batch["attention_mask"].bool()],
                                           minlength=token_counts.shape[0]).cpu()
            batch = to_device(batch, self.device)
            size, length = batch["input_ids"].shape
            t = torch.randint(0, self.schedule.num_steps, (size,), generator=generator)
            for suffix, timesteps in (("", t), ("_abar50", torch.full_like(t, t_half))):
                draws = Draws.sample(timesteps, self._noise_shape(size, length), generator)
                with autocast(self.precision, self.device):
                    terms = diffusion_losses(model, self.schedule, batch, self.loss_spec, draws)
                names = (("total", "mse", "ce", "t_T", "token_accuracy", "z0_sq") if not suffix
                         else ("mse", "token_accuracy"))
                for name in names:
                    key = name + suffix
                    sums[key] = sums.get(key, 0.0) + getattr(terms, name).float().sum().item()
            count += size
        model.train(was_training)
        if count == 0:
            raise RaydiffError("evaluation got no batches: is the validation split empty?")
        out = {f"val_{k}": v / count for k, v in sums.items()}
        out["val_loss"] = out.pop("val_total")
        out["val_mse_over_z0_sq"] = out["val_mse"] / max(out["val_z0_sq"], 1e-12)
        return out | self.embedding_stats(token_counts)

    def embedding_stats(self, token_counts: torch.Tensor | None = None) -> dict[str, float]:
        """Collapse diagnostics of the (trained, not EMA) embedding table against its state at
        step 0, weighted by `token_counts` (V,) (the validation tokens): norms and their ratios,
        mean pairwise cosine, effective rank, the collapse rule's verdict."""
        return embedding_diagnostics(self.model.embedding_table(), self.initial_table,
                                     token_counts)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "kind": self.kind, "model": self.model.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict(), "timesteps": self.timesteps.state_dict(),
            "generator": self.generator.get_state(), "step": self.step,
            "torch_rng": torch.get_rng_state(),  # dropout draws from the global generator
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.timesteps.load_state_dict(state["timesteps"])
        self.generator.set_state(state["generator"])
        self.step = state["step"]
        torch.set_rng_state(state["torch_rng"])
