"""Segments split into the word-level tokenizer's words, exactly as its own normalizer and
pre-tokenizer would split them, at Arrow's speed.

The Whitespace pre-tokenizer cuts normalized text into maximal runs of word characters and
maximal runs of other non-space characters. For a segment whose characters the tokenizer's
normalizer leaves alone (`TokenizerClasses.unverified` finds none, and it is already NFKC), the
words are therefore: whitespace turned into " ", each run of punctuation wrapped in spaces, the
text split at " ". The classes come from the tokenizer itself (`unicode.tokenizer_classes`), so
this equals the library's result by construction; the few other segments go through the
library's normalizer and pre-tokenizer directly.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raydiff.data.tokenizer import UNK, word_pipeline
from raydiff.data.unicode import CharTables

WORDS = pa.list_(pa.string())


def split_words(segments: pa.StringArray, tables: CharTables) -> pa.ListArray:
    """list<string>: the words of each segment, as the tokenizer's trainer counts them."""
    if len(segments) == 0:
        return pa.array([], WORDS)
    classes = tables.tokenizer
    fast = pc.invert(pc.match_substring_regex(segments, classes.unverified))
    exotic = pc.invert(pc.string_is_ascii(segments))  # ASCII text is always NFKC
    if pc.any(exotic).as_py():
        normal = pc.equal(pc.utf8_normalize(segments, "NFKC"), segments)
        fast = pc.and_(fast, pc.or_(pc.invert(exotic), normal))
    fast = fast.to_numpy(zero_copy_only=False)
    if fast.all():
        return _split_verified(segments, classes)
    fast_rows, slow_rows = np.flatnonzero(fast), np.flatnonzero(~fast)
    words = pa.concat_arrays([
        _split_verified(segments.take(pa.array(fast_rows)), classes),
        _split_by_library(segments.take(pa.array(slow_rows)).to_pylist(), tables.lowercase)])
    order = np.empty(len(segments), np.int64)  # back to the input order
    order[np.concatenate([fast_rows, slow_rows])] = np.arange(len(segments))
    return words.take(pa.array(order))


def _split_verified(segments: pa.StringArray, classes) -> pa.ListArray:
    spaced = pc.replace_substring_regex(segments, classes.other_space, " ")
    spaced = pc.replace_substring_regex(spaced, classes.punct_run, " \\0 ")
    return drop_empty(pc.split_pattern(spaced, " "))


def drop_empty(pieces: pa.ListArray) -> pa.ListArray:
    """The lists without their empty strings (what splitting at single spaces leaves between
    runs of them), without a Python loop."""
    pieces = pieces.combine_chunks() if isinstance(pieces, pa.ChunkedArray) else pieces
    flat = pieces.values
    keep = pc.greater(pc.binary_length(flat), 0)
    kept_before = np.concatenate([[0], np.cumsum(keep.to_numpy(zero_copy_only=False))])
    offsets = kept_before[pieces.offsets.to_numpy()].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), flat.filter(keep))


@functools.lru_cache(maxsize=2)
def _library(lowercase: bool):
    from tokenizers.models import WordLevel

    tok = word_pipeline(WordLevel(unk_token=UNK), lowercase)
    return tok.normalizer, tok.pre_tokenizer


def _split_by_library(texts: list[str], lowercase: bool) -> pa.ListArray:
    normalizer, pre_tokenizer = _library(lowercase)
    words = [[w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t))]
             for t in texts]
    counts = np.fromiter(map(len, words), np.int64, len(words))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets),
                                    pa.array(list(itertools.chain.from_iterable(words)),
                                             pa.string()))
