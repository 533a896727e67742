"""Reading articles from local sources, splitting them by article, and building token blocks in
one process. The Ray Data pipeline does the same per block on a cluster; this is the path for a
single machine and for tests.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raydiff.config import DataConfig
from raydiff.data.blocks import encode_blocks
from raydiff.data.storage import DataError, local_files
from raydiff.data.synthetic import synthetic_news
from raydiff.data.text import clean_text, compile_boilerplate, pack_segments, segment
from raydiff.data.tokenizer import SPECIAL_TOKENS, train_word_tokenizer

SPLITS = ("train", "valid", "test")
TEXT_SUFFIXES = (".txt", ".txt.gz")
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


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


def _read_file(path: Path, cfg: DataConfig) -> Iterator[dict[str, str]]:
    name = path.name.lower()
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        if not name.endswith(TEXT_SUFFIXES + JSON_SUFFIXES):
            raise DataError(f"{path}: unsupported file type (use .txt, .jsonl or .jsonl.gz)")
        for i, line in enumerate(handle):
            if line.strip():
                # bad lines are counted and reported by the Ray Data pipeline; skipped here
                _, article = parse_line(path.name, i, line, cfg)
                if article is not None:
                    yield article


def parse_line(file_name: str, lineno: int, line: str,
               cfg: DataConfig) -> tuple[str, dict[str, str] | None]:
    """One line of a text (one article per line) or JSON Lines file -> (status, article);
    status is "ok", "malformed_json" or "empty_text", and the article is None unless "ok"."""
    article_id = f"{file_name}:{lineno}"
    if file_name.lower().endswith(TEXT_SUFFIXES):
        return ("ok", {"id": article_id, "text": line}) if line.strip() else ("empty_text", None)
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return "malformed_json", None
    article = article_from_row(row, cfg, article_id)
    return ("ok", article) if article else ("empty_text", None)


def article_from_row(row: object, cfg: DataConfig, fallback_id: str) -> dict[str, str] | None:
    """{"id", "text"} of one parsed record (text column, optional title first), or None when
    it has no usable text."""
    text = row.get(cfg.text_column) if isinstance(row, dict) else None
    if not isinstance(text, str) or not text.strip():
        return None
    title = row.get(cfg.title_column) if cfg.title_column else None
    if isinstance(title, str) and title.strip():
        text = f"{title}\n{text}"
    article_id = row.get(cfg.id_column)
    return {"id": fallback_id if article_id is None else str(article_id), "text": text}


def article_segments(text: str, cfg: DataConfig) -> list[str]:
    """Clean one article (lower-cased if configured) and cut it into training segments,
    packed into blocks of up to seq_len tokens when `data.pack` is set."""
    # a "[PAD]" written in the text would be encoded as padding: special tokens go
    text = clean_text(text, remove_tickers=cfg.remove_tickers,
                      boilerplate=_boilerplate(tuple(cfg.boilerplate_patterns)),
                      literals=SPECIAL_TOKENS)
    if cfg.lowercase:
        text = text.lower()
    segments = segment(text, min_words=cfg.min_words, max_words=cfg.max_words)
    return pack_segments(segments, cfg.seq_len) if cfg.pack else segments


@functools.lru_cache(maxsize=8)
def _boilerplate(patterns: tuple[str, ...]):
    return compile_boilerplate(list(patterns))


def read_articles(cfg: DataConfig) -> Iterator[dict[str, str]]:
    """Articles {"id", "text"} from `data.source`: "synthetic" or local files."""
    if cfg.source == "synthetic":
        articles: Iterator[dict[str, str]] = iter(synthetic_news(cfg.synthetic_size, cfg.seed))
    else:
        articles = (a for path in local_files(cfg.source) for a in _read_file(path, cfg))
    for i, article in enumerate(articles):
        if cfg.max_articles is not None and i >= cfg.max_articles:
            return
        yield article


@dataclass
class TokenizedCorpus:
    tokenizer: object  # transformers.PreTrainedTokenizerFast
    splits: dict[str, dict[str, np.ndarray]]  # split -> {"input_ids", "attention_mask"}


def build_corpus(cfg: DataConfig) -> TokenizedCorpus:
    """Read, clean, segment and split the articles; train the tokenizer on the train split
    only; encode every split to (N, seq_len) blocks."""
    segments: dict[str, list[str]] = {s: [] for s in SPLITS}
    for article in read_articles(cfg):
        split = split_of(article["id"], cfg.valid_fraction, cfg.test_fraction)
        segments[split] += article_segments(article["text"], cfg)
    if not segments["train"]:
        raise DataError(f"data.source={cfg.source}: no training segments after cleaning")
    tokenizer = train_word_tokenizer(segments["train"], cfg.vocab_size, lowercase=cfg.lowercase)
    splits = {}
    for name, texts in segments.items():
        splits[name] = (encode_blocks(tokenizer, texts, cfg.seq_len) if texts else
                        {"input_ids": np.zeros((0, cfg.seq_len), np.int64),
                         "attention_mask": np.zeros((0, cfg.seq_len), np.int8)})
    return TokenizedCorpus(tokenizer, splits)


def iterate_batches(blocks: dict[str, np.ndarray], batch_size: int, *, seed: int, rank: int = 0,
                    world_size: int = 1, shuffle: bool = True,
                    epochs: int | None = None) -> Iterator[dict]:
    """Batches of this rank's share of `blocks`, reshuffled each epoch with (seed, epoch); every
    rank sees the same permutation and takes its own stride of it. Infinite when epochs is None."""
    import torch

    n = blocks["input_ids"].shape[0]
    if n < batch_size * world_size:
        raise DataError(f"{n} examples cannot fill one global batch of {batch_size * world_size}")
    epoch = 0
    while epochs is None or epoch < epochs:
        order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle
                 else np.arange(n))
        usable = (n // (batch_size * world_size)) * batch_size * world_size
        mine = order[:usable].reshape(-1, world_size, batch_size)[:, rank]  # (steps, B)
        for idx in mine:
            yield {k: torch.from_numpy(v[idx]) for k, v in blocks.items()}
        epoch += 1


def chunk_batches(blocks: dict[str, np.ndarray], batch_size: int,
                  max_batches: int | None = None) -> Iterator[dict]:
    """Batches in order, the last one possibly short (for evaluation)."""
    import torch

    n = blocks["input_ids"].shape[0]
    for i, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        yield {k: torch.from_numpy(v[start:start + batch_size]) for k, v in blocks.items()}
