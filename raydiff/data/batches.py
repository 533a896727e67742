"""Batches of prepared blocks held in memory: shuffled per epoch for training in one process,
in order for evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from raydiff.data.storage import DataError


def iterate_batches(blocks: dict[str, np.ndarray], batch_size: int, *, seed: int, rank: int = 0,
                    world_size: int = 1, shuffle: bool = True,
                    epochs: int | None = None) -> Iterator[dict]:
    """Batches of this rank's share of `blocks`, reshuffled each epoch with (seed, epoch); every
    rank sees the same permutation and takes its own stride of it. Infinite when epochs is None."""
    import torch

    n = blocks["input_ids"].shape[0]
    if n < batch_size * world_size:
        raise DataError(f"{n} examples cannot fill one global batch of {batch_size * world_size}")
    epoch = 0
    while epochs is None or epoch < epochs:
        order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle
                 else np.arange(n))
        usable = (n // (batch_size * world_size)) * batch_size * world_size
        mine = order[:usable].reshape(-1, world_size, batch_size)[:, rank]  # (steps, B)
        for idx in mine:
            yield {k: torch.from_numpy(v[idx]) for k, v in blocks.items()}
        epoch += 1


def chunk_batches(blocks: dict[str, np.ndarray], batch_size: int,
                  max_batches: int | None = None) -> Iterator[dict]:
    """Batches in order, the last one possibly short (for evaluation)."""
    import torch

    n = blocks["input_ids"].shape[0]
    for i, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        yield {k: torch.from_numpy(v[start:start + batch_size]) for k, v in blocks.items()}
