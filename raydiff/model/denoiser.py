"""The x0-parameterised denoiser of embedding-space diffusion (docs/design.md §3).

    z_t (B, L, d) --up--> (B, L, H) + pos + time --norm, dropout--> BERT layers --down--> x0hat

One embedding table E (V, d) is both the diffusion space (z0 = E[w]) and the output head
(logits = x @ E^T + bias), so the rounding/anchor losses and the diffusion share parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raydiff.config import ModelConfig
from raydiff.model.encoder import Encoder
from raydiff.model.head_ce import tied_head_ce


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def additive_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) of 1 = token, 0 = PAD -> (B, 1, 1, L) of 0 and the dtype's most negative value."""
    mask = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


class Denoiser(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, seq_len: int,
                 self_condition: bool = False):
        super().__init__()
        d, h, dt = cfg.embed_dim, cfg.hidden_size, cfg.time_embed_dim
        self.self_condition = self_condition

        self.word_embedding = nn.Embedding(vocab_size, d)  # E, shared with the output head
        self.lm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.embed_norm = (nn.LayerNorm(d, elementwise_affine=cfg.embed_norm_affine)
                           if cfg.embed_norm == "before_proj" else None)

        self.time_embed = nn.Sequential(nn.Linear(dt, 4 * dt), nn.SiLU(), nn.Linear(4 * dt, h))
        self.up_proj = nn.Sequential(
            nn.Linear(2 * d if self_condition else d, h), nn.Tanh(), nn.Linear(h, h))
        self.position_embedding = nn.Embedding(seq_len, h)
        self.input_norm = (nn.LayerNorm(h, elementwise_affine=cfg.embed_norm_affine)
                           if cfg.embed_norm == "after_proj" else nn.Identity())
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = Encoder(h, cfg.num_layers, cfg.num_heads, cfg.intermediate_size,
                               cfg.dropout)  # BERT's layers
        self.down_proj = nn.Sequential(nn.Linear(h, h), nn.Tanh(), nn.Linear(h, d))
        self.time_embed_dim = dt

        self.apply(self._init_bert_style)
        nn.init.normal_(self.word_embedding.weight, std=cfg.embed_init_std)

    @staticmethod
    def _init_bert_style(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    # ----------------------------------------------------------------- the embedding space

    def embedding_table(self) -> torch.Tensor:
        """The rows the diffusion lives among: E, or LayerNorm(E) with `before_proj`.  (V, d)"""
        table = self.word_embedding.weight
        return self.embed_norm(table) if self.embed_norm is not None else table

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Clean z0 = E[w].   (B, L) -> (B, L, d)"""
        z0 = self.word_embedding(input_ids)
        return self.embed_norm(z0) if self.embed_norm is not None else z0

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The tied output head.   (B, L, d) -> (B, L, V)"""
        flat = torch.addmm(self.lm_bias, x.flatten(0, -2), self.embedding_table().t())
        return flat.unflatten(0, x.shape[:-1])  # the bias added inside the product

    def token_ce(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """CE(logits(x), w) per token in float32, without the (B, L, V) logits.
        (B, L, d), (B, L) -> (B, L)"""
        return tied_head_ce(x, self.embedding_table(), self.lm_bias, input_ids)

    # ----------------------------------------------------------------- the network

    def forward(self, z_t: torch.Tensor, timesteps: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                self_cond: torch.Tensor | None = None) -> torch.Tensor:
        """Predict x0 from z_t.

        z_t: (B, L, d); timesteps: (B,) in the model's time units (see `NoiseSchedule`);
        attention_mask: (B, L), 1 for tokens and 0 for PAD; self_cond: (B, L, d) previous x0hat.
        Returns x0hat: (B, L, d).
        """
        batch, length, _ = z_t.shape
        if self.self_condition:
            if self_cond is None:
                self_cond = torch.zeros_like(z_t)
            z_t = torch.cat([z_t, self_cond], dim=-1)  # (B, L, 2d)
        sinusoid = timestep_embedding(timesteps, self.time_embed_dim).to(z_t.dtype)
        time = self.time_embed(sinusoid)  # (B, H)
        positions = self.position_embedding.weight[:length]  # (L, H)
        h = self.up_proj(z_t) + positions[None] + time[:, None, :]  # (B, L, H)
        h = self.dropout(self.input_norm(h))

        mask = None
        if attention_mask is not None:
            dtype = (torch.get_autocast_dtype(h.device.type)
                     if torch.is_autocast_enabled(h.device.type) else h.dtype)
            mask = additive_attention_mask(attention_mask, dtype)  # (B, 1, 1, L)
        h = self.encoder(h, mask)  # (B, L, H)
        return self.down_proj(h)  # (B, L, d)
