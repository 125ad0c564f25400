"""Rounding floor of finite-difference values: a per-call guard and an eps suggestion.

A finite difference subtracts nearly equal model outputs, so the rounding of those outputs
is divided by a power of the step. Each output value y carries a rounding error of about
u*|y|, where u is the unit round-off of the precision the model computed in: the output
dtype's (float32 2^-24 = 6.0e-8, bfloat16 2^-8 = 3.9e-3, float16 2^-11 = 4.9e-4, float64
2^-53 = 1.1e-16), or, when ``torch.autocast`` is enabled for the input's device, the
larger autocast dtype's (an autocast model may return float32 from half-precision layers).
Per sample that gives (the "rounding floor"):

* FD-SSM, scalar model L (3 values, second difference scaled by d/eps^2):
  u * |L| * d / eps^2
* FD-SSM, score model s (v^T (s(x+v) - s(x-v)) scaled by d/(2 eps^2), ||v|| = eps; each
  component of s rounded independently): u * ||s|| * sqrt(d) / eps
* FD-DSM, random directions (loss = d/(2 eps^2) a^2, a = (L(x+v) - L(x-v))/2 + v^T target):
  u*|L| * sqrt(2 d loss)/eps + d (u*|L|)^2 / (2 eps^2)
* FD-DSM along the residual a (D = ||a|| (L(x+eps a^) - L(x-eps a^))/(2 eps), whose
  gradient is the DSM gradient): 10 * u*|L| * ||a|| / eps, against |D|; the factor 10 turns
  the rounding of D's value into that of its parameter gradient (measured: 3 to 17)
* fd_directional_derivative (sum_k beta_k f(x + gamma_k v)): u * sqrt(sum beta_k^2) * |f|

with |L|, ||s||, |f| averaged over the stacked rows. The guard compares the floor with the
typical per-sample value (the mean of |per-sample loss|, resp. of |derivative|) and raises
:class:`FDPrecisionWarning` once per call site when the ratio exceeds ``THRESHOLD`` = 0.3.
The floor is 1.5 to 3 times the standard deviation of the rounding noise measured below,
so at the threshold rounding adds a few percent to the variance of a per-sample value;
above it the batch mean drifts too (the squared first difference picks up a bias of about
d (u|L|)^2/(12 eps^2)). Near 1 the per-sample values are mostly rounding noise (the
ratio saturates there: the per-sample values it divides by are then noise themselves).
The floor ignores the averaging over the batch, which reduces zero-mean noise by sqrt(B)
but not that bias.

Measured (``python -m benchmarks.precision``, benchmarks/results/precision.md): an 8-d
energy MLP trained in float32 (held-out energies 70 to 86, exact J_SM -7.67), FD-SSM on
1000 held-out points, mean +- std over 50 direction seeds, and the guard's ratio:

=====================================  ===============  ===============  ===============
eps                                     0.1              0.3              0.6 / 1.0
=====================================  ===============  ===============  ===============
float32                                 -7.68 +- 0.28    -7.69 +- 0.28    (0.05: -7.68)
bfloat16 autocast                       -10.4 +- 5.0     -8.39 +- 0.71    -7.88 / -7.81
  guard ratio                           1.37             0.93             0.49 / quiet
bfloat16 autocast, float32 last layer   -6.73 +- 1.52    -7.62 +- 0.32    -7.69 +- 0.28
  guard ratio                           3.98             2.01             0.57
=====================================  ===============  ===============  ===============

float32 at eps 1e-3: -6.5 +- 1.6, 1e-4: 68 +- 184, 1e-5: -8600 +- 15000 (guard ratios
0.59 to 0.69). What works: float32 outputs with eps 0.01 to 0.3; under bfloat16 autocast,
a float32 last layer (run outside autocast on ``h.float()``) with eps >= 0.3, or eps near
1 (:func:`suggest_eps` gives 1.0 here, -7.81 +- 0.26; in float32 it gives 0.15). The guard
cannot see inside the model: under autocast it charges the autocast u to all of |L|, which
overestimates a float32 last layer's noise about 5x (it warned at eps 0.3 and 0.6 above,
where the loss was accurate; check against :func:`fdsm_ext.exact_sm_loss` on a batch, then
filter the warning), and a model that casts internally without autocast and returns
float32 is not seen at all.

On CUDA the check never synchronises: its two numbers are copied to pinned host memory
asynchronously and read on a later call once the copy has finished (so a warning can arrive
one call late); other devices read the two numbers at once. Under ``torch.compile`` tracing
and CUDA graph capture the guard is skipped. The check runs on the
first 8 calls of each call site and then on every 64th, until that site has warned.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["FDPrecisionWarning", "EpsSuggestion", "suggest_eps", "unit_roundoff"]

THRESHOLD = 0.3
# The rounding of D's value understates that of its parameter gradient (the backward pass
# of L(x~ +- eps a^) rounds too): measured in float32 against float64, the gradient's relative
# error was 3 to 17 times u*|L|*||a||/(eps |D|) on an MLP and two conv energies.
RESIDUAL_GRADIENT_FACTOR = 10.0
_EAGER_CALLS = 8
_EVERY = 64


class FDPrecisionWarning(UserWarning):
    """Rounding noise is a sizeable part (ratio > 0.3, see :mod:`fdsm_ext.precision`) of a
    finite-difference value."""


def unit_roundoff(dtype: torch.dtype, device_type: str | None = None) -> float:
    """u = eps_machine / 2 of ``dtype``; with ``device_type``, the larger of that and the
    autocast dtype's u when autocast is enabled for that device type."""
    u = torch.finfo(dtype).eps / 2
    if device_type is not None and torch.is_autocast_enabled(device_type):
        u = max(u, torch.finfo(torch.get_autocast_dtype(device_type)).eps / 2)
    return u


# ---------------------------------------------------------------------------------------
# The guard: one call per loss, after the fused op.


def guard_fd_ssm(
    fn: str, out: Tensor, per_sample: Tensor, scalar: bool, d: int, eps: float
) -> None:
    def floor(u: float) -> Tensor:
        if scalar:
            return u * out.abs().mean() * d / eps**2
        return u * out.reshape(out.shape[0], -1).norm(dim=1).mean() * math.sqrt(d) / eps

    what = "|L|*d/eps^2" if scalar else "||s||*sqrt(d)/eps"
    _guard(fn, out, floor, per_sample, f"u*{what} with d={d}, eps={eps:g}", "a larger eps")


def guard_fd_dsm(fn: str, out: Tensor, per_sample: Tensor, d: int, eps: float) -> None:
    def floor(u: float) -> Tensor:
        e = u * out.abs().mean()
        return e * torch.sqrt(2 * d * per_sample.mean()) / eps + d * e**2 / (2 * eps**2)

    _guard(fn, out, floor, per_sample, f"d={d}, eps={eps:g}", "a larger eps")


def guard_fd_dsm_residual(
    fn: str, out: Tensor, norm: Tensor, slope: Tensor, eps: float
) -> None:
    """``out``: the model outputs at x~ +- eps a^; ``norm``: ||a||; ``slope``: D per sample."""

    def floor(u: float) -> Tensor:
        return RESIDUAL_GRADIENT_FACTOR * u * out.abs().mean() * norm.mean() / eps

    _guard(fn, out, floor, slope, f"{RESIDUAL_GRADIENT_FACTOR:g}*u*|L|*||a||/eps, eps={eps:g}",
           "a larger eps")


def guard_directional_derivative(
    fn: str, y: Tensor, result: Tensor, weights: Sequence[float], order: int
) -> None:
    norm = math.sqrt(sum(w * w for w in weights))

    def floor(u: float) -> Tensor:
        return u * norm * y.abs().mean()

    _guard(fn, y, floor, result, f"order {order}, u*|f|*{norm:.3g}", "a larger ||v||")


def _guard(
    fn: str,
    out: Tensor,
    floor: Callable[[float], Tensor],
    value: Tensor,
    detail: str,
    remedy: str,
) -> None:
    """Compare floor(u) with mean |value|; warn (once per call site) above THRESHOLD."""
    if torch.compiler.is_compiling() or (
        out.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    ):
        return
    _poll_pending()
    site = _call_site()
    if not _due(site):
        return
    u = unit_roundoff(out.dtype, out.device.type)
    autocast = torch.is_autocast_enabled(out.device.type)
    precision = f"u={u:.2g}" + (" (autocast)" if autocast else f" ({out.dtype})")
    with torch.no_grad():
        numbers = torch.stack([floor(u).float(), value.detach().abs().mean().float()])
    context = (fn, site, precision, detail, remedy)
    if numbers.device.type != "cuda":
        _report(numbers.tolist(), context)
        return
    host = torch.empty(2, dtype=torch.float32, pin_memory=True)
    host.copy_(numbers, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    _pending.append((event, host, context))


# call site -> number of checked calls (-1 once it has warned)
_calls: dict[tuple[str, int], int] = {}
_pending: list[tuple[Any, Tensor, tuple]] = []
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _call_site() -> tuple[str, int, str]:
    """(filename, lineno, module) of the first frame outside fdsm_ext and torch."""
    frame = sys._getframe(2)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(
        (_PACKAGE_DIR, _TORCH_DIR)
    ):
        frame = frame.f_back
    return frame.f_code.co_filename, frame.f_lineno, frame.f_globals.get("__name__", "")


def _due(site: tuple[str, int, str]) -> bool:
    n = _calls.get(site[:2], 0)
    if n < 0:
        return False
    _calls[site[:2]] = n + 1
    return n < _EAGER_CALLS or n % _EVERY == 0


def _poll_pending() -> None:
    while _pending and _pending[0][0].query():
        _, host, context = _pending.pop(0)
        _report(host.tolist(), context)


def _report(numbers: list[float], context: tuple) -> None:
    floor, scale = numbers
    fn, site, precision, detail, remedy = context
    if not floor > THRESHOLD * scale or _calls.get(site[:2], 0) < 0:
        return
    _calls[site[:2]] = -1
    ratio = "inf" if scale == 0 else f"{floor / scale:.2f}"
    message = (
        f"{fn}: rounding noise of about {floor:.3g} per sample ({precision}, {detail}) "
        f"against typical per-sample values of {scale:.3g}: ratio {ratio} (warns above "
        f"{THRESHOLD}; near 1 the values are mostly rounding noise). Use {remedy} "
        "(fdsm_ext.suggest_eps), float32 model outputs, or under autocast float32 last "
        "layers (see fdsm_ext.precision). Warned once per call site."
    )
    filename, lineno, module = site
    warnings.warn_explicit(message, FDPrecisionWarning, filename, lineno, module)


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
    stops being smooth (1.0 suits data standardised per coordinate).
    """
    from .losses import fd_ssm_loss

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
