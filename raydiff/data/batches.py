"""Batches of prepared blocks held in memory: shuffled per epoch for training in one process,
in order for evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from raydiff.data.storage import DataError


def iterate_batches(blocks: dict[str, np.ndarray], batch_size: int, *, seed: int,
                    shuffle: bool = True, epochs: int | None = None,
                    start: int = 0) -> Iterator[dict]:
    """Batches of `blocks`, reshuffled each epoch with (seed, epoch), each epoch's tail that
    cannot fill a batch dropped. Infinite when epochs is None. `start` skips that many batches
    (a resumed run's steps) without building them: the order is a pure function of (seed,
    batch index)."""
    import torch

    n = blocks["input_ids"].shape[0]
    if n < batch_size:
        raise DataError(f"{n} examples cannot fill one batch of {batch_size}")
    per_epoch = n // batch_size
    epoch, skip = divmod(start, per_epoch)
    while epochs is None or epoch < epochs:
        order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle
                 else np.arange(n))
        for idx in order[:per_epoch * batch_size].reshape(-1, batch_size)[skip:]:  # (steps, B)
            yield {k: torch.from_numpy(v[idx]) for k, v in blocks.items()}
        epoch, skip = epoch + 1, 0


def chunk_batches(blocks: dict[str, np.ndarray], batch_size: int,
                  max_batches: int | None = None) -> Iterator[dict]:
    """Batches in order, the last one possibly short (for evaluation)."""
    import torch

    n = blocks["input_ids"].shape[0]
    for i, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        yield {k: torch.from_numpy(v[start:start + batch_size]) for k, v in blocks.items()}
