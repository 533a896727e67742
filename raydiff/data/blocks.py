"""Token ids in fixed-length blocks of `seq_len`: the arrays every trainer reads.

One implementation on the raw `tokenizers.Tokenizer` serves both the single-process path and
the Ray Data workers (which never import transformers: it costs seconds per process).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from raydiff.data.tokenizer import PAD_ID

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast


def encode_fixed(tokenizer: Tokenizer, texts: Sequence[str], seq_len: int):
    """Right-padded, truncated blocks: (N, seq_len) int32 ids and (N, seq_len) int8 mask."""
    encodings = tokenizer.encode_batch(list(texts))
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int32,
                      count=int(lengths.sum()))
    return fixed_blocks(ids, lengths, seq_len)


def fixed_blocks(ids: np.ndarray, lengths: np.ndarray, seq_len: int):
    """Ragged token ids (flat, with per-row lengths) -> right-padded, truncated (N, seq_len)
    int32 ids and int8 mask."""
    starts = np.cumsum(lengths) - lengths  # (N,) where each row begins in ids
    mask = np.arange(seq_len)[None, :] < np.minimum(lengths, seq_len)[:, None]  # (N, seq_len)
    if len(ids) == 0:
        return np.full(mask.shape, PAD_ID, dtype=np.int32), mask.astype(np.int8)
    # (N, seq_len) positions in ids, clipped where a row is shorter (masked out below)
    source = np.minimum(starts[:, None] + np.arange(seq_len)[None, :], len(ids) - 1)
    blocks = np.where(mask, ids[source], PAD_ID).astype(np.int32)
    return blocks, mask.astype(np.int8)


def encode_blocks(tokenizer: PreTrainedTokenizerFast, segments: Sequence[str],
                  seq_len: int) -> dict[str, np.ndarray]:
    """One block per segment: {"input_ids": (N, seq_len) int64, "attention_mask": (N, seq_len)}."""
    ids, mask = encode_fixed(tokenizer.backend_tokenizer, segments, seq_len)
    return {"input_ids": ids.astype(np.int64), "attention_mask": mask}
