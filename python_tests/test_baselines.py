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


def test_exact_sm_create_graph_gives_parameter_gradients():
    mlp = MLP(3)
    loss = exact_sm_loss(mlp, torch.randn(5, 3, dtype=torch.float64), create_graph=True,
                         output="log_density")
    loss.backward()
    assert mlp.net[0].weight.grad is not None and mlp.net[0].weight.grad.abs().sum() > 0


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
