"""A word-level tokenizer (the `tokenizers` library), saved so that
`transformers.AutoTokenizer.from_pretrained(dir)` loads it.

Two ways to the same tokenizer: `train_word_tokenizer` runs the library's trainer over texts in
one process; `prepare` splits the texts into words on the workers (`words.split_words`, exactly
as this tokenizer's normalizer and pre-tokenizer would), counts them there, and builds the
tokenizer from the counts (`select_vocabulary`, `tokenizer_from_vocabulary`) by the trainer's
own rule, so the result is identical (tested).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer

if TYPE_CHECKING:  # transformers costs seconds to import: Ray Data workers never need it
    from transformers import PreTrainedTokenizerFast

PAD, UNK = "[PAD]", "[UNK]"
PAD_ID, UNK_ID = 0, 1
SPECIAL_TOKENS = (PAD, UNK)


def word_pipeline(model: WordLevel, lowercase: bool) -> Tokenizer:
    """NFKC (and lower-casing) -> words and runs of punctuation -> WordLevel ids."""
    tok = Tokenizer(model)
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and runs of punctuation
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    return tok


def train_word_tokenizer(texts: Iterable[str], vocab_size: int,
                         lowercase: bool = True) -> PreTrainedTokenizerFast:
    """Keep the `vocab_size - 2` most frequent words (plus PAD = 0 and UNK = 1)."""
    from transformers import PreTrainedTokenizerFast

    tok = word_pipeline(WordLevel(unk_token=UNK), lowercase)
    trainer = WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                               min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK)


def select_vocabulary(words: Sequence[str], counts: Sequence[int], vocab_size: int) -> list[str]:
    """The trainer's rule: the special tokens, then words by count (descending), ties by the
    word's code points, up to `vocab_size` in all. Index = token id."""
    ranked = sorted((w for w in zip(words, counts, strict=True) if w[0] not in SPECIAL_TOKENS),
                    key=lambda wc: (-wc[1], wc[0]))
    return list(SPECIAL_TOKENS) + [w for w, _ in ranked[:max(0, vocab_size - len(SPECIAL_TOKENS))]]


def tokenizer_from_vocabulary(vocabulary: Sequence[str], lowercase: bool = True) -> Tokenizer:
    """The tokenizer `train_word_tokenizer` would have trained to this vocabulary."""
    tok = word_pipeline(WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token=UNK),
                         lowercase)
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # as the trainer registers them
    return tok


def save_word_tokenizer(tok: Tokenizer, directory: str | Path) -> None:
    """`tokenizer.json` and the `tokenizer_config.json` that `AutoTokenizer.from_pretrained`
    reads, written without importing transformers (over a second of start-up on the driver).
    The class named, PreTrainedTokenizerFast, loads in transformers 4 and 5 alike."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": PAD, "unk_token": UNK}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> None:
    tokenizer.save_pretrained(str(directory))


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))
