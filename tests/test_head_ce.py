"""The chunked tied-head cross-entropy (raydiff.model.head_ce) against F.cross_entropy over the
materialised logits: the same values and the same gradients, over several chunks."""

import pytest
import torch
import torch.nn.functional as F

from raydiff.model import head_ce
from raydiff.model.head_ce import tied_head_ce
from tests.conftest import tiny_denoiser


def _inputs(n=10, vocab=7, dim=5, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64)
    target = torch.randint(0, vocab, (n,), generator=gen)
    upstream = torch.rand(n, generator=gen, dtype=torch.float64)  # per-row loss weights
    return x, weight, bias, target, upstream


def _grads(fn, x, weight, bias, target, upstream):
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    ce = fn(*leaves, target)
    (ce * upstream).sum().backward()
    return ce.detach(), *(t.grad for t in leaves)


def _reference(x, weight, bias, target):
    return F.cross_entropy(x @ weight.t() + bias, target, reduction="none")


@pytest.mark.parametrize("scale", [1.0, 60.0])  # 60: logits hundreds apart, exp would overflow
def test_values_and_gradients_equal_the_materialised_cross_entropy(monkeypatch, scale):
    x, weight, bias, target, upstream = _inputs(scale=scale)
    # 3 rows a chunk: chunks of 3, 3, 3 and a ragged 1
    monkeypatch.setattr(head_ce, "CPU_CHUNK_ELEMENTS", 3 * weight.shape[0] + 1)
    assert head_ce._chunks(10, 7, x.device) == [(0, 3), (3, 6), (6, 9), (9, 10)]

    ce, gx, gw, gb = _grads(lambda *a: head_ce._TiedHeadCE.apply(*a, torch.float64),
                            x, weight, bias, target, upstream)
    ref_ce, ref_gx, ref_gw, ref_gb = _grads(_reference, x, weight, bias, target, upstream)
    assert torch.isfinite(ce).all() and ce.max() > (10 if scale > 1 else 0.1)
    for got, want in ((ce, ref_ce), (gx, ref_gx), (gw, ref_gw), (gb, ref_gb)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # the gradient's own definition, not only agreement: d CE / d bias sums softmax - onehot
    probs = torch.softmax(x @ weight.t() + bias, dim=1)
    onehot = F.one_hot(target, weight.shape[0]).double()
    torch.testing.assert_close(gb, ((probs - onehot) * upstream[:, None]).sum(0))


def test_with_only_x_needing_a_gradient_it_is_right_and_in_xs_dtype():
    x, weight, bias, target, upstream = _inputs()
    xg = x.clone().requires_grad_()
    (tied_head_ce(xg, weight.float(), bias.float(), target) * upstream).sum().backward()
    assert xg.grad is not None and xg.grad.dtype == torch.float64  # back in the input's dtype
    ref = torch.autograd.grad((_reference(xg, weight, bias, target) * upstream).sum(), xg)[0]
    torch.testing.assert_close(xg.grad, ref, rtol=1e-5, atol=1e-6)


def test_the_denoisers_token_ce_is_its_logits_cross_entropy_with_the_table_norm():
    model = tiny_denoiser(embed_norm="before_proj")  # the table is LayerNorm(E)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, model.word_embedding.embedding_dim, generator=gen)
    ids = torch.randint(0, model.lm_bias.shape[0], (2, 6), generator=gen)

    ce = model.token_ce(x, ids)  # (B, L)
    ce.sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = F.cross_entropy(model.logits(x).flatten(0, 1), ids.flatten(), reduction="none")
    ref.sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.testing.assert_close(ce, ref.view(ids.shape))
    assert set(got) == set(want) == {"word_embedding.weight", "lm_bias", "embed_norm.weight",
                                     "embed_norm.bias"}
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_under_autocast_the_products_take_its_dtype_and_agree_with_autocasts_logits(monkeypatch):
    monkeypatch.setattr(head_ce, "CPU_CHUNK_ELEMENTS", 3 * 7 + 1)  # several chunks again
    x, weight, bias, target, upstream = (t.float() if t.is_floating_point() else t
                                         for t in _inputs(scale=4.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce, gx, gw, gb = _grads(tied_head_ce, x, weight, bias, target, upstream)
        ref = _grads(_reference, x, weight, bias, target, upstream)  # autocast's own logits
    assert ce.dtype == gx.dtype == gw.dtype == torch.float32
    for got, want in zip((ce, gx, gw, gb), ref, strict=True):  # bf16 rounds the logits
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
