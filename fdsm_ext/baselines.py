"""Autograd score-matching baselines (SSM, SSM-VR, DSM, exact SM), same calling convention.

They are the best plain-autograd forms, for comparison with the FD losses: projections are
batched into one model call, and scalar models are differentiated twice (double backward).
``output``: "energy" or "log_density" for per-sample scalar models, "score" for score models;
"auto" accepts score models only (it cannot guess the sign of a scalar). The objectives:
docs/math.rst, :ref:`section "Score-matching objectives" <math-objectives>`.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) the double backward cannot work: FSDP
frees the gathered parameters after the first backward pass through the model, and the
second needs them. A model that is, or contains, an FSDP module (or a bound method of one)
is refused with a ValueError naming the FD losses, which need one ordinary backward.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._common import (
    check_callable,
    check_choice,
    check_int,
    check_reduction_output,
    check_x,
    model_score,
    per_sample_sigma,
    reduce,
    sort_model_args,
)
from ._random import NOISE, rademacher, resolve_seed, standard_normal, stream

__all__ = ["dsm_loss", "exact_sm_loss", "ssm_loss"]

_SCALAR_OUTPUTS = ("energy", "log_density")


def _check_not_sharded(model: Callable[..., Tensor], fn: str, alternative: str) -> None:
    """ValueError when ``model`` (or the module of a bound method) is or contains an FSDP2
    module: called only where the loss, or a backward through it, differentiates the model
    twice, which fails under fully_shard with torch's 'setStorage: ... out of bounds for
    storage of size 0' (the second pass reads parameters FSDP resharded after the first)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:  # never imported, so nothing can have been sharded (and no import cost)
        return
    owner = getattr(model, "__self__", model)
    if isinstance(owner, torch.nn.Module) and any(
        isinstance(m, fsdp.FSDPModule) for m in owner.modules()
    ):
        raise ValueError(
            f"{fn}: model is sharded with FSDP2 (fully_shard), and {fn} needs a double backward "
            "through it, which FSDP2 does not support (it frees the gathered parameters after "
            "the first backward pass; torch then fails with 'setStorage: ... out of bounds for "
            f"storage of size 0'); use {alternative}, which needs one ordinary backward, or "
            "an unsharded model"
        )


def ssm_loss(
    model: Callable[..., Tensor],
    x: Tensor,
    *model_args: Any,
    model_kwargs: Mapping[str, Any] | None = None,
    shared: Sequence[int | str] = (),
    noise: str = "rademacher",
    n_projections: int = 1,
    variance_reduction: bool = False,
    output: str = "auto",
    reduction: str = "mean",
    seed: int | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sliced score matching (Song et al. 2019) by autograd, u with E[u u^T] = I.

    Per sample, averaged over ``n_projections`` directions (evaluated in one model call)::

        1/2 (u^T s(x))^2 + u^T (ds/dx) u        (SSM)
        1/2 ||s(x)||^2   + u^T (ds/dx) u        (SSM-VR, variance_reduction=True)

    with s = grad log p by autograd for scalar models (then ds/dx is the Hessian, a double
    backward) or the model output for score models. ``noise``: "rademacher" | "gaussian".
    ``model_args``, ``model_kwargs``, ``shared``, ``seed`` and ``generator`` as in
    :func:`fdsm_ext.fd_ssm_loss`.
    """
    fn = "ssm_loss"
    check_callable(model, fn)
    check_x(x, fn, finite_differences=False)
    check_reduction_output(output, reduction, fn)
    check_choice("noise", noise, ("rademacher", "gaussian"), fn)
    check_int("n_projections", n_projections, 1, fn)
    # Scalar models: the Hessian term is a second backward inside the loss; score models:
    # training backpropagates through the input Jacobian's graph.
    if output in _SCALAR_OUTPUTS or torch.is_grad_enabled():
        _check_not_sharded(model, fn, "fdsm_ext.fd_ssm_loss")
    batch = x.shape[0]
    inputs = sort_model_args(model_args, model_kwargs, shared, batch, fn)
    key = resolve_seed(seed, generator, x.device, fn)
    x_rep = torch.cat([x] * n_projections) if n_projections > 1 else x
    args = inputs.repeat(n_projections)
    score, x_in = model_score(model, x_rep, args, output, fn, create_graph=True)
    u = (rademacher if noise == "rademacher" else standard_normal)(score, key)
    with torch.enable_grad():
        su = (score * u).sum(1)
        (jac_u,) = torch.autograd.grad(su.sum(), x_in, create_graph=True)
    u_jac_u = (jac_u.reshape_as(u) * u).sum(1)
    first = 0.5 * (score * score).sum(1) if variance_reduction else 0.5 * su**2
    per_sample = (first + u_jac_u).reshape(n_projections, batch).mean(0)
    return reduce(per_sample, reduction)


def dsm_loss(
    model: Callable[..., Tensor],
    x: Tensor,
    sigma: float | Tensor,
    *model_args: Any,
    model_kwargs: Mapping[str, Any] | None = None,
    shared: Sequence[int | str] = (),
    output: str = "auto",
    reduction: str = "mean",
    seed: int | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Denoising score matching (Vincent 2011): x~ = x + sigma z, z ~ N(0, I); per sample

        1/2 || s(x~) + (x~ - x)/sigma^2 ||^2 = 1/2 || s(x~) + z/sigma ||^2,

    with s the model output (score models, no derivative of the model) or grad log p by
    autograd (scalar models, a double backward in training). ``sigma``: number or (B,).
    ``model_args``, ``model_kwargs``, ``shared``, ``seed`` and ``generator`` as in
    :func:`fdsm_ext.fd_ssm_loss`; for the same seed z is that of :func:`fdsm_ext.fd_dsm_loss`.
    """
    fn = "dsm_loss"
    check_callable(model, fn)
    check_x(x, fn, finite_differences=False)
    check_reduction_output(output, reduction, fn)
    sigma = per_sample_sigma(sigma, x, fn)
    if output in _SCALAR_OUTPUTS and torch.is_grad_enabled():  # training backpropagates
        # through grad_x of the model; a score model's DSM is an ordinary backward
        _check_not_sharded(model, fn, "fdsm_ext.fd_dsm_loss")
    inputs = sort_model_args(model_args, model_kwargs, shared, x.shape[0], fn)
    key = resolve_seed(seed, generator, x.device, fn)
    z = standard_normal(x.reshape(x.shape[0], -1), stream(key, NOISE)).reshape_as(x)
    view = (-1,) + (1,) * (x.dim() - 1)
    x_tilde = x + sigma.view(view) * z
    score, _ = model_score(model, x_tilde, inputs, output, fn, create_graph=True)
    residual = score + (z / sigma.view(view)).reshape_as(score)
    return reduce(0.5 * (residual * residual).sum(1), reduction)


def exact_sm_loss(
    model: Callable[..., Tensor],
    x: Tensor,
    *model_args: Any,
    model_kwargs: Mapping[str, Any] | None = None,
    shared: Sequence[int | str] = (),
    output: str = "auto",
    reduction: str = "mean",
    create_graph: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Exact score matching (Hyvarinen 2005): per sample 1/2 ||s(x)||^2 + tr(ds/dx).

    The trace is summed from the d diagonal entries, ``chunk_size`` input dimensions at a
    time (default: about 1024 stacked rows per model call), each chunk one model call on
    ``chunk_size * B`` rows and one extra backward, so memory stays bounded for any d.
    ``create_graph=True`` keeps the graph for training; by default the value is detached.
    ``model_args``, ``model_kwargs`` and ``shared`` as in :func:`fdsm_ext.fd_ssm_loss`.
    """
    fn = "exact_sm_loss"
    check_callable(model, fn)
    check_x(x, fn, finite_differences=False)
    check_reduction_output(output, reduction, fn)
    batch, d = x.shape[0], x[0].numel()
    if chunk_size is None:
        chunk_size = max(1, min(d, 1024 // batch))
    check_int("chunk_size", chunk_size, 1, fn)
    # The trace of a scalar model is a second backward; create_graph keeps the first for one.
    if output in _SCALAR_OUTPUTS or (create_graph and torch.is_grad_enabled()):
        _check_not_sharded(model, fn, "fdsm_ext.fd_ssm_loss (a sliced estimate of J_SM)")
    inputs = sort_model_args(model_args, model_kwargs, shared, batch, fn)

    norm_term = None
    trace = torch.zeros(batch, dtype=x.dtype, device=x.device)
    for start in range(0, d, chunk_size):
        dims = torch.arange(start, min(d, start + chunk_size), device=x.device)
        copies = dims.numel()
        x_rep = torch.cat([x] * copies) if copies > 1 else x
        args = inputs.repeat(copies)
        score, x_in = model_score(model, x_rep, args, output, fn, create_graph=True)
        # Copy j differentiates its own score entry dims[j]: one backward gives a diagonal chunk.
        index = dims.view(-1, 1, 1).expand(copies, batch, 1)
        diag_out = score.reshape(copies, batch, d).gather(2, index)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(diag_out.sum(), x_in, create_graph=create_graph)
        diag = grad.reshape(copies, batch, d).gather(2, index)
        trace = trace + diag.sum((0, 2))
        if norm_term is None:
            first = score.reshape(copies, batch, d)[0]
            norm_term = 0.5 * (first * first).sum(1)
            if not create_graph:
                norm_term = norm_term.detach()
    per_sample = norm_term + trace
    return reduce(per_sample if create_graph else per_sample.detach(), reduction)

