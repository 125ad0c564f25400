"""The precision guard: compares the rounding floor of a finite-difference value with the
value itself and warns (:class:`fdsm_ext.FDPrecisionWarning`) when rounding dominates.

Private; the public side (the floor formulas, :func:`fdsm_ext.suggest_eps`,
:class:`fdsm_ext.FDPrecisionWarning`, :func:`fdsm_ext.unit_roundoff`) is
:mod:`fdsm_ext.precision`, which re-exports what this module defines. It imports neither
``fdsm_ext.precision`` nor ``fdsm_ext.losses``, so the losses can use it while
``precision.suggest_eps`` calls the losses. The floors are derived in docs/math.rst,
:ref:`section "Precision: the rounding floor" <math-precision>`.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

THRESHOLD = 0.3
# Above NOISE_LEVEL the message says plainly that the values are rounding noise: the ratio
# stays of order 1 however small eps gets, because the values it divides by are then
# rounding noise themselves (floor / mean |noise| stays near 1).
NOISE_LEVEL = 0.5
# The rounding of D's value understates that of its parameter gradient (the backward pass
# of L(x~ +- eps a^) rounds too): an empirical factor, from float32 against float64 gradients
# on an MLP and two conv energies (the precision guide, docs/guides/precision.rst, has the
# measurement; docs/math.rst, section "Precision: the rounding floor", the floor).
RESIDUAL_GRADIENT_FACTOR = 10.0
_EAGER_CALLS = 8
LARGER_EPS = "a larger eps (fdsm_ext.suggest_eps)"
_EVERY = 64


class FDPrecisionWarning(UserWarning):
    """Rounding noise is a sizeable part (ratio > 0.3, see :mod:`fdsm_ext.precision`) of a
    finite-difference value."""


# Public as fdsm_ext.precision.FDPrecisionWarning (and fdsm_ext.FDPrecisionWarning): keep that
# name in reprs, pickles and ``-W error::fdsm_ext.precision.FDPrecisionWarning`` filters.
FDPrecisionWarning.__module__ = "fdsm_ext.precision"


def unit_roundoff(dtype: torch.dtype, device_type: str | None = None) -> float:
    """u = eps_machine / 2 of ``dtype``; with ``device_type``, the larger of that and the
    autocast dtype's u when autocast is enabled for that device type."""
    u = torch.finfo(dtype).eps / 2
    if device_type is not None and torch.is_autocast_enabled(device_type):
        u = max(u, torch.finfo(torch.get_autocast_dtype(device_type)).eps / 2)
    return u


unit_roundoff.__module__ = "fdsm_ext.precision"


# ---------------------------------------------------------------------------------------
# The guard: one call per loss, after the fused op.


def guard_fd_ssm(
    fn: str, out: Tensor, per_sample: Tensor, scalar: bool, d: int, eps: float
) -> None:
    def floor(u: float, out: Tensor) -> Tensor:
        if scalar:
            return u * out.abs().mean() * d / eps**2
        return u * out.reshape(out.shape[0], -1).norm(dim=1).mean() * math.sqrt(d) / eps

    what = "|L|*d/eps^2" if scalar else "||s||*sqrt(d)/eps"
    _guard(fn, out, floor, per_sample, f"u*{what} with d={d}, eps={eps:g}", LARGER_EPS)


def guard_fd_dsm(fn: str, out: Tensor, per_sample: Tensor, d: int, eps: float) -> None:
    def floor(u: float, out: Tensor) -> Tensor:
        e = u * out.abs().mean()
        return e * torch.sqrt(2 * d * per_sample.mean()) / eps + d * e**2 / (2 * eps**2)

    _guard(fn, out, floor, per_sample, f"d={d}, eps={eps:g}", LARGER_EPS)


def guard_fd_dsm_residual(
    fn: str, out: Tensor, norm: Tensor, slope: Tensor, eps: float
) -> None:
    """``out``: the model outputs at x~ +- eps a^; ``norm``: ||a||; ``slope``: D per sample."""

    def floor(u: float, out: Tensor) -> Tensor:
        return RESIDUAL_GRADIENT_FACTOR * u * out.abs().mean() * norm.mean() / eps

    _guard(fn, out, floor, slope, f"{RESIDUAL_GRADIENT_FACTOR:g}*u*|L|*||a||/eps, eps={eps:g}",
           LARGER_EPS)


def guard_directional_derivative(
    fn: str, y: Tensor, result: Tensor, weights: Sequence[float], order: int
) -> None:
    norm = math.sqrt(sum(w * w for w in weights))

    def floor(u: float, y: Tensor) -> Tensor:
        return u * norm * y.abs().mean()

    _guard(fn, y, floor, result, f"order {order}, u*|f|*{norm:.3g}",
           "a larger ||v|| (fdsm_ext.suggest_step)")


def _guard(
    fn: str,
    out: Tensor,
    floor: Callable[[float, Tensor], Tensor],
    value: Tensor,
    detail: str,
    remedy: str,
) -> None:
    """Compare floor(u, out) with mean |value|; warn (once per call site) above THRESHOLD.
    ``out`` reaches ``floor`` widened to float32 if it is 16-bit (the floor may overflow)."""
    if torch.compiler.is_compiling() or (
        out.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    ):
        return
    _poll_pending()
    site = _call_site()
    if not _due(site):
        return
    u = unit_roundoff(out.dtype, out.device.type)
    out = out.detach()
    if out.dtype in (torch.float16, torch.bfloat16):  # the floor itself overflows float16
        out = out.float()
    autocast = torch.is_autocast_enabled(out.device.type)
    precision = f"u={u:.2g}" + (" (autocast)" if autocast else f" ({out.dtype})")
    with torch.no_grad():
        numbers = torch.stack([floor(u, out).float(), value.detach().abs().mean().float()])
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
    ratio = math.inf if scale == 0 else floor / scale
    result = "derivative" if fn == "fd_directional_derivative" else "loss"
    verdict = (
        f"the per-sample values are dominated by rounding: the {result} is noise"
        if ratio >= NOISE_LEVEL
        else "rounding noise is a large part of the per-sample values"
    )
    message = (
        f"{fn}: rounding noise of about {floor:.3g} per sample ({precision}, {detail}) "
        f"against typical per-sample values of {scale:.3g} (ratio {ratio:.2f}): {verdict}. "
        f"(Warns above {THRESHOLD}; from {NOISE_LEVEL} on the values are noise, and the "
        "ratio then stays of order 1 however small the step, because the values it divides "
        f"by are noise too.) Use {remedy}, float32 model outputs, or under autocast float32 "
        "last layers (see fdsm_ext.precision). Warned once per call site."
    )
    filename, lineno, module = site
    warnings.warn_explicit(message, FDPrecisionWarning, filename, lineno, module)
