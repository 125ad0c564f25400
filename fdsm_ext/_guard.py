"""The precision guard: compares the rounding floor of a finite-difference value with the
value itself and warns (:class:`fdsm_ext.FDPrecisionWarning`) when rounding dominates.

Private; the public side (the floor formulas, :func:`fdsm_ext.suggest_eps`,
:class:`fdsm_ext.FDPrecisionWarning`, :func:`fdsm_ext.unit_roundoff`) is
:mod:`fdsm_ext.precision`, which re-exports what this module defines. It imports neither
``fdsm_ext.precision`` nor ``fdsm_ext.losses``, so the losses can use it while
``precision.suggest_eps`` calls the losses. The floors are derived in docs/math.rst,
:ref:`section "Precision: the rounding floor" <math-precision>`; the rounding probe of
scalar FD-SSM (:func:`_probe_second_difference`) is described in :mod:`fdsm_ext.precision`.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ._common import ModelArgs, call_model

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
# The probe runs only where the model computes in float32 or coarser: below this unit
# round-off (float64) even a large amplification of u*|L| stays far under the threshold.
PROBE_MIN_UNIT_ROUNDOFF = 2.0**-30
# The probe's step, relative to eps: the true second difference shrinks by its square.
PROBE_STEP = 0.01
LARGER_EPS = ('a larger eps (fdsm_ext.suggest_eps), derivatives="forward" (exact, no '
              "finite differences)")
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


class Probe(NamedTuple):
    """What the guard needs to evaluate the model once more: the model, x flattened (B, d),
    x's event shape and the model inputs of the loss call (see :func:`guard_fd_ssm`)."""

    model: Callable[..., Tensor]
    x: Tensor
    event_shape: torch.Size
    inputs: ModelArgs


def guard_fd_ssm(
    fn: str,
    out: Tensor,
    per_sample: Tensor,
    scalar: bool,
    d: int,
    eps: float,
    probe: Probe | None = None,
) -> None:
    """Scalar models: floor = max(e*d/eps^2 + d e^2/(12 eps^2) with e = u*mean|L|, measured),
    ``measured`` from the rounding probe (``probe`` given; see
    :func:`_probe_second_difference`): r, the rms over the batch of L(x + w) + L(x - w) - 2 L(x)
    at ||w|| = eps/100, gives r*d/eps^2*sqrt((4 + 2/P)/6) for P projections (the centre's
    rounding is shared by the projections) + d r^2/(24 eps^2). The second terms are the bias
    d sigma^2/(4 eps^2) of the squared first difference, sigma the rms rounding of one output
    (e/sqrt(3) for rounding to nearest, r/sqrt(6) measured): negligible unless sigma is of
    order 1 in L's units. Score models: u*||s||*sqrt(d)/eps."""
    batch = per_sample.shape[0]
    projections = max(1, (out.shape[0] // batch - 1) // 2)

    def floor(u: float, out: Tensor) -> Tensor:
        if scalar:
            e = u * out.abs().mean()
            return e * d / eps**2 + d * e**2 / (12 * eps**2)
        return u * out.reshape(out.shape[0], -1).norm(dim=1).mean() * math.sqrt(d) / eps

    measured = None
    if scalar and probe is not None:
        factor = d / eps**2 * math.sqrt((4 + 2 / projections) / 6)
        bias = d / (24 * eps**2)

        def measured(fresh: bool, site: tuple) -> Tensor | None:
            if fresh:
                noise = _probe_second_difference(fn, probe, eps)
                if noise is None:
                    _probe_noise.pop(site[:2], None)
                    return None
                _probe_noise[site[:2]] = noise
            noise = _probe_noise.get(site[:2])
            return None if noise is None else noise * factor + bias * noise**2

    what = "|L|*d/eps^2 (+ its square's bias)" if scalar else "||s||*sqrt(d)/eps"
    _guard(fn, out, floor, per_sample, f"u*{what} with d={d}, eps={eps:g}", LARGER_EPS,
           measured)


def _probe_second_difference(fn: str, probe: Probe, eps: float) -> Tensor | None:
    """rms over the batch of L(x + w) + L(x - w) - 2 L(x), ||w|| = eps/100 (one gradient-free
    model call on 3B rows), or None where the model computes in float64, in a run of several
    processes (see :func:`_distributed`) or where the call fails.

    The stencil at a step 100 times smaller: its true second difference is 10^-4 of that at
    eps, so what remains is rounding, of the rows x +- w, of every layer and of the output,
    which is the rounding of the stencil at eps too. u*|L| understates it where L is small
    against the values inside the network (a freshly initialised one). w has the signs of a
    hash of the index (no random generator is drawn from); under autocast the rows x +- w are
    also shifted by hashed fractions of the autocast dtype's rounding step. The global random
    state and the buffers of an ``nn.Module`` (batch-norm statistics) are restored afterwards.
    """
    x = probe.x.detach()
    u = unit_roundoff(x.dtype, x.device.type)
    if u < PROBE_MIN_UNIT_ROUNDOFF or _distributed():
        return None
    batch, d = x.shape
    index = torch.arange(x.numel(), device=x.device).reshape(batch, d)
    w = (((index * 2654435761) >> 15) % 2 * 2 - 1).to(x.dtype) * (PROBE_STEP * eps / math.sqrt(d))
    rows = torch.cat([x, x + w, x - w])
    if u > unit_roundoff(x.dtype):
        # Autocast casts the rows to a coarser dtype, in which x +- w and x round alike; a
        # shift by a pseudo-random fraction (within +-1/2) of its rounding step 2u|x| makes
        # each row's cast round on its own, as those of x +- v do.
        index = torch.arange(2 * x.numel(), device=x.device).reshape(2 * batch, d)
        fraction = (((index * 2654435761) >> 8) % 65536).to(x.dtype) / 65536 - 0.5
        rows[batch:] += 2 * u * x.abs().repeat(2, 1) * fraction
    model = probe.model
    buffers = list(model.buffers()) if isinstance(model, nn.Module) else []
    saved = [b.detach().clone() for b in buffers]
    devices = []
    if x.device.type == "cuda":
        devices = [torch.cuda.current_device() if x.device.index is None else x.device.index]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            f = call_model(model, rows.reshape(-1, *probe.event_shape), probe.inputs.repeat(3),
                           fn)
    except Exception:  # a diagnostic: the loss itself has already run
        return None
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
    f = f.detach().reshape(3, batch, -1)[..., 0].float()
    return (f[1] + f[2] - 2 * f[0]).pow(2).mean().sqrt()


def _distributed() -> bool:
    """Several processes: a DDP or FSDP model's forward is a collective, which every rank
    would have to make, while the guard's schedule can differ between ranks (it stops
    checking a site once it has warned there, on that rank's batch)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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
    measured: Callable[[bool, tuple], Tensor | None] | None = None,
) -> None:
    """Compare floor(u, out) with mean |value|; warn (once per call site) above THRESHOLD.
    ``out`` reaches ``floor`` widened to float32 if it is 16-bit (the floor may overflow).
    ``measured(fresh, site)``, if given, is a measured floor (None: none): the larger one
    counts; ``fresh`` asks for a new measurement (the first check of a site and every
    periodic one), otherwise the site's last is reused."""
    if torch.compiler.is_compiling() or (
        out.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    ):
        return
    _poll_pending()
    site = _call_site()
    n = _due(site)
    if n < 0:
        return
    u = unit_roundoff(out.dtype, out.device.type)
    out = out.detach()
    if out.dtype in (torch.float16, torch.bfloat16):  # the floor itself overflows float16
        out = out.float()
    autocast = torch.is_autocast_enabled(out.device.type)
    precision = f"u={u:.2g}" + (" (autocast)" if autocast else f" ({out.dtype})")
    with torch.no_grad():
        estimate = floor(u, out).float()
        extra = None if measured is None else measured(n == 0 or n >= _EAGER_CALLS, site)
        if extra is not None:
            estimate = torch.maximum(estimate, extra.float())
            detail += ", or the model's measured rounding where larger"
        numbers = torch.stack([estimate, value.detach().abs().mean().float()])
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
# call site -> the rms second difference of the site's last rounding probe
_probe_noise: dict[tuple[str, int], Tensor] = {}
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


def _due(site: tuple[str, int, str]) -> int:
    """The number of earlier calls at ``site`` if this one is checked, else -1."""
    n = _calls.get(site[:2], 0)
    if n < 0:
        return -1
    _calls[site[:2]] = n + 1
    return n if n < _EAGER_CALLS or n % _EVERY == 0 else -1


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
