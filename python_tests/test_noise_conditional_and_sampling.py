"""NCSN training loss and Langevin samplers against Gaussian closed forms."""

import pytest
import torch
from helpers import Counting, QuadraticLogDensity, philox_normal

from fdsm_ext import (
    annealed_langevin_dynamics,
    dsm_loss,
    fd_dsm_loss,
    fd_ssm_loss,
    geometric_sigmas,
    langevin_dynamics,
    noise_conditional_loss,
    ssm_loss,
)

SIGMAS = geometric_sigmas(1.0, 0.01, 10)


def gaussian_ncsn(sigmas):
    """Exact noise-conditional score of N(0, I) data: s(x, i) = -x / (1 + sigma_i^2)."""
    def model(x, labels):
        var = 1 + sigmas.to(x.dtype)[labels] ** 2
        return -x / var.view(-1, *([1] * (x.dim() - 1)))
    return model


def gaussian_ncsn_of_sigma(x, sigma):
    """The same exact score, conditioned on the noise level itself: -x / (1 + sigma^2)."""
    return -x / (1 + sigma**2).view(-1, *([1] * (x.dim() - 1)))


def test_geometric_sigmas():
    torch.testing.assert_close(SIGMAS[[0, -1]], torch.tensor([1.0, 0.01]))
    ratios = SIGMAS[1:] / SIGMAS[:-1]
    torch.testing.assert_close(ratios, torch.full((9,), 0.01 ** (1 / 9)))


@pytest.mark.parametrize("method", ["fd_ssm", "ssm", "dsm"])
def test_noise_conditional_loss_weights_each_sample_by_sigma_squared(method):
    x = torch.randn(6, 2, dtype=torch.float64)
    labels = torch.tensor([0, 3, 9, 1, 9, 5])
    sig = SIGMAS.double()[labels]
    model = Counting(gaussian_ncsn(SIGMAS))
    loss = noise_conditional_loss(model, x, SIGMAS, method=method, labels=labels, seed=3,
                                  reduction="none")
    if method == "dsm":
        expected = dsm_loss(model, x, sig, labels, reduction="none", seed=3)
    else:
        x_tilde = x + sig[:, None] * philox_normal(3, 6, 2)
        estimator = fd_ssm_loss if method == "fd_ssm" else ssm_loss
        expected = estimator(model, x_tilde, labels, reduction="none", seed=3)
    torch.testing.assert_close(loss, sig**2 * expected)
    assert all(torch.equal(args[0], labels.repeat(len(args[0]) // 6)) for args in model.args)


@pytest.mark.parametrize("direction, n_projections", [("residual", 1), ("random", 1),
                                                      ("random", 3)])
def test_noise_conditional_fd_dsm_for_scalar_models(direction, n_projections):
    quad = QuadraticLogDensity(2)
    x = torch.randn(4, 2, dtype=torch.float64)
    labels = torch.tensor([0, 2, 4, 9])
    loss = noise_conditional_loss(lambda y, lab: quad(y), x, SIGMAS, method="fd_dsm",
                                  labels=labels, generator=torch.Generator().manual_seed(1),
                                  reduction="none", output="log_density",
                                  direction=direction, n_projections=n_projections)
    sig = SIGMAS.double()[labels]
    expected = fd_dsm_loss(lambda y, lab: quad(y), x, sig, labels, reduction="none",
                           output="log_density", generator=torch.Generator().manual_seed(1),
                           direction=direction, n_projections=n_projections)
    torch.testing.assert_close(loss, sig**2 * expected)


def test_noise_conditional_draws_levels_uniformly():
    seen = []

    def model(x, labels):
        seen.append(labels)
        return -x

    noise_conditional_loss(model, torch.randn(4000, 1), SIGMAS, method="dsm", output="score")
    counts = torch.bincount(seen[0], minlength=10).float()
    assert seen[0].dtype == torch.long
    assert torch.all((counts - 400).abs() < 100), counts


@pytest.mark.parametrize("output", ["score", "energy"])
def test_langevin_samples_a_gaussian(output):
    sigma = 0.7
    model = (lambda y: -y / sigma**2) if output == "score" else (
        lambda y: 0.5 * (y * y).sum(1) / sigma**2)
    x0 = 3.0 + torch.randn(4000, 2, dtype=torch.float64)
    x = langevin_dynamics(model, x0, 400, 0.01, output=output,
                          generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x.mean(0), torch.zeros(2, dtype=x.dtype), atol=0.06, rtol=0)
    torch.testing.assert_close(x.var(0), torch.full((2,), sigma**2, dtype=x.dtype),
                               atol=0.05, rtol=0)


def test_annealed_langevin_recovers_data_distribution():
    x0 = torch.rand(4000, 2, dtype=torch.float64) * 2 - 1
    x = annealed_langevin_dynamics(gaussian_ncsn(SIGMAS), x0, SIGMAS, n_steps_each=100,
                                   step_lr=2e-5, output="score",
                                   generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x.var(0), torch.ones(2, dtype=x.dtype), atol=0.1, rtol=0)
    torch.testing.assert_close(x.mean(0), torch.zeros(2, dtype=x.dtype), atol=0.06, rtol=0)


def test_annealed_langevin_schedule_labels_and_denoising():
    model = Counting(gaussian_ncsn(SIGMAS))
    x0 = torch.randn(5, 3)
    plain = annealed_langevin_dynamics(model, x0, SIGMAS, n_steps_each=2, denoise=False,
                                       generator=torch.Generator().manual_seed(1))
    levels = [int(args[0][0]) for args in model.args]
    assert levels == [i for i in range(10) for _ in range(2)]
    assert all(args[0].dtype == torch.long and args[0].shape == (5,) for args in model.args)
    denoised = annealed_langevin_dynamics(model, x0, SIGMAS, n_steps_each=2, denoise=True,
                                          generator=torch.Generator().manual_seed(1))
    labels = torch.full((5,), 9)
    torch.testing.assert_close(denoised, plain + SIGMAS[-1] ** 2 * model(plain, labels))


@pytest.mark.parametrize("method", ["fd_ssm", "ssm", "dsm", "fd_dsm"])
def test_condition_sigma_calls_the_model_with_the_noise_levels(method):
    """condition="sigma": model(x, sigma_i) with sigma_i = sigmas[i] (float (B,)); the same
    level draw and noise as condition="label" for the same seed, so the same loss."""
    x = torch.randn(6, 2, dtype=torch.float64)
    quad = QuadraticLogDensity(2)
    if method == "fd_dsm":  # scalar models only
        by_label, by_sigma = (lambda y, lab: quad(y)), (lambda y, sig: quad(y))
        output = "log_density"
    else:
        by_label, by_sigma = gaussian_ncsn(SIGMAS), gaussian_ncsn_of_sigma
        output = "score"
    by_sigma = Counting(by_sigma)
    by_label = Counting(by_label)
    a = noise_conditional_loss(by_label, x, SIGMAS, method=method, seed=9, reduction="none",
                               output=output)
    b = noise_conditional_loss(by_sigma, x, SIGMAS, method=method, condition="sigma", seed=9,
                               reduction="none", output=output)
    torch.testing.assert_close(b, a)
    labels, sigma = by_label.args[0][0][:6], by_sigma.args[0][0][:6]
    assert labels.dtype == torch.long and sigma.dtype == torch.float64
    torch.testing.assert_close(sigma, SIGMAS.double()[labels])


def test_annealed_langevin_conditioned_on_sigma():
    model = Counting(gaussian_ncsn_of_sigma)
    x0 = torch.rand(4000, 2, dtype=torch.float64) * 2 - 1
    x = annealed_langevin_dynamics(model, x0, SIGMAS, n_steps_each=100, step_lr=2e-5,
                                   condition="sigma", output="score",
                                   generator=torch.Generator().manual_seed(0))
    by_label = annealed_langevin_dynamics(gaussian_ncsn(SIGMAS), x0, SIGMAS, n_steps_each=100,
                                          step_lr=2e-5, output="score",
                                          generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, by_label)
    torch.testing.assert_close(x.var(0), torch.ones(2, dtype=x.dtype), atol=0.1, rtol=0)
    levels = [args[0] for args in model.args[::100]]
    assert all(c.dtype == torch.float64 and c.shape == (4000,) for c in levels)
    torch.testing.assert_close(torch.stack([c[0] for c in levels[:10]]), SIGMAS.double())
    assert torch.all(model.args[-1][0] == SIGMAS[-1].double())  # the denoising step


def test_bad_condition():
    with pytest.raises(ValueError, match="condition must be one of 'label', 'sigma'"):
        noise_conditional_loss(gaussian_ncsn(SIGMAS), torch.randn(3, 2), SIGMAS,
                               condition="time")
    with pytest.raises(ValueError, match="condition must be one of 'label', 'sigma'"):
        annealed_langevin_dynamics(gaussian_ncsn(SIGMAS), torch.randn(3, 2), SIGMAS,
                                   condition="index")
