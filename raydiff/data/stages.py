"""The per-block stages of `prepare`: pure functions of Arrow tables, no Ray, so that the Ray
Data plan (`pipeline.py`) and the in-process one (`local.py`) run the very same code.

    records --SegmentStage--> segment rows + tallies --(dedup: group by (kind, text):
                                                         min rank, min pos, sum n)-->
    unique  --WordStage-----> words + tallies
    words   --word_counts---> (word, count), per block --(group by word: sum)-->
    counts  --TopWords------> the vocabulary's candidates (the driver picks among them)
    words   --EncodeStage---> fixed-length blocks + tallies --(shards.write_shards)--> Parquet

Tallies are how the counts of every kind of record travel with the data: rows of `kind` >= 1
(see TALLY) whose `n` is a count, aggregated by the same group-by that removes duplicates, so no
stage needs a second pass over the input to count it. A segment row has kind 0, n = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raydiff.config import DataConfig
from raydiff.data.blocks import fixed_blocks
from raydiff.data.clean import article_segments
from raydiff.data.parse import parse_lines
from raydiff.data.records import (
    LINE_BITS,
    MAX_LINE_BYTES,
    RANK_OF_SPLIT,
    STATUS,
    STATUSES,
    InputFile,
    split_of,
)
from raydiff.data.tokenizer import SPECIAL_TOKENS, UNK_ID
from raydiff.data.unicode import CharTables
from raydiff.data.words import WORDS, split_words

SEGMENT = 0  # kind of a segment row; tallies below
TALLY = {"articles": 1} | {status: 2 + code for code, status in enumerate(STATUSES)}
TALLY_NAME = {kind: name for name, kind in TALLY.items()}
SEG_BITS = 20  # segments per article < 2^19: an article has at most MAX_LINE_BYTES characters
assert (1 << SEG_BITS) > MAX_LINE_BYTES // 2 + 1 and LINE_BITS + 16 + SEG_BITS <= 63
TRAIN = RANK_OF_SPLIT["train"]

SEGMENT_ROWS = pa.schema([
    ("kind", pa.int8()),  # SEGMENT, or a TALLY kind
    ("text", pa.string()),  # the segment; a corrupt_file tally: "<path>: <reason>"
    ("rank", pa.int8()),  # RANK_OF_SPLIT of the segment's article (min over duplicates)
    ("pos", pa.int64()),  # (record order << SEG_BITS) | index in the article (min: first)
    ("n", pa.int64()),  # 1 per segment (sum: occurrences); a tally's count
])
WORD_ROWS = pa.schema([
    ("kind", pa.int8()), ("text", pa.string()), ("rank", pa.int8()), ("pos", pa.int64()),
    ("n", pa.int64()), ("words", WORDS),
])
COUNTS = pa.schema([("word", pa.string()), ("count", pa.int64())])


# de-duplication: group segment rows (and tallies) by these, aggregate so (column, how)
DEDUP_KEYS = ("kind", "text")
DEDUP_AGGREGATES = (("rank", "min"), ("pos", "min"), ("n", "sum"))


@dataclass(frozen=True)
class SmallestOk:
    """Records -> the order keys of this block's first `keep` articles that parse: every
    block's, merged, hold the `data.max_articles`-th article's key."""

    files: tuple[InputFile, ...]
    cfg: DataConfig
    keep: int

    def __call__(self, records: pa.Table) -> pa.Table:
        parsed = parse_lines(records, list(self.files), self.cfg)
        orders = parsed["order"].filter(pc.equal(parsed["status"], STATUS["ok"]))
        first = pc.bottom_k_unstable(orders, min(self.keep, len(orders)))  # their indices
        return pa.table({"order": orders.take(first)})


@dataclass(frozen=True)
class SegmentStage:
    """Records -> the segments of the kept articles, and tallies of every record's status.
    `last_order` is the order key of the last article `data.max_articles` keeps (None: all)."""

    cfg: DataConfig
    files: tuple[InputFile, ...]
    tables: CharTables
    last_order: int | None = None

    def __call__(self, records: pa.Table) -> pa.Table:
        records = parse_lines(records, list(self.files), self.cfg)
        status = records["status"].to_numpy()
        ok = status == STATUS["ok"]
        if ok.any():  # an article longer than a line may be is not one
            long = pc.fill_null(pc.greater(pc.utf8_length(records["text"]), MAX_LINE_BYTES),
                                False).to_numpy(zero_copy_only=False)
            status = np.where(ok & long, STATUS["too_long"], status)
            ok = status == STATUS["ok"]
        kept = ok if self.last_order is None else \
            ok & (records["order"].to_numpy() <= self.last_order)
        rows = np.flatnonzero(kept)
        ids = records["id"].take(pa.array(rows)).to_pylist()
        texts = records["text"].take(pa.array(rows)).to_pylist()
        order = records["order"].to_numpy()[rows]
        rank = np.fromiter((RANK_OF_SPLIT[split_of(i, self.cfg.valid_fraction,
                                                    self.cfg.test_fraction)] for i in ids),
                           np.int8, len(ids))
        segments, article = article_segments(texts, self.cfg, self.tables)
        first = np.searchsorted(article, article)  # index of each article's first segment
        pos = (order[article] << SEG_BITS) | (np.arange(len(article)) - first)
        n = len(segments)
        segment_rows = pa.table([pa.array(np.zeros(n, np.int8)), segments,
                                 pa.array(rank[article]), pa.array(pos),
                                 pa.array(np.ones(n, np.int64))], schema=SEGMENT_ROWS)
        return pa.concat_tables([segment_rows, self._tallies(records, status, len(rows))])

    def _tallies(self, records: pa.Table, status: np.ndarray, articles: int) -> pa.Table:
        codes, counts = np.unique(status, return_counts=True)
        kinds = [TALLY["articles"], *(2 + int(c) for c in codes if c != STATUS["corrupt_file"])]
        values = [articles, *(int(n) for c, n in zip(codes, counts, strict=True)
                              if c != STATUS["corrupt_file"])]
        texts: list[str | None] = [None] * len(kinds)
        corrupt = np.flatnonzero(status == STATUS["corrupt_file"])
        for row in corrupt:  # one tally per damaged file, naming it
            order = records["order"][int(row)].as_py()
            why = records["raw"][int(row)].as_py().decode("utf-8", "replace")
            kinds.append(TALLY["corrupt_file"])
            texts.append(f"{self.files[order >> LINE_BITS].path}: {why}")
            values.append(1)
        k = len(kinds)
        return pa.table([pa.array(kinds, pa.int8()), pa.array(texts, pa.string()),
                         pa.nulls(k, pa.int8()), pa.nulls(k, pa.int64()),
                         pa.array(values, pa.int64())], schema=SEGMENT_ROWS)


@dataclass(frozen=True)
class WordStage:
    """Unique segments -> their words (the segment text is dropped); tallies pass."""

    tables: CharTables

    def __call__(self, unique: pa.Table) -> pa.Table:
        segments, tallies = segments_and_tallies(unique.select(SEGMENT_ROWS.names)
                                                 .cast(SEGMENT_ROWS))
        words = split_words(segments["text"].combine_chunks(), self.tables)
        n, k = segments.num_rows, tallies.num_rows
        return pa.concat_tables([
            pa.table([segments["kind"], pa.nulls(n, pa.string()), segments["rank"],
                      segments["pos"], segments["n"], words], schema=WORD_ROWS),
            pa.table([tallies["kind"], tallies["text"], tallies["rank"], tallies["pos"],
                      tallies["n"], pa.nulls(k, WORDS)], schema=WORD_ROWS)])


def segments_and_tallies(block: pa.Table) -> tuple[pa.Table, pa.Table]:
    """The block's segment rows and its tally rows (a few in the whole corpus), without a copy
    of the segments when the block holds no tally."""
    is_segment = pc.equal(block["kind"], SEGMENT)
    if pc.all(is_segment).as_py() is not False:  # no tally (or no row)
        return block, block.slice(0, 0)
    return block.filter(is_segment), block.filter(pc.invert(is_segment))


def word_counts(block: pa.Table) -> pa.Table:
    """How often each word occurs in this block's train segments."""
    segments, _ = segments_and_tallies(block)
    words = segments["words"].combine_chunks()
    train = segments["rank"].to_numpy() == TRAIN
    in_train = train[pc.list_parent_indices(words).to_numpy()]
    counts = pc.value_counts(pc.list_flatten(words).filter(pa.array(in_train)))
    return pa.table([counts.field("values"), counts.field("counts")], schema=COUNTS)


@dataclass(frozen=True)
class TopWords:
    """The `limit` words of this block that rank first by the vocabulary's rule (count
    descending, then code points). Every word of the final vocabulary ranks among the first
    `limit` of whichever block holds its (complete) count, so these are all the driver needs."""

    limit: int

    def __call__(self, counts: pa.Table) -> pa.Table:
        counts = counts.select(COUNTS.names).cast(COUNTS)
        counts = counts.filter(pc.invert(pc.is_in(counts["word"],
                                                  value_set=pa.array(SPECIAL_TOKENS))))
        order = pc.sort_indices(counts, sort_keys=[("count", "descending"),
                                                   ("word", "ascending")])
        return counts.take(order[:self.limit])


def block_rows(seq_len: int) -> pa.Schema:
    """What EncodeStage emits: blocks of segments (kind 0) and the tallies."""
    return pa.schema([
        ("kind", pa.int8()), ("text", pa.string()), ("rank", pa.int8()), ("n", pa.int64()),
        ("row_id", pa.int64()), ("input_ids", pa.list_(pa.int32(), seq_len)),
        ("attention_mask", pa.list_(pa.int8(), seq_len)),
    ])


@dataclass(frozen=True)
class EncodeStage:
    """Words -> token ids in the vocabulary (UNK outside it) -> right-padded, truncated blocks
    of `seq_len`; `row_id` is the segment's first position (unique, deterministic); the
    tallies pass."""

    vocabulary: tuple[str, ...]
    seq_len: int

    def __call__(self, block: pa.Table) -> pa.Table:
        segments, tallies = segments_and_tallies(block.select(WORD_ROWS.names).cast(WORD_ROWS))
        words = segments["words"].combine_chunks()
        ids = pc.index_in(pc.list_flatten(words), value_set=pa.array(self.vocabulary, pa.string()))
        ids = ids.fill_null(UNK_ID).to_numpy().astype(np.int32)
        lengths = pc.list_value_length(words).to_numpy().astype(np.int64)
        input_ids, mask = fixed_blocks(ids, lengths, self.seq_len)
        schema = block_rows(self.seq_len)
        encoded = pa.table([segments["kind"], segments["text"], segments["rank"], segments["n"],
                            segments["pos"], fixed_lists(input_ids), fixed_lists(mask)],
                           schema=schema)
        k = len(tallies)
        tallies = pa.table([tallies["kind"], tallies["text"], tallies["rank"], tallies["n"],
                            pa.nulls(k, pa.int64()), pa.nulls(k, schema.field("input_ids").type),
                            pa.nulls(k, schema.field("attention_mask").type)], schema=schema)
        return pa.concat_tables([encoded, tallies])


def fixed_lists(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """(N, L) -> an Arrow fixed_size_list<L> column, without a Python loop."""
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])
