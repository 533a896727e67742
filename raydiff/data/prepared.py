"""Reading a prepared dataset back: its manifest, a split's blocks in one process, or Ray
Datasets of its shards for `ray.train.get_dataset_shard`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raydiff.config import DataConfig
from raydiff.data.output import MANIFEST, read_manifest
from raydiff.data.storage import DataError, Location
from raydiff.data.tokenizer import load_tokenizer


@dataclass
class PreparedData:
    location: Location
    manifest: dict
    reused: bool  # True when an existing complete output was found

    @property
    def path(self) -> str:
        return self.location.uri


def open_prepared(path: str, cfg: DataConfig | None = None) -> tuple[Location, dict]:
    """A prepared dataset's location and manifest; a one-line DataError when incomplete."""
    location = Location.of(path, cfg or DataConfig())
    manifest = read_manifest(location)
    if manifest is None:
        raise DataError(f"{path}: not a prepared dataset (no {MANIFEST}; incomplete or wrong path)")
    return location, manifest


def prepared_tokenizer(location: Location):
    """The prepared dataset's tokenizer (transformers' PreTrainedTokenizerFast), from anywhere."""
    with tempfile.TemporaryDirectory() as tmp:
        location.fs.get(location.child("tokenizer").uri + "/", tmp + "/", recursive=True)
        return load_tokenizer(tmp)


def read_split_blocks(path: str, split: str, cfg: DataConfig | None = None) -> dict[str, np.ndarray]:
    """A prepared split as (N, seq_len) arrays in one process (local training, evaluation),
    rows in `row_id` order: the same arrays however the dataset was prepared."""
    location, manifest = open_prepared(path, cfg)
    seq_len = manifest["data_config"]["seq_len"]
    tables = []
    for name in manifest["splits"][split]["shards"]:
        with location.fs.open(f"{location.uri}/{split}/{name}", "rb") as f:
            tables.append(pq.read_table(f, columns=["input_ids", "attention_mask", "row_id"]))
    if not tables:
        return {"input_ids": np.zeros((0, seq_len), np.int64),
                "attention_mask": np.zeros((0, seq_len), np.int8)}
    table = pa.concat_tables(tables)
    table = table.take(pc.sort_indices(table["row_id"]))
    return {"input_ids": np.stack(table["input_ids"].to_numpy(zero_copy_only=False))
            .astype(np.int64),
            "attention_mask": np.stack(table["attention_mask"].to_numpy(zero_copy_only=False))
            .astype(np.int8)}


def training_datasets(path: str, cfg: DataConfig | None = None, splits=("train", "valid"),
                      rows_per_block: int = 256):
    """Ray Datasets of a prepared output, for `ray.train.get_dataset_shard`, in blocks of
    `rows_per_block` rows: many small blocks let workers that consume at different speeds
    (streaming_split(equal=False)) all get data and keep the tail dropped at an epoch's end
    small. Workers reshuffle their stream per epoch (`train.ingest.RowStream`)."""
    import ray.data

    location, manifest = open_prepared(path, cfg)
    out = {}
    for split in splits:
        shards = manifest["splits"][split]["shards"]
        if not shards:
            raise DataError(f"{path}: split {split!r} is empty")
        out[split] = ray.data.read_parquet(
            [location.ray_path(f"{location.uri}/{split}/{s}") for s in shards],
            filesystem=location.arrow_filesystem(),
        ).repartition(target_num_rows_per_block=rows_per_block)
    return out
