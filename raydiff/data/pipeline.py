"""`raydiff prepare`: raw articles -> cleaned, segmented, de-duplicated, tokenized Parquet shards,
with Ray Data doing the work so that it scales from a laptop to a cluster.

    pass 1 (Ray Data, parallel): files (local / s3) --read_binary_files--> lines, or hub /
        synthetic rows --> parse + clean + segment + split into words (the tokenizer's Rust
        pre-tokenization, the heavy part) --> one row per record (status, segments, words)
    driver (`assemble`, Arrow and numpy kernels): status counts, exact-duplicate removal,
        word counts of the train split -> vocabulary -> tokenizer, word -> id lookups,
        fixed-length blocks, Parquet shards per split

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
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raydiff.config import SECRET_KEYS, DataConfig
from raydiff.data.assemble import RANK_OF_SPLIT, SPLIT_OF_RANK, Assembled, assemble
from raydiff.data.corpus import SPLITS, article_from_row, article_segments, parse_line, split_of
from raydiff.data.storage import (
    DataError,
    Location,
    file_identity,
    is_s3,
    list_source_files,
    local_files,
)
from raydiff.data.synthetic import synthetic_news
from raydiff.data.tokenizer import UNK_ID, save_word_tokenizer, word_tokens

MANIFEST = "manifest.json"
MAX_LINE_BYTES = 1 << 20  # a line over 1 MiB is not an article
SHARD_ROWS = 50_000  # rows per Parquet shard
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
    if looks_like_files(src):
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


def looks_like_files(source: str) -> bool:
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


def explode_files(batch: dict) -> dict:
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


class SegmentRecords:
    """Lines (files) or rows (tables) -> one output row per input record: its status, its
    position in the input (for a deterministic `max_articles`), its split, its segments, and
    (when `tokenize`) each segment's words as the tokenizer splits them. Parsing, cleaning,
    segmentation and the tokenizer's Rust work are fused into this one parallel stage; the
    driver is left with counting and table lookups (`assemble`)."""

    SCHEMA = pa.schema([("status", pa.string()), ("order", pa.int64()), ("rank", pa.int8()),
                        ("segments", pa.list_(pa.string())),
                        ("tokens", pa.list_(pa.list_(pa.string())))])

    def __init__(self, cfg: DataConfig, file_index: dict[str, int] | None = None,
                 id_prefix: str = "", tokenize: bool = True):
        self.cfg, self.file_index, self.id_prefix = cfg, file_index, id_prefix
        self.tokenize = tokenize

    def _parse_line(self, path: str, lineno: int, raw: bytes) -> tuple[str, dict | None]:
        if lineno < 0:
            return "empty_file", None
        if len(raw) > MAX_LINE_BYTES:
            return "too_long", None
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return "invalid_utf8", None
        return parse_line(os.path.basename(path), lineno, line, self.cfg)

    def _records(self, batch: dict):
        if self.file_index is not None:  # lines of files
            for path, lineno, raw in zip(batch["path"], batch["lineno"], batch["raw"],
                                         strict=True):
                lineno = int(lineno)
                order = (self.file_index[path] << 32) + max(lineno, 0)
                yield (order, *self._parse_line(path, lineno, raw))
            return
        columns = list(batch)
        for i in range(len(batch["_row"])):  # rows of a table
            row = {c: _plain(batch[c][i]) for c in columns}
            article = article_from_row(row, self.cfg, f"{self.id_prefix}:{row['_row']}")
            yield row["_row"], ("ok" if article else "empty_text"), article

    def __call__(self, batch: dict) -> pa.Table:
        statuses, orders, ranks, segments = [], [], [], []
        for order, status, article in self._records(batch):
            statuses.append(status)
            orders.append(order)
            if article is None:
                ranks.append(-1)
                segments.append([])
                continue
            split = split_of(article["id"], self.cfg.valid_fraction, self.cfg.test_fraction)
            ranks.append(RANK_OF_SPLIT[split])
            segments.append(article_segments(article["text"], self.cfg))
        segment_lists = pa.array(segments, pa.list_(pa.string()))
        words = self._words(segment_lists.flatten().to_pylist())  # per segment
        tokens = pa.ListArray.from_arrays(segment_lists.offsets, words)  # per record
        return pa.table([statuses, orders, ranks, segment_lists, tokens], schema=self.SCHEMA)

    def _words(self, texts: list[str]) -> pa.Array:
        if not self.tokenize or not texts:
            return pa.array([[] for _ in texts], pa.list_(pa.string()))
        # a Ray task holds one CPU: the tokenizer's own thread pool would take every core of
        # the node and fight the other tasks for them
        if _in_ray_worker():
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        return word_tokens(texts, lowercase=self.cfg.lowercase)


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _in_ray_worker() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:
        return False


def _fixed_lists(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """(N, L) -> an Arrow fixed_size_list<L> column, without a Python loop."""
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])


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
    source = resolve_source(cfg)
    out = output_location(cfg, source)
    existing = read_manifest(out)
    if existing is not None:
        return PreparedData(out, existing, reused=True)
    return _prepare(cfg, source, out)


def _records(cfg: DataConfig, source: Source, tokenize: bool = True):
    """Pass 1 as a lazy dataset: one row per input record (see `SegmentRecords`)."""
    import ray
    import ray.data

    stage = functools.partial(SegmentRecords, cfg, tokenize=tokenize)
    cpus = max(1, int(ray.available_resources().get("CPU", 1)))
    blocks = max(2, 2 * cpus)  # a few per CPU: tasks of unequal length even out
    if source.kind == "files":
        lines = ray.data.read_binary_files(
            [source.location.ray_path(f) for f in source.files], include_paths=True,
            filesystem=source.location.arrow_filesystem())
        file_index = {source.location.ray_path(f): i for i, f in enumerate(source.files)}
        return (lines.map_batches(explode_files, batch_size=1).repartition(blocks)
                .map_batches(stage(file_index=file_index), batch_size=None))
    if source.kind == "hub":
        table = _hub_rows(cfg)
        rows = ray.data.from_arrow(table.append_column("_row", pa.array(
            np.arange(table.num_rows)))).repartition(blocks)
    else:
        rows = ray.data.from_items([dict(a, _row=i) for i, a in enumerate(
            synthetic_news(cfg.synthetic_size, cfg.seed))])
    return rows.map_batches(stage(id_prefix=source.name), batch_size=None)


def _gather(dataset) -> pa.Table:
    """Run pass 1 and bring its records to the driver, in input order."""
    import ray

    blocks = ray.get(dataset.to_arrow_refs())
    return pa.concat_tables([b.cast(SegmentRecords.SCHEMA) for b in blocks if b.num_rows]
                            or [SegmentRecords.SCHEMA.empty_table()]).sort_by("order")


def kept_records(records: pa.Table, cfg: DataConfig) -> pa.Table:
    """The articles that parsed, the first `max_articles` of them when that is set."""
    ok = records.filter(pc.equal(records["status"], "ok"))
    return ok if cfg.max_articles is None else ok.slice(0, cfg.max_articles)


def read_segments(cfg: DataConfig) -> dict[str, list[str]]:
    """Pass 1 alone, for any source (files local or s3, hub, synthetic): the cleaned segments of
    each split, in input order (evaluation tokenizes them with a checkpoint's own tokenizer)."""
    records = kept_records(_gather(_records(cfg, resolve_source(cfg), tokenize=False)), cfg)
    out: dict[str, list[str]] = {split: [] for split in SPLITS}
    for rank, segs in zip(records["rank"].to_pylist(), records["segments"].to_pylist(),
                          strict=True):
        out[SPLIT_OF_RANK[rank]] += segs
    return out


def _prepare(cfg: DataConfig, source: Source, out: Location) -> PreparedData:
    started = time.perf_counter()

    # pass 1 (parallel): parse, clean, segment, split into words
    records = _gather(_records(cfg, source))
    statuses, counts = np.unique(records["status"].to_numpy(zero_copy_only=False),
                                 return_counts=True)
    counts = dict(zip(statuses.tolist(), counts.tolist(), strict=True))
    pass1_done = time.perf_counter()

    # the driver: de-duplicate, count the training words, build the tokenizer, look up ids
    kept = kept_records(records, cfg)
    if not pc.sum(pc.list_value_length(kept["segments"])).as_py():
        raise DataError(f"data.source={cfg.source}: no segments after cleaning "
                        f"(line statuses: {counts})")
    assembled = assemble(kept, cfg.vocab_size, cfg.seq_len, cfg.lowercase)
    assembled_at = time.perf_counter()

    with _staging(out) as stage:
        per_split = write_output(stage, assembled)
        written_at = time.perf_counter()
        n_segments = sum(s["segments"] for s in per_split.values())
        tokens = sum(s["tokens"] for s in per_split.values())
        manifest = {
            "source": cfg.source, "files": source.files,
            "fingerprint": fingerprint(cfg, source),
            "data_config": {k: v for k, v in dataclasses.asdict(cfg).items()
                            if k not in SECRET_FIELDS},
            "articles": kept.num_rows, "lines": sum(counts.values()),
            "skipped": {k: counts.get(k, 0) for k in STATUSES if k != "ok"},
            "segments_before_dedup": assembled.segments_before_dedup, "segments": n_segments,
            "tokens": tokens, "vocab_size": assembled.tokenizer.get_vocab_size(),
            "oov_rate": sum(s["unk"] for s in per_split.values()) / max(tokens, 1),
            "pad_fraction": sum(s["pad"] for s in per_split.values())
            / max(1, cfg.seq_len * n_segments),
            "splits": per_split, "seconds": written_at - started,
            "timings": {"pass1_s": pass1_done - started, "assemble_s": assembled_at - pass1_done,
                        "write_s": written_at - assembled_at},
        }
        stage.child(MANIFEST).write_text_atomic(json.dumps(manifest, indent=2))
    return PreparedData(out, manifest, reused=False)


def write_output(stage: Location, assembled: Assembled) -> dict[str, dict]:
    """The tokenizer and every split's shards under `stage`; per-split statistics."""
    with tempfile.TemporaryDirectory() as tmp:
        save_word_tokenizer(assembled.tokenizer, tmp)
        stage.fs.put(tmp + "/", stage.child("tokenizer").uri + "/", recursive=True)
    return {split: _write_split(stage, split, blocks) for split, blocks in assembled.splits.items()}


def _write_split(stage: Location, split: str, blocks: dict[str, np.ndarray]) -> dict:
    """One split's blocks as Parquet shards of up to SHARD_ROWS rows; their statistics."""
    ids, mask = blocks["input_ids"], blocks["attention_mask"]
    stage.fs.makedirs(stage.child(split).uri, exist_ok=True)
    shards = []
    for index, start in enumerate(range(0, len(ids), SHARD_ROWS)):
        rows = slice(start, start + SHARD_ROWS)
        shard = f"part-{index:05d}.parquet"
        table = pa.table({"input_ids": _fixed_lists(ids[rows]),
                          "attention_mask": _fixed_lists(mask[rows]),
                          "row_id": blocks["row_id"][rows]})
        with stage.fs.open(f"{stage.uri}/{split}/{shard}", "wb") as f:
            pq.write_table(table, f)
        shards.append(shard)
    return {"segments": int(len(ids)), "tokens": int(mask.sum()),
            "unk": int(((ids == UNK_ID) & (mask == 1)).sum()), "pad": int((mask == 0).sum()),
            "shards": shards}


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
    """A seeded per-epoch reshuffle: rows sorted by a hash of (row_id, seed, epoch), so the same
    (seed, epoch) gives exactly the same order whatever the block layout (Ray's seeded
    random_shuffle does not), and every epoch a different one."""
    salt = np.uint64((seed * 1_000_003 + epoch) & 0xFFFFFFFFFFFFFFFF)

    def add_key(batch: dict) -> dict:
        batch["shuffle_key"] = _mix64(np.asarray(batch["row_id"]).astype(np.uint64) ^ salt)
        return batch

    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    # the task-based sort shuffle: the default hash shuffle starts aggregator actors, which
    # cost tens of seconds per epoch on a small machine
    context = DataContext.get_current()
    previous = context.shuffle_strategy
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        return (dataset.map_batches(add_key, batch_format="numpy").sort("shuffle_key")
                .drop_columns(["shuffle_key"]))
    finally:
        context.shuffle_strategy = previous


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixed hash of uint64s."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (x ^ (x >> np.uint64(31))).astype(np.int64)
