"""Cleaning news articles and cutting them into training segments, a batch of articles at a time.

    per article (Python's C code)  HTML entities unescaped, Unicode NFKC
    per batch (Arrow kernels)      literal special tokens, Reuters ticker tags such as <IBM>,
                                   [extra boilerplate regexes: Python, per article], HTML tags,
                                   runs of spaces -> " ", [lower-casing], lines, stripped,
                                   empty lines dropped, sentences, filtered by word count,
                                   [packed into blocks of up to seq_len tokens]

Every step means exactly what Python's `str`/`re` would (`unicode.py` spells the classes out),
and every pattern matches only where the text changes, since RE2 pays per match, not per
byte. tests/test_clean.py checks the whole against a plain-Python reference.
"""

from __future__ import annotations

import functools
import html
import re
import unicodedata
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raydiff.config import ConfigError, DataConfig
from raydiff.data.runs import count_runs
from raydiff.data.tokenizer import SPECIAL_TOKENS
from raydiff.data.unicode import PY_SPACE_CHARS, PY_SPACE_CLASS, WORD, CharTables, py_pieces_table

TICKER = r"<[A-Z][A-Z0-9.\-&]{0,15}>"  # Reuters company tags such as <IBM>
TAG = r"</?[a-zA-Z][^<>]{0,200}>"
_SPACE_RUN = r"[ \t\x{a0}\x{2000}-\x{200b}\x{3000}]"  # what collapses to one space
# a run of those that is not already a single " "
SPACES = rf"[\t\x{{a0}}\x{{2000}}-\x{{200b}}\x{{3000}}]{_SPACE_RUN}*| {_SPACE_RUN}+"
LINE_BREAK = r"\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x{85}\x{2028}\x{2029}]"  # str.splitlines
SPECIAL_LITERALS = "|".join(re.escape(token) for token in SPECIAL_TOKENS)  # cannot overlap
# a sentence ends at . ! or ? followed by spaces and a capital, a digit or an opening quote
SENTENCE_END = rf"([.!?]){PY_SPACE_CLASS}+([\"'(\[]?[A-Z0-9])"


def compile_boilerplate(patterns: Sequence[str]) -> re.Pattern | None:
    """One (Python) regex matching any of `data.boilerplate_patterns`; None when there are none.
    Compiled once per process, not once per batch."""
    return _boilerplate(tuple(patterns))


@functools.lru_cache(maxsize=8)
def _boilerplate(patterns: tuple[str, ...]) -> re.Pattern | None:
    if not patterns:
        return None
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ConfigError(f"data.boilerplate_patterns: invalid regex {p!r} ({e})") from None
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.MULTILINE)


def article_segments(texts: Sequence[str], cfg: DataConfig,
                     tables: CharTables) -> tuple[pa.StringArray, np.ndarray]:
    """Clean `texts` and cut them into segments: each line's sentences with `data.min_words`
    to `data.max_words` words (as `str.split` counts them), packed when `data.pack` is set.
    Returns (segments, index of each segment's article)."""
    lines, article = clean_lines(texts, cfg, tables)
    marked = pc.replace_substring_regex(lines, SENTENCE_END, "\\1\n\\2")
    sentences, line = _explode(pc.split_pattern(marked, "\n"))
    article = article[line]
    n_words = count_runs(sentences, py_pieces_table(), WORD)  # as str.split() counts them
    kept = (n_words >= cfg.min_words) & (n_words <= cfg.max_words)
    sentences, article = sentences.filter(pa.array(kept)), article[kept]
    if cfg.pack:
        sentences, article = _pack(sentences, article, cfg.seq_len, tables.py_word)
    return sentences, article


def clean_lines(texts: Sequence[str], cfg: DataConfig,
                tables: CharTables) -> tuple[pa.StringArray, np.ndarray]:
    """The non-empty lines of each cleaned article (lower-cased when configured): (lines,
    index of each line's article)."""
    docs = pa.array([_nfkc(html.unescape(t)) for t in texts], pa.string())
    # "[PAD]" in the text would be encoded as padding (one regex: RE2 skips to each "[")
    docs = pc.replace_substring_regex(docs, SPECIAL_LITERALS, " ")
    if cfg.remove_tickers:
        docs = pc.replace_substring_regex(docs, TICKER, " ")
    boilerplate = compile_boilerplate(cfg.boilerplate_patterns)
    if boilerplate is not None:  # user patterns keep Python's regex semantics
        docs = pa.array([boilerplate.sub(" ", t) for t in docs.to_pylist()], pa.string())
    docs = pc.replace_substring_regex(docs, TAG, " ")
    docs = pc.replace_substring_regex(docs, SPACES, " ")
    if cfg.lowercase:  # commutes with what follows: it makes no space and no line break
        docs = _lower(docs, tables.lower_mismatch)
    lines, article = _explode(pc.split_pattern_regex(docs, LINE_BREAK))
    lines = pc.utf8_trim(lines, PY_SPACE_CHARS)
    kept = pc.greater(pc.binary_length(lines), 0)
    return lines.filter(kept), article[kept.to_numpy(zero_copy_only=False)]


def _nfkc(text: str) -> str:
    """NFKC, after Python's quick check (most text is already normalized)."""
    return text if unicodedata.is_normalized("NFKC", text) else \
        unicodedata.normalize("NFKC", text)


def _lower(docs: pa.StringArray, mismatch: str) -> pa.StringArray:
    """`str.lower` of every text: Arrow's kernel where it agrees, Python's where it may not."""
    lowered = pc.utf8_lower(docs)
    exact = pc.match_substring_regex(docs, mismatch)
    if not pc.any(exact).as_py():
        return lowered
    rows = np.flatnonzero(exact.to_numpy(zero_copy_only=False))
    by_python = pa.array([t.lower() for t in docs.take(pa.array(rows)).to_pylist()], pa.string())
    return pc.replace_with_mask(lowered, exact, by_python)


def _explode(lists: pa.ListArray) -> tuple[pa.StringArray, np.ndarray]:
    """list<string> -> (flat strings, index of each one's list)."""
    return (pc.list_flatten(lists),
            pc.list_parent_indices(lists).to_numpy().astype(np.int64))


def _pack(segments: pa.StringArray, article: np.ndarray, max_tokens: int,
          word: str) -> tuple[pa.StringArray, np.ndarray]:
    """Greedily join consecutive segments of an article into pieces of at most `max_tokens`
    tokens (runs of word or punctuation characters, Python's `\\w`); a longer segment stands
    alone."""
    tokens = pc.count_substring_regex(
        segments, f"{word}+|[^{word[1:-1]}{PY_SPACE_CLASS[1:-1]}]+").to_numpy()
    texts = segments.to_pylist()
    packed, packed_article = [], []
    start, length = 0, 0
    for i in range(len(texts) + 1):
        boundary = i == len(texts) or (i > start and (article[i] != article[start]
                                                      or length + tokens[i] > max_tokens))
        if boundary and i > start:
            packed.append(" ".join(texts[start:i]))
            packed_article.append(article[start])
            start, length = i, 0
        if i < len(texts):
            length += tokens[i]
    return pa.array(packed, pa.string()), np.asarray(packed_article, np.int64)
