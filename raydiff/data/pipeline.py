"""`raydiff prepare`: raw articles -> cleaned, segmented, de-duplicated, tokenized Parquet shards,
with Ray Data doing the work so that it scales from a laptop to a cluster.

    files (local / s3) --read_binary_files--> lines --parse-->   articles (+ status)
    hub dataset, synthetic --from_arrow/from_items--> rows --parse--^
    articles --segment--> segments --groupby(segment)--> unique --tokenize--> blocks --write_parquet

Output (the layout trainers and evaluation read):

    <out>/tokenizer/                     AutoTokenizer-loadable word-level tokenizer (train only)
    <out>/{train,valid,test}/*.parquet   input_ids (seq_len ints), attention_mask
    <out>/manifest.json                  counts, OOV rate, pad fraction, shards, fingerprint

`<out>` is `data.out_dir/<name>-<fingerprint>`, local or `s3://`: a different source or data
config writes elsewhere, and re-running the same one finds the manifest and does nothing. The
manifest is written last (locally, the whole output is staged and renamed into place), so a
half-written output never looks complete.
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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydiff.config import SECRET_KEYS, DataConfig
from raydiff.data.corpus import SPLITS, article_from_row, article_segments, split_of
from raydiff.data.storage import (
    DataError,
    Location,
    file_identity,
    is_s3,
    list_source_files,
    local_files,
)
from raydiff.data.synthetic import synthetic_news
from raydiff.data.tokenizer import PAD_ID, UNK_ID, train_word_tokenizer

MANIFEST = "manifest.json"
MAX_LINE_BYTES = 1 << 20  # a line over 1 MiB is not an article
STATUSES = ("ok", "malformed_json", "invalid_utf8", "empty_text", "too_long", "empty_file")
SECRET_FIELDS = {key.split(".", 1)[1] for key in SECRET_KEYS}


# ----------------------------------------------------------------------------- sources


@dataclass
class Source:
    """What `data.source` names: "files" (local or s3), "hub" or "synthetic"."""

    kind: str
    name: str  # a short label for the output directory
    files: list[str]
    location: Location | None  # where the files live
    identity: list[str]  # what the fingerprint hashes besides the config


def resolve_source(cfg: DataConfig) -> Source:
    src = cfg.source
    if src == "synthetic":
        return Source("synthetic", "synthetic", [], None, [])
    if _looks_like_files(src):
        files, location = list_source_files(src, cfg)
        name = Path(src.rstrip("/*")).name.split(".")[0] or "corpus"
        return Source("files", name, files, location,
                      [file_identity(f, location) for f in files])
    # anything else is a hub id: "cc_news", "ucirvine/reuters21578", or a builder like "json"
    identity = [f"hub:{src}|{cfg.hub_config}|{cfg.hub_split}|{cfg.hub_data_files}"]
    if cfg.hub_data_files:
        identity += [f"{f}|{p.stat().st_size}|{p.stat().st_mtime_ns}"
                     for f in [cfg.hub_data_files] for p in local_files(f)]
    return Source("hub", src.replace("/", "_"), [], None, identity)


FILE_SUFFIXES = (".jsonl", ".json", ".gz", ".txt", ".parquet")


def _looks_like_files(source: str) -> bool:
    """s3 URIs, existing paths, globs, and anything path-like (absolute, ./ ~/, a data file
    suffix) are files; what is left is a hub id such as `cc_news` or `org/name`."""
    return (is_s3(source) or Path(source).expanduser().exists()
            or any(ch in source for ch in "*?[") or source.startswith(("/", ".", "~"))
            or source.endswith(FILE_SUFFIXES))


def fingerprint(cfg: DataConfig, source: Source) -> str:
    """Hash of the data config (less out_dir and credentials) and the source's identity."""
    h = hashlib.blake2b(digest_size=16)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k != "out_dir" and k not in SECRET_FIELDS}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for item in source.identity:
        h.update(item.encode())
    return h.hexdigest()


def output_location(cfg: DataConfig, source: Source | None = None) -> Location:
    source = source or resolve_source(cfg)
    base = Location.of(cfg.out_dir, cfg)
    return base.child(f"{source.name}-{fingerprint(cfg, source)[:12]}")


def _hub_rows(cfg: DataConfig):
    """A hub dataset as an Arrow table (loaded by `datasets`; never through Ray's
    from_huggingface, which makes hub calls without a timeout)."""
    import datasets

    try:
        ds = datasets.load_dataset(cfg.source, name=cfg.hub_config, split=cfg.hub_split,
                                   data_files=cfg.hub_data_files)
    except Exception as e:
        raise DataError(f"data.source={cfg.source}: cannot load hub dataset "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return ds.data.table


# ----------------------------------------------------------------------------- stages (per batch)


def _explode_files(batch: dict) -> dict:
    """One row per line of each file: {"path", "lineno", "raw": bytes}; empty files -> a marker."""
    paths, linenos, raws = [], [], []
    for path, data in zip(batch["path"], batch["bytes"], strict=True):
        if data[:2] == b"\x1f\x8b":  # still gzip (Ray inflates only what it recognises)
            data = gzip.decompress(data)
        # Parquet rows become JSON lines, parsed like any JSONL
        lines = _parquet_rows_as_json(data) if path.endswith(".parquet") else data.splitlines()
        kept = [(i, line) for i, line in enumerate(lines) if line.strip()]
        for i, line in kept or [(-1, b"")]:
            paths.append(path)
            linenos.append(i)
            raws.append(line)
    return {"path": paths, "lineno": linenos, "raw": raws}


def _parquet_rows_as_json(data: bytes) -> list[bytes]:
    table = pq.read_table(io.BytesIO(data))
    return [json.dumps(row, default=str).encode() for row in table.to_pylist()]


class ParseLines:
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
        return _status_columns(parsed)


class ParseRows:
    """Table rows (hub datasets, the synthetic corpus) to articles with a status."""

    def __init__(self, cfg: DataConfig, id_prefix: str):
        self.cfg, self.id_prefix = cfg, id_prefix

    def __call__(self, batch: dict) -> dict:
        columns = list(batch)
        n = len(batch[columns[0]]) if columns else 0
        parsed = []
        for i in range(n):
            row = {c: _plain(batch[c][i]) for c in columns}
            article = article_from_row(row, self.cfg, f"{self.id_prefix}:{row.get('_row')}")
            parsed.append(("ok", article["id"], article["text"]) if article
                          else ("empty_text", "", ""))
        return _status_columns(parsed)


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _status_columns(parsed: list[tuple[str, str, str]]) -> dict:
    status, ids, texts = zip(*parsed, strict=True) if parsed else ((), (), ())
    return {"status": list(status), "id": list(ids), "text": list(texts)}


class SegmentArticles:
    """Clean each article and cut it into segments, tagged with the article's hold-out rank."""

    # rank order valid (0) < test (1) < train (2): min(rank) over duplicates keeps a segment in
    # a held-out split, so nothing seen in evaluation is also trained on
    RANK_OF_SPLIT = {"valid": 0, "test": 1, "train": 2}

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def __call__(self, batch: dict) -> dict:
        segments, ranks = [], []
        for article_id, text in zip(batch["id"], batch["text"], strict=True):
            split = split_of(article_id, self.cfg.valid_fraction, self.cfg.test_fraction)
            for s in article_segments(text, self.cfg):
                segments.append(s)
                ranks.append(self.RANK_OF_SPLIT[split])
        return {"segment": segments, "rank": np.array(ranks, dtype=np.int8)}


@functools.lru_cache(maxsize=4)
def _tokenizer_from_json(tokenizer_json: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


class TokenizeBlocks:
    """Tokenize segments into fixed blocks. The tokenizer travels as its JSON (any node can
    build it), cached per worker process; stages run as tasks, not actor pools, because on
    small machines actors holding every CPU starve the read tasks."""

    SPLIT_OF_RANK = np.array([SPLITS.index("valid"), SPLITS.index("test"), SPLITS.index("train")],
                             dtype=np.int8)

    def __init__(self, tokenizer_json: str, seq_len: int):
        self.tokenizer_json, self.seq_len = tokenizer_json, seq_len

    def __call__(self, batch: dict) -> dict:
        tokenizer = _tokenizer_from_json(self.tokenizer_json)
        ids = np.full((len(batch["segment"]), self.seq_len), PAD_ID, dtype=np.int32)
        lengths = np.zeros(len(batch["segment"]), dtype=np.int64)
        for row, enc in enumerate(tokenizer.encode_batch(list(batch["segment"]))):
            tokens = enc.ids[: self.seq_len]  # truncate
            ids[row, : len(tokens)] = tokens
            lengths[row] = len(tokens)
        mask = (np.arange(self.seq_len)[None, :] < lengths[:, None]).astype(np.int8)
        return {"input_ids": ids, "attention_mask": mask,
                "split": self.SPLIT_OF_RANK[batch["rank"]],
                "n_tokens": mask.sum(1).astype(np.int64),
                "n_unk": ((ids == UNK_ID) & (mask == 1)).sum(1).astype(np.int64),
                "n_pad": (mask == 0).sum(1).astype(np.int64)}


# ----------------------------------------------------------------------------- the run


@dataclass
class PreparedData:
    location: Location
    manifest: dict
    reused: bool  # True when an existing complete output was found

    @property
    def path(self) -> str:
        return self.location.uri


def read_manifest(location: Location) -> dict | None:
    manifest = location.child(MANIFEST)
    if not manifest.exists():
        return None
    return json.loads(manifest.read_text())


def prepare(cfg: DataConfig) -> PreparedData:
    """Prepare `cfg.source` under `output_location(cfg)` on the current Ray cluster (started by
    the caller). A no-op when that output is already complete."""
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    source = resolve_source(cfg)
    out = output_location(cfg, source)
    existing = read_manifest(out)
    if existing is not None:
        return PreparedData(out, existing, reused=True)
    # Task-based sort shuffle for the group-bys: the default hash shuffle starts aggregator
    # actors, which took 37 s against 10 s for a whole small run on 2 CPUs here.
    context = DataContext.get_current()
    previous = context.shuffle_strategy
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        return _prepare(cfg, source, out)
    finally:
        context.shuffle_strategy = previous


def _articles(cfg: DataConfig, source: Source, parallelism: int):
    """The parsed dataset: one row per input line or record with status, id and text."""
    import ray.data

    if source.kind == "files":
        lines = ray.data.read_binary_files(
            [source.location.ray_path(f) for f in source.files], include_paths=True,
            filesystem=source.location.arrow_filesystem())
        return (lines.map_batches(_explode_files, batch_size=1)
                .repartition(max(4, 4 * parallelism))
                .map_batches(ParseLines(cfg), batch_size=1024))
    if source.kind == "hub":
        table = _hub_rows(cfg)
        table = table.append_column("_row", pa.array(np.arange(table.num_rows)))
        rows = ray.data.from_arrow(table).repartition(max(4, 4 * parallelism))
    else:
        rows = ray.data.from_items([dict(a, _row=i) for i, a in enumerate(
            synthetic_news(cfg.synthetic_size, cfg.seed))])
    return rows.map_batches(ParseRows(cfg, source.name), batch_size=1024)


def _prepare(cfg: DataConfig, source: Source, out: Location) -> PreparedData:
    import ray
    from ray.data.aggregate import Count, Sum

    started = time.perf_counter()
    parallelism = max(1, int(ray.available_resources().get("CPU", 1)))

    parsed = _articles(cfg, source, parallelism).materialize()
    counts = {row["status"]: row["count()"]
              for row in parsed.groupby("status", num_partitions=1).count().take_all()}
    articles = parsed.filter(expr="status == 'ok'")
    if cfg.max_articles is not None:
        articles = articles.limit(cfg.max_articles)
    segments = articles.map_batches(SegmentArticles(cfg), batch_size=256).materialize()
    n_segments_total = segments.count()
    if n_segments_total == 0:
        raise DataError(f"data.source={cfg.source}: no segments after cleaning "
                        f"(line statuses: {counts})")
    unique = (segments.groupby("segment", num_partitions=parallelism).min("rank")
              .rename_columns({"min(rank)": "rank"}).materialize())

    train_rank = SegmentArticles.RANK_OF_SPLIT["train"]
    train_text = (s for batch in unique.filter(expr=f"rank == {train_rank}")
                  .iter_batches(batch_size=4096, batch_format="pyarrow")
                  for s in batch["segment"].to_pylist())
    tokenizer = train_word_tokenizer(train_text, cfg.vocab_size, lowercase=cfg.lowercase)
    blocks = unique.map_batches(
        TokenizeBlocks(tokenizer.backend_tokenizer.to_str(), cfg.seq_len),
        batch_size=1024).materialize()
    stats = {int(row["split"]): row for row in blocks.groupby("split", num_partitions=1)
             .aggregate(Count(), Sum("n_tokens"), Sum("n_unk"), Sum("n_pad")).take_all()}

    with _staging(out) as stage:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            stage.fs.put(tmp + "/", stage.child("tokenizer").uri + "/", recursive=True)
        per_split = {}
        for index, split in enumerate(SPLITS):
            row = stats.get(index, {})
            target = stage.child(split)
            stage.fs.makedirs(target.uri, exist_ok=True)
            if row:
                (blocks.filter(expr=f"split == {index}")
                 .select_columns(["input_ids", "attention_mask"])
                 .write_parquet(stage.ray_path(target.uri), filesystem=stage.arrow_filesystem(),
                                min_rows_per_file=50_000))
            per_split[split] = {
                "segments": int(row.get("count()", 0)),
                "tokens": int(row.get("sum(n_tokens)", 0)), "unk": int(row.get("sum(n_unk)", 0)),
                "pad": int(row.get("sum(n_pad)", 0)),
                "shards": sorted(Path(p).name for p in stage.fs.glob(target.uri + "/*.parquet"))}
        n_segments = sum(s["segments"] for s in per_split.values())
        tokens = sum(s["tokens"] for s in per_split.values())
        manifest = {
            "source": cfg.source, "files": source.files,
            "fingerprint": fingerprint(cfg, source),
            "data_config": {k: v for k, v in dataclasses.asdict(cfg).items()
                            if k not in SECRET_FIELDS},
            "articles": min(counts.get("ok", 0), cfg.max_articles or counts.get("ok", 0)),
            "lines": sum(counts.values()),
            "skipped": {k: counts.get(k, 0) for k in STATUSES if k != "ok"},
            "segments_before_dedup": n_segments_total, "segments": n_segments,
            "tokens": tokens, "vocab_size": len(tokenizer),
            "oov_rate": sum(s["unk"] for s in per_split.values()) / max(tokens, 1),
            "pad_fraction": sum(s["pad"] for s in per_split.values())
            / max(1, cfg.seq_len * n_segments),
            "splits": per_split, "seconds": time.perf_counter() - started,
        }
        stage.child(MANIFEST).write_text_atomic(json.dumps(manifest, indent=2))
    return PreparedData(out, manifest, reused=False)


class _staging:
    """Local: build in a hidden sibling directory, then rename it into place (atomic). S3: no
    rename exists, so write in place; the manifest, written last, is what marks completion,
    and a leftover partial output from a crashed run is cleared first."""

    def __init__(self, out: Location):
        self.out = out
        if out.is_s3:
            self.stage = out
        else:
            self.stage = Location(str(Path(out.uri).with_name(
                f".staging-{Path(out.uri).name}-{os.getpid()}")), out.fs)

    def __enter__(self) -> Location:
        if self.stage.exists():
            self.stage.fs.rm(self.stage.uri, recursive=True)
        self.stage.fs.makedirs(self.stage.uri, exist_ok=True)
        return self.stage

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.out.is_s3:
            return
        if exc_type is not None:
            shutil.rmtree(self.stage.uri, ignore_errors=True)
            return
        Path(self.stage.uri).rename(self.out.uri)


# ----------------------------------------------------------------------------- reading it back


def open_prepared(path: str, cfg: DataConfig | None = None) -> tuple[Location, dict]:
    """A prepared dataset's location and manifest; a one-line DataError when incomplete."""
    location = Location.of(path, cfg or DataConfig())
    manifest = read_manifest(location)
    if manifest is None:
        raise DataError(f"{path}: not a prepared dataset (no {MANIFEST}; incomplete or wrong path)")
    return location, manifest


def read_split_blocks(path: str, split: str, cfg: DataConfig | None = None) -> dict[str, np.ndarray]:
    """A prepared split as (N, seq_len) arrays, in one process (tests, evaluation)."""
    location, manifest = open_prepared(path, cfg)
    seq_len = manifest["data_config"]["seq_len"]
    tables = []
    for name in manifest["splits"][split]["shards"]:
        with location.fs.open(f"{location.uri}/{split}/{name}", "rb") as f:
            tables.append(pq.read_table(f, columns=["input_ids", "attention_mask"]))
    if not tables:
        return {"input_ids": np.zeros((0, seq_len), np.int64),
                "attention_mask": np.zeros((0, seq_len), np.int8)}
    table = pa.concat_tables(tables)
    return {"input_ids": np.stack(table["input_ids"].to_numpy(zero_copy_only=False))
            .astype(np.int64),
            "attention_mask": np.stack(table["attention_mask"].to_numpy(zero_copy_only=False))
            .astype(np.int8)}


def training_datasets(path: str, cfg: DataConfig | None = None, splits=("train", "valid"),
                      rows_per_block: int = 256):
    """Ray Datasets of a prepared output, for `ray.train.get_dataset_shard`, in blocks of
    `rows_per_block` rows: many small blocks let workers that consume at different speeds
    (streaming_split(equal=False)) all get data and keep the tail dropped at an epoch's end
    small. Shuffle per epoch with `shuffled(ds, seed, epoch)`."""
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


def shuffled(dataset, seed: int, epoch: int):
    """A seeded per-epoch reshuffle: the same (seed, epoch) gives the same order."""
    return dataset.random_shuffle(seed=seed * 1_000_003 + epoch)
