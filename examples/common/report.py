"""Measurements reported by the scripts: interleaved step timing and peak memory."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

import numpy as np
import torch


def interleaved_timing(steps: dict[str, Callable[[int], object]], rounds: int,
                       warmup: int = 2) -> dict:
    """Seconds per call of every ``steps[name](i)``, the methods interleaved round by round.

    Round i calls every method's step once (i = 0 .. warmup + rounds - 1, the first ``warmup``
    untimed), so a change of machine load during the measurement hits all methods alike.
    Returns ``{name: {"median_s", "mean_s", "std_s", "rounds"}}``.
    """
    times: dict = {name: [] for name in steps}
    for i in range(warmup + rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn(i)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": float(np.median(t)), "mean_s": float(np.mean(t)),
                   "std_s": float(np.std(t)), "rounds": len(t)} for name, t in times.items()}


def peak_memory_mb(device: torch.device) -> dict:
    """Peak RSS of this process and, on a GPU, peak CUDA allocation (MB)."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device.type == "cuda":
        out["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
