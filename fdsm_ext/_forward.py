"""Exact directional derivatives of the model by forward-mode AD (``torch.func.jvp``).

Used by the losses' ``derivatives="forward"`` option, which replaces each finite difference
along v by the derivative it approximates (docs/math.rst,
:ref:`section "Forward mode" <math-forward-mode>`). The model's parameters (and tensor
model arguments) are captured by closure, so the outer autograd graph records the tangent
computation and one ordinary ``.backward()`` reaches them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._common import ModelArgs, call_model
from ._ops import _acc_dtype

DERIVATIVES = ("fd", "forward")

# Substrings of torch's errors for an op, or a custom autograd.Function, without a
# forward-mode rule (an aten op missing from derivatives.yaml's forward formulas, a Function
# without ``jvp``, or one without ``setup_context``, which functorch transforms require).
_NO_FORWARD_RULE = ("forward AD", "forward mode AD", "functorch transforms")


def model_fn(
    model: Callable[..., Tensor], event_shape: torch.Size, args: ModelArgs, fn: str, batch: int
) -> Callable[[Tensor], Tensor]:
    """rows (N, d) -> the model output on rows reshaped to (N, *event_shape)."""

    def f(rows: Tensor) -> Tensor:
        return call_model(model, rows.reshape(-1, *event_shape), args, fn, batch=batch)

    return f


def jvp(f: Callable[[Tensor], Tensor], x: Tensor, v: Tensor, fn: str) -> tuple[Tensor, Tensor]:
    """(f(x), d/dt f(x + t v) at t = 0): one forward-mode pass (about 2 forwards' work).

    Results in float32 for 16-bit outputs (autocast), like the FD kernels' accumulation.
    """
    value, d1 = _with_hint(fn, lambda: torch.func.jvp(f, (x,), (v,)))
    return _widen(value), _widen(d1)


def jvp2(
    f: Callable[[Tensor], Tensor], x: Tensor, v: Tensor, fn: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(g(0), g'(0), g''(0)) for g(t) = f(x + t v): the jvp along v of the jvp along v.

    The inner jvp returns (f, f'[v]); the outer one differentiates both along v again, giving
    (f'[v], f''[v, v]) as tangents (the first a duplicate of the inner tangent). Results
    widened as in :func:`jvp`.
    """

    def first(y: Tensor) -> tuple[Tensor, Tensor]:
        return torch.func.jvp(f, (y,), (v,))

    (value, d1), (_, d2) = _with_hint(fn, lambda: torch.func.jvp(first, (x,), (v,)))
    return _widen(value), _widen(d1), _widen(d2)


def _widen(t: Tensor) -> Tensor:
    return t.to(_acc_dtype(t.dtype))


def _with_hint(fn: str, run: Callable[[], Any]) -> Any:
    """Runs ``run``; in eager mode an op without a forward-mode rule gets a message that names
    the option and the alternative (under torch.compile the error is torch's own)."""
    if torch.compiler.is_compiling():
        return run()
    try:
        return run()
    except RuntimeError as exc:  # NotImplementedError is a RuntimeError
        if not any(hint in str(exc) for hint in _NO_FORWARD_RULE):
            raise
        raise NotImplementedError(
            f"{fn}: derivatives='forward' needs a forward-mode AD rule (jvp) for every op of "
            f"the model, and one is missing: {exc}\nUse derivatives='fd' (the default), which "
            "needs first-order autograd only."
        ) from exc
