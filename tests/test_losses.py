import pytest
import torch

from raydiff.diffusion import Draws, LossSpec, NoiseSchedule, diffusion_losses, masked_mean
from tests.conftest import tiny_denoiser


def _batch(vocab=50, B=4, L=8):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, vocab, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0  # PAD
    return ids, mask


def _draws(ids, t, seed=0, dim=16):
    return Draws.sample(t, (*ids.shape, dim), torch.Generator().manual_seed(seed))


def _losses(model, ids, mask, loss, t=None, seed=0, perturb_z0=True):
    s = NoiseSchedule.named("pw_lin", 100)
    t = torch.tensor([0, 10, 50, 99]) if t is None else t
    return diffusion_losses(model, s, {"input_ids": ids, "attention_mask": mask},
                            LossSpec(loss=loss, perturb_z0=perturb_z0),
                            _draws(ids, t, seed, model.word_embedding.embedding_dim))


@pytest.mark.parametrize("loss", ["rounding", "anchor"])
def test_ce_gradient_reaches_denoiser_only_for_anchor(loss):
    model = tiny_denoiser()
    ids, mask = _batch()
    terms = _losses(model, ids, mask, loss)
    terms.ce.sum().backward()
    shared = {id(p) for p in (model.word_embedding.weight, model.lm_bias)}
    if model.embed_norm is not None:
        shared |= {id(p) for p in model.embed_norm.parameters()}
    # the network proper: not the table, its norm or the head bias
    body_grads = [p.grad for p in model.parameters() if id(p) not in shared]
    body_norm = sum(g.abs().sum().item() for g in body_grads if g is not None)
    if loss == "anchor":
        assert body_norm > 0
    else:
        assert body_norm == 0
    # either way the CE reaches the shared embedding table
    assert model.word_embedding.weight.grad.abs().sum() > 0


def test_loss_none_optimises_mse_and_tT_only_and_still_logs_both_ce():
    model = tiny_denoiser()
    ids, mask = _batch()
    none, anchor = _losses(model, ids, mask, "none"), _losses(model, ids, mask, "anchor")
    assert torch.all(none.ce == 0)
    torch.testing.assert_close(none.total, none.mse + none.t_T)
    # same draws, same model: every logged term agrees with the anchor run's
    for name in ("mse", "t_T", "rounding_ce", "anchor_ce", "token_accuracy"):
        torch.testing.assert_close(getattr(none, name), getattr(anchor, name))
    assert torch.all(anchor.ce > 0)
    none.total.sum().backward()
    model.zero_grad()
    # the CE terms carry no graph: nothing but mse and tT can move the weights
    assert not none.anchor_ce.requires_grad and not none.rounding_ce.requires_grad


def test_draws_rows_of_the_global_batch_are_the_local_batches_draws():
    ids, _ = _batch(B=6)
    t = torch.arange(6)
    whole = _draws(ids, t, seed=3)
    part = whole[slice(2, 5)]
    assert part.t.tolist() == [2, 3, 4] and part.eps0.shape == (3, 8, 16)
    torch.testing.assert_close(part.eps, whole.eps[2:5], rtol=0, atol=0)
    again = _draws(ids, t, seed=3)  # the same generator state, the same draws
    torch.testing.assert_close(again.eps0, whole.eps0, rtol=0, atol=0)
    coins = {Draws.sample(t, (6, 8, 16), torch.Generator().manual_seed(s), True).self_cond
             for s in range(20)}
    assert coins == {True, False}
    assert not any(Draws.sample(t, (6, 8, 16), torch.Generator().manual_seed(s)).self_cond
                   for s in range(20))


def test_loss_spec_reads_the_diffusion_section():
    from raydiff.config import load_config
    d = load_config(None, ["diffusion.loss=rounding", "diffusion.noise_factor=2.0",
                           "diffusion.perturb_z0=false"]).diffusion
    assert LossSpec.of(d) == LossSpec(loss="rounding", noise_factor=2.0, perturb_z0=False)


def test_every_term_sends_gradient_into_embeddings():
    model = tiny_denoiser()
    ids, mask = _batch()
    terms = _losses(model, ids, mask, "anchor")
    for name in ("mse", "t_T", "ce"):
        model.zero_grad()
        getattr(terms, name).sum().backward(retain_graph=True)
        assert model.word_embedding.weight.grad.abs().sum() > 0, name


@pytest.mark.parametrize("loss", ["rounding", "anchor"])
def test_pad_tokens_change_neither_loss_nor_outputs(loss):
    model = tiny_denoiser()
    ids, mask = _batch()
    other = ids.clone()
    other[mask == 0] = torch.randint(2, 50, (int((mask == 0).sum()),))
    a, b = _losses(model, ids, mask, loss), _losses(model, other, mask, loss)
    for name in ("total", "mse", "ce", "t_T", "token_accuracy"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-6)

    z = torch.randn(4, 8, 8)
    z_other = z.clone()
    z_other[mask == 0] = torch.randn(int((mask == 0).sum()), 8) * 5
    t = torch.tensor([1.0, 100.0, 500.0, 900.0])
    out, out_other = model(z, t, mask), model(z_other, t, mask)
    torch.testing.assert_close(out[mask == 1], out_other[mask == 1], rtol=0, atol=1e-5)
    assert not torch.allclose(out[mask == 0], out_other[mask == 0])


def test_without_mask_pad_would_leak():
    """Guards the test above: the mask, not chance, is what isolates PAD."""
    model = tiny_denoiser()
    _, mask = _batch()
    z = torch.randn(4, 8, 8)
    z_other = z.clone()
    z_other[mask == 0] += 5
    t = torch.full((4,), 100.0)
    assert not torch.allclose(model(z, t)[mask == 1], model(z_other, t)[mask == 1])


def test_masked_mean_ignores_pad():
    values = torch.tensor([[1.0, 3.0, 100.0], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(masked_mean(values, mask), torch.tensor([2.0, 2.0]))


class _OracleOfCleanEmbedding(torch.nn.Module):
    """Predicts E[w] exactly, whatever z_t is."""

    def __init__(self, net, ids):
        super().__init__()
        self.net, self.ids = net, ids

    def embed(self, ids):
        return self.net.embed(ids)

    def logits(self, x):
        return self.net.logits(x)

    def token_ce(self, x, ids):
        return self.net.token_ce(x, ids)

    def forward(self, z_t, t, mask=None, self_cond=None):
        return self.net.embed(self.ids)


def test_target_is_clean_embedding_at_t0_and_perturbed_z0_elsewhere():
    ids, mask = _batch()
    oracle = _OracleOfCleanEmbedding(tiny_denoiser(), ids)
    s = NoiseSchedule.named("pw_lin", 100)
    t = torch.tensor([0, 0, 5, 5])
    batch = {"input_ids": ids, "attention_mask": mask}
    terms = diffusion_losses(oracle, s, batch, LossSpec(perturb_z0=True), _draws(ids, t, dim=8))
    assert torch.all(terms.mse[:2] == 0)
    # elsewhere the target carries the sqrt(b_0) perturbation: mse ~ b_0 per entry
    assert torch.all(terms.mse[2:] > 0.3 * s.betas[0].item())
    unperturbed = diffusion_losses(oracle, s, batch, LossSpec(perturb_z0=False),
                                   _draws(ids, t, dim=8))
    assert torch.all(unperturbed.mse == 0)


@pytest.mark.parametrize("loss", ["none", "rounding", "anchor"])
def test_skipping_diagnostics_leaves_the_loss_and_its_gradients_unchanged(loss):
    ids, mask = _batch()
    grads, terms = [], []
    for diagnostics in (True, False):
        model = tiny_denoiser()  # the same seeded weights each time
        t = torch.tensor([0, 10, 50, 99])
        out = diffusion_losses(model, NoiseSchedule.named("pw_lin", 100),
                               {"input_ids": ids, "attention_mask": mask}, LossSpec(loss=loss),
                               _draws(ids, t, dim=8), diagnostics=diagnostics)
        out.total.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
        terms.append(out)
    full, lean = terms
    torch.testing.assert_close(lean.total, full.total, rtol=0, atol=0)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=0, msg=name)
    assert lean.token_accuracy is None and full.token_accuracy is not None
    # only the optimised CE term is computed without diagnostics
    assert (lean.rounding_ce is None) == (loss != "rounding")
    assert (lean.anchor_ce is None) == (loss != "anchor")


def test_the_training_objective_module_is_diffusion_losses():
    """What DDP wraps and `train.compile` compiles gives `diffusion_losses`' terms and
    gradients, with and without diagnostics."""
    from raydiff.diffusion import DiffusionObjective

    ids, mask = _batch()
    t = torch.tensor([0, 10, 50, 99])
    schedule, spec = NoiseSchedule.named("pw_lin", 100), LossSpec(loss="anchor")
    for diagnostics in (True, False):
        results = []
        for through_module in (False, True):
            model = tiny_denoiser()
            draws = _draws(ids, t, dim=8)
            if through_module:
                out = DiffusionObjective(model, schedule, spec)(
                    ids, mask, draws.t, draws.eps0, draws.eps, False, diagnostics)
            else:
                out = diffusion_losses(model, schedule, {"input_ids": ids, "attention_mask": mask},
                                       spec, draws, diagnostics=diagnostics)
            out.total.sum().backward()
            results.append((out, {n: p.grad for n, p in model.named_parameters()}))
        (plain, plain_grads), (module, module_grads) = results
        for name in ("total", "mse", "t_T", "ce", "z0_sq"):
            torch.testing.assert_close(getattr(module, name), getattr(plain, name), rtol=0, atol=0)
        assert (module.token_accuracy is None) == (not diagnostics)
        for name, g in plain_grads.items():
            torch.testing.assert_close(module_grads[name], g, rtol=0, atol=0, msg=name)
