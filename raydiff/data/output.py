"""What `prepare` writes, and how a half-written output is never taken for a complete one.

    <out>/tokenizer/                     AutoTokenizer-loadable word-level tokenizer
    <out>/{train,valid,test}/*.parquet   input_ids, attention_mask (fixed_size_list<seq_len>),
                                         row_id; at most `data.shard_rows` rows per shard
    <out>/manifest.json                  counts, statistics, shards: written last

Shards are written by the workers (`write_shards`), each file atomically; each write returns
its statistics, and the driver turns those (one record per shard, O(shards)) and the tallies
into the manifest (`build_manifest`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raydiff.config import SECRET_KEYS, DataConfig
from raydiff.data.records import RANK_OF_SPLIT, SPLITS, STATUSES
from raydiff.data.sources import Source, fingerprint
from raydiff.data.stages import TALLY_NAME, segments_and_tallies
from raydiff.data.storage import DataError, Location
from raydiff.data.tokenizer import UNK_ID, save_word_tokenizer, tokenizer_from_vocabulary

MANIFEST = "manifest.json"
SECRET_FIELDS = {key.split(".", 1)[1] for key in SECRET_KEYS}


def write_shards(block: pa.Table, stage: Location, name: str, shard_rows: int) -> list[dict]:
    """Write `block`'s segment rows (stages.block_rows) as Parquet shards of at most
    `shard_rows` rows, `<stage>/<split>/part-<name>-<k>.parquet`; return one statistics record
    per shard and one per tally row."""
    results = []
    segments, tallies = segments_and_tallies(block)
    by_split = np.argsort(segments["rank"].to_numpy(), kind="stable")  # each split a slice
    ordered = segments.take(pa.array(by_split))
    rank, ranks = ordered["rank"].to_numpy(), [RANK_OF_SPLIT[split] for split in SPLITS]
    first, last = np.searchsorted(rank, ranks), np.searchsorted(rank, ranks, "right")
    for split, a, b in zip(SPLITS, first.tolist(), last.tolist(), strict=True):
        rows = ordered.slice(a, b - a)
        for k, start in enumerate(range(0, rows.num_rows, shard_rows)):
            part = rows.slice(start, shard_rows)
            shard = f"part-{name}-{k:03d}.parquet"
            table = pa.table({"input_ids": part["input_ids"],
                              "attention_mask": part["attention_mask"],
                              "row_id": part["row_id"]})
            buffer = io.BytesIO()
            pq.write_table(table, buffer)
            stage.child(split).child(shard).write_bytes_atomic(buffer.getvalue())
            ids = pc.list_flatten(part["input_ids"]).to_numpy()
            mask = pc.list_flatten(part["attention_mask"]).to_numpy()
            results.append({"split": split, "shard": shard, "segments": part.num_rows,
                            "tokens": int(mask.sum()), "unk": int(((ids == UNK_ID) & (mask == 1))
                                                                 .sum()),
                            "pad": int((mask == 0).sum()),
                            "occurrences": int(pc.sum(part["n"]).as_py() or 0)})
    for kind, text, n in zip(tallies["kind"].to_pylist(), tallies["text"].to_pylist(),
                             tallies["n"].to_pylist(), strict=True):
        results.append({"tally": TALLY_NAME[kind], "text": text, "n": n})
    return results


def write_tokenizer(stage: Location, vocabulary: list[str], lowercase: bool) -> int:
    """The tokenizer of `vocabulary` (index = id) under `<stage>/tokenizer/`; its size."""
    tokenizer = tokenizer_from_vocabulary(vocabulary, lowercase=lowercase)
    with tempfile.TemporaryDirectory() as tmp:
        save_word_tokenizer(tokenizer, tmp)
        stage.fs.put(tmp + "/", stage.child("tokenizer").uri + "/", recursive=True)
    return tokenizer.get_vocab_size()


def tallies(results: list[dict]) -> tuple[dict[str, int], list[dict]]:
    """The summed tallies of every write ({kind: count}), and the damaged files named."""
    counts = {name: 0 for name in TALLY_NAME.values()}
    damaged = []
    for r in results:
        if "tally" in r:
            counts[r["tally"]] += r["n"]
            if r["tally"] == "corrupt_file":
                path, _, why = r["text"].partition(": ")
                damaged.append({"path": path, "reason": why})
    return counts, sorted(damaged, key=lambda d: d["path"])


def build_manifest(cfg: DataConfig, source_name: str, files: list[str], fingerprint: str,
                   results: list[dict], vocab_size: int, timings: dict[str, float]) -> dict:
    counts, damaged = tallies(results)
    splits = {split: {"segments": 0, "tokens": 0, "unk": 0, "pad": 0, "shards": []}
              for split in SPLITS}
    before_dedup = 0
    for r in sorted((r for r in results if "shard" in r), key=lambda r: r["shard"]):
        s = splits[r["split"]]
        for key in ("segments", "tokens", "unk", "pad"):
            s[key] += r[key]
        s["shards"].append(r["shard"])
        before_dedup += r["occurrences"]
    n_segments = sum(s["segments"] for s in splits.values())
    tokens = sum(s["tokens"] for s in splits.values())
    return {
        "source": source_name, "files": files, "fingerprint": fingerprint,
        "data_config": {k: v for k, v in dataclasses.asdict(cfg).items()
                        if k not in SECRET_FIELDS},
        "articles": counts["articles"], "lines": sum(counts[s] for s in STATUSES),
        "skipped": {s: counts[s] for s in STATUSES if s != "ok"},
        "skipped_files": damaged,
        "segments_before_dedup": before_dedup, "segments": n_segments, "tokens": tokens,
        "vocab_size": vocab_size,
        "oov_rate": sum(s["unk"] for s in splits.values()) / max(tokens, 1),
        "pad_fraction": sum(s["pad"] for s in splits.values())
        / max(1, cfg.seq_len * n_segments),
        "splits": splits, "seconds": sum(timings.values()), "timings": timings,
    }


def existing_manifest(cfg: DataConfig, out: Location) -> dict | None:
    """The manifest of the complete output at `out`, None when there is none yet; under
    `data.strict`, one that counts skipped input is an error (the output stays as it is)."""
    manifest = read_manifest(out)
    if manifest is not None:
        _check_strict(cfg, manifest)
    return manifest


def finish_output(stage: Location, cfg: DataConfig, source: Source, results: list[dict],
                  vocab_size: int, timings: dict[str, float]) -> dict:
    """Build the manifest of a staged output from its shards' records and tallies, check it
    against `data.strict`, and write it last: only then is the output complete."""
    manifest = build_manifest(cfg, cfg.source, source.paths, fingerprint(cfg, source), results,
                              vocab_size, timings)
    _check_strict(cfg, manifest)
    write_manifest(stage, manifest)
    return manifest


def _check_strict(cfg: DataConfig, manifest: dict) -> None:
    """With `data.strict`, any damaged file or skipped line is a one-line error."""
    if not cfg.strict:
        return
    if damaged := manifest["skipped_files"]:
        more = f" (and {len(damaged) - 1} more files)" if len(damaged) > 1 else ""
        raise DataError(f"data.strict: {damaged[0]['path']}: damaged "
                        f"({damaged[0]['reason']}){more}")
    if skipped := {kind: n for kind, n in manifest["skipped"].items() if n}:
        raise DataError(f"data.strict: {sum(skipped.values())} records of {manifest['source']} "
                        f"skipped ({', '.join(f'{k} {n}' for k, n in skipped.items())})")


def write_manifest(stage: Location, manifest: dict) -> None:
    stage.child(MANIFEST).write_text_atomic(json.dumps(manifest, indent=2))


def read_manifest(location: Location) -> dict | None:
    manifest = location.child(MANIFEST)
    if not manifest.exists():
        return None
    return json.loads(manifest.read_text())


class Staging:
    """Local: build in a hidden sibling directory, then rename it into place (atomic). S3: no
    rename exists, so write in place; the manifest, written last, is what marks completion,
    and a leftover partial output from a crashed run is cleared first."""

    def __init__(self, out: Location):
        self.out = out
        if not out.is_local:
            self.stage = out
        else:
            self.stage = Location(str(Path(out.uri).with_name(
                f".staging-{Path(out.uri).name}-{os.getpid()}")), out.fs)

    def __enter__(self) -> Location:
        if self.stage.exists():
            self.stage.fs.rm(self.stage.uri, recursive=True)
        self.stage.fs.makedirs(self.stage.uri, exist_ok=True)
        for split in SPLITS:
            self.stage.fs.makedirs(self.stage.child(split).uri, exist_ok=True)
        return self.stage

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.out.is_local:
            return
        if exc_type is not None:
            shutil.rmtree(self.stage.uri, ignore_errors=True)
            return
        Path(self.stage.uri).rename(self.out.uri)

