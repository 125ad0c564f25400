"""Autograd baselines against closed forms and torch.func Hessians."""

import pytest
import torch
from helpers import MLP, Counting, LinearScore, QuadraticLogDensity, philox_normal
from torch import nn

from fdsm_ext import dsm_loss, exact_sm_loss, reference, ssm_loss


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
@pytest.mark.parametrize("variance_reduction", [False, True])
@pytest.mark.parametrize("model_kind", ["scalar", "energy", "score"])
def test_ssm_matches_closed_form_with_same_projections(noise, variance_reduction, model_kind):
    d, batch, n_proj = 4, 3, 5
    quad = QuadraticLogDensity(d)
    model, output = {
        "scalar": (quad, "log_density"),
        "energy": (lambda y: -quad(y), "energy"),
        "score": (LinearScore(d), "score"),
    }[model_kind]
    x = torch.randn(batch, d, dtype=torch.float64)
    loss = ssm_loss(model, x, noise=noise, n_projections=n_proj, output=output,
                    variance_reduction=variance_reduction, reduction="none", seed=2)
    u = reference._philox_directions(2, n_proj * batch, d, noise).double()
    s = quad.score(x).repeat(n_proj, 1)
    first = 0.5 * (s * s).sum(1) if variance_reduction else 0.5 * (u * s).sum(1) ** 2
    expected = first - ((u @ quad.A) * u).sum(1)
    torch.testing.assert_close(loss, expected.reshape(n_proj, batch).mean(0))


def test_ssm_projections_are_one_model_call():
    model = Counting(MLP(3))
    ssm_loss(model, torch.randn(4, 3, dtype=torch.float64), n_projections=6,
             output="log_density").backward()
    assert model.rows == [24]


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 5])
@pytest.mark.parametrize("model_kind", ["scalar", "score"])
def test_exact_sm_closed_form_any_chunking(chunk_size, model_kind):
    d = 5
    quad = QuadraticLogDensity(d)
    model = quad if model_kind == "scalar" else LinearScore(d)
    x = torch.randn(4, d, dtype=torch.float64)
    output = "log_density" if model_kind == "scalar" else "auto"
    loss = exact_sm_loss(model, x, chunk_size=chunk_size, reduction="none", output=output)
    torch.testing.assert_close(loss, quad.exact_sm(x))
    assert not loss.requires_grad


@pytest.mark.parametrize("output", ["log_density", "energy"])
def test_exact_sm_matches_torch_func_hessian_trace(output):
    d = 4
    mlp = MLP(d, seed=3)
    sign = 1.0 if output == "log_density" else -1.0
    x = torch.randn(3, d, dtype=torch.float64)
    loss = exact_sm_loss(lambda y: sign * mlp(y), x, output=output, reduction="none",
                         chunk_size=3)

    def logp(xi):
        return mlp(xi[None])[0]

    # Reverse over reverse: torch.func.hessian's forward mode loads torch's jit-scripted
    # decompositions (a torch.jit.script deprecation warning).
    hessian = lambda f: torch.func.jacrev(torch.func.grad(f))  # noqa: E731
    expected = torch.stack([
        0.5 * torch.func.grad(logp)(xi).pow(2).sum() + hessian(logp)(xi).trace()
        for xi in x
    ])
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("output", ["log_density", "energy"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_exact_sm_create_graph_gradient_is_the_closed_form(output, chunk_size):
    """L(x) = -1/2 x^T A x + b^T x with a free (non-symmetric) parameter A: the score is
    s = -S x + b, S = (A + A^T)/2, and J = mean 1/2 ||s||^2 - tr A, so
    dJ/db = mean s and dJ/dA = -mean (s x^T + x s^T)/2 - I."""
    d = 5
    quad = QuadraticLogDensity(d)
    with torch.no_grad():
        quad.A.add_(0.3 * torch.randn(d, d, dtype=torch.float64,
                                      generator=torch.Generator().manual_seed(7)))
    model = quad if output == "log_density" else (lambda y: -quad(y))
    x = torch.randn(6, d, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    loss = exact_sm_loss(model, x, create_graph=True, output=output, chunk_size=chunk_size)
    grad_a, grad_b = torch.autograd.grad(loss, [quad.A, quad.b])
    with torch.no_grad():
        sym = (quad.A + quad.A.T) / 2
        s = -x @ sym + quad.b
        torch.testing.assert_close(loss, (0.5 * (s * s).sum(1)).mean() - torch.trace(quad.A))
        outer = (s[:, :, None] * x[:, None, :]).mean(0)
        torch.testing.assert_close(grad_b, s.mean(0))
        torch.testing.assert_close(grad_a, -(outer + outer.T) / 2 - torch.eye(d).double())


def test_exact_sm_create_graph_gradient_of_an_mlp_matches_torch_func():
    """A non-quadratic model: the parameter gradient against torch.func (reverse over
    reverse over reverse on the closed form 1/2 ||grad L||^2 + tr Hess L, per sample)."""
    d = 3
    mlp = MLP(d, seed=4)
    x = torch.randn(5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    params = dict(mlp.named_parameters())
    loss = exact_sm_loss(mlp, x, create_graph=True, output="log_density")
    # allow_unused: the last bias shifts L by a constant, which no score depends on.
    got = torch.autograd.grad(loss, list(params.values()), allow_unused=True)

    def j_sm(p):
        def logp(xi):
            return torch.func.functional_call(mlp, p, (xi[None],))[0]

        g = torch.func.vmap(torch.func.grad(logp))(x)
        h = torch.func.vmap(torch.func.jacrev(torch.func.grad(logp)))(x)
        return (0.5 * (g * g).sum(1) + torch.diagonal(h, dim1=1, dim2=2).sum(1)).mean()

    expected = torch.func.grad(j_sm)(params)
    for name, g in zip(params, got, strict=True):
        torch.testing.assert_close(torch.zeros_like(expected[name]) if g is None else g,
                                   expected[name])
    assert sum(g is not None and g.abs().sum() > 0 for g in got) >= 3


def test_exact_sm_in_high_dimension_is_chunked():
    """d = 3072 (CIFAR-sized): bounded memory via chunks; closed form -tr(A) + 1/2||s||^2."""
    d = 3072
    model = nn.Linear(d, d, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(-0.5 * torch.eye(d, dtype=torch.float64))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    counting = Counting(lambda y: model(y.reshape(y.shape[0], -1)).reshape(y.shape))
    loss = exact_sm_loss(counting, x, reduction="none", chunk_size=512)
    expected = 0.5 * (0.25 * x.reshape(2, -1).pow(2).sum(1)) - 0.5 * d
    torch.testing.assert_close(loss, expected)
    assert counting.rows == [1024] * 6


@pytest.mark.parametrize("model_kind", ["scalar", "score"])
def test_dsm_closed_form(model_kind):
    d, batch, sigma = 3, 6, 0.25
    quad = QuadraticLogDensity(d)
    model = quad if model_kind == "scalar" else LinearScore(d)
    x = torch.randn(batch, d, dtype=torch.float64)
    output = "log_density" if model_kind == "scalar" else "score"
    loss = dsm_loss(model, x, sigma, reduction="none", output=output, seed=4)
    z = philox_normal(4, batch, d)
    expected = 0.5 * (quad.score(x + sigma * z) + z / sigma).pow(2).sum(1)
    torch.testing.assert_close(loss, expected)


def test_dsm_per_sample_sigma():
    quad = QuadraticLogDensity(2)
    x = torch.randn(3, 2, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    per = dsm_loss(quad, x, sigma, reduction="none", output="log_density", seed=0)
    for i in range(3):
        z = philox_normal(0, 3, 2)[i]
        s = quad.score((x[i] + sigma[i] * z)[None])[0]
        torch.testing.assert_close(per[i], 0.5 * (s + z / sigma[i]).pow(2).sum())
