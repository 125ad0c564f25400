"""Randomness that makes resumed runs exact: everything random inside a training loop is a pure
function of (seed, rank, step), and checkpoints carry the global RNG states.

The data order of epoch e is ``randperm(n, seed=mix(seed, e))`` and the loss noise of step s
comes from a generator seeded with ``mix(seed, rank, s)``, so a run killed after a checkpoint
and resumed ends in exactly the state of an uninterrupted run, whatever the number of
processes.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from .distributed import Dist

_M = (1 << 63) - 1


def mix(*xs: int) -> int:
    """Deterministic 63-bit hash of integers (splitmix64-style), for seeding generators."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = h * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & _M


def batch_indices(n: int, batch_size: int, step: int, seed: int, d: Dist) -> torch.Tensor:
    """Indices of this rank's share of global batch ``step`` (0-based); drop-last epochs, each
    epoch's permutation sharded DistributedSampler-style (``idx[rank::world]``)."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch size {batch_size} is larger than the {n} training images")
    epoch, j = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(mix(seed, 0xDA7A, epoch))
    perm = torch.randperm(n, generator=g)
    return perm[j * batch_size:(j + 1) * batch_size][d.rank::d.world_size]


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """Generator for the loss noise of one step: a pure function of (seed, rank, step)."""
    return torch.Generator(device=device).manual_seed(mix(seed, 0x1055, rank, step))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    """The global RNG states (torch, CUDA, numpy, random), as stored in checkpoints: tensors
    and plain Python values only, so that a checkpoint loads with weights_only=True."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return plain_rng_state(state)


def plain_rng_state(state: dict) -> dict:
    """``state`` with the NumPy state (a tuple holding a uint32 array) and the Python state
    (a tuple of 625 ints) as dicts of int64 tensors and numbers; a state already in that form
    is returned unchanged. :func:`set_rng_state` reads this form."""
    out = dict(state)
    if isinstance(state["numpy"], tuple):  # np.random.get_state()
        name, key, pos, has_gauss, gauss = state["numpy"]
        out["numpy"] = {"name": str(name),
                        "key": torch.from_numpy(np.asarray(key, dtype=np.int64).copy()),
                        "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}
    if isinstance(state["python"], tuple):  # random.getstate(): (version, internal, gauss)
        version, internal, gauss_next = state["python"]
        out["python"] = {"version": int(version),
                         "internal": torch.tensor(internal, dtype=torch.int64),
                         "gauss_next": None if gauss_next is None else float(gauss_next)}
    return out


def set_rng_state(state: dict) -> None:
    """Restore the global RNG states that :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()),
                     py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
