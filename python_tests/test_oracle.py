"""An independent oracle for the estimators: FD-SSM and FD-DSM on non-quadratic models (an
MLP energy and a conv energy, float64) against the exact objectives computed by autograd
(:func:`fdsm_ext.exact_sm_loss`, :func:`fdsm_ext.dsm_loss`), not against a re-implementation
of the fused ops' formulas.

The FD estimators are random (the directions v): each check draws many projections and
allows ``5`` standard errors of the mean, the standard error measured from the same draws,
plus a bound on the O(eps^2) truncation measured with the same directions at 2 eps
(F(2 eps) - F(eps) ~ 3 A eps^2; the bound allows twice A eps^2). Each check also asserts that
its tolerance is small against the value checked, so that it has the power to see a wrong
constant.
"""

import pytest
import torch
from torch import nn

from fdsm_ext import dsm_loss, exact_sm_loss, fd_dsm_loss, fd_ssm_loss

EPS = 0.02  # float64: rounding ~ 1e-16 * |E| * d / eps^2 is negligible here


def sharpen(model: nn.Sequential) -> nn.Sequential:
    """Last linear layer x 20: scores of order 1 (at the default initialisation J_SM is
    ~1e-3, below what 4096 projections resolve)."""
    with torch.no_grad():
        model[-2].weight.mul_(20)
    return model.double()


def mlp_energy(d: int) -> nn.Module:
    torch.manual_seed(0)
    return sharpen(nn.Sequential(nn.Linear(d, 32), nn.Softplus(), nn.Linear(32, 32), nn.Tanh(),
                                 nn.Linear(32, 1), nn.Flatten(0)))


def conv_energy() -> nn.Module:
    """1 x 4 x 4 images (d = 16)."""
    torch.manual_seed(1)
    return sharpen(nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Softplus(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.Tanh(), nn.Flatten(), nn.Linear(16, 1), nn.Flatten(0),
    ))


MODELS = {
    "mlp_d4": (lambda: mlp_energy(4), (4,)),
    "mlp_d16": (lambda: mlp_energy(16), (16,)),
    "conv_d16": (conv_energy, (1, 4, 4)),
}


def data(shape, batch: int) -> torch.Tensor:
    return torch.randn(batch, *shape, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(2))


def check_mean(diff_eps: torch.Tensor, diff_2eps: torch.Tensor, scale: float) -> None:
    """mean(diff_eps) = 0 within 5 standard errors + the truncation bound; the tolerance is
    at most 25 % of ``scale`` (the magnitude of the value checked; measured 11 .. 20 %: the
    slicing variance, the per-row check below is the sharp one)."""
    n = diff_eps.numel()
    mean = diff_eps.mean().item()
    standard_error = diff_eps.std().item() / n**0.5
    truncation = 2 * abs(diff_2eps.mean().item() - mean) / 3
    tolerance = 5 * standard_error + truncation
    assert abs(mean) < tolerance, (mean, standard_error, truncation)
    assert tolerance < 0.25 * scale, (tolerance, scale)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("noise", ["sphere", "gaussian", "rademacher"])
def test_fd_ssm_value_against_exact_sm(name, noise):
    """Per row, FD-SSM(x_i, v) - J_SM(x_i), over 64 samples x 64 projections (each row of the
    repeated batch draws its own direction)."""
    make, shape = MODELS[name]
    model, x = make(), data(shape, 64)
    exact = exact_sm_loss(model, x, output="energy", reduction="none")
    rows, target = x.repeat(64, *[1] * len(shape)), exact.repeat(64)
    diffs = [fd_ssm_loss(model, rows, eps=eps, output="energy", noise=noise, seed=5,
                         reduction="none").detach() - target for eps in (EPS, 2 * EPS)]
    check_mean(*diffs, scale=exact.abs().mean().item())


@pytest.mark.parametrize("name", MODELS)
def test_fd_dsm_random_value_against_dsm(name):
    """Per row, FD-DSM with a random direction minus DSM with the same noise z (the same
    seed draws the same z), over 64 samples x 64 directions; sigma = 0.5."""
    make, shape = MODELS[name]
    model, x = make(), data(shape, 64)
    rows = x.repeat(64, *[1] * len(shape))
    dsm = dsm_loss(model, rows, 0.5, output="energy", seed=6, reduction="none").detach()
    diffs = [fd_dsm_loss(model, rows, 0.5, eps=eps, direction="random", output="energy",
                         seed=6, reduction="none").detach() - dsm for eps in (EPS, 2 * EPS)]
    check_mean(*diffs, scale=dsm.mean().item())


def parameter_gradient(model, loss) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return torch.cat([torch.zeros_like(p).flatten() if g is None else g.flatten()
                      for p, g in zip(model.parameters(), grads, strict=True)])


@pytest.mark.parametrize("name", MODELS)
def test_fd_dsm_residual_value_and_gradient_against_dsm(name):
    """The residual estimator's value is DSM's exactly; its parameter gradient is DSM's up
    to O(eps^2) (deterministic for a seed): the error at eps is about 4 times that at
    eps/2, and below 1e-4 of the gradient at eps = 0.02."""
    make, shape = MODELS[name]
    model, x = make(), data(shape, 64)
    dsm = dsm_loss(model, x, 0.5, output="energy", seed=7, reduction="none")
    exact = parameter_gradient(model, dsm.mean())
    errors = []
    for eps in (EPS, EPS / 2):
        fd = fd_dsm_loss(model, x, 0.5, eps=eps, direction="residual", output="energy",
                         seed=7, reduction="none")
        torch.testing.assert_close(fd, dsm, rtol=1e-12, atol=1e-12)
        errors.append((parameter_gradient(model, fd.mean()) - exact).norm().item())
    assert errors[0] < 1e-4 * exact.norm().item(), errors
    assert 3 < errors[0] / errors[1] < 5, errors


@pytest.mark.parametrize("name", MODELS)
def test_fd_ssm_parameter_gradient_against_exact_sm(name):
    """The FD-SSM parameter gradient, averaged over 32 groups of 32 projections per sample
    (16 samples), against the exact SM gradient (exact_sm_loss, create_graph=True), at
    d = 4 and 16: ||mean - exact|| within 3 times the root of the summed squared standard
    errors (its expected size if unbiased) plus the truncation bound, and that tolerance
    below 15 % of ||exact||."""
    make, shape = MODELS[name]
    model, x = make(), data(shape, 16)
    exact = parameter_gradient(model, exact_sm_loss(model, x, output="energy",
                                                    create_graph=True))
    rows = x.repeat(32, *[1] * len(shape))
    groups = {EPS: [], 2 * EPS: []}
    for eps, grads in groups.items():
        for g in range(32):
            loss = fd_ssm_loss(model, rows, eps=eps, output="energy", seed=100 + g)
            grads.append(parameter_gradient(model, loss))
    at_eps, at_2eps = (torch.stack(groups[e]) for e in (EPS, 2 * EPS))
    mean = at_eps.mean(0)
    spread = (at_eps.var(0) / at_eps.shape[0]).sum().sqrt().item()
    truncation = 2 * (at_2eps.mean(0) - mean).norm().item() / 3
    tolerance = 3 * spread + truncation
    error = (mean - exact).norm().item()
    assert error < tolerance, (error, spread, truncation)
    assert tolerance < 0.15 * exact.norm().item(), (tolerance, exact.norm().item())


# ---------------------------------------------------------------------------------------
# Per row, for the directions the loss drew (read back from the rows the model was called
# on): the finite differences against the same sliced objective by autograd, d/eps^2 times
# 1/2 (v.grad L)^2 + v^T (Hess L) v (FD-SSM), resp. 1/(2) (d/eps^2) (v.a)^2 with the DSM
# residual a (FD-DSM random). Deterministic: only the O(eps^2) truncation separates them.


class Recording(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, None

    def forward(self, y):
        self.rows = y.detach()
        return self.model(y)


def log_density_grad(model, x, v=None):
    """grad L(x) (L = -E), and with v also (Hess L) v, by autograd, flattened to (B, d)."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(-model(x).sum(), x, create_graph=v is not None)
    grad = grad.reshape(x.shape[0], -1)
    if v is None:
        return grad.detach()
    (hv,) = torch.autograd.grad((grad * v).sum(), x)
    return grad.detach(), hv.reshape(x.shape[0], -1)


def relative_errors(per_eps):
    """max |FD - sliced| / mean |sliced| at each eps."""
    return [((fd - sliced).abs().max() / sliced.abs().mean()).item() for fd, sliced in per_eps]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("noise", ["sphere", "gaussian", "rademacher"])
def test_fd_ssm_per_row_against_the_sliced_objective(name, noise):
    """Per row below 1e-3 of the typical value at eps = 0.02, and about 4 times smaller at
    eps = 0.01: O(eps^2)."""
    make, shape = MODELS[name]
    model, x = Recording(make()), data(shape, 32)
    batch, d = x.shape[0], x[0].numel()
    per_eps = []
    for eps in (EPS, EPS / 2):
        fd = fd_ssm_loss(model, x, eps=eps, output="energy", noise=noise, seed=8,
                         reduction="none").detach()
        rows = model.rows.reshape(3 * batch, d)
        assert torch.equal(rows[:batch], x.reshape(batch, d))
        v = (rows[batch:2 * batch] - rows[2 * batch:]) / 2
        grad, hv = log_density_grad(model.model, x, v)
        sliced = d / eps**2 * (0.5 * (v * grad).sum(1) ** 2 + (v * hv).sum(1))
        per_eps.append((fd, sliced))
    errors = relative_errors(per_eps)
    assert errors[0] < 1e-3 and 3 < errors[0] / errors[1] < 5, errors


@pytest.mark.parametrize("name", MODELS)
def test_fd_dsm_random_per_row_against_the_sliced_objective(name):
    """x~ and v read back from the rows x~ +- v; a = grad L(x~) + (x~ - x)/sigma^2 by
    autograd; per row below 1e-3 of the typical value at eps = 0.02, O(eps^2)."""
    make, shape = MODELS[name]
    model, x = Recording(make()), data(shape, 32)
    batch, d, sigma = x.shape[0], x[0].numel(), 0.5
    per_eps = []
    for eps in (EPS, EPS / 2):
        fd = fd_dsm_loss(model, x, sigma, eps=eps, direction="random", output="energy",
                         seed=9, reduction="none").detach()
        rows = model.rows.reshape(2 * batch, d)
        x_tilde, v = (rows[:batch] + rows[batch:]) / 2, (rows[:batch] - rows[batch:]) / 2
        a = (log_density_grad(model.model, x_tilde.reshape(x.shape))
             + (x_tilde - x.reshape(batch, d)) / sigma**2)
        per_eps.append((fd, d / (2 * eps**2) * (v * a).sum(1) ** 2))
    errors = relative_errors(per_eps)
    assert errors[0] < 1e-3 and 3 < errors[0] / errors[1] < 5, errors
