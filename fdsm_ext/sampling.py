"""Langevin samplers driven by a score model or by a scalar (log-density / energy) model."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._common import (
    OUTPUTS,
    call_model,
    check_choice,
    check_generator,
    check_int,
    check_positive,
    check_x,
    model_score,
    output_kind,
    randn_like,
)


def _score(
    model: Callable[..., Tensor], x: Tensor, args: Sequence[Any], output: str, fn: str
) -> Tensor:
    """Detached score at x, shaped like x; score models run without building a graph."""
    if output in ("score", "auto"):
        with torch.no_grad():
            out = call_model(model, x, args, fn)
        output_kind(out, x.shape[1:], output, fn)
        return out
    score, _ = model_score(model, x, args, output, fn, create_graph=False)
    return score.detach().reshape_as(x)


def _step(
    model: Callable[..., Tensor],
    x: Tensor,
    args: Sequence[Any],
    alpha: float,
    output: str,
    generator: torch.Generator | None,
    fn: str,
) -> Tensor:
    """One Langevin step x + alpha s(x) + sqrt(2 alpha) z."""
    score = _score(model, x, args, output, fn)
    return x + alpha * score + math.sqrt(2 * alpha) * randn_like(x, generator)


def langevin_dynamics(
    model: Callable[..., Tensor],
    x: Tensor,
    n_steps: int,
    step_size: float,
    *model_args: Any,
    output: str = "auto",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Unadjusted Langevin dynamics: x <- x + alpha s(x) + sqrt(2 alpha) z, ``n_steps`` times.

    s is the model output (score models, ``output="score"`` or "auto") or grad log p by
    autograd (scalar models: declare ``output="energy"`` or ``"log_density"``; "auto"
    refuses per-sample scalars, whose sign it cannot guess). Returns the final samples
    (detached).
    """
    fn = "langevin_dynamics"
    check_x(x, fn, finite_differences=False)
    check_int("n_steps", n_steps, 0, fn)
    check_positive("step_size", step_size, fn)
    check_choice("output", output, OUTPUTS, fn)
    check_generator(generator, fn)
    x = x.detach()
    for _ in _progress(range(n_steps), progress, "langevin"):
        x = _step(model, x, model_args, step_size, output, generator, fn)
    return x


def annealed_langevin_dynamics(
    model: Callable[..., Tensor],
    x: Tensor,
    sigmas: Sequence[float] | Tensor,
    n_steps_each: int = 100,
    step_lr: float = 2e-5,
    *,
    output: str = "auto",
    denoise: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019) for noise-conditional models.

    For each level i (sigmas in decreasing order), alpha_i = step_lr (sigma_i/sigma_L)^2 and
    ``n_steps_each`` times: x <- x + alpha_i s(x, i) + sqrt(2 alpha_i) z, where the model is
    called as ``model(x, labels)`` with labels = i (LongTensor (B,)). With ``denoise``, a
    final step x <- x + sigma_L^2 s(x, L-1) removes the last level's noise (Tweedie).
    Returns the final samples (detached).
    """
    fn = "annealed_langevin_dynamics"
    check_x(x, fn, finite_differences=False)
    check_int("n_steps_each", n_steps_each, 1, fn)
    check_positive("step_lr", step_lr, fn)
    check_choice("output", output, OUTPUTS, fn)
    check_generator(generator, fn)
    sigmas = [float(s) for s in torch.as_tensor(sigmas).reshape(-1).tolist()]
    if not sigmas:
        raise ValueError(f"{fn}: sigmas must hold at least one noise level")
    for s in sigmas:
        check_positive("sigmas", s, fn)
    x = x.detach()
    steps = [(i, step_lr * (s / sigmas[-1]) ** 2) for i, s in enumerate(sigmas)]
    schedule = [step for step in steps for _ in range(n_steps_each)]
    for level, alpha in _progress(schedule, progress, "annealed langevin"):
        labels = torch.full((x.shape[0],), level, dtype=torch.long, device=x.device)
        x = _step(model, x, (labels,), alpha, output, generator, fn)
    if denoise:
        labels = torch.full((x.shape[0],), len(sigmas) - 1, dtype=torch.long, device=x.device)
        x = x + sigmas[-1] ** 2 * _score(model, x, (labels,), output, fn)
    return x


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm  # optional dependency: only needed for progress bars

    return tqdm(iterable, desc=desc)
