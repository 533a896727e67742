"""Checkpoints as directories, written atomically: a checkpoint either exists whole or not at all.

    <dir>/state.pt        engine state (model, EMA, optimizer, LR schedule, step, RNG states)
    <dir>/config.yaml     the resolved config
    <dir>/tokenizer/      the tokenizer (AutoTokenizer-loadable), so a checkpoint stands alone
    <dir>/integrity.json  every other file's size and SHA-256, written last

A checkpoint is good when its integrity record is there and every file matches it. One loader,
`load_checkpoint`, serves resuming (both training paths), sampling, evaluation and Tune's
reports: given a run directory it takes the newest good checkpoint, and names in one warning
each newer one it skipped and why.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from raydiff.config import Config, load_config
from raydiff.data.tokenizer import load_tokenizer, save_tokenizer
from raydiff.errors import RaydiffError

STATE_FILE, CONFIG_FILE, TOKENIZER_DIR = "state.pt", "config.yaml", "tokenizer"
INTEGRITY_FILE = "integrity.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RaydiffError):
    """A missing, damaged or unreadable checkpoint; the message is one line and names the path."""


class SkippedCheckpoint(UserWarning):
    """A checkpoint that failed its integrity check and was passed over for an older one."""


def write_checkpoint_files(directory: Path, state: dict, cfg: Config, tokenizer) -> None:
    """Fill an (empty, private) directory with one checkpoint's files, the integrity record
    last: a directory without it was never finished."""
    torch.save(state, directory / STATE_FILE)
    cfg.save(directory / CONFIG_FILE)
    save_tokenizer(tokenizer, directory / TOKENIZER_DIR)
    record = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
              for p in sorted(directory.rglob("*")) if p.is_file()}
    (directory / INTEGRITY_FILE).write_text(json.dumps({"files": record}, indent=1))


def save_checkpoint(checkpoints_dir: str | Path, step: int, state: dict, cfg: Config,
                    tokenizer, keep: int | None = None) -> Path:
    """Write `checkpoints_dir/step_<step>` via a temporary sibling and one rename; then, with
    `keep`, delete all but the newest `keep` checkpoints (Ray Train's `num_to_keep`, for the
    one-process path)."""
    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp_step_{step:08d}_", dir=checkpoints_dir))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide it from the team's storage
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
    if keep is not None:
        for stale in checkpoints(checkpoints_dir)[keep:]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def verify_checkpoint(ckpt: Path) -> None:
    """Raise `CheckpointError` unless every file of `ckpt` matches its integrity record."""
    try:
        record = json.loads((ckpt / INTEGRITY_FILE).read_text())["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: no {INTEGRITY_FILE} (unfinished, or not written by "
                              f"raydiff)") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{ckpt}: unreadable {INTEGRITY_FILE}") from None
    for name, want in record.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{ckpt}: {name} is missing")
        if path.stat().st_size != want["bytes"]:
            raise CheckpointError(f"{ckpt}: {name} has {path.stat().st_size} bytes, its record "
                                  f"says {want['bytes']} (truncated or overwritten)")
        if _sha256(path) != want["sha256"]:
            raise CheckpointError(f"{ckpt}: {name} does not match its SHA-256 (corrupt)")


def checkpoint_step(path: str | Path) -> int | None:
    """The step a checkpoint directory (`step_<step>`) holds; None for any other name."""
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def checkpoints(path: str | Path) -> list[Path]:
    """The checkpoint directories of a run directory (its `checkpoints/` on the one-process
    path, itself on Ray) or of a checkpoints directory, newest first, good or not."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        if root.is_dir():
            steps = sorted(((step, p) for p in root.iterdir()
                            if (step := checkpoint_step(p)) is not None and p.is_dir()),
                           reverse=True)
            if steps:
                return [p for _, p in steps]
    return []


def latest_checkpoint(path: str | Path) -> Path | None:
    """The newest checkpoint under a run or checkpoints directory, without checking it."""
    found = checkpoints(path)
    return found[0] if found else None


def good_checkpoint(path: str | Path, *, warn: Callable[[str], None] | None = None) -> Path | None:
    """A checkpoint directory itself (which must be good), or the newest good checkpoint of a
    run directory, `warn` called with one line for each newer one that is not; None when the
    run has no checkpoint at all. A run whose checkpoints are all damaged is an error."""
    path = Path(path)
    if checkpoint_step(path) is not None or (path / STATE_FILE).exists():
        verify_checkpoint(path)
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    found = checkpoints(path)
    warn = warn or (lambda line: warnings.warn(line, SkippedCheckpoint, stacklevel=3))
    damaged = []
    for ckpt in found:
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            damaged.append(str(e))
            continue
        for reason in damaged:
            warn(f"skipping damaged checkpoint {reason}")
        return ckpt
    if found:
        raise CheckpointError(f"{path}: none of its {len(found)} checkpoints is intact "
                              f"(newest: {damaged[0]}); nothing was overwritten")
    return None


def load_state(ckpt: Path, map_location: str | torch.device = "cpu") -> dict:
    """The engine state of a checkpoint already checked by `good_checkpoint`."""
    try:
        return torch.load(ckpt / STATE_FILE, map_location=map_location, weights_only=False)
    except Exception as e:  # a foreign file that still matches its record
        raise CheckpointError(f"{ckpt / STATE_FILE}: unreadable checkpoint "
                              f"({type(e).__name__})") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"):
    """(state, config, tokenizer, checkpoint dir) of a checkpoint, or of a run directory's
    newest good checkpoint."""
    ckpt = good_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"{path}: holds no checkpoint (no step_* directory)")
    state = load_state(ckpt, map_location)
    return state, load_config(ckpt / CONFIG_FILE), load_tokenizer(ckpt / TOKENIZER_DIR), ckpt


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
