"""Shared fixtures: a tiny denoiser and config small enough for CPU tests that run in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from raydiff.config import Config, load_config
from raydiff.model import Denoiser

# Ray hygiene for every test session (see ../shared/RAY_NOTES.md)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def smoke_cfg(tmp_path) -> Config:
    return load_config(ROOT / "configs" / "smoke.yaml", [f"train.output_dir={tmp_path / 'runs'}"])


def tiny_denoiser(vocab_size: int = 50, seq_len: int = 8, embed_dim: int = 8, **overrides):
    cfg = load_config(None, [
        "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.intermediate_size=64", f"model.embed_dim={embed_dim}", "model.dropout=0.0",
        "model.time_embed_dim=16",
        *[f"model.{k}={v}" for k, v in overrides.items()],
    ])
    torch.manual_seed(0)
    return Denoiser(cfg.model, vocab_size, seq_len).eval()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (ray.init costs 6-20 s on 2 CPUs)."""
    import ray
    from ray.data import DataContext

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=300 * 1024**2)
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
