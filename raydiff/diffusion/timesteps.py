"""Which timesteps a training batch sees: uniform, or importance sampling by loss second moment.

Both return (t, weights) with E[weights * loss(t)] equal to the uniform average, so the choice
changes the variance of the gradient estimate, not its expectation.
"""

from __future__ import annotations

import torch


class UniformSampler:
    learns = False  # whether `update` uses the losses (a distributed step then gathers them)

    def __init__(self, num_steps: int):
        self.num_steps = num_steps

    def sample(self, batch_size: int, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(0, self.num_steps, (batch_size,), generator=generator)
        return t.to(device), torch.ones(batch_size, device=device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling learns nothing from losses."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossSecondMomentSampler(UniformSampler):
    """p(t) proportional to sqrt(E[loss_t^2]) over the last `history` losses at each t
    (improved-diffusion's LossSecondMomentResampler); uniform until every t has a full history.
    """

    learns = True

    def __init__(self, num_steps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_steps)
        self.history, self.uniform_prob = history, uniform_prob
        self.losses = torch.zeros(num_steps, history, dtype=torch.float64)  # ring buffers
        self.counts = torch.zeros(num_steps, dtype=torch.long)

    def probabilities(self) -> torch.Tensor:
        """(T,) sampling distribution over timesteps."""
        if (self.counts < self.history).any():
            return torch.full((self.num_steps,), 1.0 / self.num_steps, dtype=torch.float64)
        weights = self.losses.pow(2).mean(dim=1).sqrt()
        weights = weights / weights.sum()
        return weights * (1 - self.uniform_prob) + self.uniform_prob / self.num_steps

    def sample(self, batch_size, device="cpu", generator=None):
        p = self.probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_steps * p[t])
        return t.to(device), weights.float().to(device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Push each (t, loss) pair into t's ring buffer, in batch order."""
        for step, loss in zip(t.tolist(), losses.detach().double().cpu().tolist(), strict=True):
            self.losses[step, self.counts[step] % self.history] = loss
            self.counts[step] += 1

    def state_dict(self) -> dict:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.losses.copy_(state["losses"])
        self.counts.copy_(state["counts"])


def make_timestep_sampler(kind: str, num_steps: int) -> UniformSampler:
    if kind == "uniform":
        return UniformSampler(num_steps)
    if kind == "loss_second_moment":
        return LossSecondMomentSampler(num_steps)
    raise ValueError(f"unknown timestep sampling {kind!r}; valid: uniform, loss_second_moment")
