"""derivatives="forward": the eps -> 0 limit of the FD estimators by forward-mode AD, on the
same directions v. Checked in float64 against closed forms (quadratic models, where the
derivatives are exact), against double backward on the same v (MLPs), against dsm_loss, and
against the FD estimators themselves (which differ by O(eps^2))."""

import pytest
import torch
from helpers import MLP, QuadraticLogDensity, philox_normal
from torch import nn

from fdsm_ext import dsm_loss, fd_dsm_loss, fd_ssm_loss, noise_conditional_loss, reference

SEED = 5
CASES = [  # (output, variance_reduction): VR applies to score models only
    ("log_density", True), ("energy", True), ("score", True), ("score", False)]


def directions(x, n_projections, noise, eps, seed=SEED):
    """The v (P B, d) a loss draws for ``seed``, by the oracle's replay of the Philox stream."""
    x2 = x.reshape(x.shape[0], -1)
    return reference.random_stencil_batch(x2, seed, (0.0,), n_projections, noise, eps)[1]


def grads(value, tensors):
    return torch.autograd.grad(value, tensors, allow_unused=True, materialize_grads=True)


def assert_grads_close(got, want, rtol=1e-10, atol=1e-13):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


def ssm_from_derivatives(first, second, norm_sq, v, d, eps, n_projections, output, vr):
    """The forward-mode formula from the directional derivatives v.s (first), v^T J v (second)
    and ||s||^2 per row, averaged over projections."""
    scale = d / eps**2
    if output == "score" and vr:
        rows = 0.5 * norm_sq + scale * second
    else:
        rows = scale * (0.5 * first**2 + second)
    return rows.reshape(n_projections, -1).mean(0)


def energy_or_model(model, output):
    """A model returning what ``output`` declares: energies are minus the log-density."""
    return (lambda y, *a: -model(y, *a)) if output == "energy" else model


@pytest.mark.parametrize("n_projections", [1, 3])
@pytest.mark.parametrize("noise", ["sphere", "gaussian", "rademacher"])
@pytest.mark.parametrize("output, vr", CASES)
def test_quadratic_equals_the_closed_form(output, vr, noise, n_projections):
    """log p = -1/2 x^T A x + b^T x (A symmetric): s = b - A x and Hessian/Jacobian -A, so
    v.s, v^T J v = -v^T A v and the loss are closed forms in v; values and parameter
    gradients (through A and b) agree to rounding."""
    d, batch, eps = 5, 4, 0.3
    quad = QuadraticLogDensity(d)
    A, b = quad.A, quad.b
    model = (lambda y: quad.score(y)) if output == "score" else energy_or_model(quad, output)
    x = torch.randn(batch, d, dtype=torch.float64)
    got = fd_ssm_loss(model, x, output=output, noise=noise, n_projections=n_projections,
                      variance_reduction=vr, eps=eps, seed=SEED, reduction="none",
                      derivatives="forward")
    v = directions(x, n_projections, noise, eps)
    # A's value is symmetric; as a parameter, the log-density sees (A + A^T)/2, the score x A.
    s = b - x @ (A if output == "score" else (A + A.T) / 2)
    s = s.repeat(n_projections, 1)
    want = ssm_from_derivatives((v * s).sum(1), -((v @ A) * v).sum(1), (s * s).sum(1), v, d,
                                eps, n_projections, output, vr)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert_grads_close(grads(got.sum(), [A, b]), grads(want.sum(), [A, b]))


@pytest.mark.parametrize("n_projections", [1, 3])
@pytest.mark.parametrize("noise", ["sphere", "gaussian", "rademacher"])
@pytest.mark.parametrize("output, vr", CASES)
def test_mlp_equals_double_backward_on_the_same_directions(output, vr, noise, n_projections):
    """On a softplus/tanh MLP the value and the gradients (parameters and x) equal those of
    the same formula with v.s and v^T J v by reverse-mode autograd (a double backward)."""
    d, batch, eps = 4, 5, 0.2
    net = MLP(d, score=output == "score")
    model = energy_or_model(net, output)
    params = list(net.parameters())
    x = torch.randn(batch, 2, 2, dtype=torch.float64, requires_grad=True)  # event shape (2, 2)
    got = fd_ssm_loss(model, x, output=output, noise=noise, n_projections=n_projections,
                      variance_reduction=vr, eps=eps, seed=SEED, reduction="none",
                      derivatives="forward")
    v = directions(x, n_projections, noise, eps)
    x_rep = x.reshape(batch, d).repeat(n_projections, 1)
    if output == "score":
        s = net(x_rep)
    else:
        # For energies the model returns E = -net, so L = net either way.
        (s,) = torch.autograd.grad(net(x_rep).sum(), x_rep, create_graph=True)
    (jt_v,) = torch.autograd.grad((s * v).sum(), x_rep, create_graph=True)  # J^T v
    want = ssm_from_derivatives((v * s).sum(1), (jt_v * v).sum(1), (s * s).sum(1), v, d, eps,
                                n_projections, output, vr)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert_grads_close(grads(got.mean(), [*params, x]), grads(want.mean(), [*params, x]))


def relative_error(got, want):
    return float(((got - want).norm() / want.norm()).detach())


@pytest.mark.parametrize("output", ["energy", "score"])
def test_fd_ssm_approaches_forward_like_eps_squared(output):
    """Same seed, same v: FD's per-sample difference from the exact limit falls 4x when eps
    halves (O(eps^2)); float64 keeps rounding far below it."""
    net = MLP(6, score=output == "score")
    x = torch.randn(16, 6, dtype=torch.float64)
    kw = dict(output=output, n_projections=2, seed=SEED, reduction="none")
    errors = []
    for eps in (0.2, 0.1, 0.05):
        exact = fd_ssm_loss(net, x, eps=eps, derivatives="forward", **kw)
        errors.append(relative_error(fd_ssm_loss(net, x, eps=eps, **kw), exact))
    assert errors[0] < 1e-2, errors
    assert all(3.6 < a / b < 4.4 for a, b in zip(errors, errors[1:])), errors


def test_fd_dsm_approaches_forward_like_eps_squared():
    """direction="random": per-sample values; direction="residual": parameter gradients."""
    net = MLP(6)
    params = list(net.parameters())
    x = torch.randn(16, 6, dtype=torch.float64)
    kw = dict(output="log_density", seed=SEED)
    value_errors, grad_errors = [], []
    for eps in (0.2, 0.1, 0.05):
        random = dict(kw, eps=eps, direction="random", n_projections=2, reduction="none")
        value_errors.append(relative_error(fd_dsm_loss(net, x, 0.5, **random),
                                           fd_dsm_loss(net, x, 0.5, derivatives="forward",
                                                       **random)))
        fd = grads(fd_dsm_loss(net, x, 0.5, eps=eps, **kw), params)
        exact = grads(fd_dsm_loss(net, x, 0.5, eps=eps, derivatives="forward", **kw), params)
        grad_errors.append(relative_error(torch.cat([g.flatten() for g in fd]),
                                          torch.cat([g.flatten() for g in exact])))
    for errors in (value_errors, grad_errors):
        assert errors[0] < 1e-2, errors
        assert all(3.6 < a / b < 4.4 for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("output", ["log_density", "energy"])
@pytest.mark.parametrize("per_sample_sigma", [False, True])
def test_fd_dsm_residual_forward_is_dsm(output, per_sample_sigma):
    """Value 1/2 ||a||^2 (dsm_loss's, to rounding: ||a||^2 against a sum of squares) and
    exactly DSM's parameter gradient, at any eps."""
    net, x = MLP(5), torch.randn(8, 5, dtype=torch.float64)
    model, params = energy_or_model(net, output), list(net.parameters())
    sigma = torch.linspace(0.1, 0.6, 8, dtype=torch.float64) if per_sample_sigma else 0.3
    want = dsm_loss(model, x, sigma, output=output, seed=SEED, reduction="none")
    want_grads = grads(want.sum(), params)
    for eps in (0.5, 1e-3):
        got = fd_dsm_loss(model, x, sigma, eps=eps, output=output, seed=SEED,
                          reduction="none", derivatives="forward")
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
        assert_grads_close(grads(got.sum(), params), want_grads)


@pytest.mark.parametrize("n_projections", [1, 3])
def test_fd_dsm_random_forward_equals_the_closed_form(n_projections):
    """(d/(2 eps^2)) (v.(s(x~) + z/sigma))^2 with s = b - A x~, the loss's z and v; the
    parameter gradients of that closed form."""
    d, batch, eps, sigma = 5, 4, 0.3, 0.4
    quad = QuadraticLogDensity(d)
    x = torch.randn(batch, d, dtype=torch.float64)
    got = fd_dsm_loss(quad, x, sigma, eps=eps, direction="random", n_projections=n_projections,
                      output="log_density", seed=SEED, reduction="none", derivatives="forward")
    z = philox_normal(SEED, batch, d)
    x_tilde = x + sigma * z
    v = directions(x_tilde, n_projections, "sphere", eps)
    # The log-density sees the parameter A as (A + A^T)/2 (its value is symmetric).
    a = (quad.b - x_tilde @ (quad.A + quad.A.T) / 2 + z / sigma).repeat(n_projections, 1)
    want = (d / (2 * eps**2) * (v * a).sum(1) ** 2).reshape(n_projections, batch).mean(0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    params = [quad.A, quad.b]
    assert_grads_close(grads(got.sum(), params), grads(want.sum(), params))


class Conditional(nn.Module):
    """L(x, c, temperature, offset) with a per-sample label c, a per-sample keyword offset and
    a shared tensor temperature (which takes a gradient)."""

    def __init__(self, d):
        super().__init__()
        self.net = MLP(d + 1)

    def forward(self, x, c, temperature, offset=None):
        out = self.net(torch.cat([x, c.to(x.dtype)[:, None]], 1)) / temperature
        return out + (offset * x).sum(1)


def test_model_args_kwargs_and_shared():
    """Per-sample positional and keyword arguments are tiled with the projections, a shared
    one is passed as is: the same values and gradients as a model closed over the tiled
    arguments, for fd_ssm_loss and both fd_dsm_loss directions."""
    d, batch, proj = 3, 4, 2
    model = Conditional(d)
    x = torch.randn(batch, d, dtype=torch.float64)
    labels = torch.arange(batch)
    temperature = torch.tensor([1.7], dtype=torch.float64, requires_grad=True)
    offset = torch.randn(batch, d, dtype=torch.float64, requires_grad=True)
    tensors = [*model.parameters(), temperature, offset]
    kw = dict(model_kwargs={"offset": offset}, shared=[1], output="log_density", seed=SEED,
              reduction="none", derivatives="forward")

    def closed_over(copies):
        return lambda y: model(y, labels.repeat(copies), temperature, offset.repeat(copies, 1))

    plain = dict(kw, model_kwargs=None, shared=())
    # fd_ssm: the closed-over model on x tiled P times, one projection each, sees the same
    # rows and draws the same v, row for row (the projection-major layout).
    got = fd_ssm_loss(model, x, labels, temperature, n_projections=proj, **kw)
    want = fd_ssm_loss(closed_over(proj), x.repeat(proj, 1), **plain)
    want = want.reshape(proj, batch).mean(0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert_grads_close(grads(got.sum(), tensors), grads(want.sum(), tensors))
    got = fd_dsm_loss(model, x, 0.3, labels, temperature, **kw)
    want = fd_dsm_loss(closed_over(1), x, 0.3, **plain)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert_grads_close(grads(got.sum(), tensors), grads(want.sum(), tensors))
    # fd_dsm random: against double backward with the same z and v.
    got = fd_dsm_loss(model, x, 0.3, labels, temperature, direction="random",
                      n_projections=proj, **kw)
    z = philox_normal(SEED, batch, d)
    x_tilde = (x + 0.3 * z).repeat(proj, 1).requires_grad_(True)
    v = directions(x + 0.3 * z, proj, "sphere", 0.1)
    (s,) = torch.autograd.grad(closed_over(proj)(x_tilde).sum(), x_tilde, create_graph=True)
    a = s + (z / 0.3).repeat(proj, 1)
    want = (d / (2 * 0.1**2) * (v * a).sum(1) ** 2).reshape(proj, batch).mean(0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert_grads_close(grads(got.sum(), tensors), grads(want.sum(), tensors))


def test_reductions():
    net, x = MLP(3), torch.randn(6, 3, dtype=torch.float64)
    kw = dict(output="energy", seed=SEED, derivatives="forward")
    for loss in (lambda **r: fd_ssm_loss(net, x, n_projections=2, **kw, **r),
                 lambda **r: fd_dsm_loss(net, x, 0.2, **kw, **r),
                 lambda **r: fd_dsm_loss(net, x, 0.2, direction="random", **kw, **r)):
        per_sample = loss(reduction="none")
        assert per_sample.shape == (6,)
        torch.testing.assert_close(loss(reduction="mean"), per_sample.mean(), rtol=1e-14, atol=0)
        torch.testing.assert_close(loss(reduction="sum"), per_sample.sum(), rtol=1e-14, atol=0)


def test_unknown_derivatives_and_wrong_outputs_are_refused():
    net, x = MLP(3), torch.randn(4, 3, dtype=torch.float64)
    match = "derivatives must be one of 'fd', 'forward'; got 'reverse'"
    with pytest.raises(ValueError, match=f"fd_ssm_loss: {match}"):
        fd_ssm_loss(net, x, output="energy", derivatives="reverse")
    with pytest.raises(ValueError, match=f"fd_dsm_loss: {match}"):
        fd_dsm_loss(net, x, 0.1, output="energy", derivatives="reverse")
    # Output checks as for "fd": per-sample scalars are not guessed, scores are not scalars.
    with pytest.raises(ValueError, match="fd_ssm_loss: the model returned per-sample scalars"):
        fd_ssm_loss(net, x, derivatives="forward")
    with pytest.raises(ValueError, match="fd_ssm_loss: with output='energy' the model must"):
        fd_ssm_loss(MLP(3, score=True), x, output="energy", derivatives="forward")
    with pytest.raises(ValueError, match="fd_dsm_loss: the model returned scores"):
        fd_dsm_loss(MLP(3, score=True), x, 0.1, direction="random", output="auto",
                    derivatives="forward")


class NoForwardRule(torch.autograd.Function):
    """tanh with a backward but no jvp: first-order autograd works, forward mode does not."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


def test_a_model_without_forward_rules_gets_a_clear_error():
    lin = nn.Linear(3, 1).double()

    def model(y):
        return NoForwardRule.apply(lin(y))[:, 0]

    x = torch.randn(4, 3, dtype=torch.float64)
    fd_ssm_loss(model, x, output="energy").backward()  # FD needs first-order autograd only
    with pytest.raises(NotImplementedError, match=r"(?s)fd_ssm_loss: derivatives='forward' "
                       r"needs a forward-mode AD rule.*jvp.*Use derivatives='fd'"):
        fd_ssm_loss(model, x, output="energy", derivatives="forward")


def test_noise_conditional_passes_derivatives_through():
    """fd_ssm: the sigma^2-weighted forward-mode loss on the perturbed data, by value;
    fd_dsm: the value and parameter gradient of the dsm method; autograd methods refuse it."""
    net = MLP(3)
    model, params = (lambda y, c: net(y)), list(net.parameters())
    x, sigmas = torch.randn(6, 3, dtype=torch.float64), torch.tensor([1.0, 0.3, 0.1])
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    kw = dict(labels=labels, output="log_density", seed=SEED)
    got = noise_conditional_loss(model, x, sigmas, method="fd_ssm", derivatives="forward", **kw)
    sigma = sigmas.double()[labels]
    x_tilde = x + sigma[:, None] * philox_normal(SEED, 6, 3)
    per_sample = fd_ssm_loss(model, x_tilde, labels, output="log_density", seed=SEED,
                             reduction="none", derivatives="forward")
    torch.testing.assert_close(got, (sigma**2 * per_sample).mean(), rtol=1e-14, atol=0)
    fd = noise_conditional_loss(model, x, sigmas, method="fd_ssm", **kw)
    assert relative_error(fd, got) > 1e-6  # "fd" differs: the option did arrive
    got = noise_conditional_loss(model, x, sigmas, method="fd_dsm", derivatives="forward", **kw)
    want = noise_conditional_loss(model, x, sigmas, method="dsm", **kw)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    assert_grads_close(grads(got, params), grads(want, params))
    with pytest.raises(ValueError, match="noise_conditional_loss: derivatives='forward' "
                       "applies to the FD methods 'fd_ssm', 'fd_dsm'; method='ssm'"):
        noise_conditional_loss(model, x, sigmas, method="ssm", derivatives="forward", **kw)


def test_compiled_whole_loss_equals_eager():
    """torch.compile(fullgraph=True) traces the nested jvp (seed as a tensor): the same value
    and parameter gradients as eager."""
    torch._dynamo.reset()
    net, x = MLP(4), torch.randn(6, 4, dtype=torch.float64)
    params = list(net.parameters())

    def loss(y, seed):
        return fd_ssm_loss(net, y, output="energy", n_projections=2, seed=seed,
                           derivatives="forward")

    eager = loss(x, torch.tensor(SEED))
    got = torch.compile(loss, backend="aot_eager", fullgraph=True)(x, torch.tensor(SEED))
    torch.testing.assert_close(got, eager, rtol=1e-12, atol=0)
    assert_grads_close(grads(got, params), grads(eager, params), rtol=1e-12, atol=0)
    torch._dynamo.reset()
