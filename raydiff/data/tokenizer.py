"""A word-level tokenizer (the `tokenizers` library), saved so that
`transformers.AutoTokenizer.from_pretrained(dir)` loads it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer

if TYPE_CHECKING:  # transformers costs seconds to import: Ray Data workers never need it
    from transformers import PreTrainedTokenizerFast

PAD, UNK = "[PAD]", "[UNK]"
PAD_ID, UNK_ID = 0, 1


def train_word_tokenizer(texts: Iterable[str], vocab_size: int,
                         lowercase: bool = True) -> PreTrainedTokenizerFast:
    """Keep the `vocab_size - 2` most frequent words (plus PAD = 0 and UNK = 1)."""
    tok = Tokenizer(WordLevel(unk_token=UNK))
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and runs of punctuation
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    trainer = WordLevelTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK], min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> None:
    tokenizer.save_pretrained(str(directory))


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))
