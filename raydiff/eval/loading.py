"""Trained models back from checkpoints (a checkpoint directory, or a run directory's newest
good one), ready for evaluation: the diffusion denoiser with its EMA weights, or the reference
LM."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from raydiff.config import Config
from raydiff.diffusion import NoiseSchedule
from raydiff.model import Denoiser
from raydiff.model.reference_lm import build_reference_lm
from raydiff.train.checkpoint import CheckpointError, load_checkpoint
from raydiff.train.reference import REFERENCE_KIND


@dataclass
class LoadedDiffusion:
    path: Path  # the checkpoint directory
    cfg: Config
    tokenizer: object  # transformers.PreTrainedTokenizerFast
    model: Denoiser  # eval mode
    schedule: NoiseSchedule
    step: int


def load_diffusion(path: str | Path, use_ema: bool = True,
                   device: torch.device | str = "cpu") -> LoadedDiffusion:
    """The denoiser of a diffusion checkpoint, with the EMA weights unless `use_ema=False`."""
    state, cfg, tokenizer, ckpt = load_checkpoint(path)
    if state.get("kind", "diffusion") != "diffusion":
        raise CheckpointError(f"{ckpt}: a {state['kind']} checkpoint, not a diffusion model")
    model = Denoiser(cfg.model, len(tokenizer), cfg.data.seq_len, cfg.diffusion.self_condition)
    weights = state["ema"]["model"] if use_ema else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{ckpt}: weights do not match its config.yaml ({first})") from None
    schedule = NoiseSchedule.named(cfg.diffusion.schedule, cfg.diffusion.num_steps)
    return LoadedDiffusion(ckpt, cfg, tokenizer, model.to(device).eval(), schedule,
                           int(state["step"]))


def load_reference(path: str | Path, device: torch.device | str = "cpu"):
    """(model, tokenizer, checkpoint dir) of a reference-LM checkpoint (`raydiff train-reference`)."""
    state, cfg, tokenizer, ckpt = load_checkpoint(path)
    if state.get("kind") != REFERENCE_KIND:
        raise CheckpointError(f"{ckpt}: not a reference LM checkpoint (train one with "
                              f"`raydiff train-reference`)")
    model = build_reference_lm(cfg.reference, len(tokenizer), cfg.data.seq_len)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer, ckpt


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers map every token to the same id."""
    return a.get_vocab() == b.get_vocab()
