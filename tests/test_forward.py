import pytest
import torch

from raydiff.diffusion import NoiseSchedule, perturb_embedding, q_sample


@pytest.mark.parametrize("noise_factor", [1.0, 3.5])
@pytest.mark.parametrize("t_value", [0, 500, 1999])
def test_forward_statistics_match_closed_form(noise_factor, t_value):
    s = NoiseSchedule.named("pw_lin", 2000)
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(1, 4, 8, generator=gen, dtype=torch.float64).expand(20000, 4, 8)
    t = torch.full((20000,), t_value)
    noise = torch.randn(z0.shape, generator=gen, dtype=torch.float64)
    z_t = q_sample(s, z0, t, noise, noise_factor)
    abar = s.alphas_cumprod[t_value]
    var = (1 - abar) * noise_factor**2
    mean_err = (z_t.mean(0) - abar.sqrt() * z0[0]).abs().max()
    assert mean_err < 5 * (var / 20000).sqrt()
    torch.testing.assert_close(z_t.var(0), torch.full_like(z0[0], var.item()), rtol=0.06, atol=0)


def test_perturbation_has_std_sqrt_beta0():
    s = NoiseSchedule.named("sqrt", 2000)
    e = torch.zeros(50000, 8, dtype=torch.float64)
    z0 = perturb_embedding(s, e, torch.randn_like(e))
    assert z0.std().item() == pytest.approx(s.betas[0].sqrt().item(), rel=0.02)
