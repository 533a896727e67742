"""Input files -> records, streamed: one record per line (JSON Lines, text) or per table row
(Parquet), carrying its position in the corpus and what became of it.

A file is read in chunks, never whole, so a reader's memory is bounded by `CHUNK_BYTES` plus
one line (and a line over `MAX_LINE_BYTES` is skipped, not held). Compression is recognised
by its magic bytes (gzip, bz2, xz, zstd), whatever the file is called. A file that cannot be
inflated or parsed (truncated, corrupt) becomes one `corrupt_file` record with the reason; the
records before the damage are kept, and the rest of the corpus is read as usual.

`parse.parse_lines` turns the raw lines into articles; it runs in the segmenting stage, not in
the reader, so that one large file does not leave the other CPUs idle.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from raydiff.config import DataConfig

SPLITS = ("train", "valid", "test")
RANK_OF_SPLIT = {"valid": 0, "test": 1, "train": 2}  # held-out splits win duplicates
SPLIT_OF_RANK = {rank: split for split, rank in RANK_OF_SPLIT.items()}

# what became of each record; the manifest counts every kind but "ok" as skipped
STATUSES = ("ok", "malformed_json", "invalid_utf8", "empty_text", "too_long", "empty_file",
            "corrupt_file")
STATUS = {name: code for code, name in enumerate(STATUSES)}
LINE = -1  # a raw line, not parsed yet

MAX_LINE_BYTES = 1 << 20  # a line over 1 MiB is not an article
CHUNK_BYTES = 8 << 20  # read (and emit) this much text at a time
TEXT_SUFFIXES = (".txt", ".txt.gz")

# A record's order key: (file index, line or row) in 16 + 27 bits; segments add 20 more
FILE_BITS, LINE_BITS = 16, 27
MAX_FILES, MAX_LINES = 1 << FILE_BITS, 1 << LINE_BITS

RECORDS = pa.schema([
    ("order", pa.int64()),  # (file index << LINE_BITS) | line or row number
    ("status", pa.int8()),  # STATUS code, or LINE
    ("raw", pa.binary()),  # LINE: the line's bytes; corrupt_file: why
    ("id", pa.string()),  # ok: the article id
    ("text", pa.string()),  # ok: the article text (title first when configured)
])


@dataclass(frozen=True)
class InputFile:
    """One file of the corpus, as the reader needs it."""

    index: int  # position in the sorted file list: the high bits of every order key
    path: str
    id_prefix: str  # ids of records without one are "<id_prefix>:<row>"
    row_offset: int = 0  # added to row numbers in ids (hub tables count across files)
    size: int = 0  # bytes on storage

    @property
    def compressed(self) -> bool:
        return self.path.lower().endswith((".gz", ".bz2", ".xz", ".zst"))

    @property
    def is_text(self) -> bool:
        return self.path.lower().endswith(TEXT_SUFFIXES)

    @property
    def is_parquet(self) -> bool:
        return self.path.lower().endswith(".parquet")


def split_of(article_id: str, valid_fraction: float, test_fraction: float) -> str:
    """Assign an article to train/valid/test by a hash of its id: deterministic across runs,
    machines and workers, and an article never lands in two splits."""
    digest = hashlib.blake2b(article_id.encode("utf-8"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64  # uniform in [0, 1)
    if u < valid_fraction:
        return "valid"
    if u < valid_fraction + test_fraction:
        return "test"
    return "train"


def article_from_row(row: object, cfg: DataConfig, fallback_id: str) -> tuple[str, str] | None:
    """(id, text) of one parsed record (text column, optional title first), or None when it has
    no usable text."""
    text = row.get(cfg.text_column) if isinstance(row, dict) else None
    if not isinstance(text, str) or not text.strip():
        return None
    title = row.get(cfg.title_column) if cfg.title_column else None
    if isinstance(title, str) and title.strip():
        text = f"{title}\n{text}"
    article_id = row.get(cfg.id_column)
    return (fallback_id if article_id is None else str(article_id)), text


# ----------------------------------------------------------------------------- reading


class CorruptFile(Exception):
    """The file's bytes cannot be inflated or parsed (not an I/O failure)."""


class _Source(io.RawIOBase):
    """The raw stream, with its first bytes peeked for the magic number; its own read errors
    stay I/O errors (they are not the file's fault)."""

    def __init__(self, stream):
        self.stream, self.head = stream, stream.read(8)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.stream.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def _inflated(stream):
    source = _Source(stream)
    head = source.head
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=io.BufferedReader(source, 1 << 20))
    if head[:3] == b"BZh":
        return bz2.BZ2File(io.BufferedReader(source, 1 << 20))
    if head[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(io.BufferedReader(source, 1 << 20))
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return pa.CompressedInputStream(pa.PythonFile(io.BufferedReader(source, 1 << 20)),
                                        "zstd")
    return io.BufferedReader(source, 1 << 20)


_INFLATE_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError, pa.ArrowInvalid)


def read_records(stream, file: InputFile, cfg: DataConfig,
                 chunk_bytes: int = CHUNK_BYTES) -> Iterator[pa.Table]:
    """The records of one open file (binary, readable; seekable for Parquet), a table of
    RECORDS per chunk of about `chunk_bytes` of text."""
    try:
        if file.is_parquet:
            yield from _parquet_records(stream, file, cfg)
        else:
            yield from _line_records(_inflated(stream), file, chunk_bytes)
    except (CorruptFile, *_INFLATE_ERRORS) as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
        yield _table([_order(file, 0)], [STATUS["corrupt_file"]], raw=[reason.encode()])
    except OSError as e:  # bz2 reports bad data as a bare OSError; real I/O errors propagate
        if not _is_format_error(e):
            raise
        yield _table([_order(file, 0)], [STATUS["corrupt_file"]],
                     raw=[f"{type(e).__name__}: {e}".encode()])


def _is_format_error(error: OSError) -> bool:
    text = str(error).lower()
    return any(s in text for s in ("invalid data stream", "compressed", "not a gzipped",
                                   "magic bytes", "corrupt", "invalid header"))


def _line_records(inflated, file: InputFile, chunk_bytes: int) -> Iterator[pa.Table]:
    """Lines as `bytes.splitlines` cuts them (\\n, \\r\\n, \\r), blank ones skipped but
    counted in the numbering; a file with no line at all gives one `empty_file` record."""
    lineno, carry, skipping, any_line = 0, b"", False, False
    while True:
        chunk = inflated.read(chunk_bytes)
        data = carry + chunk
        if chunk:  # cut after the last line break; a final "\r" may be half of "\r\n"
            end = max(data.rfind(b"\n"), data.rfind(b"\r", 0, len(data) - 1))
        else:
            end = len(data) - 1
        head, carry = data[:end + 1], data[end + 1:]
        orders, statuses, raws = [], [], []
        for line in head.splitlines():
            if skipping:  # the rest of an over-long line
                skipping = False
            else:
                if len(line) > MAX_LINE_BYTES:
                    orders.append(_order(file, lineno))
                    statuses.append(STATUS["too_long"])
                    raws.append(None)
                elif line.strip():
                    orders.append(_order(file, lineno))
                    statuses.append(LINE)
                    raws.append(line)
                lineno += 1
        if len(carry) > MAX_LINE_BYTES:  # an over-long line: record it once, drop its bytes
            if not skipping:
                orders.append(_order(file, lineno))
                statuses.append(STATUS["too_long"])
                raws.append(None)
                lineno += 1
            carry, skipping = b"", True
        if orders:
            any_line = True
            yield _table(orders, statuses, raw=raws)
        if not chunk:
            break
    if not any_line:
        yield _table([_order(file, 0)], [STATUS["empty_file"]])


def _parquet_records(stream, file: InputFile, cfg: DataConfig) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(stream)
    except (pa.ArrowInvalid, OSError) as e:
        raise CorruptFile(str(e)) from None
    names = set(parquet.schema_arrow.names)
    columns = [c for c in (cfg.text_column, cfg.title_column, cfg.id_column) if c in names]
    row = 0
    for batch in parquet.iter_batches(batch_size=16_384, columns=columns or None):
        rows = batch.to_pylist()
        orders, statuses, ids, texts = [], [], [], []
        for i, values in enumerate(rows, start=row):
            article = article_from_row(values, cfg, f"{file.id_prefix}:{file.row_offset + i}")
            orders.append(_order(file, i))
            statuses.append(STATUS["ok"] if article else STATUS["empty_text"])
            ids.append(article[0] if article else None)
            texts.append(article[1] if article else None)
        row += len(rows)
        yield _table(orders, statuses, ids=ids, texts=texts)
    if row == 0:
        yield _table([_order(file, 0)], [STATUS["empty_file"]])


def records_of_articles(articles: list[dict], id_prefix: str) -> pa.Table:
    """Records of articles held in memory ({"id", "text"}: the synthetic corpus)."""
    return _table(list(range(len(articles))), [STATUS["ok"]] * len(articles),
                  ids=[a.get("id") or f"{id_prefix}:{i}" for i, a in enumerate(articles)],
                  texts=[a["text"] for a in articles])


def _order(file: InputFile, line: int) -> int:
    if line >= MAX_LINES:
        raise CorruptFile(f"more than {MAX_LINES:,} lines; split the file")
    return (file.index << LINE_BITS) | line


def _table(orders, statuses, raw=None, ids=None, texts=None) -> pa.Table:
    n = len(orders)
    return pa.table([pa.array(orders, pa.int64()), pa.array(statuses, pa.int8()),
                     pa.array(raw if raw is not None else [None] * n, pa.binary()),
                     pa.array(ids if ids is not None else [None] * n, pa.string()),
                     pa.array(texts if texts is not None else [None] * n, pa.string())],
                    schema=RECORDS)
