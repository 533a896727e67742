"""Maximal runs of character classes in Arrow strings, found with numpy over their UTF-8 bytes:
the pieces `str.split` cuts a sentence into, and the tokenizer's words and runs of punctuation,
without a regex replacement, a split and a filter of empty pieces per batch.

A class table gives each code point below `len(table)` a small number (0: a separator), and
`beyond` stands for every code point above. Every byte of the strings' data takes the class of
its character, so that

    runs       maximal stretches of bytes of one non-zero class, within one string
    per row    the number of runs, or the runs themselves as list<string> (their bytes, copied
               once, contiguous: a run's offsets are the running sum of run lengths)

On the 33 MB of Reuters + CC-News + AllSides segments this takes about a third of the time of
the regex replacement, split and filter it replaces (docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def utf8_view(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, offsets): the strings' UTF-8 data as uint8 and each string's start in it
    (len(strings) + 1 int64 offsets from 0), without a copy. The strings have no nulls."""
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    if strings.null_count:
        raise ValueError("utf8_view: null strings")
    if len(strings) == 0:
        return np.zeros(0, np.uint8), np.zeros(1, np.int64)
    wide = pa.types.is_large_string(strings.type)
    _, offsets_buffer, data_buffer = strings.buffers()
    offsets = np.frombuffer(offsets_buffer, np.int64 if wide else np.int32,
                            count=len(strings) + 1,
                            offset=strings.offset * (8 if wide else 4)).astype(np.int64)
    data = np.frombuffer(data_buffer, np.uint8) if data_buffer is not None else \
        np.zeros(0, np.uint8)
    return data[offsets[0]:offsets[-1]], offsets - offsets[0]


def byte_classes(data: np.ndarray, table: np.ndarray, beyond: int) -> np.ndarray:
    """uint8 per byte of valid UTF-8 `data`: the class `table` gives its character."""
    classes = _ascii_classes(data, table)
    lead = np.flatnonzero(data >= 0xC0)  # the first byte of each non-ASCII character
    if lead.size == 0:
        return classes
    last = len(data) - 1
    b0 = data[lead].astype(np.int64)
    b1, b2, b3 = (data[np.minimum(lead + k, last)].astype(np.int64) & 0x3F for k in (1, 2, 3))
    width = 2 + (b0 >= 0xE0) + (b0 >= 0xF0)
    codepoint = np.where(width == 2, ((b0 & 0x1F) << 6) | b1,
                         np.where(width == 3, ((b0 & 0x0F) << 12) | (b1 << 6) | b2,
                                  ((b0 & 0x07) << 18) | (b1 << 12) | (b2 << 6) | b3))
    inside = codepoint < len(table)
    of_char = np.full(len(lead), beyond, np.uint8)
    of_char[inside] = table[codepoint[inside]]
    for k in range(4):  # the lead byte and its continuation bytes
        has = width > k
        classes[lead[has] + k] = of_char[has]
    return classes


def _ascii_classes(data: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The class of every ASCII byte (0 for the others), looked up two bytes at a time: half
    as many gathers as one a byte, from a 64k-entry table of byte pairs."""
    single = np.zeros(256, np.uint8)
    single[:128] = table[:128]
    pairs = np.arange(1 << 16)
    pair_table = (single[pairs & 0xFF].astype("<u2") | (single[pairs >> 8].astype("<u2") << 8))
    classes = np.empty(len(data), np.uint8)
    even = len(data) & ~1
    classes[:even] = pair_table[data[:even].view("<u2")].view(np.uint8)
    classes[even:] = single[data[even:]]
    return classes


def run_bounds(classes: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) in bytes of every maximal run of one non-zero class, never crossing from
    one string into the next; in order."""
    n = len(classes)
    change, in_run = _changes(classes, offsets), classes != 0
    return np.flatnonzero(change[:n] & in_run), np.flatnonzero(change[1:] & in_run) + 1


def count_runs(strings: pa.Array, table: np.ndarray, beyond: int) -> np.ndarray:
    """int64: how many runs each string holds."""
    data, offsets = utf8_view(strings)
    classes = byte_classes(data, table, beyond)
    starts = np.flatnonzero(_changes(classes, offsets)[:-1] & (classes != 0))
    return np.diff(np.searchsorted(starts, offsets))


def _changes(classes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(n + 1,) bool: a stretch of one class begins at this byte (a new class, or a new
    string), and at n, where the data ends."""
    n = len(classes)
    change = np.ones(n + 1, bool)
    np.not_equal(classes[1:], classes[:-1], out=change[1:n])
    change[offsets[:-1]] = True
    return change


def split_runs(data: np.ndarray, offsets: np.ndarray, classes: np.ndarray) -> pa.ListArray:
    """list<string>: each string's runs (of `classes`, from `byte_classes` over `data`)."""
    starts, ends = run_bounds(classes, offsets)
    values = data[classes != 0]  # the runs' bytes, in order, nothing between
    if len(values) >= 2**31 or len(starts) >= 2**31:
        raise ValueError("split_runs: 2 GiB of words or more in one batch; split the batch")
    word_offsets = np.zeros(len(starts) + 1, np.int32)
    np.cumsum(ends - starts, dtype=np.int32, out=word_offsets[1:])
    words = pa.StringArray.from_buffers(len(starts), pa.py_buffer(word_offsets),
                                        pa.py_buffer(values))
    list_offsets = np.searchsorted(starts, offsets).astype(np.int32)  # runs before each string
    return pa.ListArray.from_arrays(pa.array(list_offsets), words)
