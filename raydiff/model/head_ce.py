"""Cross-entropy of the tied output head without its (N, V) logits (docs/design.md §4).

    CE_i = logsumexp_v(x_i · W_v + b_v) − (x_i · W_{w_i} + b_{w_i})      x (N, d), W (V, d), b (V,)

`F.cross_entropy(x @ W.T + b, w)` materialises the logits, their bias sum, their log-softmax,
the gradient's zeros and the softmax of the backward: five fresh (N, V) tensors a step. At the
ablation-small size (N = 1,024, V = 5,000, d = 16) those passes over 20 MB tensors, and the page
faults of allocating them afresh (glibc returns blocks this large to the kernel), were most of a
CPU step. Here the rows go through in chunks of at most `CPU_CHUNK_ELEMENTS` logits: the forward
keeps each row's log-sum-exp only, and the backward recomputes a chunk's logits (a product of
inner dimension d + 2) to form the softmax − onehot in place. The technique of fused linear
cross-entropy (Liger Kernel; Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language
Models"), written here for the tied head.
"""

from __future__ import annotations

import torch

# logits per chunk: 1M floats (4 MiB) on a CPU, where ablation-small's step on 2 threads was
# fastest from 2^20 up and flat on one (docs/benchmarks.md); a GPU takes the rows in one go
CPU_CHUNK_ELEMENTS = 1 << 20
GPU_CHUNK_ELEMENTS = 1 << 28


def _chunks(n: int, vocab: int, device: torch.device) -> list[tuple[int, int]]:
    limit = GPU_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS
    rows = max(1, limit // max(vocab, 1))
    return [(start, min(start + rows, n)) for start in range(0, n, rows)]


class _TiedHeadCE(torch.autograd.Function):
    """The bias rides in the products as one more inner dimension ([x, 1] · [W, b]). The
    products run in `dtype` (autocast's, else x's), as autocast runs the logits' matmul; the
    exp, sums and gradients in x's dtype. When the two agree the backward's −logsumexp rides in
    the product as well ([x, 1, −lse] · [W, b, 1]); a 16-bit dtype would round it to 8 or 11
    bits and misscale the softmax by percents, so there it is subtracted after the product."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, dtype):
        # x (N, d), weight (V, d), bias (V,), target (N,) int64 -> CE (N,), in x's dtype
        xa = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1).to(dtype)  # (N, d + 1)
        wa = torch.cat([weight, bias[:, None]], dim=1).to(dtype)  # (V, d + 1)
        lse = x.new_empty(x.shape[0])
        picked = torch.empty_like(lse)
        for start, end in _chunks(x.shape[0], weight.shape[0], x.device):
            logits = (xa[start:end] @ wa.t()).to(lse.dtype)  # (n, V)
            picked[start:end] = logits.gather(1, target[start:end, None]).squeeze(1)
            top = logits.amax(dim=1, keepdim=True)  # (n, 1)
            lse[start:end] = logits.sub_(top).exp_().sum(dim=1).log_() + top.squeeze(1)
        ctx.save_for_backward(xa, wa, target, lse)
        return lse - picked

    @staticmethod
    def backward(ctx, grad):
        # grad (N,): dCE_i/dlogits_i = softmax_i − onehot(w_i), scaled by grad_i
        xa, wa, target, lse = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        folded = xa.dtype == lse.dtype
        if folded:
            xs = torch.cat([xa, -lse[:, None]], dim=1)  # (N, d + 2)
            ws = torch.cat([wa, wa.new_ones(wa.shape[0], 1)], dim=1)  # (V, d + 2)
        grad_x = lse.new_empty(xa.shape[0], xa.shape[1] - 1) if need_x else None  # (N, d)
        grad_wa = lse.new_zeros(wa.shape) if need_w or need_b else None  # (V, d + 1)
        for start, end in _chunks(xa.shape[0], wa.shape[0], xa.device):
            g = grad[start:end, None]  # (n, 1)
            if folded:
                dlogits = xs[start:end] @ ws.t()  # logits − lse: (n, V)
            else:
                dlogits = (xa[start:end] @ wa.t()).to(lse.dtype).sub_(lse[start:end, None])
            dlogits.exp_().mul_(g)  # the softmax, scaled
            dlogits.scatter_add_(1, target[start:end, None], -g)
            dlogits = dlogits.to(xa.dtype)
            if need_x:
                grad_x[start:end] = dlogits @ wa[:, :-1]
            if grad_wa is not None:
                grad_wa += dlogits.t() @ xa[start:end]
        grad_w = grad_wa[:, :-1] if need_w else None
        grad_b = grad_wa[:, -1] if need_b else None
        return grad_x, grad_w, grad_b, None, None


# run eagerly inside a compiled objective: Inductor (torch 2.13, CPU, 2 threads) compiled the
# chunk loop into wrong, run-to-run different gradients when there was more than one chunk
# (docs/benchmarks.md, session 13); eagerly it is already one product per chunk
@torch.compiler.disable
def tied_head_ce(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 target: torch.Tensor) -> torch.Tensor:
    """Per-token CE(x W^T + b, target) in float32, never holding more than a chunk of logits.

    x: (..., d) predictions in the embedding space; weight: (V, d) the head (the embedding
    table); bias: (V,); target: (...) token ids. Returns (...) float32. Under autocast the
    products run in autocast's dtype and the rest in float32, as for `F.cross_entropy` over
    autocast's logits."""
    device = x.device.type
    dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
             else torch.float32)
    with torch.autocast(device, enabled=False):
        ce = _TiedHeadCE.apply(x.float().flatten(0, -2), weight.float(), bias.float(),
                               target.flatten(), dtype)
    return ce.view(target.shape)
