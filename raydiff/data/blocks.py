"""Token ids in fixed-length blocks of `seq_len`: the tensors every trainer reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def encode_blocks(tokenizer: PreTrainedTokenizerBase, segments: Sequence[str],
                  seq_len: int) -> dict[str, np.ndarray]:
    """One block per segment, truncated or padded to `seq_len`.

    Returns {"input_ids": (N, seq_len) int64, "attention_mask": (N, seq_len) int8}.
    """
    enc = tokenizer(list(segments), max_length=seq_len, truncation=True, padding="max_length",
                    return_attention_mask=True, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int8)}
