"""Rounding floor of finite-difference values: a per-call guard, an eps suggestion for the
FD losses (:func:`suggest_eps`) and a step suggestion for
:func:`fdsm_ext.fd_directional_derivative` (:func:`suggest_step`).

A finite difference subtracts nearly equal model outputs, so the rounding of those outputs
is divided by a power of the step. Each output value y carries a rounding error of about
``u*|y|``, where u is the unit round-off of the precision the model computed in: the output
dtype's (float32 2^-24 = 6.0e-8, bfloat16 2^-8 = 3.9e-3, float16 2^-11 = 4.9e-4, float64
2^-53 = 1.1e-16), or, when ``torch.autocast`` is enabled for the input's device, the
larger autocast dtype's (an autocast model may return float32 from half-precision layers).
Per sample that gives (the "rounding floor"):

* FD-SSM, scalar model L (3 values, second difference scaled by d/eps^2): the larger of
  the formula ``e * d / eps^2 + d e^2 / (12 eps^2)``, ``e = u * |L|``, and a measurement,
  the rounding probe (below); the second term is the bias of the squared first difference,
  which matters only once e is of order 1 or more (a large output in half precision)
* FD-SSM, score model s (``v^T (s(x+v) - s(x-v))`` scaled by d/(2 eps^2), ``||v|| = eps``;
  each component of s rounded independently): ``u * ||s|| * sqrt(d) / eps``
* FD-DSM, random directions (loss ``= d/(2 eps^2) r^2``,
  ``r = (L(x+v) - L(x-v))/2 + v^T target``):
  ``u*|L| * sqrt(2 d loss)/eps + d (u*|L|)^2 / (2 eps^2)``
* FD-DSM along the residual a (``D = ||a|| (L(x+eps a^) - L(x-eps a^))/(2 eps)``, whose
  gradient is the DSM gradient): ``RESIDUAL_GRADIENT_FACTOR * u*|L| * ||a|| / eps``,
  against ``|D|``; the empirical factor 10 turns the rounding of D's value into that of its
  parameter gradient (the backward pass rounds too)
* fd_directional_derivative (``sum_k beta_k f(x + gamma_k v)``):
  ``u * sqrt(sum beta_k^2) * |f|``

with ``|L|``, ``||s||``, ``|f|`` averaged over the stacked rows (derivations: docs/math.rst,
:ref:`section "Precision: the rounding floor" <math-precision>`).

The formulas charge the rounding of the model's output only. Where the output is small
against the values inside the network, as in a freshly initialised one (random-signed sums
that nearly cancel), the output carries many times ``u*|L|``: on a freshly initialised
784-256-256-1 MLP energy in float32 at eps 0.1, FD-SSM's per-sample values are mostly
rounding noise while the formula stays far below the threshold
(python_tests/test_guard_fresh_models.py). The **rounding probe** measures that noise for
scalar FD-SSM: in float32 or coarser, on the first check of a call site and on every
periodic one (the checks in between reuse its value), the guard calls the model once more,
without gradients, on the 3B rows x, x + w, x - w with ``||w|| = eps/100``, where the true
second difference is 10^-4 of that at eps and what remains is the rounding of the inputs,
of every layer and of the output. Its rms over the batch, times ``d/eps^2`` and
``sqrt((4 + 2/P)/6)`` for P projections (the centre L(x) is shared by the projections), is
the measured floor (plus the same bias term, with the measured rounding of one output,
``r/sqrt(6)``, for ``e/sqrt(3)``); the guard takes the larger of it and the formula.
Measured against float64 (the tests above and the precision section of the benchmarks
page), it is close to the actual float32 rounding error where the model's output is small
against its inner values; where the output is large, rounding that stays correlated over the
probe's small step (the last layers') escapes it, and the floor can be about half the
actual error. The probe draws no random numbers (w has the signs of
a hash of the index), runs under ``torch.no_grad`` with the global random state forked
(dropout inside the model draws nothing from it), and restores the buffers of an
``nn.Module`` model (batch-norm statistics) afterwards; an exception in it is ignored. It
does not run in float64, where its cost would buy nothing, in runs of several processes (a
DDP or FSDP model's forward is a collective, and the guard's schedule can differ between
ranks), nor under compilation (the guard is off there). Under autocast the rows are cast to
a coarser dtype, in which x, x + w and x - w would round alike; the probe then also shifts
x +- w by pseudo-random fractions (within +-1/2) of that dtype's rounding step, so that each
row's cast rounds on its own, as those of x +- v do.

The guard compares the floor with the typical per-sample value (the mean of
``|per-sample loss|``, resp. of ``|derivative|``) and raises
:class:`~fdsm_ext.FDPrecisionWarning` once per call site when the ratio exceeds
``THRESHOLD`` = 0.3. The floor estimates the size of the rounding noise of one
per-sample value to within a small factor (the precision guide compares it with measured
float32-against-float64 errors), so at the threshold the per-sample values are already
noisy; above it the batch mean drifts too: the rounding of the centre value L(x) is the
same for every projection, so averaging over projections does not remove it, only averaging
over the batch does (and the squared first difference picks up a bias of about
``d (u|L|)^2/(12 eps^2)``). From ``NOISE_LEVEL`` = 0.5 on, the warning says that the
per-sample values are dominated by rounding and the loss is noise: the ratio cannot show
more than that, since it stays of order 1 however small eps gets (the per-sample values it
divides by are then rounding noise themselves). The floor ignores the averaging over the
batch, which reduces zero-mean noise by sqrt(B) but not that bias.

The formulas cannot see inside the model: under autocast the guard charges the autocast u
to all of ``|L|``, which overestimates the noise of a model whose last layer runs in float32
(check such a model against :func:`fdsm_ext.exact_sm_loss` on a batch, then filter the
warning), and a model that casts to half precision internally without autocast and returns
float32 is charged float32's u; the probe's small step mostly leaves its half-precision
inputs unchanged, so it does not see that rounding either.
Measured errors of FD-SSM under float32, bfloat16 autocast and tiny eps, the guard's
verdicts and what works: :doc:`the precision guide </guides/precision>`
(docs/guides/precision.rst).

On CUDA the check never synchronises: its two numbers are copied to pinned host memory
asynchronously and read on a later call once the copy has finished (so a warning can arrive
one call late); other devices read the two numbers at once. Under ``torch.compile`` tracing
and CUDA graph capture the guard is skipped. The check runs on the
first 8 calls of each call site and then on every 64th, until that site has warned; the
rounding probe (scalar FD-SSM, float32 or coarser) adds one gradient-free model call on 3B
rows to the first of these and to every 64th.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

# The guard lives in the private module _guard, which the losses import; this module adds
# suggest_eps (which calls the losses) and is the public home of the names below.
from ._guard import (  # noqa: F401  (re-exported; _calls: tests reset the per-site state)
    NOISE_LEVEL,
    RESIDUAL_GRADIENT_FACTOR,
    THRESHOLD,
    FDPrecisionWarning,
    _calls,
    unit_roundoff,
)
from .losses import fd_ssm_loss
from .stencil import check_order_accuracy, fd_stencil

__all__ = ["FDPrecisionWarning", "EpsSuggestion", "suggest_eps", "suggest_step", "unit_roundoff"]


# ---------------------------------------------------------------------------------------
# The eps suggestion: truncation A eps^2 against rounding B / eps^p.


class EpsSuggestion(NamedTuple):
    """eps minimising A*eps^2 + B/eps^p, with the estimated A and B.

    truncation: A, the FD-SSM bias of the batch mean is about A*eps^2;
    rounding: B, the per-sample rounding floor is B/eps^p (p = 2 scalar, 1 score models);
    unit_roundoff: the u that B was computed with.
    """

    eps: float
    truncation: float
    rounding: float
    unit_roundoff: float


def suggest_eps(
    model: Callable[..., Tensor],
    x: Tensor,
    *model_args: Any,
    output: str = "auto",
    dtype: torch.dtype | None = None,
    eps_max: float = 1.0,
    levels: int = 9,
    seed: int = 0,
) -> EpsSuggestion:
    """An eps for :func:`fdsm_ext.fd_ssm_loss` (sphere directions) on this model and batch.

    Minimises truncation + rounding, A*eps^2 + B/eps^p, at ``eps* = (p B / (2 |A|))^(1/(p+2))``:

    * B = u*mean|L|*d (p = 2, scalar models) or u*mean||s||*sqrt(d) (p = 1, score models),
      the rounding floor of the module docstring, with u the unit round-off of ``dtype``
      (default: the model output's dtype under the current autocast state, so calling this
      inside ``torch.autocast`` plans for it);
    * A by Richardson extrapolation: F(h), the batch-mean loss with the same directions at
      h = eps_max/2^k (k < ``levels``), computed with autocast disabled in x's dtype, gives
      A ~ (F(2h) - F(h)) / (3 h^2). The smallest h whose difference exceeds 10 times its
      own rounding noise is used; if none does, A is bounded by that noise at the largest
      h (a conservative, smaller eps).

    The result is clamped to [eps_max/2^(levels-1), eps_max]. Costs ``levels + 1`` model
    calls on 2 or 3 stacked copies of x. eps_max should be on the scale where the model
    stops being smooth (1.0 suits data standardised per coordinate). Derivation:
    docs/math.rst, :ref:`section "Choosing eps: truncation against rounding"
    <math-suggest-eps>`.
    """
    fn = "suggest_eps"
    with torch.no_grad():
        out = model(x, *model_args)
    scalar = output in ("energy", "log_density")
    if not isinstance(out, Tensor):
        raise TypeError(f"{fn}: the model must return a tensor, got {type(out).__name__}")
    d = x[0].numel()
    u = torch.finfo(dtype).eps / 2 if dtype is not None else unit_roundoff(
        out.dtype, x.device.type
    )
    if scalar:
        size, power = float(out.abs().mean()), 2
    else:
        size, power = float(out.reshape(out.shape[0], -1).norm(dim=1).mean()), 1
    rounding = u * size * d if scalar else u * size * math.sqrt(d)

    steps = [eps_max / 2**k for k in range(levels)]
    no_autocast = torch.autocast(x.device.type, enabled=False)
    with no_autocast, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FDPrecisionWarning)
        values = [
            fd_ssm_loss(model, x, *model_args, eps=h, output=output,
                        generator=torch.Generator(x.device).manual_seed(seed)).item()
            for h in steps
        ]
    u_x = torch.finfo(x.dtype).eps / 2
    batch_noise = (u_x * size * (d if scalar else math.sqrt(d))) / math.sqrt(x.shape[0])
    truncation = None
    for k in range(1, levels):
        h = steps[k]
        noise = 2 * batch_noise / h**power
        if abs(values[k - 1] - values[k]) > 10 * noise:
            truncation = (values[k - 1] - values[k]) / (3 * h**2)
    if truncation is None:
        truncation = 10 * 2 * batch_noise / steps[1] ** power / (3 * steps[1] ** 2)
    eps = (power * rounding / (2 * abs(truncation))) ** (1 / (power + 2))
    eps = min(max(eps, steps[-1]), eps_max)
    return EpsSuggestion(eps, truncation, rounding, u)


# ---------------------------------------------------------------------------------------
# The step of fd_directional_derivative: truncation c (h/scale)^p against rounding
# u ||beta|| (scale/h)^T, both relative to the derivative.


def suggest_step(
    order: int, accuracy: int = 2, dtype: torch.dtype = torch.float32, scale: float = 1.0
) -> float:
    """A step ``||v||`` for :func:`fdsm_ext.fd_directional_derivative` of ``order`` T and
    ``accuracy`` p, for a function that varies on the length ``scale`` along v.

    With (gamma, beta) = ``fd_stencil(T, p)`` and g(t) = f(x + t v^), v^ = v/||v||, the
    stencil's result at step h relative to ``g^(T)`` carries

    * truncation ``c (h/scale)^p``, ``c = |sum_k beta_k gamma_k^(T+p)| / (T+p)!`` (the first
      moment the stencil does not cancel), taking ``|g^(m)| ~ |f| / scale^m``;
    * rounding ``u sqrt(sum_k beta_k^2) (scale/h)^T``, u = ``torch.finfo(dtype).eps / 2``
      (the floor of :mod:`fdsm_ext.precision`, each f value rounded by about u*|f|).

    Their sum is smallest at ``h* = scale * (T u sqrt(sum beta^2) / (p c))^(1/(T+p))``,
    where the relative error is about ``(1 + p/T) c (h*/scale)^p``. Higher orders want larger
    steps: the rounding term grows like ``h^-T``. Derivation: docs/math.rst,
    :ref:`section "General order-T stencils" <math-stencils>`; the precision guide
    (docs/guides/precision.rst) has an example.
    """
    fn = "suggest_step"
    check_order_accuracy(order, accuracy, fn)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{fn}: scale must be a finite number > 0, got {scale!r}")
    offsets, weights = fd_stencil(order, accuracy)
    moment = abs(sum(w * g ** (order + accuracy) for g, w in zip(offsets, weights)))
    c = float(moment) / math.factorial(order + accuracy)
    b = math.sqrt(sum(float(w) ** 2 for w in weights))
    u = torch.finfo(dtype).eps / 2
    return scale * (order * u * b / (accuracy * c)) ** (1 / (order + accuracy))
