"""Batched generation from a trained denoiser: token ids -> words and text, with progress."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from raydiff.config import DiffusionConfig
from raydiff.data.tokenizer import PAD_ID
from raydiff.diffusion import sample
from raydiff.errors import RaydiffError
from raydiff.eval.loading import LoadedDiffusion
from raydiff.files import write_atomic


class SamplerNotice(UserWarning):
    """A sampler setting that cannot be honoured as given (and what is done instead)."""


@dataclass(frozen=True)
class SamplerSettings:
    sampler: Literal["ddpm", "ddim"]
    steps: int  # ddim: sub-sequence length; ddpm always visits all T
    eta: float
    clamp: bool
    precision: Literal["float32", "float64"] = "float32"  # of the model and the sampler's state
    clamp_below: float = 1.0  # clamp only where t < clamp_below * T

    @classmethod
    def of(cls, cfg: DiffusionConfig, **overrides) -> SamplerSettings:
        """The checkpoint's own sampler settings, with any non-None override applied."""
        values = {"sampler": cfg.sampler, "steps": cfg.sample_steps, "eta": cfg.eta,
                  "clamp": cfg.clamp, "clamp_below": cfg.clamp_below}
        values |= {k: v for k, v in overrides.items() if v is not None}
        if values["sampler"] not in ("ddpm", "ddim"):
            raise RaydiffError(f"--sampler must be ddpm or ddim, got {values['sampler']!r}")
        if not 0.0 <= values["eta"] <= 1.0:
            raise RaydiffError(f"--eta must be in [0, 1], got {values['eta']}")
        if values.get("precision", "float32") not in ("float32", "float64"):
            raise RaydiffError(f"--precision must be float32 or float64, got "
                               f"{values['precision']!r}")
        if not 0.0 < values["clamp_below"] <= 1.0:
            raise RaydiffError(f"--clamp-below must be in (0, 1], got {values['clamp_below']}")
        if values["steps"] < 1:
            raise RaydiffError(f"--steps must be >= 1, got {values['steps']}")
        asked = overrides.get("steps")
        if asked is not None and values["sampler"] == "ddpm" and asked != cfg.num_steps:
            warnings.warn(f"--steps {asked} is ignored: DDPM takes all T = {cfg.num_steps} "
                          f"steps", SamplerNotice, stacklevel=2)
        elif asked is not None and asked > cfg.num_steps:
            warnings.warn(f"--steps {asked} exceeds the model's T = {cfg.num_steps}: sampling "
                          f"with {cfg.num_steps} steps", SamplerNotice, stacklevel=2)
        return cls(**values)

    def model_calls(self, num_steps: int) -> int:
        return num_steps if self.sampler == "ddpm" else min(self.steps, num_steps)

    def describe(self, num_steps: int) -> dict:
        """What a run of these settings did, for JSON outputs (`steps`: the model calls)."""
        return {"sampler": self.sampler, "steps": self.model_calls(num_steps), "eta": self.eta,
                "clamp": self.clamp, "clamp_below": self.clamp_below,
                "precision": self.precision}


@dataclass
class GeneratedSample:
    token_ids: list[int]  # PAD positions removed
    words: str  # the tokens joined by spaces: what the text metrics read
    text: str  # decoded for people


def generate(loaded: LoadedDiffusion, num_samples: int, settings: SamplerSettings, *,
             seed: int = 0, batch_size: int = 64,
             on_batch: Callable[[int], None] | None = None,
             device: torch.device | str = "cpu") -> list[GeneratedSample]:
    """`num_samples` sequences of the checkpoint's length. The same (seed, batch_size) gives
    the same samples. `on_batch(n)` is called after each batch of n."""
    if num_samples < 1:
        raise RaydiffError(f"--num-samples must be >= 1, got {num_samples}")
    cfg, tokenizer = loaded.cfg, loaded.tokenizer
    model = loaded.model
    if settings.precision == "float64":  # a copy: scoring keeps the float32 weights
        model = copy.deepcopy(model).to(torch.float64)
    generator = torch.Generator().manual_seed(seed)
    samples: list[GeneratedSample] = []
    while len(samples) < num_samples:
        size = min(batch_size, num_samples - len(samples))
        out = sample(model, loaded.schedule,
                     (size, cfg.data.seq_len, cfg.model.embed_dim),
                     sampler=settings.sampler, sample_steps=settings.steps, eta=settings.eta,
                     clamp=settings.clamp, clamp_below=settings.clamp_below,
                     noise_factor=cfg.diffusion.noise_factor,
                     self_condition=cfg.diffusion.self_condition, generator=generator,
                     device=device)
        for row in out.tokens.tolist():  # (size, L)
            ids = [i for i in row if i != PAD_ID]
            samples.append(GeneratedSample(
                ids, " ".join(tokenizer.convert_ids_to_tokens(ids)), tokenizer.decode(ids)))
        if on_batch is not None:
            on_batch(size)
    return samples


def write_samples(path: str | Path, samples: list[GeneratedSample], settings: SamplerSettings,
                  loaded: LoadedDiffusion, seed: int) -> None:
    """One JSON object per sample, the file written whole (`raydiff.files.write_atomic`)."""
    common = {"checkpoint": str(loaded.path), "step": loaded.step, "seed": seed,
              **settings.describe(loaded.schedule.num_steps)}
    write_atomic(path, "".join(
        json.dumps({"index": i, "text": s.text, "num_tokens": len(s.token_ids),
                    "token_ids": s.token_ids} | common) + "\n" for i, s in enumerate(samples)))
