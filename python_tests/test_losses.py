"""FD losses against closed forms (quadratic log-densities, linear scores) and autograd."""

import math

import pytest
import torch
from helpers import MLP, Counting, LinearScore, QuadraticLogDensity, philox_normal

from fdsm_ext import _ops as ops
from fdsm_ext import exact_sm_loss, fd_directional_derivative, fd_dsm_loss, fd_ssm_loss, reference

NOISES = ["sphere", "gaussian", "rademacher"]


def directions(x, seed, n_projections, noise, eps):
    """The directions v (P*B, d) that a loss drawing from Generator().manual_seed(seed) uses."""
    gen = torch.Generator().manual_seed(seed)
    x2 = x.reshape(x.shape[0], -1)
    _, v = ops.random_stencil_batch(
        x2, ops.draw_seed(x.device, gen), (1.0, -1.0), n_projections, noise, eps
    )
    return v


def ssm_with_directions(model, x, u, kind, variance_reduction=False):
    """Autograd SSM with given directions u (P*B, d), averaged over projections: the value
    FD-SSM approximates with v = u eps / sqrt(d)."""
    n_proj = u.shape[0] // x.shape[0]
    xr = torch.cat([x] * n_proj).detach().requires_grad_(True)
    out = model(xr)
    s = torch.autograd.grad(out.sum(), xr, create_graph=True)[0] if kind == "scalar" else out
    s = s.reshape(xr.shape[0], -1)
    su = (s * u).sum(1)
    ju = torch.autograd.grad(su.sum(), xr, create_graph=True)[0].reshape_as(u)
    first = 0.5 * (s * s).sum(1) if variance_reduction else 0.5 * su**2
    return (first + (u * ju).sum(1)).reshape(n_proj, -1).mean(0)


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("n_projections", [1, 3])
@pytest.mark.parametrize("form", ["log_density", "energy", "score_vr", "score_plain"])
def test_fd_ssm_quadratic_is_exact_per_direction(noise, n_projections, form):
    """For quadratic log-densities central differences are exact: the FD-SSM value equals
    (d/eps^2) [1/2 (v.s)^2 + v^T H v] (score VR: 1/2 ||s||^2 + (d/eps^2) v^T H v)."""
    d, batch, eps = 5, 4, 0.1
    quad = QuadraticLogDensity(d)
    x = torch.randn(batch, d, dtype=torch.float64)
    model, kwargs = {
        "log_density": (quad, {"output": "log_density"}),
        "energy": (lambda y: -quad(y), {"output": "energy"}),
        "score_vr": (LinearScore(d), {"output": "score"}),
        "score_plain": (LinearScore(d), {"output": "score", "variance_reduction": False}),
    }[form]
    loss = fd_ssm_loss(model, x, eps=eps, noise=noise, n_projections=n_projections,
                       reduction="none", generator=torch.Generator().manual_seed(7), **kwargs)
    v = directions(x, 7, n_projections, noise, eps)
    s = quad.score(x).repeat(n_projections, 1)
    vhv = -((v @ quad.A) * v).sum(1)
    if form == "score_vr":
        expected = 0.5 * (s * s).sum(1) + d / eps**2 * vhv
    else:
        expected = d / eps**2 * (0.5 * (v * s).sum(1) ** 2 + vhv)
    torch.testing.assert_close(loss, expected.reshape(n_projections, batch).mean(0))


@pytest.mark.parametrize("noise", NOISES)
def test_directions_have_the_stated_law(noise):
    """E[v v^T] = (eps^2/d) I; ||v|| = eps on the sphere; |v_i| = eps/sqrt(d) for rademacher."""
    d, eps, n = 6, 0.3, 20000
    x = torch.zeros(n, d, dtype=torch.float64)
    v = directions(x, 3, 1, noise, eps)
    cov = (d / eps**2) * (v.T @ v) / n
    torch.testing.assert_close(cov, torch.eye(d, dtype=torch.float64), atol=0.06, rtol=0)
    torch.testing.assert_close(v.mean(0), torch.zeros(d, dtype=torch.float64), atol=0.01, rtol=0)
    if noise == "sphere":
        torch.testing.assert_close(v.norm(dim=1), torch.full((n,), eps, dtype=torch.float64))
    if noise == "rademacher":
        assert torch.all(v.abs() == eps / math.sqrt(d))


@pytest.mark.parametrize("model_kind", ["scalar", "score"])
def test_fd_ssm_expectation_is_exact_sm_for_quadratics(model_kind):
    d, batch = 4, 3
    quad = QuadraticLogDensity(d)
    model = quad if model_kind == "scalar" else LinearScore(d)
    x = torch.randn(batch, d, dtype=torch.float64)
    output = "log_density" if model_kind == "scalar" else "auto"
    loss = fd_ssm_loss(model, x, n_projections=40000, reduction="none", output=output,
                       generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, quad.exact_sm(x), rtol=0.03, atol=0.05)


@pytest.mark.parametrize("output", ["log_density", "score"])
def test_one_dimension_fd_ssm_equals_exact_sm(output):
    """In d = 1 the sphere is {-eps, +eps}: FD-SSM of a quadratic is exactly J_SM."""
    quad = QuadraticLogDensity(1)
    model = quad if output == "log_density" else LinearScore(1)
    x = torch.randn(8, 1, dtype=torch.float64)
    loss = fd_ssm_loss(model, x, eps=0.3, output=output, reduction="none")
    torch.testing.assert_close(loss, quad.exact_sm(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind, vr", [("scalar", False), ("score", True), ("score", False)])
def test_fd_ssm_error_shrinks_like_eps_squared(kind, vr):
    d, batch = 5, 6
    model = MLP(d, score=kind == "score")
    x = torch.randn(batch, d, dtype=torch.float64)
    errors = []
    for eps in (0.2, 0.1, 0.05):
        loss = fd_ssm_loss(model, x, eps=eps, n_projections=2, variance_reduction=vr,
                           output="log_density" if kind == "scalar" else "score",
                           reduction="none", generator=torch.Generator().manual_seed(1))
        u = directions(x, 1, 2, "sphere", eps) * math.sqrt(d) / eps
        exact = ssm_with_directions(model, x, u, kind, variance_reduction=vr and kind == "score")
        errors.append((loss - exact).abs().max().item())
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.0 < coarse / fine < 5.0, errors


def test_fd_ssm_parameter_gradients_approach_exact_sm():
    """d = 1: FD-SSM's parameter gradients converge to those of exact SM at rate eps^2."""
    model = MLP(1, seed=2)
    x = torch.randn(16, 1, dtype=torch.float64)
    params = list(model.parameters())[:-1]  # the output bias does not enter the score
    exact = torch.autograd.grad(
        exact_sm_loss(model, x, create_graph=True, output="log_density"), params
    )
    errors = []
    for eps in (0.1, 0.05):
        fd = torch.autograd.grad(fd_ssm_loss(model, x, eps=eps, output="log_density"), params)
        errors.append(max((a - b).abs().max().item() for a, b in zip(fd, exact)))
    assert errors[1] < 1e-3
    assert 3.0 < errors[0] / errors[1] < 5.0, errors


@pytest.mark.parametrize("energy", [False, True])
@pytest.mark.parametrize("per_sample_sigma", [False, True])
@pytest.mark.parametrize("n_projections", [1, 3])
def test_fd_dsm_quadratic_closed_form(energy, per_sample_sigma, n_projections):
    """Per sample mean_p (d/(2 eps^2)) (v_p.(s(x~) + z/sigma))^2 exactly for a quadratic
    log-density."""
    d, batch, eps = 3, 5, 0.2
    quad = QuadraticLogDensity(d)
    x = torch.randn(batch, d, dtype=torch.float64)
    sigma = torch.linspace(0.1, 0.5, batch, dtype=torch.float64) if per_sample_sigma else 0.3
    model = (lambda y: -quad(y)) if energy else quad
    loss = fd_dsm_loss(model, x, sigma, eps=eps, output="energy" if energy else "log_density",
                       direction="random", n_projections=n_projections, reduction="none",
                       seed=5)
    z = philox_normal(5, batch, d)
    sig = torch.as_tensor(sigma, dtype=x.dtype).expand(batch)[:, None]
    x_tilde = x + sig * z
    _, v = reference.random_stencil_batch(x_tilde, 5, (1.0, -1.0), n_projections, "sphere", eps)
    v = v.reshape(n_projections, batch, d)
    expected = d / (2 * eps**2) * ((v * (quad.score(x_tilde) + z / sig)).sum(2)) ** 2
    torch.testing.assert_close(loss, expected.mean(0))


def test_fd_dsm_many_projections_approach_dsm():
    """Averaged over many directions, FD-DSM tends to the DSM loss at the same x~ (exact in v
    for a quadratic): 1/2 ||s(x~) + z/sigma||^2; relative spread about 1.1/sqrt(P) at d = 6."""
    d, batch, sigma, p = 6, 4, 0.3, 2000
    quad = QuadraticLogDensity(d)
    x = torch.randn(batch, d, dtype=torch.float64)
    loss = fd_dsm_loss(quad, x, sigma, direction="random", n_projections=p,
                       output="log_density", reduction="none", seed=9)
    z = philox_normal(9, batch, d)
    x_tilde = x + sigma * z
    dsm = 0.5 * (quad.score(x_tilde) + z / sigma).pow(2).sum(1)
    torch.testing.assert_close(loss, dsm, rtol=0.1, atol=0)


@pytest.mark.parametrize(
    "call, rows_per_sample",
    [
        (lambda m, x: fd_ssm_loss(m, x, output="log_density"), 3),
        (lambda m, x: fd_ssm_loss(m, x, n_projections=4, output="energy"), 9),
        (lambda m, x: fd_dsm_loss(m, x, 0.1, direction="random", output="log_density"), 2),
        (lambda m, x: fd_dsm_loss(m, x, 0.1, direction="random", n_projections=3,
                                  output="energy"), 6),
    ],
)
def test_scalar_model_called_once_on_stacked_batch(call, rows_per_sample):
    model = Counting(MLP(3))
    call(model, torch.randn(5, 3, dtype=torch.float64)).backward()
    assert model.rows == [5 * rows_per_sample]


@pytest.mark.parametrize("output, n_projections, rows_per_sample",
                         [("score", 1, 2), ("score", 3, 6), ("auto", 1, 2)])
def test_score_model_called_once_on_stacked_batch(output, n_projections, rows_per_sample):
    model = Counting(MLP(3, score=True))
    fd_ssm_loss(model, torch.randn(5, 3, dtype=torch.float64), output=output,
                n_projections=n_projections).backward()
    assert model.rows == [5 * rows_per_sample]


def test_model_args_with_batch_dimension_are_repeated_per_block():
    batch = 4
    labels = torch.arange(batch)
    seen = []

    def model(y, lab, scale):
        seen.append((lab.clone(), scale))
        return -(y * y).sum(1) * scale

    fd_ssm_loss(model, torch.randn(batch, 2), labels, 2.0, n_projections=2, output="energy")
    lab, scale = seen[0]
    assert torch.equal(lab, labels.repeat(5)) and scale == 2.0


def test_same_generator_seed_gives_identical_losses():
    model, x = MLP(4), torch.randn(6, 4, dtype=torch.float64)
    kw = {"output": "log_density"}
    a = fd_ssm_loss(model, x, generator=torch.Generator().manual_seed(3), **kw)
    b = fd_ssm_loss(model, x, generator=torch.Generator().manual_seed(3), **kw)
    c = fd_ssm_loss(model, x, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(11)
    d1 = fd_dsm_loss(model, x, 0.2, **kw)
    torch.manual_seed(11)
    d2 = fd_dsm_loss(model, x, 0.2, **kw)
    assert torch.equal(d1, d2)


def test_reductions():
    model, x = MLP(4), torch.randn(6, 4, dtype=torch.float64)
    def loss(**kw):
        return fd_ssm_loss(model, x, output="energy", generator=torch.Generator().manual_seed(0),
                           **kw)

    per_sample, total, mean = loss(reduction="none"), loss(reduction="sum"), loss()
    assert per_sample.shape == (6,)
    torch.testing.assert_close(total, per_sample.sum())
    torch.testing.assert_close(mean, per_sample.mean())


def test_image_shaped_inputs_are_flattened_consistently():
    """x of shape (B, C, H, W) gives the same loss as the flattened (B, C*H*W) input."""
    quad = QuadraticLogDensity(12)
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64)
    a = fd_ssm_loss(quad, x, output="log_density", generator=torch.Generator().manual_seed(0))
    b = fd_ssm_loss(quad, x.reshape(3, 12), output="log_density",
                    generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("order", range(1, 7))
@pytest.mark.parametrize("accuracy", [2, 4])
def test_directional_derivative_converges_at_stated_rate(order, accuracy):
    """f(x) = exp(w.x): d^T/dt^T f(x + t v) = (w.v)^T exp(w.x)."""
    d = 3
    w = torch.tensor([0.3, -0.5, 0.2], dtype=torch.float64)
    x = torch.randn(4, d, dtype=torch.float64) * 0.5
    direction = torch.randn(4, d, dtype=torch.float64)
    direction = direction / direction.norm(dim=1, keepdim=True)
    errors = []
    for h in (0.2, 0.1):
        v = h * direction
        exact = (v @ w) ** order * torch.exp(x @ w)
        approx = fd_directional_derivative(lambda y: torch.exp(y @ w), x, v, order, accuracy)
        errors.append(((approx - exact) / h**order).abs().max().item())
    rate = math.log2(errors[0] / errors[1])
    assert accuracy - 0.3 < rate < accuracy + 0.3, (errors, rate)


def test_directional_derivative_tensor_outputs_and_one_call():
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    v = 1e-2 * torch.randn_like(x)
    f = Counting(lambda y: torch.stack([torch.sin(y).sum((1, 2)), (y**3).sum((1, 2))], 1))
    out = fd_directional_derivative(f, x, v, order=2, accuracy=4)
    exact = torch.stack([(-torch.sin(x) * v * v).sum((1, 2)), (6 * x * v * v).sum((1, 2))], 1)
    assert out.shape == (5, 2) and f.rows == [5 * 5]
    torch.testing.assert_close(out, exact, rtol=1e-6, atol=1e-12)


def test_directional_derivative_is_differentiable_in_x_and_v():
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    v = (0.1 * torch.randn(3, 2, dtype=torch.float64)).requires_grad_(True)

    def fn(x, v):
        return fd_directional_derivative(lambda y: (y**3).sum(1), x, v, order=1)

    assert torch.autograd.gradcheck(fn, (x, v))
