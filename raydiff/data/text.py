"""Text cleaning and line-wise segmentation of news articles (one training example per line or
sentence, as the seed paper trains). Pure Python: the Ray Data pipeline maps these per batch.
"""

from __future__ import annotations

import html
import re
import unicodedata

_TAG = re.compile(r"</?[a-zA-Z][^<>]{0,200}>")
_TICKER = re.compile(r"<[A-Z][A-Z0-9.\-&]{0,15}>")  # Reuters company tags such as <IBM>
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u3000]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def clean_text(text: str, *, remove_tickers: bool = True,
               boilerplate: re.Pattern | None = None, literals: tuple[str, ...] = ()) -> str:
    """Unicode (NFKC) and whitespace normalisation, HTML entities and tags removed, optional
    ticker tags, boilerplate and literal strings (a tokenizer's special tokens) removed;
    keeps lines."""
    text = unicodedata.normalize("NFKC", html.unescape(text))
    for literal in literals:
        text = text.replace(literal, " ")
    if remove_tickers:
        text = _TICKER.sub(" ", text)
    if boilerplate is not None:
        text = boilerplate.sub(" ", text)
    text = _TAG.sub(" ", text)
    lines = (_SPACES.sub(" ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def compile_boilerplate(patterns: list[str]) -> re.Pattern | None:
    """One regex matching any of the configured boilerplate patterns (None when there are none)."""
    if not patterns:
        return None
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"data.boilerplate_patterns: invalid regex {p!r} ({e})") from None
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.MULTILINE)


WORD_OR_PUNCT = re.compile(r"\w+|[^\w\s]+")  # the tokenizer's Whitespace pre-tokenizer


def pack_segments(segments: list[str], max_tokens: int) -> list[str]:
    """Greedily join consecutive segments into pieces of at most `max_tokens` tokens (counted
    as the word-level tokenizer splits them); a segment longer than that stands alone."""
    packed, current, length = [], [], 0
    for seg in segments:
        n = len(WORD_OR_PUNCT.findall(seg))
        if current and length + n > max_tokens:
            packed.append(" ".join(current))
            current, length = [], 0
        current.append(seg)
        length += n
    if current:
        packed.append(" ".join(current))
    return packed


def segment(text: str, *, min_words: int = 1, max_words: int = 10_000) -> list[str]:
    """Split a cleaned article into lines, and lines into sentences; keep those whose word
    count lies in [min_words, max_words]."""
    segments = []
    for line in text.splitlines():
        for sentence in _SENTENCE_END.split(line):
            n_words = len(sentence.split())
            if min_words <= n_words <= max_words:
                segments.append(sentence)
    return segments
