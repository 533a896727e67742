"""The denoiser's transformer: post-LayerNorm BERT layers (Devlin et al. 2019), computed as
transformers' `BertEncoder` computes them, in a few tensor operations per layer.

    a   = LN(h + Dropout(W_o MHA(h)))           MHA: softmax(q k^T / sqrt(d_head) + mask) v
    out = LN(a + Dropout(W_2 gelu(W_1 a)))

Query, key and value come from one (3H, H) projection. At the sizes raydiff trains on a CPU,
what a layer costs beyond its kernels is a visible share of the step (docs/benchmarks.md);
these layers keep it small. Weights saved from a `BertEncoder` (raydiff's checkpoints before
this module) load unchanged: `load_state_dict` maps their names and concatenates their query,
key and value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-12  # BERT's


class EncoderLayer(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int,
                 dropout: float):
        super().__init__()  # heads dividing the width: checked with the config (config/load.py)
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.attn_out = nn.Linear(hidden_size, hidden_size)
        self.attn_norm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.ffn_in = nn.Linear(hidden_size, intermediate_size)
        self.ffn_out = nn.Linear(intermediate_size, hidden_size)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """h: (B, L, H); mask: additive, (B, 1, 1, L), or None. Returns (B, L, H)."""
        batch, length, hidden = h.shape
        p = self.dropout if self.training else 0.0
        qkv = self.qkv(h).view(batch, length, 3, self.num_heads, hidden // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, L, d_head)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        a = a.transpose(1, 2).reshape(batch, length, hidden)  # (B, L, H)
        h = self.attn_norm(h + F.dropout(self.attn_out(a), p, self.training))
        f = self.ffn_out(F.gelu(self.ffn_in(h)))  # (B, L, H), through (B, L, I)
        return self.ffn_norm(h + F.dropout(f, p, self.training))


class Encoder(nn.Module):
    def __init__(self, hidden_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(hidden_size, num_heads, intermediate_size, dropout)
            for _ in range(num_layers))
        self._register_load_state_dict_pre_hook(_from_bert_names)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """h: (B, L, H); mask: additive, (B, 1, 1, L). Returns (B, L, H)."""
        for layer in self.layers:
            h = layer(h, mask)
        return h


# a BertEncoder's names under layer.{i}. -> this module's under layers.{i}.
_BERT_NAMES = {"attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
               "intermediate.dense": "ffn_in", "output.dense": "ffn_out",
               "output.LayerNorm": "ffn_norm"}


def _from_bert_names(state: dict, prefix: str, *_args) -> None:
    """Rename a BertEncoder's parameters in `state` (in place) to this module's. A layer whose
    names are not all there is left as it is, for `load_state_dict` to report."""
    old = f"{prefix}layer."
    layers = {key[len(old):].split(".", 1)[0] for key in state if key.startswith(old)}
    for i in sorted(layers):
        at, to = f"{old}{i}.", f"{prefix}layers.{i}."
        qkv = {kind: [f"{at}attention.self.{n}.{kind}" for n in ("query", "key", "value")]
               for kind in ("weight", "bias")}
        renames = {f"{at}{bert}.{kind}": f"{to}{mine}.{kind}"
                   for bert, mine in _BERT_NAMES.items() for kind in ("weight", "bias")}
        if not all(key in state for key in [*qkv["weight"], *qkv["bias"], *renames]):
            continue
        for kind, keys in qkv.items():
            state[f"{to}qkv.{kind}"] = torch.cat([state.pop(key) for key in keys])
        for bert_key, key in renames.items():
            state[key] = state.pop(bert_key)
