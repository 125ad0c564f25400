"""Noise-conditional score matching (NCSN training) over a schedule of noise levels."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._common import (
    check_choice,
    check_generator,
    check_int,
    check_positive,
    check_x,
    randn_like,
    reduce,
)
from .baselines import dsm_loss, ssm_loss
from .losses import fd_dsm_loss, fd_ssm_loss

METHODS = {"fd_ssm": fd_ssm_loss, "ssm": ssm_loss, "dsm": dsm_loss, "fd_dsm": fd_dsm_loss}


def geometric_sigmas(
    sigma_max: float = 1.0, sigma_min: float = 0.01, n_levels: int = 10
) -> Tensor:
    """sigma_i = sigma_max (sigma_min/sigma_max)^(i/(L-1)), i = 0..L-1 (NCSN's schedule)."""
    fn = "geometric_sigmas"
    check_positive("sigma_max", sigma_max, fn)
    check_positive("sigma_min", sigma_min, fn)
    check_int("n_levels", n_levels, 1, fn)
    if n_levels == 1:
        return torch.tensor([float(sigma_max)])
    ratio = math.log(sigma_min / sigma_max) / (n_levels - 1)
    levels = torch.arange(n_levels, dtype=torch.float64)
    return torch.exp(math.log(sigma_max) + ratio * levels).float()


def noise_conditional_loss(
    model: Callable[..., Tensor],
    x: Tensor,
    sigmas: Sequence[float] | Tensor,
    *,
    method: str = "fd_ssm",
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
    **estimator_kwargs: Any,
) -> Tensor:
    """Multi-scale score matching: E_i[ sigma_i^2 J_method(x~ | i) ], x~ = x + sigma_i z.

    Each sample draws a level i uniformly (unless ``labels`` (B,) are given); the model is
    called as ``model(x_tilde, labels)`` through the estimator ``method``: "fd_ssm" and
    "ssm" (on the perturbed data; pass ``variance_reduction`` etc. in ``estimator_kwargs``),
    "dsm" and "fd_dsm" (which perturb x with sigma_i themselves). Each sample is weighted by
    lambda(sigma_i) = sigma_i^2. ``reduction`` in ``estimator_kwargs`` applies to the
    weighted per-sample losses (default "mean").
    """
    fn = "noise_conditional_loss"
    check_choice("method", method, tuple(METHODS), fn)
    check_x(x, fn, finite_differences=False)
    check_generator(generator, fn)
    sigmas = torch.as_tensor(sigmas, dtype=x.dtype, device=x.device).reshape(-1)
    if sigmas.numel() == 0:
        raise ValueError(f"{fn}: sigmas must hold at least one noise level")
    check_positive("sigmas", sigmas, fn)
    batch = x.shape[0]
    if labels is None:
        device = generator.device if generator is not None else x.device
        labels = torch.randint(
            len(sigmas), (batch,), generator=generator, device=device
        ).to(x.device)
    elif labels.shape != (batch,) or labels.dtype != torch.long:
        raise ValueError(
            f"{fn}: labels must be a LongTensor of shape ({batch},), got "
            f"{labels.dtype} {tuple(labels.shape)}"
        )
    reduction = estimator_kwargs.pop("reduction", "mean")
    check_choice("reduction", reduction, ("mean", "sum", "none"), fn)
    sigma = sigmas[labels]
    estimator = METHODS[method]
    kwargs = dict(estimator_kwargs, reduction="none", generator=generator)
    if method in ("dsm", "fd_dsm"):
        per_sample = estimator(model, x, sigma, labels, **kwargs)
    else:
        view = (-1,) + (1,) * (x.dim() - 1)
        x_tilde = x + sigma.view(view) * randn_like(x, generator)
        per_sample = estimator(model, x_tilde, labels, **kwargs)
    return reduce(sigma**2 * per_sample, reduction)
