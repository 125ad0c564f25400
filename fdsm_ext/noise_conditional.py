"""Noise-conditional score matching (NCSN training) over a schedule of noise levels."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._common import check_callable, check_choice, check_int, check_positive, check_x, reduce
from ._random import LEVELS, NOISE, resolve_seed, standard_normal, stream, uniform_levels
from .baselines import dsm_loss, ssm_loss
from .losses import fd_dsm_loss, fd_ssm_loss

__all__ = ["geometric_sigmas", "noise_conditional_loss"]

METHODS = {"fd_ssm": fd_ssm_loss, "ssm": ssm_loss, "dsm": dsm_loss, "fd_dsm": fd_dsm_loss}
FD_METHODS = ("fd_ssm", "fd_dsm")
CONDITIONS = ("label", "sigma")


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


def check_labels(labels: Tensor, n_levels: int, fn: str) -> None:
    """Level indices in [0, n_levels). CPU labels are read here (an error naming the values);
    reading CUDA labels back would sync every training step, so there the check is an
    asynchronous device assert (torch._assert_async, no sync). Under torch.compile it is
    skipped: the trace stays whole, and an index out of range still fails in sigmas[labels]."""
    if torch.compiler.is_compiling() or labels.numel() == 0:
        return
    if labels.device.type != "cpu":
        torch._assert_async(
            torch.all((labels >= 0) & (labels < n_levels)),
            f"{fn}: labels must be level indices in [0, {n_levels})",
        )
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= n_levels:
        raise ValueError(
            f"{fn}: labels must be level indices in [0, {n_levels}) for the {n_levels} "
            f"sigmas, got values from {low} to {high}"
        )


def noise_conditional_loss(
    model: Callable[..., Tensor],
    x: Tensor,
    sigmas: Sequence[float] | Tensor,
    *,
    method: str = "fd_ssm",
    condition: str = "label",
    labels: Tensor | None = None,
    seed: int | Tensor | None = None,
    generator: torch.Generator | None = None,
    **estimator_kwargs: Any,
) -> Tensor:
    """Multi-scale score matching: E_i[ sigma_i^2 J_method(x~ | i) ], x~ = x + sigma_i z.

    Each sample draws a level i uniformly (unless ``labels``, a LongTensor (B,) of level
    indices, are given) and the model is conditioned on it through ``condition``:

    * ``"label"``: ``model(x_tilde, labels)`` with the level indices (LongTensor (B,));
    * ``"sigma"``: ``model(x_tilde, sigma)`` with the noise levels sigma_i themselves
      (tensor (B,) in x's dtype), as networks conditioned on a continuous noise level take.

    ``method`` is the estimator: "fd_ssm" and "ssm" (on the perturbed data; pass
    ``variance_reduction`` etc. in ``estimator_kwargs``), "dsm" and "fd_dsm" (which perturb
    x with sigma_i themselves). Each sample is weighted by lambda(sigma_i) = sigma_i^2.
    ``derivatives="forward"`` (exact forward-mode derivatives instead of finite differences,
    see :func:`fdsm_ext.fd_ssm_loss`) passes through to "fd_ssm" and "fd_dsm"; the autograd
    methods refuse it.
    ``reduction`` in ``estimator_kwargs`` applies to the weighted per-sample losses (default
    "mean"); ``model_kwargs`` and ``shared`` pass through to the estimator (the condition
    is its ``model_args[0]``). ``seed`` or ``generator`` fixes the level draw, the noise and
    the estimator's draws, as in :func:`fdsm_ext.fd_ssm_loss`. Derivation: docs/math.rst,
    :ref:`section "Noise-conditional training and annealed Langevin dynamics"
    <math-noise-conditional>`.
    """
    fn = "noise_conditional_loss"
    check_callable(model, fn)
    check_choice("method", method, tuple(METHODS), fn)
    check_choice("condition", condition, CONDITIONS, fn)
    if "derivatives" in estimator_kwargs and method not in FD_METHODS:
        raise ValueError(
            f"{fn}: derivatives={estimator_kwargs['derivatives']!r} applies to the FD methods "
            f"{', '.join(map(repr, FD_METHODS))}; method={method!r} differentiates by autograd"
        )
    check_x(x, fn, finite_differences=False)
    sigmas = torch.as_tensor(sigmas, dtype=x.dtype, device=x.device).reshape(-1)
    if sigmas.numel() == 0:
        raise ValueError(f"{fn}: sigmas must hold at least one noise level")
    check_positive("sigmas", sigmas, fn)
    batch = x.shape[0]
    key = resolve_seed(seed, generator, x.device, fn)
    if labels is None:
        labels = uniform_levels(stream(key, LEVELS), batch, len(sigmas), x.device)
    elif not isinstance(labels, Tensor) or labels.shape != (batch,) or labels.dtype != torch.long:
        raise ValueError(
            f"{fn}: labels must be a LongTensor of shape ({batch},), got "
            + (f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor)
               else type(labels).__name__)
        )
    else:
        check_labels(labels, len(sigmas), fn)
    reduction = estimator_kwargs.pop("reduction", "mean")
    check_choice("reduction", reduction, ("mean", "sum", "none"), fn)
    sigma = sigmas[labels]
    cond = labels if condition == "label" else sigma
    estimator = METHODS[method]
    kwargs = dict(estimator_kwargs, reduction="none", seed=key)
    if method in ("dsm", "fd_dsm"):
        per_sample = estimator(model, x, sigma, cond, **kwargs)
    else:
        z = standard_normal(x.reshape(batch, -1), stream(key, NOISE)).reshape_as(x)
        x_tilde = x + sigma.view((-1,) + (1,) * (x.dim() - 1)) * z
        per_sample = estimator(model, x_tilde, cond, **kwargs)
    return reduce(sigma**2 * per_sample, reduction)
