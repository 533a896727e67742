"""`raydiff prepare`: raw articles -> cleaned, segmented, de-duplicated, tokenized Parquet shards,
with Ray Data doing the work so that it scales from a laptop to a cluster.

    files --read_binary_files--> lines --parse--> articles (+ status) --segment--> segments
        --groupby(segment)--> unique segments --tokenize (actor pool)--> blocks --write_parquet-->

Output (the layout trainers and evaluation read):

    <out>/tokenizer/                 AutoTokenizer-loadable word-level tokenizer (train split only)
    <out>/{train,valid,test}/*.parquet   input_ids (seq_len ints), attention_mask
    <out>/manifest.json              counts, OOV rate, pad fraction, shards, fingerprint

`<out>` is `data.out_dir/<name>-<fingerprint>`: a different source or data config writes
elsewhere, and re-running the same one finds the manifest and does nothing. Everything is
written to a staging directory that is renamed into place, manifest last, so a half-written
output never looks complete.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydiff.config import DataConfig
from raydiff.data.corpus import (
    SPLITS,
    DataError,
    article_from_row,
    article_segments,
    local_files,
    split_of,
)
from raydiff.data.tokenizer import PAD_ID, UNK_ID, load_tokenizer, train_word_tokenizer

MANIFEST = "manifest.json"
MAX_LINE_BYTES = 1 << 20  # a line over 1 MiB is not an article
STATUSES = ("ok", "malformed_json", "invalid_utf8", "empty_text", "too_long", "empty_file")


# ----------------------------------------------------------------------------- identity


def fingerprint(cfg: DataConfig, files: list[Path]) -> str:
    """Hash of the data config (less out_dir) and each source file's name, size and mtime."""
    h = hashlib.blake2b(digest_size=16)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out_dir"}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def prepared_dir(cfg: DataConfig) -> Path:
    files = local_files(cfg.source)
    name = Path(cfg.source.rstrip("/*")).name.split(".")[0] or "corpus"
    return Path(cfg.out_dir).expanduser().resolve() / f"{name}-{fingerprint(cfg, files)[:12]}"


# ----------------------------------------------------------------------------- stages (per batch)


def _explode_files(batch: dict) -> dict:
    """One row per line of each file: {"path", "lineno", "raw": bytes}; empty files -> a marker."""
    paths, linenos, raws = [], [], []
    for path, data in zip(batch["path"], batch["bytes"], strict=True):
        if data[:2] == b"\x1f\x8b":  # still gzip (Ray inflates only what it recognises)
            data = gzip.decompress(data)
        # Parquet rows become JSON lines, parsed like any JSONL
        lines = _parquet_rows_as_json(data) if path.endswith(".parquet") else data.splitlines()
        if not any(line.strip() for line in lines):
            paths.append(path)
            linenos.append(-1)
            raws.append(b"")
            continue
        for i, line in enumerate(lines):
            if line.strip():
                paths.append(path)
                linenos.append(i)
                raws.append(line)
    return {"path": paths, "lineno": linenos, "raw": raws}


def _parquet_rows_as_json(data: bytes) -> list[bytes]:
    table = pq.read_table(io.BytesIO(data))
    return [json.dumps(row).encode() for row in table.to_pylist()]


class ParseArticles:
    """Decode and parse each line; every line gets a status, and only "ok" lines an article."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def _parse(self, path: str, lineno: int, raw: bytes) -> tuple[str, str, str]:
        if lineno < 0:
            return "empty_file", "", ""
        if len(raw) > MAX_LINE_BYTES:
            return "too_long", "", ""
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return "invalid_utf8", "", ""
        article_id = f"{os.path.basename(path)}:{lineno}"
        if path.endswith((".txt", ".txt.gz")):
            return ("ok", article_id, line) if line.strip() else ("empty_text", "", "")
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return "malformed_json", "", ""
        article = article_from_row(row, self.cfg, article_id)
        if article is None:
            return "empty_text", "", ""
        return "ok", article["id"], article["text"]

    def __call__(self, batch: dict) -> dict:
        parsed = [self._parse(p, int(n), r)
                  for p, n, r in zip(batch["path"], batch["lineno"], batch["raw"], strict=True)]
        status, ids, texts = zip(*parsed, strict=True) if parsed else ((), (), ())
        return {"status": list(status), "id": list(ids), "text": list(texts)}


class SegmentArticles:
    """Clean each article and cut it into segments, tagged with the article's split."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def __call__(self, batch: dict) -> dict:
        segments, ranks = [], []
        for article_id, text in zip(batch["id"], batch["text"], strict=True):
            rank = SPLITS.index(split_of(article_id, self.cfg.valid_fraction,
                                         self.cfg.test_fraction))
            for s in article_segments(text, self.cfg):
                segments.append(s)
                ranks.append(rank)
        return {"segment": segments, "split": np.array(ranks, dtype=np.int8)}


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(tokenizer_dir: str):
    return load_tokenizer(tokenizer_dir)


class TokenizeBlocks:
    """Tokenize segments into fixed blocks. Stages run as tasks, not actor pools: on small
    machines actors holding every CPU starve the read tasks (RAY_NOTES), so the tokenizer is
    cached per worker process instead of per actor."""

    def __init__(self, tokenizer_dir: str, seq_len: int):
        self.tokenizer_dir, self.seq_len = tokenizer_dir, seq_len

    def __call__(self, batch: dict) -> dict:
        tokenizer = _cached_tokenizer(self.tokenizer_dir)
        enc = tokenizer(list(batch["segment"]), max_length=self.seq_len, truncation=True,
                             padding="max_length", return_attention_mask=True,
                             return_tensors="np")
        ids = enc["input_ids"].astype(np.int32)
        mask = enc["attention_mask"].astype(np.int8)
        return {"input_ids": ids, "attention_mask": mask, "split": batch["split"],
                "n_tokens": mask.sum(1).astype(np.int64),
                "n_unk": ((ids == UNK_ID) & (mask == 1)).sum(1).astype(np.int64),
                "n_pad": (ids == PAD_ID).sum(1).astype(np.int64)}


# ----------------------------------------------------------------------------- the run


@dataclass
class PreparedData:
    path: Path
    manifest: dict
    reused: bool  # True when an existing complete output was found


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return None


def prepare(cfg: DataConfig) -> PreparedData:
    """Prepare `cfg.source` under `prepared_dir(cfg)` on the current Ray cluster (started by
    the caller). A no-op when that output is already complete."""
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    out = prepared_dir(cfg)
    existing = read_manifest(out)
    if existing is not None:
        return PreparedData(out, existing, reused=True)
    # Task-based sort shuffle for the group-bys: the default hash shuffle starts aggregator
    # actors, which took 37 s against 10 s for the whole run on 2 CPUs here.
    context = DataContext.get_current()
    previous = context.shuffle_strategy
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        return _prepare(cfg, out)
    finally:
        context.shuffle_strategy = previous


def _prepare(cfg: DataConfig, out: Path) -> PreparedData:
    import ray
    import ray.data

    started = time.perf_counter()
    files = local_files(cfg.source)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".staging-{out.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    parallelism = max(1, int(ray.available_resources().get("CPU", 1)))

    lines = (ray.data.read_binary_files([str(f) for f in files], include_paths=True)
             .map_batches(_explode_files, batch_size=1)
             .repartition(max(4, 4 * parallelism)))
    parsed = lines.map_batches(ParseArticles(cfg), batch_size=1024).materialize()
    counts = {row["status"]: row["count()"]
              for row in parsed.groupby("status", num_partitions=1).count().take_all()}
    articles = parsed.filter(expr="status == 'ok'")
    if cfg.max_articles is not None:
        articles = articles.limit(cfg.max_articles)

    segments = articles.map_batches(SegmentArticles(cfg), batch_size=256)
    # exact duplicates collapse to one row; a segment seen in several splits stays only in the
    # first of (train, valid, test)... held-out splits win so nothing leaks into evaluation
    unique = (segments.map_batches(_hold_out_first, batch_format="pyarrow")
              .groupby("segment", num_partitions=parallelism).min("rank").materialize())
    unique = unique.map_batches(_rank_to_split, batch_format="pyarrow").materialize()
    n_segments_total = segments.count()

    train_text = (row["segment"] for batch in unique.filter(expr="split == 0")
                  .iter_batches(batch_size=4096, batch_format="pyarrow")
                  for row in batch.select(["segment"]).to_pylist())
    tokenizer = train_word_tokenizer(train_text, cfg.vocab_size, lowercase=cfg.lowercase)
    tokenizer.save_pretrained(str(staging / "tokenizer"))

    blocks = unique.map_batches(TokenizeBlocks(str(staging / "tokenizer"), cfg.seq_len),
                                batch_size=1024).materialize()
    # one pass for the statistics, one partitioned write for all splits
    stats = {int(row["split"]): row for row in blocks.groupby("split", num_partitions=1)
             .sum(["n_tokens", "n_unk", "n_pad"]).take_all()}
    blocks.select_columns(["split", "input_ids", "attention_mask"]).write_parquet(
        str(staging / "blocks"), partition_cols=["split"], min_rows_per_file=50_000)
    per_split = {}
    for rank, split in enumerate(SPLITS):
        written = staging / "blocks" / f"split={rank}"
        if written.exists():
            written.rename(staging / split)
        else:
            (staging / split).mkdir()
        row = stats.get(rank, {})
        shards = sorted(p.name for p in (staging / split).glob("*.parquet"))
        per_split[split] = {
            "segments": sum(pq.ParquetFile(staging / split / f).metadata.num_rows for f in shards),
            "tokens": int(row.get("sum(n_tokens)", 0)), "unk": int(row.get("sum(n_unk)", 0)),
            "pad": int(row.get("sum(n_pad)", 0)), "shards": shards,
        }
    shutil.rmtree(staging / "blocks", ignore_errors=True)
    tokens = sum(s["tokens"] for s in per_split.values())
    manifest = {
        "source": cfg.source, "files": [str(f) for f in files],
        "fingerprint": fingerprint(cfg, files), "data_config": dataclasses.asdict(cfg),
        "articles": min(counts.get("ok", 0), cfg.max_articles or counts.get("ok", 0)),
        "lines": sum(counts.values()),
        "skipped": {k: counts.get(k, 0) for k in STATUSES if k != "ok"},
        "segments_before_dedup": n_segments_total,
        "segments": sum(s["segments"] for s in per_split.values()),
        "tokens": tokens, "vocab_size": len(tokenizer),
        "oov_rate": sum(s["unk"] for s in per_split.values()) / max(tokens, 1),
        "pad_fraction": sum(s["pad"] for s in per_split.values())
        / max(1, cfg.seq_len * sum(s["segments"] for s in per_split.values())),
        "splits": per_split, "seconds": time.perf_counter() - started,
    }
    _write_json_atomic(staging / MANIFEST, manifest)
    staging.rename(out)  # the manifest appears with everything else, never before
    return PreparedData(out, manifest, reused=False)


def _hold_out_first(table: pa.Table) -> pa.Table:
    # rank order valid (0) < test (1) < train (2): min() keeps a duplicate in a held-out split
    rank_of_split = np.array([2, 0, 1], dtype=np.int8)  # indexed by SPLITS position
    return table.append_column("rank", pa.array(rank_of_split[table["split"].to_numpy()]))


def _rank_to_split(table: pa.Table) -> pa.Table:
    split_of_rank = np.array([1, 2, 0], dtype=np.int8)
    ranks = table["min(rank)"].to_numpy()
    return pa.table({"segment": table["segment"], "split": split_of_rank[ranks]})


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def read_split_blocks(path: str | Path, split: str) -> dict[str, np.ndarray]:
    """A prepared split as (N, seq_len) arrays, for single-process use (tests, evaluation)."""
    path = Path(path)
    if read_manifest(path) is None:
        raise DataError(f"{path}: not a prepared dataset (no {MANIFEST})")
    files = sorted((path / split).glob("*.parquet"))
    if not files:
        seq_len = read_manifest(path)["data_config"]["seq_len"]
        return {"input_ids": np.zeros((0, seq_len), np.int64),
                "attention_mask": np.zeros((0, seq_len), np.int8)}
    table = pa.concat_tables(pq.read_table(f) for f in files)
    return {name: np.array(table[name].to_pylist(), dtype=np.int64 if name == "input_ids"
                           else np.int8) for name in ("input_ids", "attention_mask")}
