import numpy as np
import pytest
import torch

from raydiff.diffusion import SCHEDULE_NAMES, NoiseSchedule, get_named_beta_schedule


def abar(name, T):
    return np.cumprod(1 - get_named_beta_schedule(name, T))


# docs/design.md §1 check values (float64)
@pytest.mark.parametrize(("name", "T", "quantity", "expected", "rel"), [
    ("pw_lin", 2000, "b0", 0.01005, 1e-6),
    ("pw_lin", 2000, "bmax", 0.01005, 1e-6),
    ("pw_lin", 2000, "abar_T", 4.17e-5, 5e-3),
    ("pw_lin", 2000, "abar_1000", 0.0774, 5e-3),
    ("linear", 2000, "b0", 5e-5, 1e-9),
    ("linear", 2000, "abar_T", 4.18e-5, 5e-3),
    ("sqrt", 2000, "b0", 0.01464, 5e-4),
    ("trunc_cos", 2000, "b0", 0.02025, 5e-4),
    ("trunc_cos", 2000, "bmax", 0.75, 1e-3),
    ("trunc_lin", 2000, "abar_1000", 3.27e-6, 5e-3),
    ("pw_lin", 100, "b0", 0.011, 1e-9),
])
def test_check_values(name, T, quantity, expected, rel):
    betas = get_named_beta_schedule(name, T)
    a = np.cumprod(1 - betas)
    value = {"b0": betas[0], "bmax": betas.max(), "abar_T": a[-1],
             "abar_1000": a[min(1000, T - 1)]}[quantity]
    assert value == pytest.approx(expected, rel=rel)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("T", [100, 2000])
def test_shape_dtype_and_abar_strictly_decreasing(name, T):
    betas = get_named_beta_schedule(name, T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    assert np.all((betas > 0) & (betas < 1))
    assert np.all(np.diff(abar(name, T)) < 0)


def test_pw_lin_rejects_short_schedules():
    with pytest.raises(ValueError, match="pw_lin needs num_steps > 10"):
        get_named_beta_schedule("pw_lin", 10)
    assert get_named_beta_schedule("pw_lin", 11).shape == (11,)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        get_named_beta_schedule("cosin", 100)
    for name in SCHEDULE_NAMES:
        assert name in str(err.value)


def test_noise_schedule_posterior_is_consistent():
    s = NoiseSchedule.named("cosine", 100)
    assert s.alphas_cumprod.dtype == torch.float64
    assert s.alphas_cumprod_prev[0] == 1.0
    torch.testing.assert_close(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    # the posterior mean coefficients reproduce z0 exactly when z_t is noise-free
    t = torch.arange(1, 100)
    abar, abar_prev = s.alphas_cumprod[t], s.alphas_cumprod_prev[t]
    mean = s.posterior_mean_coef_x0[t] + s.posterior_mean_coef_zt[t] * abar.sqrt()
    torch.testing.assert_close(mean, abar_prev.sqrt())


def test_the_floats_the_loss_reads_and_the_tables_on_a_device_are_the_tables():
    s = NoiseSchedule.named("pw_lin", 200)
    assert s.sqrt_beta_0 == float(s.betas[0].sqrt()) and s.abar_last == float(s.alphas_cumprod[-1])
    moved = s.to("meta")  # a device of its own, without a GPU
    assert moved.alphas_cumprod.device.type == "meta" and moved.name == "pw_lin"
    assert moved.betas.shape == s.betas.shape and s.betas.device.type == "cpu"
    assert (moved.sqrt_beta_0, moved.abar_last) == (s.sqrt_beta_0, s.abar_last)  # read nothing
