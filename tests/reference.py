"""The reference the data tests compare `prepare` with: preparation as raydiff did it before every
stage moved onto the Ray Data workers (commit 1d8bca9), in plain Python, one process.

    each line      json.loads, cleaned with Python's str/re methods, segmented
    each segment   split into words by the tokenizer's Rust encode
    the driver     exact duplicates removed (kept in the most held-out split), train words
                   counted, vocabulary by the trainer's rule, ids, fixed-length blocks

Not a production path: only tests import it.
"""

from __future__ import annotations

import gzip
import html
import itertools
import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from raydiff.config import DataConfig
from raydiff.data.blocks import fixed_blocks
from raydiff.data.clean import compile_boilerplate
from raydiff.data.records import RANK_OF_SPLIT, SPLITS, split_of
from raydiff.data.tokenizer import (
    SPECIAL_TOKENS,
    UNK,
    UNK_ID,
    select_vocabulary,
    tokenizer_from_vocabulary,
    word_pipeline,
)

_TAG = re.compile(r"</?[a-zA-Z][^<>]{0,200}>")
_TICKER = re.compile(r"<[A-Z][A-Z0-9.\-&]{0,15}>")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u3000]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
WORD_OR_PUNCT = re.compile(r"\w+|[^\w\s]+")


def clean_text(text: str, *, remove_tickers: bool = True, boilerplate=None,
               literals: tuple[str, ...] = ()) -> str:
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


def segment(text: str, *, min_words: int = 1, max_words: int = 10_000) -> list[str]:
    segments = []
    for line in text.splitlines():
        for sentence in _SENTENCE_END.split(line):
            if min_words <= len(sentence.split()) <= max_words:
                segments.append(sentence)
    return segments


def pack_segments(segments: list[str], max_tokens: int) -> list[str]:
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


def article_segments(text: str, cfg: DataConfig) -> list[str]:
    text = clean_text(text, remove_tickers=cfg.remove_tickers,
                      boilerplate=compile_boilerplate(cfg.boilerplate_patterns),
                      literals=SPECIAL_TOKENS)
    if cfg.lowercase:
        text = text.lower()
    segments = segment(text, min_words=cfg.min_words, max_words=cfg.max_words)
    return pack_segments(segments, cfg.seq_len) if cfg.pack else segments


def word_tokens(texts: list[str], lowercase: bool = True) -> list[list[str]]:
    """Each text's words by the tokenizer's Rust encode over the words Python's regex finds,
    falling back to its pre-tokenizer where the regex missed one."""
    vocabulary = [UNK, *set(WORD_OR_PUNCT.findall("\n".join(texts)))]
    index = {word: i for i, word in enumerate(vocabulary)}
    tok = word_pipeline(WordLevel(index, unk_token=UNK), lowercase)
    out = []
    for text, enc in zip(texts, tok.encode_batch(texts, add_special_tokens=False), strict=True):
        if 0 in enc.ids:
            out.append([w for w, _ in tok.pre_tokenizer.pre_tokenize_str(
                tok.normalizer.normalize_str(text))])
        else:
            out.append([vocabulary[i] for i in enc.ids])
    return out


def articles(path: str | Path, cfg: DataConfig):
    """(id, text) of every article of one .jsonl[.gz] file, in order, the first
    `data.max_articles` when set."""
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    kept = 0
    for lineno, raw in enumerate(data.splitlines()):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        text = row.get(cfg.text_column) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            continue
        title = row.get(cfg.title_column) if cfg.title_column else None
        if isinstance(title, str) and title.strip():
            text = f"{title}\n{text}"
        if cfg.max_articles is not None and kept >= cfg.max_articles:
            return
        kept += 1
        article_id = row.get(cfg.id_column)
        yield (f"{Path(path).name}:{lineno}" if article_id is None else str(article_id)), text


def reference_prepare(path: str | Path, cfg: DataConfig) -> tuple[Tokenizer, dict]:
    """The tokenizer and, per split, the (N, seq_len) blocks of the unique segments."""
    segments, ranks = [], []
    for article_id, text in articles(path, cfg):
        rank = RANK_OF_SPLIT[split_of(article_id, cfg.valid_fraction, cfg.test_fraction)]
        for seg in article_segments(text, cfg):
            segments.append(seg)
            ranks.append(rank)
    best: dict[str, int] = {}  # first occurrence order, most held-out split
    for seg, rank in zip(segments, ranks, strict=True):
        best[seg] = min(rank, best.get(seg, 3))
    unique = list(best)
    words = word_tokens(unique, cfg.lowercase)
    counts = pc.value_counts(pa.array(
        [w for seg, ws in zip(unique, words, strict=True) if best[seg] == RANK_OF_SPLIT["train"]
         for w in ws], pa.string()))
    vocabulary = select_vocabulary(counts.field("values").to_pylist(),
                                   counts.field("counts").to_pylist(), cfg.vocab_size)
    index = {w: i for i, w in enumerate(vocabulary)}
    ids = np.fromiter((index.get(w, UNK_ID) for w in itertools.chain.from_iterable(words)),
                      np.int32)
    lengths = np.fromiter(map(len, words), np.int64, len(words))
    input_ids, mask = fixed_blocks(ids, lengths, cfg.seq_len)
    rank = np.array([best[s] for s in unique], np.int8)
    splits = {split: {"input_ids": input_ids[rank == RANK_OF_SPLIT[split]],
                      "attention_mask": mask[rank == RANK_OF_SPLIT[split]]} for split in SPLITS}
    return tokenizer_from_vocabulary(vocabulary, lowercase=cfg.lowercase), splits
