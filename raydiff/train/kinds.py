"""What `raydiff train` can train: the diffusion LM, or the reference LM that scores its samples.
Both engines implement `Engine`, so the loop, the batch balancer, the local runner and the Ray
worker serve both."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import torch
from torch import nn

from raydiff.config import Config
from raydiff.diffusion import Batch
from raydiff.train.engine import DiffusionEngine
from raydiff.train.reference import ReferenceEngine


class Engine(Protocol):
    """A model with its optimiser and training state, on one device."""

    kind: str  # stored in its checkpoints' state
    step: int  # optimiser steps taken
    device: torch.device
    model: nn.Module  # the bare model (hooks, weights)
    train_model: nn.Module  # what trains: `model` or its objective, DDP on Ray, compiled as asked
    optimizer: torch.optim.Optimizer

    def __init__(self, cfg: Config, vocab_size: int, device: torch.device,
                 precision: str = "fp32", seed: int = 0,
                 wrap_model: Callable[[nn.Module], nn.Module] | None = None) -> None: ...

    def train_step(self, batch: Batch, loss_weight: float = 1.0,
                   global_batch: int | None = None, offset: int = 0,
                   diagnostics: bool = True) -> dict[str, torch.Tensor | float]:
        """One optimiser step on this worker's rows of the global batch; raises
        `NonFiniteLossError` (on every rank at the same step) instead of applying a bad one.
        Metrics may stay on the device as 0-d tensors: the loop reads them at report time.
        `diagnostics=False`: metrics that cost work but no gradient may be left out."""
        ...

    def probe_loss(self, batch: Batch) -> torch.Tensor:
        """A training loss on throwaway draws, changing no state (what the balancer times)."""
        ...

    def evaluate(self, batches: Iterable[Batch], use_ema: bool = True,
                 seed: int = 1234) -> dict[str, float]:
        """Validation metrics, `val_loss` among them, from fixed draws."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


ENGINES: dict[str, type[Engine]] = {"diffusion": DiffusionEngine, "reference": ReferenceEngine}
