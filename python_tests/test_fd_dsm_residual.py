"""FD-DSM along the DSM residual: DSM's value exactly and DSM's parameter gradient to O(eps^2),
checked against ``dsm_loss`` (double backward) on closed forms and an MLP in float64."""

import warnings

import pytest
import torch
from helpers import MLP, Counting, QuadraticLogDensity, philox_normal
from torch import nn

import fdsm_ext
from fdsm_ext import FDPrecisionWarning, dsm_loss, fd_dsm_loss, noise_conditional_loss


def grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)


def relative_error(got, want):
    num = sum(((g - w) ** 2).sum() for g, w in zip(got, want, strict=True))
    return float(num.sqrt() / sum((w**2).sum() for w in want).sqrt())


@pytest.mark.parametrize("output", ["log_density", "energy"])
@pytest.mark.parametrize("per_sample_sigma", [False, True])
def test_quadratic_gradient_and_value_are_dsm_exactly(output, per_sample_sigma):
    """For a quadratic log-density the central difference along a^ is exact, so the loss is
    DSM's in value and in gradient, for any eps."""
    d, batch = 4, 6
    quad = QuadraticLogDensity(d)
    model = quad if output == "log_density" else (lambda y: -quad(y))
    x = torch.randn(batch, d, dtype=torch.float64)
    sigma = torch.linspace(0.1, 0.6, batch, dtype=torch.float64) if per_sample_sigma else 0.3
    params = list(quad.parameters())
    want = dsm_loss(model, x, sigma, output=output, reduction="none", seed=4)
    got = fd_dsm_loss(model, x, sigma, eps=0.7, output=output, reduction="none", seed=4)
    # The value is 1/2 ||a||^2 with a = s(x~) + z/sigma, the closed form.
    z = philox_normal(4, batch, d)
    sig = torch.as_tensor(sigma, dtype=x.dtype).expand(batch)[:, None]
    closed = 0.5 * (quad.score(x + sig * z) + z / sig).pow(2).sum(1)
    torch.testing.assert_close(got, closed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(want, closed, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads(got.mean(), params), grads(want.mean(), params), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_mlp_gradient_error_shrinks_like_eps_squared():
    """On a softplus/tanh MLP in float64 the relative gradient error against DSM's double
    backward falls 100x per 10x smaller eps (O(eps^2)); the value is DSM's at every eps."""
    model, x = MLP(10, hidden=32), torch.randn(128, 10, dtype=torch.float64)
    params = list(model.parameters())
    want_value = dsm_loss(model, x, 0.1, output="log_density", seed=3)
    want = grads(want_value, params)
    errors = []
    for eps in (0.1, 0.01, 0.001):
        value = fd_dsm_loss(model, x, 0.1, eps=eps, output="log_density", seed=3)
        torch.testing.assert_close(value, want_value, rtol=1e-12, atol=0)
        errors.append(relative_error(grads(value, params), want))
    assert errors[1] < 1e-4, errors
    assert 70 < errors[0] / errors[1] < 130 and 70 < errors[1] / errors[2] < 130, errors
    # The paper's one random direction is off by the order of the gradient itself.
    random = fd_dsm_loss(model, x, 0.1, eps=0.01, direction="random", output="log_density",
                         seed=3)
    assert relative_error(grads(random, params), want) > 0.3


def test_energy_sign_and_log_density_give_the_same_loss():
    model, x = MLP(5), torch.randn(8, 5, dtype=torch.float64)
    params = list(model.parameters())
    a = fd_dsm_loss(model, x, 0.2, output="log_density", seed=1)
    b = fd_dsm_loss(lambda y: -model(y), x, 0.2, output="energy", seed=1)
    torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    for g, h in zip(grads(a, params), grads(b, params), strict=True):
        torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-14)


def test_model_is_called_on_b_then_2b_rows():
    """An input-gradient pass on B rows, then one model call on the 2B stacked rows."""
    model = Counting(MLP(3))
    fd_dsm_loss(model, torch.randn(5, 3, dtype=torch.float64), 0.1,
                output="log_density").backward()
    assert model.rows == [5, 10]


class Conditional(nn.Module):
    """log p(x | c): an MLP on (x, embedding(label)) scaled by a shared temperature."""

    def __init__(self, d: int):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(3, 4).double()
        self.net = nn.Sequential(nn.Linear(d + 4, 16), nn.Softplus(), nn.Linear(16, 1)).double()

    def forward(self, x, labels, temperature):
        return self.net(torch.cat([x, self.embed(labels)], 1))[:, 0] / temperature


def test_conditioning_arguments_per_sample_and_shared():
    model, x = Conditional(4), torch.randn(6, 4, dtype=torch.float64)
    labels, temperature = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([1.5], dtype=x.dtype)
    params = list(model.parameters())
    kw = dict(output="log_density", shared=[1], seed=2)
    got = fd_dsm_loss(model, x, 0.3, labels, temperature, eps=1e-3, **kw)
    want = dsm_loss(model, x, 0.3, labels, temperature, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(grads(got, params), grads(want, params), rtol=1e-4, atol=1e-9)
    # Keyword form, same values.
    again = fd_dsm_loss(model, x, 0.3, labels, eps=1e-3, model_kwargs={"temperature": 1.5},
                        output="log_density", seed=2)
    torch.testing.assert_close(again, want, rtol=1e-12, atol=0)


def test_seeds_and_generators():
    model, x = MLP(4), torch.randn(6, 4, dtype=torch.float64)
    kw = dict(output="log_density")
    a = fd_dsm_loss(model, x, 0.2, seed=7, **kw)
    assert torch.equal(a, fd_dsm_loss(model, x, 0.2, seed=torch.tensor(7), **kw))
    assert not torch.equal(a, fd_dsm_loss(model, x, 0.2, seed=8, **kw))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(fd_dsm_loss(model, x, 0.2, generator=g1, **kw),
                       fd_dsm_loss(model, x, 0.2, generator=g2, **kw))
    torch.manual_seed(3)
    b = fd_dsm_loss(model, x, 0.2, **kw)
    torch.manual_seed(3)
    assert torch.equal(b, dsm_loss(model, x, 0.2, **kw).detach())


def test_noise_conditional_and_module_forms():
    """noise_conditional_loss(method="fd_dsm") and nn.FDDSMLoss reach the residual estimator:
    on a quadratic, the same value and gradient as the DSM method."""
    quad = QuadraticLogDensity(3)
    x, sigmas = torch.randn(8, 3, dtype=torch.float64), [1.0, 0.3, 0.1]
    params = list(quad.parameters())
    kw = dict(output="log_density", seed=6)
    got = noise_conditional_loss(lambda y, c: quad(y), x, sigmas, method="fd_dsm", **kw)
    want = noise_conditional_loss(lambda y, c: quad(y), x, sigmas, method="dsm", **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(grads(got, params), grads(want, params), rtol=1e-9, atol=1e-11)
    module = fdsm_ext.nn.FDDSMLoss(direction="residual", eps=0.05, output="log_density")
    torch.testing.assert_close(module(quad, x, 0.2, seed=1),
                               dsm_loss(quad, x, 0.2, output="log_density", seed=1))
    random = fdsm_ext.nn.FDDSMLoss(direction="random", n_projections=2, output="log_density")
    torch.testing.assert_close(random(quad, x, 0.2, seed=1),
                               fd_dsm_loss(quad, x, 0.2, direction="random", n_projections=2,
                                           output="log_density", seed=1))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"direction": "sideways"}, ValueError,
         "fd_dsm_loss: direction must be one of 'residual', 'random'; got 'sideways'"),
        ({"n_projections": 3}, ValueError,
         "fd_dsm_loss: n_projections=3 applies to direction='random' only"),
        ({"output": "score"}, ValueError, "output='score' needs no finite differences"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fd_dsm_loss(MLP(3), torch.randn(4, 3, dtype=torch.float64), 0.1,
                    **{"output": "log_density", **kwargs})


def test_score_models_are_refused():
    with pytest.raises(ValueError, match="fd_dsm_loss: the model returned scores .* use dsm_loss"):
        fd_dsm_loss(MLP(3, score=True), torch.randn(4, 3, dtype=torch.float64), 0.1,
                    output="auto")


def test_compiled_model_and_fullgraph_loss_match_eager():
    """A compiled model works as is; the whole loss compiles with fullgraph=True (the input
    gradient then goes through torch.func.vjp). Same value and gradient as eager."""
    torch._dynamo.reset()
    model, x = MLP(4), torch.randn(6, 4, dtype=torch.float64)
    params = list(model.parameters())
    kw = dict(output="log_density", seed=torch.tensor(3))
    eager = fd_dsm_loss(model, x, 0.2, **kw)
    want = grads(eager, params)
    compiled_model = torch.compile(model, backend="aot_eager")
    got = fd_dsm_loss(compiled_model, x, 0.2, **kw)
    torch.testing.assert_close(got, eager, rtol=1e-12, atol=0)
    torch.testing.assert_close(grads(got, params), want, rtol=1e-10, atol=1e-12)
    whole = torch.compile(lambda y, s: fd_dsm_loss(model, y, 0.2, output="log_density", seed=s),
                          backend="aot_eager", fullgraph=True)
    got = whole(x, torch.tensor(3))
    torch.testing.assert_close(got, eager, rtol=1e-12, atol=0)
    torch.testing.assert_close(grads(got, params), want, rtol=1e-10, atol=1e-12)


def test_precision_guard_tracks_the_measured_gradient_error():
    """float32 against float64 with the same draws: at eps 0.1 the gradient is accurate and
    the guard is quiet; at eps 1e-6 rounding swamps the difference and the guard warns."""
    model64, x64 = MLP(8, hidden=32), torch.randn(64, 8, dtype=torch.float64)
    model32, x32 = MLP(8, hidden=32).float(), x64.float()
    want = grads(dsm_loss(model64, x64, 0.1, output="log_density", seed=1),
                 list(model64.parameters()))

    def error(eps):
        loss = fd_dsm_loss(model32, x32, 0.1, eps=eps, output="log_density", seed=1)
        got = grads(loss, list(model32.parameters()))
        return relative_error([g.double() for g in got], want)

    with warnings.catch_warnings():
        warnings.simplefilter("error", FDPrecisionWarning)
        accurate = error(0.1)
    assert accurate < 1e-2
    with pytest.warns(FDPrecisionWarning, match="fd_dsm_loss: rounding noise"):
        noisy = error(1e-6)
    assert noisy > 0.3
