"""Finite-difference score-matching losses: one model call on a stacked batch, one backward.

Every loss is in the units of the exact score-matching objective
J_SM = E[1/2 ||grad log p||^2 + tr(Hess log p)], so its expectation over the random
directions equals J_SM up to O(eps^2) (see MATH.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _ops as ops
from ._common import (
    NOISES,
    SCALAR,
    call_model,
    check_choice,
    check_int,
    check_positive,
    check_reduction_output,
    check_x,
    output_kind,
    per_sample_sigma,
    randn_like,
    reduce,
    repeat_args,
)
from .stencil import check_order_accuracy, fd_stencil

# Stencil offsets, in units of v: the centre is needed only for scalar models.
_SCALAR_OFFSETS = (0.0, 1.0, -1.0)
_SCORE_OFFSETS = (1.0, -1.0)


def fd_ssm_loss(
    model: Callable[..., Tensor],
    x: Tensor,
    *model_args: Any,
    eps: float = 0.1,
    output: str = "auto",
    noise: str = "sphere",
    n_projections: int = 1,
    variance_reduction: bool = True,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Finite-difference sliced score matching (Pang et al. 2020), one model call.

    Directions v with E[v v^T] = (eps^2/d) I (``noise``: "sphere" ||v|| = eps, "gaussian",
    "rademacher"), ``n_projections`` per sample, all evaluated in ONE call of ``model`` on
    the stacked batch. Per sample, averaged over projections:

    * scalar model (log-density L, or energy E = -L):
      (d/eps^2) [ 1/8 (L(x+v) - L(x-v))^2 + L(x+v) + L(x-v) - 2 L(x) ]      (3 blocks)
    * score model s, ``variance_reduction=True``:
      1/8 ||s(x+v) + s(x-v)||^2 + (d/(2 eps^2)) v^T (s(x+v) - s(x-v))      (2 blocks)
    * score model, ``variance_reduction=False``:
      (d/eps^2) [ 1/8 (v^T (s(x+v) + s(x-v)))^2 + 1/2 v^T (s(x+v) - s(x-v)) ]

    ``output`` "auto" treats per-sample scalars as log-densities and x-shaped outputs as
    scores; it evaluates the centre block too (the model's kind is unknown before the call),
    so declare ``output="score"`` to save that third of the work. Tensor ``model_args``
    with leading dimension B are repeated for every stacked copy of the batch.
    ``reduction``: "mean" | "sum" | "none" (per-sample losses, shape (B,)).
    """
    fn = "fd_ssm_loss"
    check_x(x, fn, finite_differences=True)
    check_positive("eps", eps)
    check_reduction_output(output, reduction)
    check_choice("noise", noise, NOISES)
    check_int("n_projections", n_projections, 1)

    batch, event_shape = x.shape[0], x.shape[1:]
    x2 = x.reshape(batch, -1)
    d = x2.shape[1]
    offsets = _SCORE_OFFSETS if output == "score" else _SCALAR_OFFSETS
    seed = ops.draw_seed(x.device, generator)
    stacked, v = ops.random_stencil_batch(x2, seed, offsets, n_projections, noise, float(eps))
    n_blocks = stacked.shape[0] // batch
    out = call_model(
        model, stacked.reshape(-1, *event_shape), repeat_args(model_args, batch, n_blocks), fn
    )
    kind, sign = output_kind(out, event_shape, output, fn)
    scale = d / eps**2
    if kind == SCALAR:
        per_sample = ops.fd_ssm_scalar(out.reshape(-1), n_projections, scale, sign)
    else:
        scores = out.reshape(out.shape[0], d)[-2 * n_projections * batch :]
        per_sample = ops.fd_ssm_score(scores, v, n_projections, variance_reduction, scale)
    return reduce(per_sample, reduction)


def fd_dsm_loss(
    model: Callable[..., Tensor],
    x: Tensor,
    sigma: float | Tensor,
    *model_args: Any,
    eps: float = 0.1,
    output: str = "auto",
    reduction: str = "mean",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Finite-difference denoising score matching for scalar models, one model call.

    x~ = x + sigma z (z ~ N(0, I)), v uniform on the sphere of radius eps; per sample

        (d/(2 eps^2)) ( 1/2 [L(x~+v) - L(x~-v)] + v^T (x~ - x)/sigma^2 )^2,

    whose expectation over v is 1/2 ||grad L(x~) + (x~ - x)/sigma^2||^2 + O(eps^2), the DSM
    loss. ``sigma``: a number or a per-sample tensor (B,). Score models need no finite
    differences for DSM: use :func:`fdsm_ext.dsm_loss`.
    """
    fn = "fd_dsm_loss"
    check_x(x, fn, finite_differences=True)
    check_positive("eps", eps)
    check_reduction_output(output, reduction)
    if output == "score":
        raise ValueError(f"{fn}: output='score' needs no finite differences; use dsm_loss")
    batch, event_shape = x.shape[0], x.shape[1:]
    sigma = per_sample_sigma(sigma, x, fn)

    z = randn_like(x, generator).reshape(batch, -1)
    x_tilde = x.reshape(batch, -1) + sigma[:, None] * z
    target = z / sigma[:, None]
    seed = ops.draw_seed(x.device, generator)
    stacked, v = ops.random_stencil_batch(x_tilde, seed, _SCORE_OFFSETS, 1, "sphere", float(eps))
    out = call_model(
        model, stacked.reshape(-1, *event_shape), repeat_args(model_args, batch, 2), fn
    )
    kind, sign = output_kind(out, event_shape, output, fn)
    if kind != SCALAR:
        raise ValueError(
            f"{fn}: the model returned scores (shape {tuple(out.shape)}); DSM for score models "
            "needs no finite differences: use dsm_loss"
        )
    scale = x_tilde.shape[1] / (2 * eps**2)
    per_sample = ops.fd_dsm_scalar(out.reshape(-1), v, target, scale, sign)
    return reduce(per_sample, reduction)


def fd_directional_derivative(
    f: Callable[[Tensor], Tensor], x: Tensor, v: Tensor, order: int = 1, accuracy: int = 2
) -> Tensor:
    """d^T/dt^T f(x + t v) at t = 0 by a central stencil, with ONE call of ``f``.

    sum_k beta_k f(x + gamma_k v) with (gamma, beta) = fd_stencil(order, accuracy); the
    error is O(||v||^(order + accuracy)). ``f`` maps ``(N, *event_shape)`` to per-sample
    values (N,) or tensors (N, ...); the result has shape (B, ...) and is differentiable in x, v and
    f's parameters.
    """
    fn = "fd_directional_derivative"
    check_x(x, fn, finite_differences=True)
    check_order_accuracy(order, accuracy)
    if not isinstance(v, Tensor) or v.shape != x.shape or v.dtype != x.dtype:
        raise ValueError(
            f"{fn}: v must be a tensor with x's shape {tuple(x.shape)} and dtype {x.dtype}; "
            f"got {tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}"
        )
    offsets, weights = fd_stencil(order, accuracy)
    batch, event_shape = x.shape[0], x.shape[1:]
    stacked = ops.stencil_batch(
        x.reshape(batch, -1), v.reshape(batch, -1), [float(g) for g in offsets]
    )
    y = call_model(f, stacked.reshape(-1, *event_shape), (), fn)
    combined = ops.fd_combine(y.reshape(y.shape[0], -1), [float(w) for w in weights])
    return combined.reshape(batch, *y.shape[1:])

