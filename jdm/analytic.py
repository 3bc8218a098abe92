"""A problem with a known answer: a 2-D Gaussian mixture with an exact teacher score, and a condition
the teacher does not know. The proof that the JDM maths is implemented (tests/e2e/test_jdm_analytic_e2e.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .objectives import VPSchedule


class GaussianMixture:
    """Isotropic components N(mu_k, s^2 I), equal weights. Under x_t = alpha x + sigma eps each stays
    Gaussian, N(alpha mu_k, (alpha^2 s^2 + sigma^2) I), so the noisy score is exact."""

    def __init__(self, means: torch.Tensor, std: float):
        self.means, self.std = means.double(), std

    @classmethod
    def ring(cls, modes: int = 8, radius: float = 1.0, std: float = 0.1) -> "GaussianMixture":
        angle = 2 * math.pi * (torch.arange(modes) + 0.5) / modes  # no mode on the x_1 = 0 line
        return cls(radius * torch.stack([angle.cos(), angle.sin()], 1), std)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.randint(len(self.means), (n,), generator=generator)
        return (self.means[k] + self.std * torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)).float()

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, schedule: VPSchedule) -> torch.Tensor:
        """The exact teacher: eps = -sigma_t * grad log p_t(x_t)."""
        x = x_t.double()
        alpha, sigma = schedule.coeffs(t, x)
        var = alpha**2 * self.std**2 + sigma**2                          # [N,1]
        diff = x[:, None, :] - alpha[:, None, :] * self.means[None]      # [N,K,D]
        logits = -(diff**2).sum(-1) / (2 * var)                          # [N,K]
        resp = torch.softmax(logits, dim=1)
        score = -(resp[..., None] * diff).sum(1) / var
        return (-sigma * score).to(x_t.dtype)

    def component(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x.double(), self.means).argmin(1)


def sign_log_likelihood(x0: torch.Tensor, c: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """log p(c | x) for c = 1[x_1 > 0], softened: p(c=1 | x) = sigmoid(x_1 / temperature)."""
    return F.logsigmoid((2 * c.float() - 1) * x0[:, 0] / temperature)


def conditional_samples(mixture: GaussianMixture, c: int, n: int, generator: torch.Generator,
                        temperature: float = 0.05) -> torch.Tensor:
    """Exact samples of p(x | c) ∝ p(x) p(c | x), by rejection (p(c | x) <= 1)."""
    out = []
    while sum(len(o) for o in out) < n:
        x = mixture.sample(4 * n, generator)
        keep = torch.rand(len(x), generator=generator) < sign_log_likelihood(x, torch.full((len(x),), c), temperature).exp()
        out.append(x[keep])
    return torch.cat(out)[:n]


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size sample sets."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a.double() @ dirs).sort(0).values, (b.double() @ dirs).sort(0).values
    return ((pa - pb) ** 2).mean().sqrt().item()


def _time_features(t: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    s = t.float()[:, None] / num_timesteps
    freqs = torch.arange(1, 9, dtype=torch.float32)[None] * math.pi
    return torch.cat([s, (s * freqs).sin(), (s * freqs).cos()], 1)


def mlp(din: int, dout: int, width: int = 128, depth: int = 3) -> nn.Sequential:
    layers, d = [], din
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.SiLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, dout))


class ToyScore(nn.Module):
    """eps(x_t, t) for 2-D points: the fake score (and, with a LoRA, the consistency model)."""

    def __init__(self, dim: int = 2, num_timesteps: int = 1000, width: int = 128):
        super().__init__()
        self.num_timesteps = num_timesteps
        self.net = mlp(dim + 17, dim, width)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x_t, _time_features(t, self.num_timesteps)], 1))


class ToyGenerator(nn.Module):
    """One-step generator x = G(z, c); c in {0, 1} enters as the 'control' (the ControlNet's role)."""

    def __init__(self, dim: int = 2, width: int = 128):
        super().__init__()
        self.net = mlp(dim + 2, dim, width)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, F.one_hot(c.long(), 2).float()], 1))
