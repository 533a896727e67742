import copy
import math

import pytest
import torch

from raydiff.config import load_config
from raydiff.diffusion import NoiseSchedule, nearest_embedding, respaced_timesteps, sample
from raydiff.model import Denoiser
from tests.conftest import tiny_denoiser


class _ConstantX0(torch.nn.Module):
    """Predicts the same x0 at every step and records the z_t it was given."""

    def __init__(self, x0):
        super().__init__()
        self.x0, self.seen = x0, []
        self.table = torch.randn(10, x0.shape[-1])

    def embedding_table(self):
        return self.table

    def logits(self, x):
        return x @ self.table.t()

    def forward(self, z, t, mask=None, self_cond=None):
        self.seen.append((t[0].item(), z.clone()))
        return self.x0.expand_as(z)


def test_respaced_timesteps_cover_the_range():
    ts = respaced_timesteps(2000, 50)
    assert ts[0] == 1999 and ts[-1] == 0 and len(ts) == 50
    assert all(a > b for a, b in zip(ts, ts[1:], strict=False))
    assert respaced_timesteps(100, 100) == list(range(99, -1, -1))
    with pytest.raises(ValueError):
        respaced_timesteps(100, 101)


@pytest.mark.parametrize("clamp", [False, True])
@pytest.mark.parametrize("noise_factor", [1.0, 2.0])
def test_ddim_with_all_steps_and_eta_one_is_ddpm(clamp, noise_factor):
    model = tiny_denoiser()
    s = NoiseSchedule.named("pw_lin", 60)
    common = dict(clamp=clamp, noise_factor=noise_factor)
    ddpm = sample(model, s, (3, 8, 8), sampler="ddpm",
                  generator=torch.Generator().manual_seed(7), **common)
    ddim = sample(model, s, (3, 8, 8), sampler="ddim", sample_steps=60, eta=1.0,
                  generator=torch.Generator().manual_seed(7), **common)
    torch.testing.assert_close(ddim.x0, ddpm.x0, rtol=1e-4, atol=1e-5)
    assert torch.equal(ddim.tokens, ddpm.tokens)
    if clamp:  # an untrained model's clamped x0hat is one row everywhere: nothing to tell apart
        return
    # and eta = 0 is a different (deterministic) path
    ddim0 = sample(model, s, (3, 8, 8), sampler="ddim", sample_steps=60, eta=0.0,
                   generator=torch.Generator().manual_seed(7), **common)
    assert not torch.allclose(ddim0.x0, ddpm.x0, atol=1e-3)


def test_respaced_jump_lands_on_abar_of_previous_subsequence_step():
    s = NoiseSchedule.named("linear", 100)
    x0 = torch.randn(1, 4, 6)
    model = _ConstantX0(x0)
    gen = torch.Generator().manual_seed(3)
    sample(model, s, (1, 4, 6), sampler="ddim", sample_steps=3, eta=0.0, clamp=False,
           generator=gen)
    (t0, z_T), (t1, z_next), _ = model.seen
    abar = s.alphas_cumprod.double()
    T_, t_prev = 99, 50  # respaced_timesteps(100, 3) == [99, 50, 0]
    assert respaced_timesteps(100, 3) == [T_, t_prev, 0]

    def jump(abar_to):
        direction = (z_T - math.sqrt(abar[T_]) * x0) / math.sqrt(1 - abar[T_])
        return math.sqrt(abar_to) * x0 + math.sqrt(1 - abar_to) * direction

    torch.testing.assert_close(z_next, jump(abar[t_prev].item()), rtol=1e-5, atol=1e-5)
    # the bug docs/design.md §5 warns about would land on abar_{t-1}
    assert not torch.allclose(z_next, jump(abar[T_ - 1].item()), atol=1e-2)


def test_clamping_returns_rows_of_the_table():
    table = torch.randn(20, 5)
    x = table[torch.tensor([[3, 7, 19]])] + 0.01 * torch.randn(1, 3, 5)
    torch.testing.assert_close(nearest_embedding(x, table), table[torch.tensor([[3, 7, 19]])])


def test_self_conditioning_feeds_previous_prediction():
    cfg = load_config(None, ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=4",
                             "model.intermediate_size=32", "model.embed_dim=8"])
    torch.manual_seed(0)
    model = Denoiser(cfg.model, 50, 8, self_condition=True).eval()
    assert model.up_proj[0].in_features == 2 * 8  # [z_t, previous x0hat]
    s = NoiseSchedule.named("pw_lin", 30)
    with_sc = sample(model, s, (2, 8, 8), sample_steps=5, self_condition=True, clamp=False,
                     generator=torch.Generator().manual_seed(0))
    without = sample(model, s, (2, 8, 8), sample_steps=5, self_condition=False, clamp=False,
                     generator=torch.Generator().manual_seed(0))
    assert with_sc.tokens.shape == (2, 8)
    assert not torch.allclose(with_sc.x0, without.x0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_float64_sampling_keeps_its_state_in_float64_and_agrees_with_float32(sampler):
    model = tiny_denoiser().eval()
    s = NoiseSchedule.named("pw_lin", 100)
    runs = {}
    for dtype in (torch.float32, torch.float64):
        runs[dtype] = sample(copy.deepcopy(model).to(dtype), s, (4, 8, 8), sampler=sampler,
                             sample_steps=20, clamp=False,
                             generator=torch.Generator().manual_seed(0))
    assert runs[torch.float32].x0.dtype == torch.float32
    assert runs[torch.float64].x0.dtype == torch.float64
    # the same noise and weights: the two precisions differ by float32 rounding only
    torch.testing.assert_close(runs[torch.float32].x0.double(), runs[torch.float64].x0,
                               rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("below", [1.0, 0.5, 0.1])
def test_clamp_below_clamps_only_the_low_noise_steps(below, monkeypatch):
    """`clamp_below`: x0hat is snapped to the table only at steps with t < below x T (1.0:
    every step); the steps above it leave the model's x0hat as it is."""
    from raydiff.diffusion import sampling

    s = NoiseSchedule.named("linear", 100)
    model = _ConstantX0(torch.randn(1, 4, 6))
    clamped_after = []  # how many model calls had been made at each clamp

    def counting(x, table):
        clamped_after.append(len(model.seen))
        return nearest_embedding(x, table)

    monkeypatch.setattr(sampling, "nearest_embedding", counting)
    sample(model, s, (1, 4, 6), sampler="ddim", sample_steps=20, clamp=True, clamp_below=below,
           generator=torch.Generator().manual_seed(0))
    steps = respaced_timesteps(100, 20)  # the i-th model call is at t = steps[i]
    assert [steps[n - 1] for n in clamped_after] == [t for t in steps if t < below * 100]
    assert len(clamped_after) < len(steps) or below == 1.0
