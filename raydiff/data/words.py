"""Segments split into the word-level tokenizer's words, exactly as its own normalizer and
pre-tokenizer would split them, at numpy's speed.

The Whitespace pre-tokenizer cuts normalized text into maximal runs of word characters and
maximal runs of other non-space characters, and which run a character belongs to depends on
that character alone (`unicode.tokenizer_classes` asks the library about each one). A segment
without an UNVERIFIED character (one the normalizer changes on its own, a combining mark, a
Hangul jamo, an unassigned code point) is its own normalized form: NFKC changes a string of
characters that are each their own NFKC only by reordering marks (every character of a non-zero
combining class is a mark) or by composing a character with the next (every second character of
a composition is a mark or a jamo; tests/test_clean.py checks both over all of Unicode). Its
words are therefore the runs of WORD and of PUNCT characters that `runs.split_runs` finds in its
bytes; the few other segments go through the library's normalizer and pre-tokenizer directly.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pyarrow as pa

from raydiff.data.runs import byte_classes, split_runs, utf8_view
from raydiff.data.tokenizer import UNK, word_pipeline
from raydiff.data.unicode import UNVERIFIED, CharTables, tokenizer_table

WORDS = pa.list_(pa.string())


def split_words(segments: pa.StringArray, tables: CharTables) -> pa.ListArray:
    """list<string>: the words of each segment, as the tokenizer's trainer counts them."""
    if len(segments) == 0:
        return pa.array([], WORDS)
    data, offsets = utf8_view(segments)
    classes = byte_classes(data, tokenizer_table(tables.tokenizer), UNVERIFIED)
    fast = split_runs(data, offsets, classes)  # wrong in the rows replaced below
    slow = np.zeros(len(segments), bool)
    slow[np.searchsorted(offsets, np.flatnonzero(classes == UNVERIFIED), side="right") - 1] = True
    if not slow.any():
        return fast
    slow_rows = np.flatnonzero(slow)
    by_library = _split_by_library(segments.take(pa.array(slow_rows)).to_pylist(),
                                   tables.lowercase)
    # the fast rows' lists between each stretch of consecutive slow rows, then those rows'
    pieces, done, taken = [], 0, 0
    for stretch in np.split(slow_rows, np.flatnonzero(np.diff(slow_rows) != 1) + 1):
        first, n = int(stretch[0]), len(stretch)
        pieces += [fast.slice(done, first - done), by_library.slice(taken, n)]
        done, taken = first + n, taken + n
    pieces.append(fast.slice(done))
    return pa.concat_arrays(pieces)


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
