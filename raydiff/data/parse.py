"""Raw lines -> articles: UTF-8, then JSON (unless the file is text), then the article's id and
text (title first when configured), or the reason there is none.

`json.loads` line by line is the reference. A block's lines from one JSON Lines file go first
through Arrow's JSON reader (about 2.5x faster, and no Python object per field), which refuses
everything it would read differently: duplicate keys, a value of another type (a number where a
string is expected, a float id), non-object lines, NaN, lone surrogates, control characters.
Any such refusal sends the block through `json.loads` instead; so do invalid UTF-8 (checked by
Arrow's validator first: the JSON reader lets some through) and a byte-order mark, which Arrow
skips at the start of a buffer and Python rejects.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from raydiff.config import DataConfig
from raydiff.data.records import (
    LINE,
    LINE_BITS,
    MAX_LINES,
    RECORDS,
    STATUS,
    InputFile,
    article_from_row,
)
from raydiff.data.unicode import PY_SPACE_CHARS

Parsed = tuple[np.ndarray, pa.Array, pa.Array]  # status codes, ids, texts (one per line)


def parse_lines(records: pa.Table, files: list[InputFile], cfg: DataConfig,
                fast: bool = True) -> pa.Table:
    """The raw LINE records parsed into articles; other records pass unchanged. `fast=False`
    parses with `json.loads` only (the reference the tests compare with)."""
    status = records["status"].to_numpy().copy()
    is_line = status == LINE
    if not is_line.any():
        return records
    orders = records["order"].to_numpy()
    file_of = orders >> LINE_BITS
    ids, texts = _one_chunk(records["id"]), _one_chunk(records["text"])
    raw = _one_chunk(records["raw"])
    for index in np.unique(file_of[is_line]).tolist():
        rows = np.flatnonzero(is_line & (file_of == index))
        lines = raw.take(pa.array(rows))
        file = files[index]
        parsed = _with_arrow(lines, orders[rows], file, cfg) \
            if fast and not file.is_text else None
        if parsed is None:
            parsed = _one_by_one(lines.to_pylist(), orders[rows], file, cfg)
        status[rows] = parsed[0]
        mask = np.zeros(len(records), bool)
        mask[rows] = True
        ids = pc.replace_with_mask(ids, pa.array(mask), parsed[1])
        texts = pc.replace_with_mask(texts, pa.array(mask), parsed[2])
    keep_raw = pa.array(~is_line)  # a corrupt file's reason stays
    return pa.table([records["order"], pa.array(status, pa.int8()),
                     pc.if_else(keep_raw, raw, pa.nulls(len(records), pa.binary())), ids, texts],
                    schema=RECORDS)


def _with_arrow(lines: pa.BinaryArray, orders: np.ndarray, file: InputFile,
                cfg: DataConfig) -> Parsed | None:
    """The lines parsed by Arrow's JSON reader, or None where it might differ from Python."""
    columns = [c for c in (cfg.text_column, cfg.title_column, cfg.id_column) if c]
    if len(set(columns)) != len(columns) or lines[0].as_py().startswith(b"\xef\xbb\xbf"):
        return None
    try:  # Arrow's JSON reader does not check all of UTF-8 (an encoded surrogate passes)
        lines.cast(pa.string())
    except pa.ArrowInvalid:
        return None
    buffer = b"\n".join(lines.to_pylist())
    for id_type in (pa.string(), pa.int64()):  # ids are strings or integers (else: Python)
        schema = pa.schema([(c, id_type if c == cfg.id_column else pa.string())
                            for c in columns])
        try:
            table = pj.read_json(
                pa.BufferReader(buffer),
                read_options=pj.ReadOptions(use_threads=False, block_size=len(buffer) + 1),
                parse_options=pj.ParseOptions(explicit_schema=schema,
                                              unexpected_field_behavior="ignore"))
        except pa.ArrowInvalid:
            continue
        if table.num_rows == len(lines):
            break
        return None
    else:
        return None
    text = _one_chunk(table[cfg.text_column])
    ok = _present(text)
    if cfg.title_column:
        title = _one_chunk(table[cfg.title_column])
        text = pc.if_else(_present(title), pc.binary_join_element_wise(title, text, "\n"), text)
    article_id = _one_chunk(table[cfg.id_column]).cast(pa.string())
    missing = np.flatnonzero(ok & ~article_id.is_valid().to_numpy(zero_copy_only=False))
    if len(missing):  # "<file>:<line>" where a record has no id
        fallback = [f"{file.id_prefix}:{int(o) & (MAX_LINES - 1)}" for o in orders[missing]]
        mask = np.zeros(len(lines), bool)
        mask[missing] = True
        article_id = pc.replace_with_mask(article_id, pa.array(mask), pa.array(fallback))
    keep = pa.array(ok)
    none = pa.scalar(None, pa.string())
    return (np.where(ok, STATUS["ok"], STATUS["empty_text"]).astype(np.int8),
            pc.if_else(keep, article_id, none), pc.if_else(keep, text, none))


def _present(values: pa.StringArray) -> np.ndarray:
    """Not null and not blank (`str.strip()`'s whitespace)."""
    trimmed = pc.utf8_length(pc.utf8_trim(values, PY_SPACE_CHARS))
    return pc.fill_null(pc.greater(trimmed, 0), False).to_numpy(zero_copy_only=False)


def _one_by_one(lines: list[bytes], orders: np.ndarray, file: InputFile,
                cfg: DataConfig) -> Parsed:
    """`json.loads` line by line: the reference."""
    statuses = np.empty(len(lines), np.int8)
    ids: list[str | None] = [None] * len(lines)
    texts: list[str | None] = [None] * len(lines)
    for i, (raw, order) in enumerate(zip(lines, orders.tolist(), strict=True)):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            statuses[i] = STATUS["invalid_utf8"]
            continue
        fallback = f"{file.id_prefix}:{order & (MAX_LINES - 1)}"
        if file.is_text:
            article = (fallback, line) if line.strip() else None
        else:
            try:
                article = article_from_row(json.loads(line), cfg, fallback)
            except json.JSONDecodeError:
                statuses[i] = STATUS["malformed_json"]
                continue
        statuses[i] = STATUS["ok"] if article else STATUS["empty_text"]
        if article:
            ids[i], texts[i] = article
    try:
        text_array = pa.array(texts, pa.string())
    except (UnicodeEncodeError, pa.ArrowInvalid):  # JSON can spell lone surrogates
        for i, text in enumerate(texts):
            if text is not None and not _encodable(text):
                statuses[i], ids[i], texts[i] = STATUS["invalid_utf8"], None, None
        text_array = pa.array(texts, pa.string())
    return statuses, pa.array(ids, pa.string()), text_array


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _one_chunk(column) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
