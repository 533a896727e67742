"""`raydiff prepare` on Ray Data: raw articles -> cleaned, segmented, de-duplicated, tokenized
Parquet shards, every stage that touches the corpus on the workers.

    read: CorpusFiles (0.5 CPU a task)        files (local, s3, hub) -> records, streamed
    map_batches(SegmentStage)                 parse, clean, segment; tally every record
    groupby(kind, text).aggregate(            exact de-duplication (hash shuffle): the most
        min rank, min pos, sum n)               held-out split, the first position, the count
      -> map_batches(WordStage)               words (fused into the shuffle's reduce tasks)
    materialize                               the unique segments' words, in the object store
    map_batches(word_counts) -> groupby(word).sum -> map_batches(TopWords)
                                              -> the vocabulary's candidates, to the driver
    map_batches(EncodeStage) -> write_datasink(ShardSink)
                                              ids, blocks, Parquet shards of at most
                                              data.shard_rows; their statistics, to the driver

The driver holds the file list, the character tables, at most `vocab_size` candidate words per
count partition, one statistics record per shard and the manifest: nothing that grows with the
corpus. The stages are `stages.py`'s, the same the in-process `local.prepare_local` runs, so
both give the same output for the same config. The read task asks for half a CPU so that it
never fuses with the segmenting task: one large file still keeps every CPU busy.

On a multi-node cluster `data.out_dir` must be storage every node reaches (s3:// or a shared
mount): the workers write the shards.
"""

from __future__ import annotations

import math
import time

import pyarrow as pa
import ray
import ray.data
from ray.data.aggregate import Min, Sum
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink, FileBasedDatasource

from raydiff.config import DataConfig
from raydiff.data.local import choose_vocabulary
from raydiff.data.output import (
    Staging,
    existing_manifest,
    finish_output,
    write_shards,
    write_tokenizer,
)
from raydiff.data.prepared import PreparedData
from raydiff.data.records import CHUNK_BYTES, read_records, records_of_articles
from raydiff.data.sources import Source, output_location, resolve_source
from raydiff.data.stages import (
    COUNTS,
    DEDUP_AGGREGATES,
    DEDUP_KEYS,
    EncodeStage,
    SegmentStage,
    SmallestOk,
    TopWords,
    WordStage,
    word_counts,
)
from raydiff.data.storage import Location
from raydiff.data.synthetic import synthetic_news
from raydiff.data.unicode import CharTables

PARTITION_BYTES = 256 << 20  # aim for shuffle partitions of about this much text
BLOCK_BYTES = 16 << 20  # blocks (so tasks) of at most this much data ...
SHUFFLE_MAP_BYTES = 64 << 20  # ... and input per shuffle-map task (Ray's default: 1 GiB)
TASKS_PER_CPU = 4  # ... but small enough that each stage has this many tasks per CPU


def prepare(cfg: DataConfig) -> PreparedData:
    """Prepare `cfg.source` under `output_location(cfg)` on the current Ray cluster (started by
    the caller). A no-op when that output is already complete."""
    source = resolve_source(cfg)
    out = output_location(cfg, source)
    existing = existing_manifest(cfg, out)
    if existing is not None:
        return PreparedData(out, existing, reused=True)
    return _prepare(cfg, source, out)


def _prepare(cfg: DataConfig, source: Source, out: Location) -> PreparedData:
    marks = [time.perf_counter()]
    tables = CharTables.build(cfg.lowercase, cfg.pack)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    inflated = _inflated_bytes(source, cfg)
    partitions = max(2 * cpus, math.ceil(inflated / PARTITION_BYTES))
    per_task = max(256 << 10, inflated // (TASKS_PER_CPU * cpus))

    nodes = sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU"))

    def tuned(dataset, data_bytes: int = per_task):
        return _tuned(dataset, min(BLOCK_BYTES, data_bytes), min(SHUFFLE_MAP_BYTES, data_bytes),
                      nodes)

    marks.append(time.perf_counter())

    stage = SegmentStage(cfg, tuple(source.files), tables, _last_order(source, cfg))
    # read in chunks of half a task's text: Ray's read buffer joins them into blocks of about a
    # task's (up to 1.5x the block size), so that one large file still makes several tasks
    records = _records(source, cfg, fused=_files_go_round(source, cpus),
                       chunk_bytes=min(CHUNK_BYTES, per_task // 2))
    words = (tuned(records)
             .map_batches(stage, batch_size=None, batch_format="pyarrow")
             .groupby(list(DEDUP_KEYS), num_partitions=partitions)
             .aggregate(*({"min": Min, "sum": Sum}[how](c, alias_name=c)
                          for c, how in DEDUP_AGGREGATES))
             .map_batches(WordStage(tables), batch_size=None, batch_format="pyarrow")
             .materialize())
    marks.append(time.perf_counter())

    rows = words.count()
    # count tasks of up to four of the words' blocks, as many as a multiple of the CPUs
    most = 4 * math.ceil(rows / max(1, words.num_blocks()))
    candidates = (tuned(words)
                  .map_batches(word_counts, batch_size=_per_task(rows, cpus, most),
                               batch_format="pyarrow")
                  .groupby("word", num_partitions=partitions)
                  .aggregate(Sum("count", alias_name="count"))
                  .map_batches(TopWords(cfg.vocab_size), batch_size=None, batch_format="pyarrow"))
    candidates = [t for t in ray.get(candidates.to_arrow_refs()) if t.num_rows]
    vocabulary = choose_vocabulary(
        pa.concat_tables(candidates) if candidates else COUNTS.empty_table(), cfg, source)
    marks.append(time.perf_counter())

    with Staging(out) as staging:
        # one pass for every split; each write task gets up to ten shards' worth of rows, so
        # that the held-out splits' shards (5% each by default) are not tiny, and two tasks a
        # CPU at least, so that one CPU's last task does not run alone
        sink = ShardSink(staging, cfg.shard_rows,
                         _per_task(rows, 2 * cpus, 10 * cfg.shard_rows))
        (tuned(words).map_batches(EncodeStage(tuple(vocabulary), cfg.seq_len), batch_size=None,
                                  batch_format="pyarrow").write_datasink(sink))
        results = sink.results
        vocab_size = write_tokenizer(staging, vocabulary, cfg.lowercase)
        marks.append(time.perf_counter())
        names = ("tables_s", "segments_s", "vocabulary_s", "write_s")
        timings = {name: b - a for name, a, b in zip(names, marks[:-1], marks[1:], strict=True)}
        manifest = finish_output(staging, cfg, source, results, vocab_size, timings)
    return PreparedData(out, manifest, reused=False)


def _per_task(rows: int, cpus: int, most: int) -> int:
    """Rows per task for `rows` in tasks of at most `most` rows, as many tasks as a multiple of
    `cpus`, so that no CPU is left with a last task alone."""
    tasks = cpus * max(1, math.ceil(rows / (cpus * most)))
    return max(1, math.ceil(rows / tasks))


def _tuned(dataset, block_bytes: int, map_bytes: int, nodes: int = 1):
    """`dataset` with this pipeline's execution settings, in its own copy of the DataContext.
    Measured on 2 CPUs (docs/benchmarks.md): Ray's defaults (blocks of up to 128 MiB, 1 GiB of
    input per shuffle-map task, a CPU reservation for each of the operators) ran the
    segmenting stage about one task at a time; these took a 450 MB corpus from 30 s to 19 s."""
    context = dataset.context
    context.target_max_block_size = block_bytes
    context.shuffle_input_batch_bytes = map_bytes
    context.op_resource_reservation_enabled = False
    if nodes == 1:  # shuffled blocks never cross a network: compressing them only costs CPU
        context.shuffle_compression = "none"
    return dataset


def _files_go_round(source: Source, cpus: int) -> bool:
    """Whether whole files, one task each, keep every CPU busy: at least one per CPU, and none
    more than a CPU's share of the bytes (one large file and a few small ones: no)."""
    sizes = [f.size for f in source.files]
    return len(sizes) >= cpus and max(sizes, default=0) * cpus <= sum(sizes)


def _inflated_bytes(source: Source, cfg: DataConfig) -> int:
    """About how many bytes of text the source holds (compressed files inflate ~4x)."""
    if source.kind == "synthetic":
        return cfg.synthetic_size * 300
    return sum(f.size * (4 if f.compressed else 1) for f in source.files)


def _records(source: Source, cfg: DataConfig, fused: bool = False,
             chunk_bytes: int = CHUNK_BYTES):
    """The source's records as a lazy dataset (`records.RECORDS`). A read task asks for half a
    CPU, so that it stays apart from the segmenting that follows and one large file still keeps
    every CPU busy; with enough files to go round (`fused`), a whole CPU, and Ray runs each
    file's reading and segmenting in one task."""
    if source.kind == "synthetic":
        records = records_of_articles(synthetic_news(cfg.synthetic_size, cfg.seed), "synthetic")
        blocks = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        step = math.ceil(records.num_rows / blocks)
        return ray.data.from_arrow([records.slice(i, step)
                                    for i in range(0, records.num_rows, step)])
    return ray.data.read_datasource(CorpusFiles(source, cfg, chunk_bytes),
                                    num_cpus=1 if fused else 0.5,
                                    override_num_blocks=len(source.files))


def _last_order(source: Source, cfg: DataConfig) -> int | None:
    """The order key of the `data.max_articles`-th article that parses (None: keep all): a
    first pass that only parses, keeping the smallest keys of each block, then Ray Data's sort."""
    if cfg.max_articles is None:
        return None
    firsts = SmallestOk(tuple(source.files), cfg, cfg.max_articles)
    return (_records(source, cfg).map_batches(firsts, batch_size=None, batch_format="pyarrow")
            .sort("order").limit(cfg.max_articles).max("order"))


class CorpusFiles(FileBasedDatasource):
    """The corpus's files through `records.read_records` (compression is sniffed there, so that
    a damaged file is counted, not fatal)."""

    def __init__(self, source: Source, cfg: DataConfig, chunk_bytes: int = CHUNK_BYTES):
        location = source.location
        super().__init__([location.ray_path(f.path) for f in source.files],
                         filesystem=location.arrow_filesystem())
        self._files = {location.ray_path(f.path): f for f in source.files}
        self._cfg, self._chunk_bytes = cfg, chunk_bytes

    def resolve_compression(self, path, open_args):
        return None

    def _open_input_source(self, filesystem, path, **open_args):
        if path.lower().endswith(".parquet"):
            return filesystem.open_input_file(path)
        # the raw bytes: pyarrow would inflate by the file's suffix ("detect"), where a damaged
        # file fails the whole task
        return filesystem.open_input_stream(path, compression=None, buffer_size=1 << 20)

    def _read_stream(self, f, path: str):
        yield from read_records(f, self._files[path], self._cfg, self._chunk_bytes)


class ShardSink(Datasink):
    """Each write task writes its blocks' shards and returns their statistics; the driver's
    sink collects them (`results`) when the write completes."""

    def __init__(self, stage: Location, shard_rows: int, rows_per_task: int):
        self.stage, self.shard_rows, self.rows_per_task = stage, shard_rows, rows_per_task
        self.results = []

    def write(self, blocks, ctx) -> list[dict]:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        return write_shards(pa.concat_tables(tables), self.stage, f"{ctx.task_idx:05d}",
                            self.shard_rows)

    def on_write_complete(self, write_result) -> None:
        self.results = [r for returned in write_result.write_returns for r in returned or []]

    @property
    def min_rows_per_write(self) -> int:  # Ray gathers this many rows for each write task
        return self.rows_per_task
