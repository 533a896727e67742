"""`prepare` in this one process, without Ray: the same stages as the Ray Data plan
(`stages.py`), the group-bys done by Arrow in memory. The output (tokenizer, blocks, manifest,
and the directory it goes to) is the same as the Ray plan's for the same config and input, so a
`--no-ray` run and a Ray run share one prepared dataset. Memory grows with the corpus: this is
the path for one machine's corpora; `pipeline.prepare` is the one that scales out.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raydiff.config import DataConfig
from raydiff.data.output import (
    Staging,
    existing_manifest,
    finish_output,
    write_shards,
    write_tokenizer,
)
from raydiff.data.prepared import PreparedData
from raydiff.data.records import (
    SPLIT_OF_RANK,
    SPLITS,
    read_records,
    records_of_articles,
)
from raydiff.data.sources import Source, output_location, resolve_source
from raydiff.data.stages import (
    DEDUP_AGGREGATES,
    DEDUP_KEYS,
    SEGMENT,
    EncodeStage,
    SegmentStage,
    SmallestOk,
    TopWords,
    WordStage,
    word_counts,
)
from raydiff.data.storage import DataError
from raydiff.data.synthetic import synthetic_news
from raydiff.data.tokenizer import select_vocabulary
from raydiff.data.unicode import CharTables


def prepare_local(cfg: DataConfig) -> PreparedData:
    """Prepare `cfg.source` under `output_location(cfg)` in this process; a no-op when that
    output is already complete (whichever way it was made)."""
    source = resolve_source(cfg)
    out = output_location(cfg, source)
    existing = existing_manifest(cfg, out)
    if existing is not None:
        return PreparedData(out, existing, reused=True)
    started = time.perf_counter()
    tables = CharTables.build(cfg.lowercase, cfg.pack)
    stage = SegmentStage(cfg, tuple(source.files), tables, last_order(source, cfg))
    segments = pa.concat_tables([stage(block) for block in read_source(source, cfg)])
    unique = segments.group_by(list(DEDUP_KEYS), use_threads=False).aggregate(
        list(DEDUP_AGGREGATES)).rename_columns({f"{c}_{how}": c for c, how in DEDUP_AGGREGATES})
    words = WordStage(tables)(unique)
    counted = time.perf_counter()
    vocabulary = choose_vocabulary(TopWords(cfg.vocab_size)(word_counts(words)), cfg, source)
    chosen = time.perf_counter()
    with Staging(out) as staging:
        results = write_shards(EncodeStage(tuple(vocabulary), cfg.seq_len)(words), staging,
                               "local", cfg.shard_rows)
        vocab_size = write_tokenizer(staging, vocabulary, cfg.lowercase)
        written = time.perf_counter()
        manifest = finish_output(staging, cfg, source, results, vocab_size, {
            "segments_s": counted - started, "vocabulary_s": chosen - counted,
            "write_s": written - chosen})
    return PreparedData(out, manifest, reused=False)


def read_source(source: Source, cfg: DataConfig) -> Iterator[pa.Table]:
    """Every record of the source, a table (`records.RECORDS`) at a time."""
    if source.kind == "synthetic":
        yield records_of_articles(synthetic_news(cfg.synthetic_size, cfg.seed), "synthetic")
        return
    for file in source.files:
        with source.location.fs.open(file.path, "rb") as stream:
            yield from read_records(stream, file, cfg)


def last_order(source: Source, cfg: DataConfig) -> int | None:
    """The order key of the `data.max_articles`-th article that parses (None: keep all)."""
    if cfg.max_articles is None:
        return None
    firsts = SmallestOk(tuple(source.files), cfg, cfg.max_articles)
    orders = [firsts(block)["order"].to_numpy() for block in read_source(source, cfg)]
    orders = np.sort(np.concatenate(orders)) if orders else np.zeros(0, np.int64)
    return int(orders[min(cfg.max_articles, len(orders)) - 1]) if len(orders) else None


def choose_vocabulary(candidates: pa.Table, cfg: DataConfig, source: Source) -> list[str]:
    """The vocabulary (index = id) from the candidate words with their complete counts."""
    if candidates.num_rows == 0:
        raise DataError(f"data.source={cfg.source}: no training segments after cleaning")
    candidates = TopWords(cfg.vocab_size)(candidates)  # Arrow's sort first: few reach Python
    return select_vocabulary(candidates["word"].to_pylist(), candidates["count"].to_pylist(),
                             cfg.vocab_size)


def read_segments(cfg: DataConfig) -> dict[str, list[str]]:
    """The cleaned segments of each split, in input order and not de-duplicated, for any source
    (evaluation tokenizes them with a checkpoint's own tokenizer)."""
    source = resolve_source(cfg)
    tables = CharTables.build(cfg.lowercase, cfg.pack, words=False)
    stage = SegmentStage(cfg, tuple(source.files), tables, last_order(source, cfg))
    out: dict[str, list[str]] = {split: [] for split in SPLITS}
    for block in read_source(source, cfg):
        rows = stage(block)
        rows = rows.filter(pc.equal(rows["kind"], SEGMENT))
        rows = rows.take(pc.sort_indices(rows["pos"]))
        for rank, text in zip(rows["rank"].to_pylist(), rows["text"].to_pylist(), strict=True):
            out[SPLIT_OF_RANK[rank]].append(text)
    return out
