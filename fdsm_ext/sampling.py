"""Langevin samplers driven by a score model or by a scalar (log-density / energy) model."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._common import (
    OUTPUTS,
    ModelArgs,
    call_model,
    check_callable,
    check_choice,
    check_generator,
    check_int,
    check_positive,
    check_x,
    model_score,
    output_kind,
    randn_like,
    sort_model_args,
)
from .noise_conditional import CONDITIONS

__all__ = ["annealed_langevin_dynamics", "langevin_dynamics"]


def _score(
    model: Callable[..., Tensor], x: Tensor, args: ModelArgs, output: str, fn: str
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
    args: ModelArgs,
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
    model_kwargs: Mapping[str, Any] | None = None,
    shared: Sequence[int | str] = (),
    output: str = "auto",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Unadjusted Langevin dynamics: x <- x + alpha s(x) + sqrt(2 alpha) z, ``n_steps`` times.

    s is the model output (score models, ``output="score"`` or "auto") or grad log p by
    autograd (scalar models: declare ``output="energy"`` or ``"log_density"``; "auto"
    refuses per-sample scalars, whose sign it cannot guess), the model called as
    ``model(x, *model_args, **model_kwargs)`` (tensors among them per-sample, leading
    dimension B, unless ``shared`` lists them, as in :func:`fdsm_ext.fd_ssm_loss`). Returns
    the final samples (detached).
    """
    fn = "langevin_dynamics"
    check_callable(model, fn)
    check_x(x, fn, finite_differences=False)
    check_int("n_steps", n_steps, 0, fn)
    check_positive("step_size", step_size, fn)
    check_choice("output", output, OUTPUTS, fn)
    check_generator(generator, fn)
    inputs = sort_model_args(model_args, model_kwargs, shared, x.shape[0], fn)
    x = x.detach()
    for _ in _progress(range(n_steps), progress, "langevin"):
        x = _step(model, x, inputs, step_size, output, generator, fn)
    return x


def annealed_langevin_dynamics(
    model: Callable[..., Tensor],
    x: Tensor,
    sigmas: Sequence[float] | Tensor,
    n_steps_each: int = 100,
    step_lr: float = 2e-5,
    *,
    condition: str = "label",
    model_kwargs: Mapping[str, Any] | None = None,
    shared: Sequence[int | str] = (),
    output: str = "auto",
    denoise: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019) for noise-conditional models.

    For each level i (sigmas in decreasing order), alpha_i = step_lr (sigma_i/sigma_L)^2 and
    ``n_steps_each`` times: x <- x + alpha_i s(x, i) + sqrt(2 alpha_i) z. The model is
    conditioned as in :func:`fdsm_ext.noise_conditional_loss`: ``condition="label"`` calls
    ``model(x, labels, **model_kwargs)`` with labels = i (LongTensor (B,)), ``"sigma"``
    calls ``model(x, sigma, **model_kwargs)`` with sigma = sigma_i (tensor (B,) in x's
    dtype). With ``denoise``, a final step x <- x + sigma_L^2 s(x, L-1) removes the last
    level's noise (Tweedie). Returns the final samples (detached).
    """
    fn = "annealed_langevin_dynamics"
    check_callable(model, fn)
    check_x(x, fn, finite_differences=False)
    check_int("n_steps_each", n_steps_each, 1, fn)
    check_positive("step_lr", step_lr, fn)
    check_choice("output", output, OUTPUTS, fn)
    check_choice("condition", condition, CONDITIONS, fn)
    check_generator(generator, fn)
    sigmas = [float(s) for s in torch.as_tensor(sigmas).reshape(-1).tolist()]
    if not sigmas:
        raise ValueError(f"{fn}: sigmas must hold at least one noise level")
    for s in sigmas:
        check_positive("sigmas", s, fn)
    batch = x.shape[0]
    base = sort_model_args((), model_kwargs, shared, batch, fn)

    def inputs(level: int) -> ModelArgs:
        if condition == "label":
            cond = torch.full((batch,), level, dtype=torch.long, device=x.device)
        else:
            cond = torch.full((batch,), sigmas[level], dtype=x.dtype, device=x.device)
        return base._replace(args=(cond,), per_sample=base.per_sample | {0})

    x = x.detach()
    steps = [(i, step_lr * (s / sigmas[-1]) ** 2) for i, s in enumerate(sigmas)]
    schedule = [step for step in steps for _ in range(n_steps_each)]
    for level, alpha in _progress(schedule, progress, "annealed langevin"):
        x = _step(model, x, inputs(level), alpha, output, generator, fn)
    if denoise:
        x = x + sigmas[-1] ** 2 * _score(model, x, inputs(len(sigmas) - 1), output, fn)
    return x


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm  # optional dependency: only needed for progress bars

    return tqdm(iterable, desc=desc)
