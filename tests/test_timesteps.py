import torch

from raydiff.diffusion import LossSecondMomentSampler, UniformSampler, make_timestep_sampler


def test_uniform_sampler_covers_range_with_unit_weights():
    t, w = UniformSampler(50).sample(10000, generator=torch.Generator().manual_seed(0))
    assert t.min() == 0 and t.max() == 49 and torch.all(w == 1)


def test_loss_second_moment_sampler_prefers_high_loss_and_stays_unbiased():
    T = 20
    sampler = make_timestep_sampler("loss_second_moment", T)
    assert isinstance(sampler, LossSecondMomentSampler)
    loss_of_t = torch.linspace(0.1, 2.0, T)  # loss grows with t
    gen = torch.Generator().manual_seed(0)
    # uniform until every t has a full history
    assert torch.allclose(sampler.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))
    for _ in range(40):
        t, _ = sampler.sample(64, generator=gen)
        sampler.update(t, loss_of_t[t])
    p = sampler.probabilities()
    assert p[-1] > 5 * p[0]
    # importance weights keep E[w * loss] equal to the uniform mean of the loss
    t, w = sampler.sample(200000, generator=gen)
    estimate = (w * loss_of_t[t]).mean()
    assert abs(estimate - loss_of_t.mean()) < 0.01

    state = sampler.state_dict()
    other = LossSecondMomentSampler(T)
    other.load_state_dict(state)
    assert torch.equal(other.probabilities(), p)
