"""Finite-difference score-matching losses: one model call on a stacked batch, one backward.

Every loss is in the units of the exact score-matching objective
J_SM = E[1/2 ||grad log p||^2 + tr(Hess log p)], so its expectation over the random
directions equals J_SM up to O(eps^2). Derivations: docs/math.rst,
:ref:`section "FD-SSM" <math-fd-ssm>` and :ref:`section "FD-DSM" <math-fd-dsm>`. With
``derivatives="forward"`` the same estimators take their eps -> 0 limits exactly, by
forward-mode AD on the same directions (:ref:`section "Forward mode" <math-forward-mode>`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _forward
from . import _ops as ops
from ._common import (
    DSM_DIRECTIONS,
    NOISES,
    SCALAR,
    ModelArgs,
    call_model,
    check_callable,
    check_choice,
    check_int,
    check_positive,
    check_reduction_output,
    check_x,
    model_score,
    output_kind,
    per_sample_sigma,
    reduce,
    sort_model_args,
)
from ._forward import DERIVATIVES
from ._guard import (
    Probe,
    guard_directional_derivative,
    guard_fd_dsm,
    guard_fd_dsm_residual,
    guard_fd_ssm,
)
from ._random import NOISE, resolve_seed, standard_normal, stream
from .stencil import check_order_accuracy, fd_stencil

__all__ = ["fd_directional_derivative", "fd_dsm_loss", "fd_ssm_loss"]

# Stencil offsets, in units of v: the centre is needed only for scalar models.
_SCALAR_OFFSETS = (0.0, 1.0, -1.0)
_SCORE_OFFSETS = (1.0, -1.0)


def fd_ssm_loss(
    model: Callable[..., Tensor],
    x: Tensor,
    *model_args: Any,
    model_kwargs: Mapping[str, Any] | None = None,
    shared: Sequence[int | str] = (),
    eps: float = 0.1,
    output: str = "auto",
    noise: str = "sphere",
    n_projections: int = 1,
    variance_reduction: bool = True,
    reduction: str = "mean",
    seed: int | Tensor | None = None,
    generator: torch.Generator | None = None,
    derivatives: str = "fd",
) -> Tensor:
    """Finite-difference sliced score matching (Pang et al. 2020), one model call (plus the
    precision guard's occasional no-grad probe, below).

    Directions v with E[v v^T] = (eps^2/d) I (``noise``: "sphere" ||v|| = eps, "gaussian",
    "rademacher"), ``n_projections`` per sample, all evaluated in ONE call of ``model`` on
    the stacked batch. Per sample, averaged over projections:

    * scalar model (log-density L, or energy E = -L):
      (d/eps^2) [ 1/8 (L(x+v) - L(x-v))^2 + L(x+v) + L(x-v) - 2 L(x) ]      (3 blocks)
    * score model s, ``variance_reduction=True``:
      1/8 ||s(x+v) + s(x-v)||^2 + (d/(2 eps^2)) v^T (s(x+v) - s(x-v))      (2 blocks)
    * score model, ``variance_reduction=False``:
      (d/eps^2) [ 1/8 (v^T (s(x+v) + s(x-v)))^2 + 1/2 v^T (s(x+v) - s(x-v)) ]

    ``output``: "energy" or "log_density" for per-sample scalar models, "score" for score
    models; "auto" accepts score models only (per-sample scalars are refused: their sign is
    not guessable). ``reduction``: "mean" | "sum" | "none" (per-sample losses, shape (B,)).

    The model is called as ``model(x, *model_args, **model_kwargs)``. Every tensor among
    them with at least one dimension is per-sample (leading dimension B; repeated for each
    stacked copy of the batch) unless ``shared`` lists its position or keyword name; shapes
    are never used to guess. ``seed`` (an int or int64 tensor, traceable by torch.compile)
    or ``generator`` (eager only) fixes the random draws; by default they come from torch's
    default generator, the same in eager and compiled code.

    Error: truncation O(eps^2) in expectation over the directions (docs/math.rst,
    :ref:`section "FD-SSM" <math-fd-ssm>`) plus rounding: the model output's rounding adds noise of
    about u*|L|*d/eps^2 per sample (scalar models) or u*||s||*sqrt(d)/eps (score models),
    u the unit round-off of the output dtype or of an enabled autocast dtype, so eps must
    not be too small, and half-precision outputs need a larger eps or a float32 last layer.
    An :class:`fdsm_ext.FDPrecisionWarning` is raised once per call site when that noise is
    over 0.3 of the typical per-sample loss. For scalar models the guard also measures the
    model's own rounding noise, which can be far above u*|L| when the output is a small sum
    of large terms (freshly initialised networks): on the first calls at a call site and
    every 64th after, one extra no-grad model call on x and x +- w (||w|| = eps/100, where
    the true second difference is negligible; skipped in float64, under compile and with
    several processes). See :mod:`fdsm_ext.precision` and
    :func:`fdsm_ext.suggest_eps`; measured errors by dtype and eps:
    :doc:`the precision guide </guides/precision>` (docs/guides/precision.rst).

    ``derivatives="forward"`` computes the eps -> 0 limit of the same estimator exactly, by
    forward-mode AD (:func:`torch.func.jvp`), with the same directions v as ``"fd"`` for the
    same seed or generator. Per sample, averaged over projections:

    * scalar model: (d/eps^2) [ 1/2 (v^T grad L)^2 + v^T (Hess L) v ], both directional
      derivatives of L(x + t v) from one jvp of a jvp along v;
    * score model, ``variance_reduction=True``: 1/2 ||s||^2 + (d/eps^2) v^T J v; ``False``:
      (d/eps^2) [ 1/2 (v^T s)^2 + v^T J v ], with s and J v (J = ds/dx) from one jvp.

    eps only scales v and cancels (d/eps^2 times a quadratic form in v): no truncation, no
    rounding floor beyond ordinary rounding, so no precision guard. Cost: on the P B rows
    x, the nested jvp does roughly 2-3 forwards' work (one jvp about 2), against FD's one
    call on (1 + 2P) B (scalar) or 2P B (score) rows; then one ordinary backward, which
    reaches parameters captured by the model. Every op of the model needs a forward-mode AD
    rule; if one lacks it (some fused kernels such as the CPU flash attention of
    ``F.scaled_dot_product_attention``, a custom ``torch.autograd.Function`` without
    ``jvp``/``setup_context``), the call raises ``NotImplementedError`` naming the op, with
    the advice to use ``"fd"``. Under torch.compile, compile the whole loss (fullgraph
    works): a model compiled on its own runs eagerly inside ``torch.func.jvp``
    (PyTorch issue 128711). Under DistributedDataParallel, DDP rebuilds its gradient buckets
    in the first forward after the first backward, which fails inside the jvp ("Cannot access
    data pointer of Tensor that doesn't have storage"): call the DDP module once outside the
    loss after the first step (for example a forward on one sample), or use ``"fd"``.
    Pick ``"fd"`` for the fastest eager step and for any model (first-order autograd
    only); pick ``"forward"`` where FD's rounding matters (float32 or autocast with large
    d, small loss values) or under a compiled loss, where its cost comes closer to FD's.
    Formulas: docs/math.rst,
    :ref:`section "Forward mode" <math-forward-mode>`.
    """
    fn = "fd_ssm_loss"
    check_callable(model, fn)
    check_x(x, fn, finite_differences=True)
    check_positive("eps", eps, fn)
    check_reduction_output(output, reduction, fn)
    check_choice("noise", noise, NOISES, fn)
    check_int("n_projections", n_projections, 1, fn)
    check_choice("derivatives", derivatives, DERIVATIVES, fn)

    batch, event_shape = x.shape[0], x.shape[1:]
    x2 = x.reshape(batch, -1)
    d = x2.shape[1]
    inputs = sort_model_args(model_args, model_kwargs, shared, batch, fn)
    key = resolve_seed(seed, generator, x.device, fn)
    if derivatives == "forward":
        per_sample = _forward_ssm(
            model, x2, key, event_shape, inputs, output, noise, n_projections,
            variance_reduction, float(eps),
        )
        return reduce(per_sample, reduction)
    offsets = _SCALAR_OFFSETS if output in ("energy", "log_density") else _SCORE_OFFSETS
    stacked, v = ops.random_stencil_batch(x2, key, offsets, n_projections, noise, float(eps))
    n_blocks = stacked.shape[0] // batch
    out = call_model(
        model, stacked.reshape(-1, *event_shape), inputs.repeat(n_blocks), fn, batch=batch
    )
    kind, sign = output_kind(out, event_shape, output, fn)
    scale = d / eps**2
    if kind == SCALAR:
        per_sample = ops.fd_ssm_scalar(out.reshape(-1), n_projections, scale, sign)
    else:
        scores = out.reshape(out.shape[0], d)[-2 * n_projections * batch :]
        per_sample = ops.fd_ssm_score(scores, v, n_projections, variance_reduction, scale)
    guard_fd_ssm(fn, out, per_sample, kind == SCALAR, d, float(eps),
                 Probe(model, x2, event_shape, inputs))
    return reduce(per_sample, reduction)


def _directions(x2: Tensor, key: Tensor, n_projections: int, noise: str, eps: float) -> Tensor:
    """The directions v (P B, d) that the FD stencil of the same key uses (v does not depend
    on the stencil's offsets), without building its evaluation batch."""
    _, v = ops.random_stencil_batch(x2.detach(), key, (0.0,), n_projections, noise, eps)
    return v


def _tile(x2: Tensor, copies: int) -> Tensor:
    """copies stacked copies of x2, projection-major rows (p B + b) like v."""
    return x2.repeat(copies, 1) if copies > 1 else x2


def _forward_ssm(
    model: Callable[..., Tensor],
    x2: Tensor,
    key: Tensor,
    event_shape: torch.Size,
    inputs: ModelArgs,
    output: str,
    noise: str,
    n_projections: int,
    variance_reduction: bool,
    eps: float,
) -> Tensor:
    """Per-sample fd_ssm_loss(derivatives="forward"): the eps -> 0 limit, by jvp."""
    fn = "fd_ssm_loss"
    batch, d = x2.shape
    v = _directions(x2, key, n_projections, noise, eps)
    f = _forward.model_fn(model, event_shape, inputs.repeat(n_projections), fn, batch)
    scale = d / eps**2
    if output in ("energy", "log_density"):
        out, d1, d2 = _forward.jvp2(f, _tile(x2, n_projections), v, fn)
        _, sign = output_kind(out, event_shape, output, fn)
        d1, d2 = d1.reshape(-1), d2.reshape(-1)
        per_row = scale * (0.5 * d1**2 + sign * d2)
    else:
        s, jv = _forward.jvp(f, _tile(x2, n_projections), v, fn)
        output_kind(s, event_shape, output, fn)
        s, jv = s.reshape(-1, d), jv.reshape(-1, d)
        v_jv = (v * jv).sum(1)
        if variance_reduction:
            per_row = 0.5 * (s * s).sum(1) + scale * v_jv
        else:
            per_row = scale * (0.5 * (v * s).sum(1) ** 2 + v_jv)
    return per_row.reshape(n_projections, batch).mean(0)


def fd_dsm_loss(
    model: Callable[..., Tensor],
    x: Tensor,
    sigma: float | Tensor,
    *model_args: Any,
    model_kwargs: Mapping[str, Any] | None = None,
    shared: Sequence[int | str] = (),
    eps: float = 0.1,
    direction: str = "residual",
    n_projections: int = 1,
    output: str = "auto",
    reduction: str = "mean",
    seed: int | Tensor | None = None,
    generator: torch.Generator | None = None,
    derivatives: str = "fd",
) -> Tensor:
    """Finite-difference denoising score matching for scalar models.

    x~ = x + sigma z (z ~ N(0, I)); the DSM residual is a = grad L(x~) + (x~ - x)/sigma^2 and
    the DSM loss 1/2 ||a||^2. ``direction`` picks the estimator:

    * ``"residual"`` (default): DSM's own value and gradient, by first-order autograd only.
      grad_x L(x~) comes from one forward and one input-only backward on B rows (no
      create_graph, no parameter gradients); with a^ = a/||a|| (a detached) the per-sample loss

          1/2 ||a||^2 + D - sg(D),   D = ||a|| (L(x~ + eps a^) - L(x~ - eps a^)) / (2 eps)

      has the value 1/2 ||a||^2 exactly and, since d/dtheta 1/2 ||a||^2 = d/dtheta a_sg^T
      grad L(x~), the parameter gradient of DSM up to O(eps^2) (one model call on 2B rows,
      one ordinary backward). Gradients reach the model's parameters and tensor model
      arguments, not x or sigma. The default because it follows DSM's gradient, where one
      random direction adds slicing noise of the order of the gradient itself (derivation:
      docs/math.rst, :ref:`section "FD-DSM along the residual" <math-fd-dsm-residual>`;
      measured learning speed: :doc:`choosing an estimator </guides/choosing_an_estimator>`
      (docs/guides/choosing_an_estimator.rst)).
    * ``"random"``: the paper's estimator, v uniform on the sphere of radius eps; per sample

          (d/(2 eps^2)) ( 1/2 [L(x~+v) - L(x~-v)] + v^T (x~ - x)/sigma^2 )^2,

      averaged over ``n_projections`` directions v for the same x~ (2 P B rows, one call);
      its expectation over v is the DSM loss + O(eps^2), but its gradient is d (u^T a) J^T u
      (u = v/eps, J the Jacobian of grad L in theta) instead of J^T a: noise of the order of
      the gradient itself, which grows with d (docs/math.rst,
      :ref:`section "FD-DSM with random directions" <math-fd-dsm-random>`).

    ``sigma``: a number or a per-sample tensor (B,). Score models need no finite differences
    for DSM: use :func:`fdsm_ext.dsm_loss`. ``output``: "energy" or "log_density" ("auto"
    refuses per-sample scalars, whose sign it cannot guess). ``model_args``,
    ``model_kwargs``, ``shared``, ``seed`` and ``generator`` as in :func:`fd_ssm_loss` (z and
    v both follow the seed; for the same seed z is that of :func:`fdsm_ext.dsm_loss`).

    Precision (e ~ u*|L| the rounding of a model output, u as in :func:`fd_ssm_loss`):
    "residual": D carries about ||a|| e / eps, and its parameter gradient more, relative to
    abs(D) (the guard charges ``RESIDUAL_GRADIENT_FACTOR`` = 10 times the former);
    "random": the loss loses about e*sqrt(2 d loss)/eps + d e^2/(2 eps^2) per sample. An
    :class:`fdsm_ext.FDPrecisionWarning` is raised once per call site when that is over 0.3
    of the per-sample value (see :mod:`fdsm_ext.precision`). Truncation grows like
    (eps/sigma)^2 (the smoothed density curves on the scale of sigma): keep eps below the
    smallest sigma, and large enough for the rounding. Measured errors:
    :doc:`the precision guide </guides/precision>` (docs/guides/precision.rst) and
    :doc:`the FD-DSM results </results/fd_dsm>` (docs/results/fd_dsm.rst).

    ``derivatives="forward"``: the eps -> 0 limit, exactly, by one forward-mode pass
    (:func:`torch.func.jvp`) on B rows (``"residual"``) or P B rows (``"random"``, the same
    v as ``"fd"`` for the same seed), instead of the pair L(x~ +- step):

    * ``"residual"``: D = ||a|| (a^ . grad L(x~)), the jvp of L along a^; the loss
      1/2 ||a||^2 + D - sg(D) then has DSM's value and exactly DSM's parameter gradient;
    * ``"random"``: (d/(2 eps^2)) (v^T grad L(x~) + v^T (x~ - x)/sigma^2)^2.

    No truncation and no precision guard; the model's ops need forward-mode AD rules, and
    under torch.compile the whole loss should be compiled, as for :func:`fd_ssm_loss`,
    whose docstring says when to pick which. Formulas: docs/math.rst,
    :ref:`section "Forward mode" <math-forward-mode>`.
    """
    fn = "fd_dsm_loss"
    check_callable(model, fn)
    check_x(x, fn, finite_differences=True)
    check_positive("eps", eps, fn)
    check_choice("direction", direction, DSM_DIRECTIONS, fn)
    check_int("n_projections", n_projections, 1, fn)
    check_choice("derivatives", derivatives, DERIVATIVES, fn)
    if direction == "residual" and n_projections != 1:
        raise ValueError(
            f"{fn}: n_projections={n_projections} applies to direction='random' only; "
            "direction='residual' has one deterministic direction per sample (the residual)"
        )
    check_reduction_output(output, reduction, fn)
    if output == "score":
        raise ValueError(f"{fn}: output='score' needs no finite differences; use dsm_loss")
    batch, event_shape = x.shape[0], x.shape[1:]
    sigma = per_sample_sigma(sigma, x, fn)
    inputs = sort_model_args(model_args, model_kwargs, shared, batch, fn)

    key = resolve_seed(seed, generator, x.device, fn)
    x2 = x.reshape(batch, -1)
    z = standard_normal(x2, stream(key, NOISE))
    x_tilde = x2 + sigma[:, None] * z
    target = z / sigma[:, None]
    if direction == "residual":
        per_sample = _fd_dsm_residual(
            model, x_tilde, target, event_shape, inputs, output, eps, derivatives
        )
    else:
        per_sample = _fd_dsm_random(
            model, x_tilde, target, event_shape, inputs, output, eps, n_projections, key,
            derivatives,
        )
    return reduce(per_sample, reduction)


def _scalar_output(out: Tensor, event_shape: torch.Size, output: str, fn: str) -> float:
    """The sign that turns a scalar model output into a log-density; refuses scores."""
    kind, sign = output_kind(out, event_shape, output, fn)
    if kind != SCALAR:
        raise ValueError(
            f"{fn}: the model returned scores (shape {tuple(out.shape)}); DSM for score models "
            "needs no finite differences: use dsm_loss"
        )
    return sign


def _fd_dsm_residual(
    model: Callable[..., Tensor],
    x_tilde: Tensor,
    target: Tensor,
    event_shape: torch.Size,
    inputs: ModelArgs,
    output: str,
    eps: float,
    derivatives: str,
) -> Tensor:
    """Per-sample 1/2 ||a||^2 + D - sg(D) along the DSM residual a (see fd_dsm_loss)."""
    fn = "fd_dsm_loss"
    batch = x_tilde.shape[0]
    score, _ = model_score(
        model, x_tilde.detach().reshape(-1, *event_shape), inputs, output, fn, create_graph=False
    )
    residual = score.detach() + target
    norm = residual.norm(dim=1)
    # A zero residual (the model's score is exact here) has no direction: D is then 0.
    unit = residual / torch.where(norm > 0, norm, 1.0)[:, None]
    if derivatives == "forward":
        f = _forward.model_fn(model, event_shape, inputs, fn, batch)
        out, d1 = _forward.jvp(f, x_tilde.detach(), unit, fn)
        slope = norm * _scalar_output(out, event_shape, output, fn) * d1.reshape(-1)
        return 0.5 * norm**2 + (slope - slope.detach())
    stacked = ops.stencil_batch(x_tilde.detach(), eps * unit, list(_SCORE_OFFSETS))
    f = call_model(model, stacked.reshape(-1, *event_shape), inputs.repeat(2), fn, batch=batch)
    sign = _scalar_output(f, event_shape, output, fn)
    f = sign * f.reshape(2, batch)
    slope = norm * (f[0] - f[1]) / (2 * eps)
    guard_fd_dsm_residual(fn, f, norm, slope, float(eps))
    return 0.5 * norm**2 + (slope - slope.detach())


def _fd_dsm_random(
    model: Callable[..., Tensor],
    x_tilde: Tensor,
    target: Tensor,
    event_shape: torch.Size,
    inputs: ModelArgs,
    output: str,
    eps: float,
    n_projections: int,
    key: Tensor,
    derivatives: str,
) -> Tensor:
    """Per-sample paper FD-DSM, averaged over n_projections sphere directions."""
    fn = "fd_dsm_loss"
    batch = x_tilde.shape[0]
    scale = x_tilde.shape[1] / (2 * eps**2)
    # Rows of v are projection-major (p B + b), so the targets tile the same way (a view for
    # one projection, a copy only for several).
    targets = target.expand(n_projections, *target.shape).reshape(-1, target.shape[1])
    if derivatives == "forward":
        v = _directions(x_tilde, key, n_projections, "sphere", float(eps))
        f = _forward.model_fn(model, event_shape, inputs.repeat(n_projections), fn, batch)
        out, d1 = _forward.jvp(f, _tile(x_tilde, n_projections), v, fn)
        sign = _scalar_output(out, event_shape, output, fn)
        per_row = scale * (sign * d1.reshape(-1) + (v * targets).sum(1)) ** 2
        return per_row.reshape(n_projections, batch).mean(0)
    stacked, v = ops.random_stencil_batch(
        x_tilde, key, _SCORE_OFFSETS, n_projections, "sphere", float(eps)
    )
    out = call_model(
        model, stacked.reshape(-1, *event_shape), inputs.repeat(2 * n_projections), fn,
        batch=batch,
    )
    sign = _scalar_output(out, event_shape, output, fn)
    per_row = ops.fd_dsm_scalar(out.reshape(-1), v, targets, scale, sign)
    guard_fd_dsm(fn, out, per_row, x_tilde.shape[1], float(eps))
    return per_row.reshape(n_projections, batch).mean(0)


def fd_directional_derivative(
    f: Callable[[Tensor], Tensor], x: Tensor, v: Tensor, order: int = 1, accuracy: int = 2
) -> Tensor:
    """d^T/dt^T f(x + t v) at t = 0 by a central stencil, with ONE call of ``f``.

    sum_k beta_k f(x + gamma_k v) with (gamma, beta) = fd_stencil(order, accuracy). ``f``
    maps ``(N, *event_shape)`` to per-sample values (N,) or tensors (N, ...); the result has
    shape (B, ...) and is differentiable in x, v and f's parameters.

    Error: truncation O(||v||^(order + accuracy)) (relative: O(||v||^accuracy)) PLUS
    rounding: each f value carries about u*|f| (u the unit round-off of f's output dtype, or
    of an enabled autocast dtype), so the result carries about u*sqrt(sum beta_k^2)*|f|, a
    relative error ``~ u*|f| / (||v||^order * |f^(order)|)`` that GROWS as ||v|| shrinks,
    the faster the higher the order (the stencils: docs/math.rst,
    :ref:`section "General order-T stencils" <math-stencils>`). An
    :class:`fdsm_ext.FDPrecisionWarning` is raised once per call site when that estimate
    exceeds 0.3 of the mean absolute result.

    Choosing ||v||: for f varying on the length ``scale`` along v (``|g^(m)| ~ |f|/scale^m``,
    g(t) = f(x + t v/||v||)), the relative error is about ``c (h/scale)^p + u ||beta||
    (scale/h)^T`` at ``||v|| = h`` (T = ``order``, p = ``accuracy``, ``||beta||`` =
    ``sqrt(sum beta_k^2)``, ``c = |sum_k beta_k gamma_k^(T+p)| / (T+p)!``), smallest at
    ``h* = scale (T u ||beta|| / (p c))^(1/(T+p))``, which
    :func:`fdsm_ext.suggest_step(order, accuracy, dtype, scale) <fdsm_ext.suggest_step>`
    returns. The higher the order, the larger the step. Measured errors:
    :doc:`the precision guide </guides/precision>` (docs/guides/precision.rst).
    """
    fn = "fd_directional_derivative"
    check_callable(f, fn, name="f")
    check_x(x, fn, finite_differences=True)
    check_order_accuracy(order, accuracy, fn)
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
    y = call_model(f, stacked.reshape(-1, *event_shape), ModelArgs(), fn, batch=batch)
    combined = ops.fd_combine(y.reshape(y.shape[0], -1), [float(w) for w in weights])
    guard_directional_derivative(fn, y, combined, [float(w) for w in weights], order)
    return combined.reshape(batch, *y.shape[1:])

