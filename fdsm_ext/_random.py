"""The randomness of a loss call: one Philox key, from ``seed``, a generator or torch's default.

Every random quantity of a loss (directions v, noise z, noise levels) is drawn by the
library's Philox op (``fdsm::random_stencil_batch``) from one key per call, each quantity
from its own stream: ``key XOR mask`` with a fixed 62-bit mask per stream (the directions
use the key itself), so the streams are independent Philox sequences and a call never
touches torch's generators beyond drawing the key. The key is

* ``seed`` when given: a Python int or an int64 tensor, traceable by ``torch.compile``;
* otherwise drawn from ``generator`` (eager only: torch.compile cannot trace a Generator);
* otherwise drawn from torch's default generator by the opaque op ``fdsm::draw_seed``, so
  compiled and eager code use the same key after the same ``torch.manual_seed``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import _ops as ops
from ._common import check_generator

NOISE = 0x1E3779B97F4A7C15  # stream masks (< 2^62), arbitrary fixed constants
LEVELS = 0x3C6EF372FE94F82B


def resolve_seed(
    seed: int | Tensor | None, generator: torch.Generator | None, device: torch.device, fn: str
) -> Tensor:
    """The call's Philox key: int64 tensor of shape (1,) on ``device`` (see module docstring)."""
    if seed is not None and generator is not None:
        raise ValueError(f"{fn}: pass seed or generator, not both")
    if seed is not None:
        return _seed_tensor(seed, device, fn)
    check_generator(generator, fn)
    if generator is not None:
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"{fn}: torch.compile cannot trace a torch.Generator; pass seed= (an int or an "
                "int64 tensor) instead, or nothing to draw from torch's default generator"
            )
    return ops.draw_seed(device, generator)


def _seed_tensor(seed: Any, device: torch.device, fn: str) -> Tensor:
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(
                f"{fn}: seed must be an int or an int64 tensor with one element, got a "
                f"{seed.dtype} tensor of shape {tuple(seed.shape)}"
            )
        return seed.reshape(1).to(device)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"{fn}: seed must be an int in [0, 2^63) or an int64 tensor, got {seed!r}")
    return torch.tensor([seed], dtype=torch.int64, device=device)


def stream(key: Tensor, mask: int) -> Tensor:
    """The key of one random stream of the call: ``key XOR mask``."""
    return torch.bitwise_xor(key, mask)


def standard_normal(like: Tensor, key: Tensor) -> Tensor:
    """N(0, 1) entries shaped like ``like`` (B, d), in its dtype: the op's "gaussian"
    directions g at scale eps / sqrt(d) = 1."""
    return _philox(like, key, "gaussian")


def rademacher(like: Tensor, key: Tensor) -> Tensor:
    """+-1 entries shaped like ``like`` (B, d), in its dtype."""
    return _philox(like, key, "rademacher")


def _philox(like: Tensor, key: Tensor, noise: str) -> Tensor:
    like = like.detach()
    _, g = ops.random_stencil_batch(like, key, (0.0,), 1, noise, math.sqrt(like.shape[1]))
    return g


def uniform_levels(key: Tensor, batch: int, n_levels: int, device: torch.device) -> Tensor:
    """Levels i ~ Uniform{0, ..., L-1}, LongTensor (B,): i = floor(L Phi(g)), g ~ N(0, 1).

    Phi(g) (the normal CDF) is uniform on (0, 1).
    """
    g = standard_normal(torch.zeros(batch, 1, device=device), key)[:, 0]
    u = torch.special.ndtr(g)
    return (u * n_levels).long().clamp_(max=n_levels - 1)
