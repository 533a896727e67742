"""Evaluation metrics (docs/design.md §6) as pure functions of texts, tensors and per-example scores.

Texts are word-tokenized strings (tokens separated by spaces), as raydiff's tokenizer decodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

# Noise-level buckets over abar (the signal fraction), not over t: two schedules reach the same
# abar at very different t, so buckets of abar compare models trained with different schedules.
ABAR_EDGES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams in all texts (Li et al. 2016); 0 when there are none."""
    total, seen = 0, set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def self_bleu(texts: Sequence[str], max_texts: int | None = 500) -> float:
    """Mean BLEU-4 of each text against all the others as references (Zhu et al. 2018,
    Texygen), with sacrebleu's sentence BLEU (exponential smoothing, no re-tokenization), in
    [0, 1]. Higher means less diverse; identical texts give 1. Only the first `max_texts` are
    used (the cost is quadratic)."""
    from sacrebleu.metrics import BLEU

    texts = [t for t in texts if t.strip()][:max_texts]
    if len(texts) < 2:
        return math.nan
    bleu = BLEU(tokenize="none", effective_order=True)
    scores = [bleu.sentence_score(hyp, texts[:i] + texts[i + 1:]).score
              for i, hyp in enumerate(texts)]
    return float(np.mean(scores)) / 100.0


def unigram_entropy(token_lists: Sequence[Sequence[int]]) -> float:
    """Entropy in nats of the token distribution pooled over all sequences, -sum p log p (the
    plug-in estimate: it grows with the number of tokens, so compare sets of equal size). Low
    values mean few distinct tokens, which a low gen-PPL can hide; NaN when there are none."""
    tokens = [np.asarray(t, np.int64) for t in token_lists]
    counts = np.bincount(np.concatenate(tokens)) if tokens else np.zeros(0, np.int64)
    total = counts.sum()
    if total == 0:
        return math.nan
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def unique_share(texts: Sequence[str]) -> float:
    """Share of texts that are distinct strings."""
    return len(set(texts)) / len(texts) if texts else 0.0


# The collapse rule (docs/design.md §6): a table whose rows, as the data uses them, shrank below
# 10% of their scale at step 0, or whose effective rank fell below 10% of its dimension d
COLLAPSE_SCALE_RATIO = 0.1
COLLAPSE_RANK_SHARE = 0.1


def is_collapsed(scale_ratio: float, effective_rank: float, embed_dim: int) -> bool:
    return scale_ratio < COLLAPSE_SCALE_RATIO or effective_rank < COLLAPSE_RANK_SHARE * embed_dim


@torch.no_grad()
def embedding_diagnostics(table: torch.Tensor, initial: torch.Tensor | None = None,
                          token_counts: torch.Tensor | None = None) -> dict[str, float]:
    """Collapse diagnostics of an embedding table E (V, d): row-norm mean and std, mean
    pairwise cosine between distinct rows, and effective rank (exp of the entropy of the
    normalised singular values, Roy & Vetterli 2007; d for an isotropic table, 1 if collapsed
    onto a line).

    Given the table at step 0 (`initial`), also the ratio of the mean row norms
    (`emb_norm_ratio`) and, given how often each token occurs (`token_counts`, (V,)), the
    ratio of the token-weighted RMS row norms (`emb_scale_ratio`: the scale of z0 as the data
    sees it; the plain mean is dominated by rare rows, which barely move) and the collapse
    rule's verdict on it (`emb_collapsed`, 0 or 1)."""
    table = table.detach().float()
    vocab = table.shape[0]
    norms = table.norm(dim=-1)  # (V,)
    unit = table / norms.clamp(min=1e-12)[:, None]
    # sum over all pairs (i, j) of cos_ij = ||sum_i u_i||^2; remove the V diagonal terms
    cos_sum = unit.sum(dim=0).pow(2).sum().item()
    mean_cos = (cos_sum - vocab) / (vocab * (vocab - 1)) if vocab > 1 else math.nan
    singular = torch.linalg.svdvals(table)
    p = singular / singular.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    out = {"emb_norm_mean": norms.mean().item(), "emb_norm_std": norms.std().item(),
           "emb_mean_cosine": mean_cos, "emb_effective_rank": math.exp(entropy)}
    if initial is not None:
        initial_norms = initial.detach().to(table.device, torch.float32).norm(dim=-1)
        out["emb_norm_ratio"] = out["emb_norm_mean"] / max(initial_norms.mean().item(), 1e-12)
        if token_counts is not None and token_counts.sum() > 0:
            w = token_counts.to(table.device, torch.float32)
            now, then = (w * norms.pow(2)).sum(), (w * initial_norms.pow(2)).sum()
            out["emb_scale_ratio"] = (now / then.clamp(min=1e-24)).sqrt().item()
            out["emb_collapsed"] = float(is_collapsed(out["emb_scale_ratio"],
                                                      out["emb_effective_rank"], table.shape[1]))
    return out


def bucketed(abar: np.ndarray, columns: dict[str, np.ndarray],
             edges: Sequence[float] = ABAR_EDGES) -> list[dict[str, float]]:
    """Means of per-example `columns` in buckets of abar, [lo, hi) (the last bucket closed)."""
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (abar >= lo) & ((abar < hi) if hi < edges[-1] else (abar <= hi))
        row = {"abar_lo": lo, "abar_hi": hi, "count": int(inside.sum())}
        for name, values in columns.items():
            row[name] = float(values[inside].mean()) if inside.any() else math.nan
        rows.append(row)
    return rows
