"""Exact central finite-difference stencils of any derivative order and accuracy."""

from __future__ import annotations

from fractions import Fraction
from functools import cache
from typing import NamedTuple

__all__ = ["Stencil", "fd_stencil"]


class Stencil(NamedTuple):
    """Offsets ``gamma_k`` (integers, in units of the step) and exact weights ``beta_k``.

    ``sum_k beta_k f(x + gamma_k h) = h^T f^(T)(x) + O(h^(T + accuracy))``.
    """

    offsets: tuple[int, ...]
    weights: tuple[Fraction, ...]


def check_order_accuracy(order: int, accuracy: int, fn: str) -> None:
    """Raise ``ValueError`` naming ``fn`` and the argument unless order >= 1 and accuracy is
    even >= 2."""
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"{fn}: order must be an integer >= 1, got {order!r}")
    if isinstance(accuracy, bool) or not isinstance(accuracy, int) or accuracy < 2 or accuracy % 2:
        raise ValueError(f"{fn}: accuracy must be an even integer >= 2, got {accuracy!r}")


def fd_stencil(order: int, accuracy: int = 2) -> Stencil:
    """Central stencil for the ``order``-th derivative with error ``O(h^accuracy)``.

    Uses the symmetric offsets ``-m..m`` with ``2m + 1 = 2*floor((order+1)/2) - 1 + accuracy``
    and solves, in exact rational arithmetic, the Vandermonde system

        sum_k beta_k gamma_k^t = order! * [t == order],   t = 0..2m.

    Offsets whose weight is zero (the centre for odd orders) are dropped, so the result is
    the smallest set of evaluations: e.g. order 1 -> ``(-1, 1), (-1/2, 1/2)``; order 2 ->
    ``(-1, 0, 1), (1, -2, 1)``. Derivation (why symmetric offsets gain an order for even
    orders): docs/math.rst, :ref:`section "General order-T stencils" <math-stencils>`.
    """
    check_order_accuracy(order, accuracy, "fd_stencil")
    return _solve(order, accuracy)


@cache
def _solve(order: int, accuracy: int) -> Stencil:
    m = (2 * ((order + 1) // 2) - 1 + accuracy) // 2
    offsets = list(range(-m, m + 1))
    n = len(offsets)
    # Augmented Vandermonde system A beta = rhs, solved by Gauss-Jordan over the rationals.
    rows = [[Fraction(g) ** t for g in offsets] for t in range(n)]
    factorial = 1
    for i in range(2, order + 1):
        factorial *= i
    rhs = [Fraction(factorial if t == order else 0) for t in range(n)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if rows[r][col] != 0)
        rows[col], rows[pivot] = rows[pivot], rows[col]
        rhs[col], rhs[pivot] = rhs[pivot], rhs[col]
        inv = 1 / rows[col][col]
        rows[col] = [a * inv for a in rows[col]]
        rhs[col] *= inv
        for r in range(n):
            if r != col and rows[r][col] != 0:
                factor = rows[r][col]
                rows[r] = [a - factor * b for a, b in zip(rows[r], rows[col])]
                rhs[r] -= factor * rhs[col]
    kept = [(g, w) for g, w in zip(offsets, rhs) if w != 0]
    return Stencil(tuple(g for g, _ in kept), tuple(w for _, w in kept))
