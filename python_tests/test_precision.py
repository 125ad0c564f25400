"""The precision guard (FDPrecisionWarning) and suggest_eps against measured errors and a
closed form."""

import contextlib
import warnings

import pytest
import torch
from helpers import MLP
from torch import nn

from fdsm_ext import (
    FDPrecisionWarning,
    exact_sm_loss,
    fd_directional_derivative,
    fd_dsm_loss,
    fd_ssm_loss,
    suggest_eps,
    unit_roundoff,
)

D = 8


class Energy(nn.Module):
    """E(x) = ||x||^2 / 2 + MLP(x), float32, the MLP's output around ``bias`` (the constant a
    trained EBM drifts to; score matching does not see it). Exact J_SM about -4."""

    def __init__(self, bias: float):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(D, 64), nn.Softplus(), nn.Linear(64, 64),
                                 nn.Softplus(), nn.Linear(64, 1), nn.Flatten(0))
        with torch.no_grad():
            self.net[4].bias.fill_(bias)

    def forward(self, x):
        return 0.5 * (x * x).sum(1) + self.net(x)


def energy_mlp(bias: float = 15.0) -> nn.Module:
    return Energy(bias)


def batch(n: int = 512) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(1))


def fd(model, x, eps, autocast=False, seed=0, **kw):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return fd_ssm_loss(model, x, eps=eps, output="energy",
                           generator=torch.Generator().manual_seed(seed), **kw).item()


@contextlib.contextmanager
def no_precision_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FDPrecisionWarning)
        yield


def test_unit_roundoff_of_each_dtype_and_autocast():
    assert unit_roundoff(torch.float32) == 2.0**-24
    assert unit_roundoff(torch.bfloat16) == 2.0**-8
    assert unit_roundoff(torch.float16) == 2.0**-11
    assert unit_roundoff(torch.float64) == 2.0**-53
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert unit_roundoff(torch.float32, "cpu") == 2.0**-8
    assert unit_roundoff(torch.float32, "cpu") == 2.0**-24


def test_bfloat16_autocast_warns_and_is_wrong():
    model, x = energy_mlp(), batch()
    exact = exact_sm_loss(model, x, output="energy").item()
    fp32 = [fd(model, x, 0.05, seed=s) for s in range(4)]
    with pytest.warns(FDPrecisionWarning, match=r"fd_ssm_loss: rounding noise .*\(autocast\)"):
        bf16 = [fd(model, x, 0.05, autocast=True, seed=s) for s in range(4)]
    # The warning is deserved: the autocast value is far off, float32's is not.
    assert abs(sum(fp32) / 4 - exact) < 0.5
    assert abs(sum(bf16) / 4 - exact) > 1.0, (bf16, exact)


def test_tiny_eps_warns_and_is_wrong():
    model, x = energy_mlp(), batch()
    exact = exact_sm_loss(model, x, output="energy").item()
    with pytest.warns(FDPrecisionWarning, match=r"u=6e-08 \(torch.float32\).*eps=1e-05"):
        value = fd(model, x, 1e-5)
    assert abs(value - exact) > 10 * abs(exact)


def test_healthy_float32_does_not_warn():
    model, x = energy_mlp(), batch()
    exact = exact_sm_loss(model, x, output="energy").item()
    with no_precision_warning():
        values = [fd(model, x, 0.1, seed=s) for s in range(4)]
    assert abs(sum(values) / 4 - exact) < 0.5


def test_warning_can_be_an_error_and_comes_once_per_call_site():
    model, x = energy_mlp(), batch(64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FDPrecisionWarning)
        with pytest.raises(FDPrecisionWarning):
            fd_ssm_loss(model, x, eps=1e-5, output="energy")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FDPrecisionWarning)
        for _ in range(3):
            fd_ssm_loss(model, x, eps=1e-5, output="energy")  # one call site
        fd_ssm_loss(model, x, eps=1e-5, output="energy")  # another
    assert len(caught) == 2
    assert {w.lineno for w in caught} and all(w.filename == __file__ for w in caught)


def test_score_models_and_fd_dsm_are_guarded():
    score = MLP(D, score=True).float()
    x = batch(64)
    with pytest.warns(FDPrecisionWarning, match=r"fd_ssm_loss: .*\|\|s\|\|\*sqrt\(d\)/eps"):
        fd_ssm_loss(score, x, eps=1e-7, output="score")
    with no_precision_warning():
        fd_ssm_loss(score, x, eps=0.1, output="score")
    model = energy_mlp()
    with pytest.warns(FDPrecisionWarning, match="fd_dsm_loss: rounding noise"):
        fd_dsm_loss(model, x, 0.1, eps=1e-7, output="energy")
    with no_precision_warning():
        fd_dsm_loss(model, x, 0.1, eps=0.1, output="energy")


def test_directional_derivative_rounding_is_guarded():
    """f = sum_j sin(2 x_j) + 15 in float32, order 3: d^3/dt^3 f(x + t v) = -8 sum cos(2x) v^3.
    ||v|| = 0.005 is rounding noise (and warns), ||v|| = 0.1 is accurate (and quiet)."""
    x = batch(64)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    direction = direction / direction.norm(dim=1, keepdim=True)

    def f(y):
        return torch.sin(2 * y).sum(1) + 15.0

    def rel_error(approx, v):
        exact = (-8 * torch.cos(2 * x.double()) * v.double() ** 3).sum(1)
        return ((approx.double() - exact).norm() / exact.norm()).item()

    small, large = 0.005 * direction, 0.1 * direction
    with pytest.warns(FDPrecisionWarning, match="fd_directional_derivative: .*order 3"):
        approx = fd_directional_derivative(f, x, small, order=3)
    assert rel_error(approx, small) > 0.5
    with no_precision_warning():
        approx = fd_directional_derivative(f, x, large, order=3)
    assert rel_error(approx, large) < 0.05


def cosine_log_density(a: float, w: float):
    """L(x) = sum_j a cos(w x_j); f^(k) of f = a cos(w t) in closed form."""
    def model(y):
        return (a * torch.cos(w * y)).sum(1)

    def truncation(x):
        """A with E_v[FD-SSM] - J_SM = A eps^2 + O(eps^4) (sphere directions):
        A = mean_i sum_j (f' f''' / 2 + f'''' / 4) / (d + 2)."""
        f1, f3, f4 = -a * w * torch.sin(w * x), a * w**3 * torch.sin(w * x), a * w**4 * torch.cos(
            w * x)
        return ((f1 * f3 / 2 + f4 / 4).sum(1) / (x.shape[1] + 2)).mean().item()

    return model, truncation


def test_suggest_eps_closed_form():
    """Truncation coefficient A against its closed form, rounding B = u mean|L| d exactly,
    eps = (B/|A|)^(1/4)."""
    model, truncation = cosine_log_density(a=3.0, w=1.5)
    x = torch.randn(8192, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = suggest_eps(model, x, output="log_density", dtype=torch.bfloat16)
    assert s.unit_roundoff == 2.0**-8
    assert s.rounding == pytest.approx(2.0**-8 * model(x).abs().mean().item() * 4, rel=1e-9)
    assert s.truncation == pytest.approx(truncation(x), rel=0.1)
    assert s.eps == pytest.approx((s.rounding / abs(s.truncation)) ** 0.25, rel=1e-9)


def test_suggest_eps_for_a_quadratic_is_the_largest():
    """Central differences of a quadratic have no truncation error: eps_max."""
    def quadratic(y):
        return -0.5 * (y * y).sum(1) + 20.0

    x = torch.randn(512, D, generator=torch.Generator().manual_seed(0))
    s = suggest_eps(quadratic, x, output="log_density", dtype=torch.bfloat16, eps_max=0.7)
    assert s.eps == 0.7


def test_suggested_eps_under_autocast_is_accurate_and_quiet():
    model, x = energy_mlp(), batch(1024)
    exact = exact_sm_loss(model, x, output="energy").item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = suggest_eps(model, x, output="energy")
    assert s.unit_roundoff == 2.0**-8
    assert s.rounding > 0 and s.eps > 0.05
    with no_precision_warning():
        at_suggested = sum(fd(model, x, s.eps, autocast=True, seed=k) for k in range(4)) / 4
    with pytest.warns(FDPrecisionWarning):
        at_small = sum(fd(model, x, 0.05, autocast=True, seed=k) for k in range(4)) / 4
    assert abs(at_suggested - exact) < 0.1 * abs(at_small - exact), (at_suggested, exact)
