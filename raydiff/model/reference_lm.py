"""The reference autoregressive LM that scores text: GPT-2's architecture from `transformers`,
built from a config (never pretrained) on raydiff's own word-level tokenizer.

Perplexity is exp(mean NLL) over every predicted token, i.e. each sequence's tokens after its
first (there is no BOS token: the first word of a segment is not scored, for real and generated
text alike).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from raydiff.config import ReferenceConfig

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel


def build_reference_lm(cfg: ReferenceConfig, vocab_size: int, seq_len: int) -> GPT2LMHeadModel:
    # imported here: transformers' GPT-2 takes ~3 s to import on a small CPU, which every Ray
    # Train worker (and every restart of one) would otherwise pay to train the diffusion model
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size, n_positions=seq_len, n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers, n_head=cfg.num_heads, resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, bos_token_id=None, eos_token_id=None,
        pad_token_id=0, attn_implementation="sdpa")
    return GPT2LMHeadModel(config)


def causal_lm_loss(model: GPT2LMHeadModel, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed NLL and number of predicted tokens.   (B, L), (B, L) -> (B,), (B,)

    Sequences are right-padded; position i predicts token i + 1 where that token is real."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, L, V)
    targets = input_ids[:, 1:]  # (B, L-1)
    scored = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                          reduction="none").view(targets.shape)
    return (nll * scored).sum(dim=1), scored.sum(dim=1)


@torch.no_grad()
def perplexity(model: GPT2LMHeadModel, batches: Iterable[dict[str, torch.Tensor]],
               device: torch.device | str = "cpu") -> tuple[float, int]:
    """(perplexity, tokens scored) over `batches` of {"input_ids", "attention_mask"}."""
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for batch in batches:
        nll, count = causal_lm_loss(model, batch["input_ids"].to(device),
                                    batch["attention_mask"].to(device))
        total_nll += nll.sum().item()
        total_tokens += int(count.sum().item())
    model.train(was_training)
    if total_tokens == 0:
        return math.nan, 0
    return math.exp(total_nll / total_tokens), total_tokens
