"""Checkpoints as directories, written atomically: a checkpoint either exists whole or not at all.

    <dir>/state.pt      engine state (model, EMA, optimizer, LR schedule, step, RNG states)
    <dir>/config.yaml   the resolved config
    <dir>/tokenizer/    the tokenizer (AutoTokenizer-loadable), so a checkpoint stands alone
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from raydiff.config import Config, load_config
from raydiff.data.tokenizer import load_tokenizer, save_tokenizer

STATE_FILE, CONFIG_FILE, TOKENIZER_DIR = "state.pt", "config.yaml", "tokenizer"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A missing or unreadable checkpoint; the message is one line and names the path."""


def write_checkpoint_files(directory: Path, state: dict, cfg: Config, tokenizer) -> None:
    """Fill an (empty, private) directory with one checkpoint's files."""
    torch.save(state, directory / STATE_FILE)
    cfg.save(directory / CONFIG_FILE)
    save_tokenizer(tokenizer, directory / TOKENIZER_DIR)


def save_checkpoint(checkpoints_dir: str | Path, step: int, state: dict, cfg: Config,
                    tokenizer) -> Path:
    """Write `checkpoints_dir/step_<step>` via a temporary sibling and one rename."""
    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp_step_{step:08d}_", dir=checkpoints_dir))
    try:
        write_checkpoint_files(tmp, state, cfg, tokenizer)
        if final.exists():  # same step written again (a resumed run): replace it whole
            old = final.with_name(final.name + ".old")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync_dir(checkpoints_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_step(path: str | Path) -> int | None:
    """The step a checkpoint directory (`step_<step>`) holds; None for any other name."""
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def latest_checkpoint(path: str | Path) -> Path | None:
    """The newest complete checkpoint under a run directory or a checkpoints directory."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        if root.is_dir():
            steps = sorted((step, p) for p in root.iterdir()
                           if (step := checkpoint_step(p)) is not None
                           and (p / STATE_FILE).exists())
            if steps:
                return steps[-1][1]
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the latest one in a run directory."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: holds no checkpoint (no step_*/{STATE_FILE})")
    return found


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"):
    """(state, config, tokenizer) of a checkpoint or run directory."""
    ckpt = resolve_checkpoint(path)
    try:
        state = torch.load(ckpt / STATE_FILE, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"{ckpt / STATE_FILE}: unreadable checkpoint ({type(e).__name__})") from None
    cfg = load_config(ckpt / CONFIG_FILE)
    return state, cfg, load_tokenizer(ckpt / TOKENIZER_DIR)
