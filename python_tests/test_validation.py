"""Every documented bad input raises an error naming the argument and what was expected."""

import pytest
import torch
from helpers import MLP

from fdsm_ext import (
    FDPrecisionWarning,
    annealed_langevin_dynamics,
    dsm_loss,
    exact_sm_loss,
    fd_directional_derivative,
    fd_dsm_loss,
    fd_ssm_loss,
    langevin_dynamics,
    noise_conditional_loss,
    ssm_loss,
)
from fdsm_ext import _ops as ops

X = torch.randn(4, 3)


def scalar(y, *args):
    return -(y * y).sum(1)


def score(y, *args):
    return -y


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"eps": 0.0}, ValueError, "eps must be a finite number > 0"),
        ({"eps": -0.1}, ValueError, "eps must be"),
        ({"eps": float("nan")}, ValueError, "eps must be"),
        ({"eps": "0.1"}, TypeError, "eps must be a number"),
        ({"noise": "uniform"}, ValueError, "noise must be one of 'sphere', 'gaussian'"),
        ({"output": "logits"}, ValueError, "output must be one of"),
        ({"reduction": "max"}, ValueError, "reduction must be one of"),
        ({"n_projections": 0}, ValueError, "n_projections must be an integer >= 1"),
    ],
)
def test_fd_ssm_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        fd_ssm_loss(scalar, X, **kwargs)


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.randn(4), ValueError, r"x must have a batch dimension first.*\(4,\)"),
        (torch.randn(0, 3), ValueError, "x has zero samples"),
        (torch.randn(4, 0), ValueError, "x has empty samples"),
        (torch.ones(4, 3, dtype=torch.long), TypeError, "x must be a floating-point tensor"),
        (torch.randn(4, 3).half(), TypeError, "half precision"),
        (torch.randn(4, 3).bfloat16(), TypeError, "half precision"),
        ([[1.0, 2.0]], TypeError, "x must be a torch.Tensor"),
    ],
)
@pytest.mark.parametrize("loss", [fd_ssm_loss, lambda m, x: fd_dsm_loss(m, x, 0.1)])
def test_fd_losses_bad_x(loss, x, error, match):
    with pytest.raises(error, match=match):
        loss(scalar, x)


@pytest.mark.parametrize(
    "model, output, match",
    [
        (lambda y: y[:, :2], "auto", r"output='auto' the model must return scores shaped like x"),
        (scalar, "auto", r"per-sample scalars \(shape \(\d+,\)\), which output='auto' does not "
                         r"guess: pass output='energy' .* output='log_density'"),
        (lambda y: y.sum(1, keepdim=True).expand(-1, 2), "auto", "returned shape"),
        (score, "energy", r"output='energy' the model must return per-sample scalars"),
        (score, "log_density", r"output='log_density' the model must return per-sample"),
        (scalar, "score", r"output='score' the model must return scores shaped like x"),
        (lambda y: scalar(y)[:-1], "auto", "one row per input row"),
        (lambda y: scalar(y).sum(), "auto", "one row per input row"),
        (lambda y: None, "auto", "must return a tensor"),
    ],
)
@pytest.mark.parametrize("loss", [fd_ssm_loss, ssm_loss, exact_sm_loss])
def test_bad_model_outputs(loss, model, output, match):
    with pytest.raises((ValueError, TypeError), match=match):
        loss(model, X, output=output)


def test_fd_dsm_bad_sigma_and_score_models():
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        fd_dsm_loss(scalar, X, 0.0)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        fd_dsm_loss(scalar, X, torch.tensor([0.1, 0.2, -0.1, 0.3]))
    with pytest.raises(ValueError, match=r"sigma must be a number or a tensor of shape \(B,\)"):
        fd_dsm_loss(scalar, X, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="use dsm_loss"):
        fd_dsm_loss(score, X, 0.1)
    with pytest.raises(ValueError, match="use dsm_loss"):
        fd_dsm_loss(score, X, 0.1, output="score")
    with pytest.raises(ValueError, match="sigma must be"):
        dsm_loss(score, X, -1.0)


def test_directional_derivative_bad_arguments():
    with pytest.raises(ValueError, match="order must be an integer >= 1"):
        fd_directional_derivative(scalar, X, X, order=0)
    with pytest.raises(ValueError, match="accuracy must be an even integer"):
        fd_directional_derivative(scalar, X, X, accuracy=3)
    with pytest.raises(ValueError, match="v must be a tensor with x's shape"):
        fd_directional_derivative(scalar, X, X[:, :2])


def test_baseline_bad_arguments():
    with pytest.raises(ValueError, match="noise must be one of 'rademacher', 'gaussian'"):
        ssm_loss(scalar, X, noise="sphere")
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        exact_sm_loss(scalar, X, chunk_size=0)


def test_noise_conditional_bad_arguments():
    sigmas = torch.tensor([1.0, 0.1])
    with pytest.raises(ValueError, match="method must be one of 'fd_ssm', 'ssm', 'dsm', 'fd_dsm'"):
        noise_conditional_loss(score, X, sigmas, method="sliced")
    with pytest.raises(ValueError, match="sigmas must be > 0"):
        noise_conditional_loss(score, X, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="sigmas must hold at least one"):
        noise_conditional_loss(score, X, [])
    with pytest.raises(ValueError, match=r"labels must be a LongTensor of shape \(4,\)"):
        noise_conditional_loss(score, X, sigmas, labels=torch.zeros(4))


def test_sampler_bad_arguments():
    with pytest.raises(ValueError, match="n_steps must be an integer >= 0"):
        langevin_dynamics(score, X, -1, 0.1)
    with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
        langevin_dynamics(score, X, 1, 0.0)
    with pytest.raises(ValueError, match="step_lr must be a finite number > 0"):
        annealed_langevin_dynamics(score, X, [1.0], step_lr=-1.0)
    with pytest.raises(ValueError, match="n_steps_each must be an integer >= 1"):
        annealed_langevin_dynamics(score, X, [1.0], n_steps_each=0)


def test_half_precision_model_outputs_accumulate_in_float32():
    """A model that returns bfloat16 still gives a float32 FD-SSM loss (and a warning)."""
    mlp = MLP(3).float()
    with pytest.warns(FDPrecisionWarning):
        loss = fd_ssm_loss(lambda y: mlp(y.bfloat16().float()).bfloat16(), torch.randn(8, 3),
                           output="log_density")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_float32_accumulation_beats_float16_accumulation():
    """d = 3072 (CIFAR-sized), a score model returning float16: the per-sample FD-SSM losses
    (sums over d of float16 products) against a float64 reference on the SAME float16 outputs
    and directions. The library's float32 accumulation is within 2e-5 of the reference
    (relative to the mean |loss|; measured 5e-6); the same sums accumulated in float16 (every
    partial sum rounded to float16, as a float16 reduction would) are off by over 1 % (measured
    7.5 %), over 1000 times more."""
    d, batch, eps, seed = 3072, 16, 0.1, 3
    x = torch.randn(batch, d, generator=torch.Generator().manual_seed(0))
    outputs = []

    def score(y):
        s = (-y + 0.3 * torch.sin(2 * y)).half()
        outputs.append(s)
        return s

    loss = fd_ssm_loss(score, x, eps=eps, output="score", reduction="none", seed=seed)
    assert loss.dtype == torch.float32
    _, v = ops.random_stencil_batch(x, torch.tensor([seed]), (1.0, -1.0), 1, "sphere", eps)
    (h,) = outputs
    scale = d / (2 * eps**2)
    s_plus, s_minus = h[:batch].double(), h[batch:].double()
    reference = (0.125 * ((s_plus + s_minus) ** 2).sum(1)
                 + scale * (v.double() * (s_plus - s_minus)).sum(1))
    squares, dots = (h[:batch] + h[batch:]) ** 2, v.half() * (h[:batch] - h[batch:])
    sum_squares = sum_dots = torch.zeros(batch, dtype=torch.float16)
    for j in range(d):
        sum_squares, sum_dots = sum_squares + squares[:, j], sum_dots + dots[:, j]
    half = 0.125 * sum_squares.double() + scale * sum_dots.double()
    size = reference.abs().mean()
    error32 = ((loss.double() - reference).abs().max() / size).item()
    error16 = ((half - reference).abs().max() / size).item()
    assert error32 < 2e-5, error32
    assert error16 > 1e-2 and error16 > 1000 * error32, (error16, error32)
