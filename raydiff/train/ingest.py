"""How the training workers read the train split from Ray Data.

Ray Train's default ingest (`streaming_split(n, equal=True)`) gives every worker the same number
of rows; workers with unequal local batches (see `raydiff.train.balance`) would then take
unequal numbers of steps and DDP would hang at the epoch's end. `UnevenSplit` hands blocks to
whichever worker asks (`equal=False`), and a `RowStream` serves a worker's rows in batches of
whatever size its current share is; `BalancedBatches` makes all workers start each epoch
together.
"""

from __future__ import annotations

import numpy as np
import ray.train
import torch

from raydiff.diffusion import Batch


class UnevenSplit(ray.train.DataConfig):
    """Split the datasets named in `split` with `streaming_split(n, equal=False)`."""

    def __init__(self, split: tuple[str, ...] = ("train",)):
        super().__init__(datasets_to_split=list(split))
        self._split = split

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            dataset = dataset.copy(dataset)
            dataset.context.execution_options = self._resolve_execution_options(name)
            if name in self._split:
                for rank, shard in enumerate(dataset.streaming_split(world_size, equal=False)):
                    output[rank][name] = shard
            else:
                for rank in range(world_size):
                    output[rank][name] = dataset.iterator()
        return output


class RowStream:
    """One worker's rows of its shard, epoch after epoch (each epoch shuffled locally with its
    own seed), taken in batches of any size."""

    def __init__(self, shard, *, seed: int = 0, read_rows: int = 256, shuffle_rows: int = 1024):
        self.shard, self.seed = shard, seed
        self.read_rows, self.shuffle_rows = read_rows, shuffle_rows
        self.epoch = 0
        self._open()

    def _open(self) -> None:
        self._source = iter(self.shard.iter_batches(
            batch_size=self.read_rows, batch_format="numpy",
            local_shuffle_buffer_size=self.shuffle_rows,
            local_shuffle_seed=self.seed + self.epoch))
        self._pending: list[dict[str, np.ndarray]] = []
        self._count = 0

    def has(self, rows: int) -> bool:
        """Whether `rows` more rows are left in this epoch (reads ahead as needed)."""
        while self._count < rows:
            chunk = next(self._source, None)
            if chunk is None:
                return False
            self._pending.append(chunk)
            self._count += len(chunk["input_ids"])
        return True

    def take(self, rows: int) -> Batch:
        """The next `rows` rows ({"input_ids", "attention_mask"}: (rows, L) int64)."""
        if not self.has(rows):
            raise IndexError(f"only {self._count} rows left in epoch {self.epoch}")
        columns = {k: np.concatenate([np.stack(c[k]) for c in self._pending])
                   for k in ("input_ids", "attention_mask")}
        rest = {k: v[rows:] for k, v in columns.items()}
        self._pending, self._count = ([rest] if len(rest["input_ids"]) else []), self._count - rows
        return {k: torch.from_numpy(np.ascontiguousarray(v[:rows])).long()
                for k, v in columns.items()}

    def next_epoch(self) -> None:
        """Drop what is left of this epoch and start the next (every worker together: the
        split's next epoch begins once all its consumers ask for it)."""
        self.epoch += 1
        self._open()
