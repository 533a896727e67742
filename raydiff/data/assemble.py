"""The driver's part of `prepare`: from the records of pass 1 (each article's split rank, segments
and their words) to the tokenizer and the fixed-length blocks of every split.

    exact duplicates  -> one segment, kept in the most held-out split it occurs in
    train words       -> counts -> vocabulary (the trainer's own rule) -> tokenizer
    every word        -> its id in that vocabulary (UNK when outside) -> (N, seq_len) blocks

Everything runs in Arrow's and numpy's kernels, with no Python loop over segments or words. No
Ray: the benchmark's single-process baseline runs this same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer

from raydiff.data.blocks import fixed_blocks
from raydiff.data.corpus import SPLITS
from raydiff.data.tokenizer import UNK_ID, select_vocabulary, tokenizer_from_vocabulary

RANK_OF_SPLIT = {"valid": 0, "test": 1, "train": 2}  # held-out splits win duplicates
SPLIT_OF_RANK = {rank: split for split, rank in RANK_OF_SPLIT.items()}


@dataclass
class Assembled:
    tokenizer: Tokenizer  # the raw `tokenizers` one (save_word_tokenizer writes it)
    # split -> {"input_ids": (N, seq_len) int32, "attention_mask": (N, seq_len) int8,
    #           "row_id": (N,) int64, the segment's index in first-occurrence order}
    splits: dict[str, dict[str, np.ndarray]]
    segments_before_dedup: int


def assemble(records: pa.Table, vocab_size: int, seq_len: int, lowercase: bool) -> Assembled:
    """`records`: the kept articles in input order, with columns `rank` (int8, see
    RANK_OF_SPLIT), `segments` (list<string>) and `tokens` (list<list<string>>, each segment's
    words as `tokenizer.word_tokens` gives them)."""
    segment_lists = _one_chunk(records["segments"])
    ranks = np.repeat(records["rank"].to_numpy(),
                      pc.list_value_length(segment_lists).fill_null(0).to_numpy())
    first, best_rank = _deduplicate(segment_lists.flatten(), ranks)
    words = _one_chunk(records["tokens"]).flatten().take(pa.array(first))  # per unique segment

    train = pc.equal(pa.array(best_rank), RANK_OF_SPLIT["train"])
    counts = pc.value_counts(words.filter(train).flatten())
    vocabulary = select_vocabulary(counts.field("values").to_pylist(),
                                   counts.field("counts").to_pylist(), vocab_size)

    ids = pc.index_in(words.flatten(), value_set=pa.array(vocabulary, pa.string()))
    ids = ids.fill_null(UNK_ID).to_numpy().astype(np.int32)
    lengths = pc.list_value_length(words).to_numpy().astype(np.int64)
    input_ids, mask = fixed_blocks(ids, lengths, seq_len)

    splits = {}
    for split in SPLITS:
        rows = np.flatnonzero(best_rank == RANK_OF_SPLIT[split])
        splits[split] = {"input_ids": input_ids[rows], "attention_mask": mask[rows],
                         "row_id": rows.astype(np.int64)}
    return Assembled(tokenizer_from_vocabulary(vocabulary, lowercase=lowercase), splits,
                     segments_before_dedup=len(ranks))


def _deduplicate(segments: pa.Array, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of each distinct segment's first occurrence (in that order), and the most
    held-out (lowest) rank it occurs with."""
    table = pa.table({"segment": segments, "position": np.arange(len(ranks)), "rank": ranks})
    distinct = (table.group_by("segment", use_threads=False)
                .aggregate([("position", "min"), ("rank", "min")]).sort_by("position_min"))
    return (distinct["position_min"].to_numpy().astype(np.int64),
            distinct["rank_min"].to_numpy().astype(np.int8))


def _one_chunk(column: pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
