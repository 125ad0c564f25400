from fractions import Fraction as Fr
from math import factorial

import pytest

from fdsm_ext import fd_stencil

KNOWN = {
    (1, 2): ((-1, 1), (Fr(-1, 2), Fr(1, 2))),
    (2, 2): ((-1, 0, 1), (Fr(1), Fr(-2), Fr(1))),
    (1, 4): ((-2, -1, 1, 2), (Fr(1, 12), Fr(-2, 3), Fr(2, 3), Fr(-1, 12))),
    (2, 4): ((-2, -1, 0, 1, 2), (Fr(-1, 12), Fr(4, 3), Fr(-5, 2), Fr(4, 3), Fr(-1, 12))),
    (3, 2): ((-2, -1, 1, 2), (Fr(-1, 2), Fr(1), Fr(-1), Fr(1, 2))),
    (4, 2): ((-2, -1, 0, 1, 2), (Fr(1), Fr(-4), Fr(6), Fr(-4), Fr(1))),
    (1, 6): ((-3, -2, -1, 1, 2, 3),
             (Fr(-1, 60), Fr(3, 20), Fr(-3, 4), Fr(3, 4), Fr(-3, 20), Fr(1, 60))),
}


@pytest.mark.parametrize("key", sorted(KNOWN))
def test_known_tables(key):
    assert fd_stencil(*key) == KNOWN[key]


@pytest.mark.parametrize("order", range(1, 7))
@pytest.mark.parametrize("accuracy", [2, 4, 6, 8])
def test_moment_conditions(order, accuracy):
    offsets, weights = fd_stencil(order, accuracy)
    assert all(isinstance(w, Fr) and w != 0 for w in weights)
    # Exact for polynomials up to degree order + accuracy - 1, and not beyond.
    for t in range(order + accuracy):
        moment = sum(w * Fr(g) ** t for g, w in zip(offsets, weights))
        assert moment == (factorial(order) if t == order else 0), t
    assert sum(w * Fr(g) ** (order + accuracy) for g, w in zip(offsets, weights)) != 0
    # Central symmetry: weights even (even order) or odd (odd order) under g -> -g.
    table = dict(zip(offsets, weights))
    for g, w in table.items():
        assert table.get(-g, 0) == (-1) ** order * w


@pytest.mark.parametrize(
    "order, accuracy, message",
    [(0, 2, "order"), (-1, 2, "order"), (1.5, 2, "order"), (True, 2, "order"),
     (1, 3, "accuracy"), (1, 0, "accuracy"), (1, -2, "accuracy"), (2, 2.0, "accuracy")],
)
def test_bad_arguments(order, accuracy, message):
    with pytest.raises(ValueError, match=message):
        fd_stencil(order, accuracy)
