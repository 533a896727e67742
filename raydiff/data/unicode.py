"""Character classes as RE2 patterns, so that Arrow's regex kernels reproduce exactly what Python's
string methods and the `tokenizers` library do, one vectorized call per batch.

RE2 (Arrow's regex engine) and Python's `re` disagree on what `\\s` and `\\w` mean outside ASCII,
and Arrow's `utf8_lower` is not Python's `str.lower`. So no class here is written with `\\s`,
`\\w` or `\\p{..}`: each is the explicit list of code points that the reference implementation
itself puts in it, found by asking it about every code point once per process:

- `PY_SPACE`: `str.isspace` (what `str.split`, `str.strip` and `re`'s `\\s` use);
- `py_word_class()`: Python `re`'s `\\w`, for `data.pack`'s token count;
- `tokenizer_classes(lowercase)`: the word-level tokenizer's own NFKC/lower-casing normalizer
  and Whitespace pre-tokenizer (Rust), run over every code point;
- `lower_mismatch_class()`: where `pc.utf8_lower` and `str.lower` differ.

Two of them also serve as numpy lookup tables (a class number per code point) for `runs.py`:
`py_pieces_table()` (what `str.split()` cuts at) and `tokenizer_table(classes)`, read off the
patterns by Arrow's regex engine once per process (about 0.1 s).

The tables cover code points below `DOMAIN_END` (all scripts in use, emoji included); text with a
character beyond it takes the exact slow path wherever a table is needed. Building them takes
about a second, so `CharTables.build` runs once per `prepare`, on the driver (and caches them on
disk, keyed by the library versions), and the workers receive the result (a few tens of kB of
patterns).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raydiff.data.storage import Location

DOMAIN_END = 0x30000  # planes 0-2: every script and symbol block that news text uses


def re2_class(codepoints, negate: bool = False) -> str:
    """An RE2 character class matching exactly `codepoints` (or all but them)."""
    cps = np.unique(np.asarray(list(codepoints), dtype=np.int64))
    if cps.size == 0:
        return r"[^\x00-\x{10ffff}]" if not negate else r"[\x00-\x{10ffff}]"
    breaks = np.flatnonzero(np.diff(cps) != 1)
    starts = np.concatenate([[cps[0]], cps[breaks + 1]])
    ends = np.concatenate([cps[breaks], [cps[-1]]])
    parts = [f"\\x{{{a:x}}}" if a == b else f"\\x{{{a:x}}}-\\x{{{b:x}}}"
             for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]
    return "[" + ("^" if negate else "") + "".join(parts) + "]"


def _domain() -> np.ndarray:
    """Code points 1 .. DOMAIN_END - 1 without the surrogates (they never occur in UTF-8)."""
    cps = np.arange(1, DOMAIN_END, dtype=np.uint32)
    return cps[(cps < 0xD800) | (cps > 0xDFFF)]


def _as_text(codepoints: np.ndarray) -> str:
    return codepoints.astype(np.uint32).tobytes().decode("utf-32-le")


# Python's whitespace: 29 code points, the last U+3000 (tests/test_unicode.py checks the range)
PY_SPACE: tuple[int, ...] = tuple(c for c in range(0x3001) if chr(c).isspace())
PY_SPACE_CLASS = re2_class(PY_SPACE)
PY_SPACE_CHARS = "".join(map(chr, PY_SPACE))

# classes of code points for `runs.byte_classes`: a separator, the two kinds of run (the
# tokenizer's words and runs of punctuation; `str.split`'s pieces are all of one kind), and the
# characters for which the tokenizer's fast path is not vouched for
SEPARATOR, WORD, PUNCT, UNVERIFIED = 0, 1, 2, 3


@functools.lru_cache(maxsize=1)
def py_pieces_table() -> np.ndarray:
    """What `str.split()` cuts at: SEPARATOR for Python's whitespace, WORD for the rest (also
    every code point above the table)."""
    table = np.full(PY_SPACE[-1] + 1, WORD, np.uint8)
    table[list(PY_SPACE)] = SEPARATOR
    return table


@functools.lru_cache(maxsize=1)
def py_word_class() -> str:
    """Python `re`'s `\\w` for str patterns: `str.isalnum()` or "_", over every code point."""
    return re2_class(c for c in range(sys.maxunicode + 1)
                     if not 0xD800 <= c <= 0xDFFF and (chr(c).isalnum() or c == 0x5F))


@functools.lru_cache(maxsize=1)
def lower_mismatch_class() -> str:
    """The characters where Arrow's `utf8_lower` differs from Python's `str.lower` (e.g. U+0130,
    which Python lowers to two code points), plus Σ (Python picks final or medial sigma by
    context) and everything outside the domain."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cps = _domain()
    chars = _as_text(cps)
    ours = pc.utf8_lower(pa.array(list(chars))).to_pylist()
    agree = {int(c) for c, a, b in zip(cps, chars, ours, strict=True) if a.lower() == b}
    agree.discard(0x3A3)
    agree.add(0)
    return re2_class(agree, negate=True)


@dataclass(frozen=True)
class TokenizerClasses:
    """The word-level tokenizer's view of characters, as RE2 patterns.

    The Whitespace pre-tokenizer splits normalized text into maximal runs of word characters
    and maximal runs of other non-space characters: which run a character belongs to depends
    on that character alone, so three classes describe it exactly. `unverified` matches any
    character for which the fast path might differ from the library: one the normalizer would
    change (upper case when lower-casing, compatibility forms), a combining mark or Hangul jamo
    (NFKC may compose them with a neighbour), an unassigned code point, or one outside the
    domain. Text without such a character is its own normalized form."""

    word: str  # the tokenizer's word characters
    punct: str  # the characters that are neither word characters nor whitespace
    unverified: str


@functools.lru_cache(maxsize=2)
def tokenizer_classes(lowercase: bool) -> TokenizerClasses:
    """Ask the tokenizer about every code point of the domain (about 0.2 s)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from raydiff.data.tokenizer import word_pipeline

    cps = _domain()
    # classes: each code point c as "a c b " through the pre-tokenizer with vocabulary {a, b}:
    # a word character gives [UNK("ac"), b], another character [a, UNK(c), b], a space [a, b]
    probe = Tokenizer(WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    probe.pre_tokenizer = word_pipeline(WordLevel(unk_token="[UNK]"), lowercase).pre_tokenizer
    quads = np.empty((len(cps), 5), np.uint32)
    quads[:] = [ord("a"), 0, ord(" "), ord("b"), ord(" ")]
    quads[:, 1] = cps
    chunks = [_as_text(q) for q in np.array_split(quads, max(1, len(cps) // 8192))]
    ids = np.concatenate([np.asarray(e.ids, np.int8)
                          for e in probe.encode_batch_fast(chunks, add_special_tokens=False)])
    ends = np.flatnonzero(ids == 2)
    starts = np.concatenate([[0], ends[:-1] + 1])
    length, first = ends - starts, ids[starts]
    if len(ends) != len(cps):
        raise RuntimeError("tokenizer_classes: the pre-tokenizer probe lost characters")
    is_word = (length == 1) & (first == 0)
    is_space = (length == 1) & (first == 1)

    # normalization: each code point alone through the tokenizer's normalizer
    normalizer = word_pipeline(WordLevel(unk_token="[UNK]"), lowercase).normalizer
    pairs = np.zeros((len(cps), 2), np.uint32)
    pairs[:, 0] = cps
    normalized = normalizer.normalize_str(_as_text(pairs)).split("\x00")[:-1]
    text = _as_text(cps)
    stable = np.fromiter((n == c for n, c in zip(normalized, text, strict=True)), bool, len(cps))
    stable &= np.fromiter((unicodedata.category(c)[0] != "M" and unicodedata.category(c) != "Cn"
                           for c in text), bool, len(cps))
    jamo = ((cps >= 0x1100) & (cps <= 0x11FF)) | ((cps >= 0x3130) & (cps <= 0x318F)) | \
        ((cps >= 0xA960) & (cps <= 0xA97F)) | ((cps >= 0xD7B0) & (cps <= 0xD7FF))
    stable &= ~jamo

    word = cps[is_word]
    space = cps[is_space]
    not_punct = np.concatenate([word, space])
    return TokenizerClasses(
        word=re2_class(word),
        punct=re2_class(not_punct, negate=True),
        unverified=re2_class(cps[stable], negate=True),
    )


@functools.lru_cache(maxsize=4)
def tokenizer_table(classes: TokenizerClasses) -> np.ndarray:
    """uint8 per code point below DOMAIN_END: UNVERIFIED, else WORD, PUNCT or SEPARATOR (the
    tokenizer's whitespace); read off the classes' own patterns by Arrow's regex engine, so that
    it means exactly what they mean. Every code point above is UNVERIFIED, as the patterns say."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cps = np.concatenate([[0], _domain()]).astype(np.uint32)
    chars = pa.array(list(_as_text(cps)), pa.string())

    def having(pattern: str) -> np.ndarray:
        return pc.match_substring_regex(chars, pattern).to_numpy(zero_copy_only=False)

    table = np.full(DOMAIN_END, UNVERIFIED, np.uint8)  # surrogates: never in UTF-8
    table[cps] = np.where(having(classes.unverified), UNVERIFIED,
                          np.where(having(classes.word), WORD,
                                   np.where(having(classes.punct), PUNCT, SEPARATOR)))
    return table


@dataclass(frozen=True)
class CharTables:
    """Every table a preparation with one data config needs."""

    lowercase: bool
    lower_mismatch: str  # lower_mismatch_class(), when lower-casing
    tokenizer: TokenizerClasses | None  # tokenizer_classes(lowercase), when splitting words
    py_word: str | None  # py_word_class(), when packing

    @classmethod
    def build(cls, lowercase: bool, pack: bool, words: bool = True) -> CharTables:
        """The tables, from the on-disk cache when this machine's libraries built them before
        (`cache_dir()`; about a second saved on every run), else built and cached."""
        path = cache_dir() / f"chartables-{_versions_key(lowercase, pack, words)}.json"
        try:
            cached = json.loads(path.read_text())
            tokenizer = cached["tokenizer"]
            return cls(lowercase, cached["lower_mismatch"],
                       TokenizerClasses(**tokenizer) if tokenizer else None, cached["py_word"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        tables = cls(lowercase, lower_mismatch_class() if lowercase else "",
                     tokenizer_classes(lowercase) if words else None,
                     py_word_class() if pack else None)
        # atomic: a concurrent reader sees all of it or none; a read-only home: built each time
        with contextlib.suppress(OSError):
            Location.local(path).write_text_atomic(json.dumps(dataclasses.asdict(tables)))
        return tables


TABLES_VERSION = 2  # bump when what the tables hold changes


def cache_dir() -> Path:
    """`$RAYDIFF_CACHE`, else `$XDG_CACHE_HOME/raydiff`, else `~/.cache/raydiff`."""
    if os.environ.get("RAYDIFF_CACHE"):
        return Path(os.environ["RAYDIFF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "raydiff"


def _versions_key(*flags: bool) -> str:
    """A hash of everything the tables depend on: the libraries that answer, and the flags."""
    import pyarrow
    import tokenizers

    parts = (TABLES_VERSION, DOMAIN_END, sys.version, unicodedata.unidata_version,
             tokenizers.__version__, pyarrow.__version__, *flags)
    return hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest()
