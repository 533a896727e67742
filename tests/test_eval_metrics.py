"""Evaluation metrics on constructed cases, and the reference LM's perplexity."""

import math

import numpy as np
import pytest
import torch

from raydiff.config import load_config
from raydiff.data.batches import chunk_batches, iterate_batches
from raydiff.data.blocks import encode_blocks
from raydiff.data.tokenizer import train_word_tokenizer
from raydiff.eval.metrics import (
    bucketed,
    distinct_n,
    embedding_diagnostics,
    is_collapsed,
    self_bleu,
    unigram_entropy,
    unique_share,
)
from raydiff.model.reference_lm import perplexity
from raydiff.train.reference import ReferenceEngine


def test_distinct_n_counts_unique_ngrams_over_all_ngrams():
    texts = ["a b a b", "a b c"]
    # unigrams: a b a b a b c -> {a, b, c} = 3 of 7; bigrams: ab ba ab ab bc -> 3 of 5
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n(texts, 3) == pytest.approx(3 / 3)  # aba bab abc
    assert distinct_n(["a"], 2) == 0.0  # no bigram at all


def test_self_bleu_is_one_for_identical_samples_and_low_for_disjoint_ones():
    same = ["the market rose sharply on monday"] * 5
    assert self_bleu(same) == pytest.approx(1.0)
    disjoint = [" ".join(f"w{i}_{j}" for j in range(6)) for i in range(5)]
    assert self_bleu(disjoint) < 0.05
    assert unique_share(same) == pytest.approx(0.2) and unique_share(disjoint) == 1.0


def test_embedding_diagnostics_tell_isotropic_from_collapsed():
    g = torch.Generator().manual_seed(0)
    isotropic = torch.randn(2000, 16, generator=g)
    d = embedding_diagnostics(isotropic)
    assert d["emb_effective_rank"] > 14 and abs(d["emb_mean_cosine"]) < 0.01
    assert d["emb_norm_mean"] == pytest.approx(4.0, rel=0.05)  # sqrt(16)
    line = torch.rand(2000, 1, generator=g) + 0.5
    collapsed = line * torch.ones(1, 16)  # every row on one direction
    c = embedding_diagnostics(collapsed)
    assert c["emb_effective_rank"] == pytest.approx(1.0, abs=1e-3)
    assert c["emb_mean_cosine"] == pytest.approx(1.0, abs=1e-5)


def test_collapse_rule_on_the_token_weighted_scale_and_effective_rank():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(500, 16, generator=g)
    counts = torch.zeros(500, dtype=torch.long)
    counts[:10] = 100  # ten frequent tokens carry the data
    healthy = embedding_diagnostics(table * 0.5, table, counts)
    assert healthy["emb_norm_ratio"] == pytest.approx(0.5) and healthy["emb_collapsed"] == 0.0
    assert healthy["emb_scale_ratio"] == pytest.approx(0.5)
    # only the frequent rows shrink: the plain mean hardly moves, the data's scale does
    frequent_shrunk = table.clone()
    frequent_shrunk[:10] *= 0.05
    d = embedding_diagnostics(frequent_shrunk, table, counts)
    assert d["emb_norm_ratio"] > 0.9 and d["emb_scale_ratio"] == pytest.approx(0.05)
    assert d["emb_collapsed"] == 1.0
    line = (torch.rand(500, 1, generator=g) + 3.0) * torch.ones(1, 16)  # rank 1 < 1.6
    assert embedding_diagnostics(line, table, counts)["emb_collapsed"] == 1.0
    assert is_collapsed(0.1, 1.6, 16) is False and is_collapsed(0.0999, 16, 16) is True
    assert is_collapsed(1.0, 1.59, 16) is True
    assert "emb_collapsed" not in embedding_diagnostics(table)  # no step-0 table, no verdict


def test_bucketed_means_are_per_abar_bucket():
    abar = np.array([0.05, 0.05, 0.95, 1.0])
    rows = bucketed(abar, {"x": np.array([1.0, 3.0, 10.0, 20.0])}, edges=(0.0, 0.5, 1.0))
    assert [r["count"] for r in rows] == [2, 2]
    assert rows[0]["x"] == 2.0 and rows[1]["x"] == 15.0
    empty = bucketed(abar, {"x": abar}, edges=(0.0, 0.01, 1.0))
    assert empty[0]["count"] == 0 and math.isnan(empty[0]["x"])


SENTENCES = [
    "oil prices rose sharply in london on monday",
    "the central bank cut its key interest rate",
    "wheat exports to china fell for a third month",
    "shares of the steel maker closed higher in new york",
]


def test_reference_lm_overfit_gives_its_sentences_low_and_shuffled_words_high_perplexity():
    cfg = load_config(None, [
        "reference.hidden_size=64", "reference.num_layers=2", "reference.num_heads=4",
        "reference.dropout=0.0", "data.seq_len=12", "optim.lr=0.003", "optim.warmup_steps=10",
        "optim.anneal_steps=1000", "train.seed=0"])
    tokenizer = train_word_tokenizer(SENTENCES, vocab_size=100)
    blocks = encode_blocks(tokenizer, SENTENCES, cfg.data.seq_len)
    torch.manual_seed(0)
    engine = ReferenceEngine(cfg, len(tokenizer), torch.device("cpu"))
    for batch in iterate_batches(blocks, 4, seed=0, epochs=150):
        engine.train_step(batch)

    rng = np.random.default_rng(0)
    shuffled = []
    for s in SENTENCES:
        words = s.split()
        while " ".join(words) == s:
            words = list(rng.permutation(words))
        shuffled.append(" ".join(words))
    real_ppl, real_tokens = perplexity(engine.model, chunk_batches(blocks, 4))
    shuffled_ppl, shuffled_tokens = perplexity(
        engine.model, chunk_batches(encode_blocks(tokenizer, shuffled, cfg.data.seq_len), 4))
    assert real_tokens == shuffled_tokens == sum(len(s.split()) - 1 for s in SENTENCES)
    assert real_ppl < 1.5
    assert shuffled_ppl > 10 * real_ppl


def test_unigram_entropy_by_hand():
    # tokens 1,1,2,3 pooled over two sequences: p = (1/2, 1/4, 1/4)
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # 1.0397 nats
    assert unigram_entropy([[1, 1], [2, 3]]) == pytest.approx(expected)
    assert unigram_entropy([[7, 7, 7]]) == 0.0  # one token: no uncertainty
    assert unigram_entropy([list(range(8))]) == pytest.approx(math.log(8))
    assert math.isnan(unigram_entropy([])) and math.isnan(unigram_entropy([[], []]))
