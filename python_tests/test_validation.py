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
