"""The driver's half of `prepare` without Ray: the vocabulary counted from the workers' words is
the one the tokenizer library's trainer would pick, and the blocks are the final tokenizer's own
encodings of the de-duplicated segments."""

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from raydiff.config import load_config
from raydiff.data.assemble import RANK_OF_SPLIT, SPLIT_OF_RANK, assemble
from raydiff.data.blocks import encode_fixed
from raydiff.data.corpus import SPLITS, article_segments
from raydiff.data.pipeline import SegmentRecords, kept_records
from raydiff.data.synthetic import synthetic_news
from raydiff.data.tokenizer import (
    PAD_ID,
    UNK_ID,
    save_word_tokenizer,
    select_vocabulary,
    tokenizer_from_vocabulary,
    train_word_tokenizer,
    word_tokens,
)

ODD_TEXTS = [
    "Ties: alpha beta gamma delta, all once; Zeta zeta ZETA!",
    "Ｆｕｌｌｗｉｄｔｈ ｌｅｔｔｅｒｓ, the ﬁ ligature and café (NFKC) -- and 3.5 pct...",
    "İstanbul, Straße; ÆØÅ æøå -- naïve coöperation",
]


def _serialized(tokenizer) -> dict:
    """Everything but the post-processor, a no-op template that transformers' wrapper adds."""
    return {k: v for k, v in json.loads(tokenizer.to_str()).items() if k != "post_processor"}


@pytest.mark.parametrize("lowercase", [True, False])
@pytest.mark.parametrize("vocab_size", [12, 60, 400, 100_000])
def test_vocabulary_from_counts_is_the_trainers(lowercase, vocab_size):
    texts = [a["text"] for a in synthetic_news(200, seed=3)] + ODD_TEXTS
    counts = Counter(w for words in word_tokens(texts, lowercase=lowercase).to_pylist()
                     for w in words)
    built = tokenizer_from_vocabulary(
        select_vocabulary(list(counts), list(counts.values()), vocab_size), lowercase=lowercase)
    trained = train_word_tokenizer(texts, vocab_size, lowercase=lowercase)
    # the whole serialized tokenizer: vocabulary, ids, special tokens, normalizer, pre-tokenizer
    assert _serialized(built) == _serialized(trained.backend_tokenizer)
    if vocab_size < len(counts):
        assert built.get_vocab_size() == vocab_size  # the cut falls inside equal counts
    assert built.encode(ODD_TEXTS[1]).ids == trained(ODD_TEXTS[1])["input_ids"]


def test_words_are_the_rust_normalizers_and_pre_tokenizers():
    # NFKC turns these into words Python's regex never saw: split by the tokenizer itself
    words = word_tokens(["Ｆｕｌｌ-width ﬁne", "plain words, here."], lowercase=True)
    assert words.to_pylist() == [["full", "-", "width", "fine"],
                                 ["plain", "words", ",", "here", "."]]


def _records(cfg, articles):
    rows = {"id": [a["id"] for a in articles], "text": [a["text"] for a in articles],
            "_row": list(range(len(articles)))}
    return kept_records(SegmentRecords(cfg, id_prefix="t")(rows).sort_by("order"), cfg)


def test_blocks_are_the_final_tokenizers_encodings_of_unique_segments():
    cfg = load_config(None, ["data.seq_len=10", "data.vocab_size=80", "data.valid_fraction=0.25",
                             "data.test_fraction=0.25", "data.lowercase=false"]).data
    articles = synthetic_news(120, seed=5)
    shared = "The same sentence appears in every article [PAD] here."
    articles = [dict(a, text=a["text"] + "\n" + shared) for a in articles]
    records = _records(cfg, articles)
    out = assemble(records, cfg.vocab_size, cfg.seq_len, cfg.lowercase)

    # the reference: de-duplicate in plain Python, train the library's tokenizer, encode
    first_rank: dict[str, int] = {}
    for rank, segments in zip(records["rank"].to_pylist(), records["segments"].to_pylist(),
                              strict=True):
        for seg in segments:
            first_rank[seg] = min(rank, first_rank.get(seg, 3))
    unique = list(first_rank)
    train = [s for s in unique if first_rank[s] == RANK_OF_SPLIT["train"]]
    reference = train_word_tokenizer(train, cfg.vocab_size, lowercase=False)
    assert _serialized(out.tokenizer) == _serialized(reference.backend_tokenizer)

    assert out.segments_before_dedup == sum(len(s) for s in records["segments"].to_pylist())
    assert sum(len(b["row_id"]) for b in out.splits.values()) == len(unique)
    for split in SPLITS:
        blocks = out.splits[split]
        segments = [unique[i] for i in blocks["row_id"]]
        assert all(SPLIT_OF_RANK[first_rank[s]] == split for s in segments)
        ids, mask = encode_fixed(reference.backend_tokenizer, segments, cfg.seq_len)
        np.testing.assert_array_equal(blocks["input_ids"], ids)
        np.testing.assert_array_equal(blocks["attention_mask"], mask)
    # the sentence shared by every article is kept once, in the most held-out split
    (shared_segment,) = [s for s in unique if s.startswith("The same sentence")]
    assert SPLIT_OF_RANK[first_rank[shared_segment]] == "valid"
    # a literal special token is cleaned out of the text, never encoded as padding
    assert "[PAD]" not in shared_segment
    valid = out.splits["valid"]
    assert not np.any((valid["input_ids"] == PAD_ID) & (valid["attention_mask"] == 1))


def test_saved_tokenizer_loads_with_auto_tokenizer(tmp_path):
    texts = [a["text"] for a in synthetic_news(50, seed=2)]
    counts = Counter(w for words in word_tokens(texts).to_pylist() for w in words)
    tok = tokenizer_from_vocabulary(select_vocabulary(list(counts), list(counts.values()), 40))
    save_word_tokenizer(tok, tmp_path / "tokenizer")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    assert len(loaded) == 40 and loaded.pad_token_id == PAD_ID and loaded.unk_token_id == UNK_ID
    sentence = texts[0].splitlines()[0] + " zzzunseen"
    assert loaded(sentence)["input_ids"] == tok.encode(sentence).ids
    assert loaded(sentence)["input_ids"][-1] == UNK_ID


def test_special_tokens_written_in_text_are_removed():
    cfg = load_config(None, ["data.lowercase=false"]).data
    assert article_segments("Say [UNK] or ［PAD］ aloud.", cfg) == ["Say or aloud."]


def test_records_without_tokens_for_reading_segments():
    cfg = load_config(None, []).data
    articles = synthetic_news(5, seed=1)
    rows = {"id": [a["id"] for a in articles], "text": [a["text"] for a in articles],
            "_row": list(range(5))}
    table = SegmentRecords(cfg, id_prefix="t", tokenize=False)(rows)
    assert all(words == [[]] * len(segs) for words, segs in
               zip(table["tokens"].to_pylist(), table["segments"].to_pylist(), strict=True))
    assert table.schema.equals(SegmentRecords.SCHEMA) and isinstance(table, pa.Table)
