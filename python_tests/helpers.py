"""Small analytic models and a call-counting wrapper shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

from fdsm_ext import reference
from fdsm_ext._random import NOISE


def philox_normal(seed: int, rows: int, d: int, dtype=torch.float64) -> torch.Tensor:
    """The N(0, 1) noise z (rows, d) that a loss called with ``seed=seed`` draws: the oracle's
    replay of the Philox stream ``seed XOR NOISE``."""
    return reference._philox_directions(seed ^ NOISE, rows, d, "gaussian").to(dtype)


def spd_matrix(d: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=dtype)
    return a @ a.T / d + torch.eye(d, dtype=dtype)


class QuadraticLogDensity(nn.Module):
    """log p(x) = -1/2 x^T A x + b^T x: score -A x + b, Hessian -A (trace -tr A)."""

    def __init__(self, d: int, seed: int = 0):
        super().__init__()
        self.A = nn.Parameter(spd_matrix(d, seed))
        self.b = nn.Parameter(torch.linspace(-1, 1, d, dtype=torch.float64))

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        return -0.5 * ((x @ self.A) * x).sum(1) + x @ self.b

    def score(self, x):
        return -x.reshape(x.shape[0], -1) @ self.A + self.b

    def exact_sm(self, x):
        s = self.score(x)
        return 0.5 * (s * s).sum(1) - torch.diagonal(self.A).sum()


class LinearScore(nn.Module):
    """s(x) = -A x + b (score model of the quadratic log-density)."""

    def __init__(self, d: int, seed: int = 0):
        super().__init__()
        self.inner = QuadraticLogDensity(d, seed)

    def forward(self, x):
        return self.inner.score(x).reshape(x.shape)


class MLP(nn.Module):
    """Smooth MLP, float64: scalar output (log-density / energy) or x-shaped output (score)."""

    def __init__(self, d: int, hidden: int = 16, score: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Linear(d, hidden), nn.Softplus(), nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, d if score else 1),
        ).double()
        self.score_model = score

    def forward(self, x, *unused):
        out = self.net(x.reshape(x.shape[0], -1))
        return out.reshape(x.shape) if self.score_model else out[:, 0]


class Counting(nn.Module):
    """Records the row count of every call of the wrapped model."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.rows: list[int] = []
        self.args: list[tuple] = []

    def forward(self, x, *args):
        self.rows.append(x.shape[0])
        self.args.append(args)
        return self.model(x, *args)
