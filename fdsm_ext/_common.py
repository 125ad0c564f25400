"""Argument checks, model calls on stacked batches and output handling shared by every loss."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

OUTPUTS = ("auto", "log_density", "energy", "score")
REDUCTIONS = ("mean", "sum", "none")
NOISES = ("sphere", "gaussian", "rademacher")
DSM_DIRECTIONS = ("residual", "random")
SCALAR = "scalar"
SCORE = "score"


def check_choice(name: str, value: Any, choices: Sequence[str], fn: str) -> None:
    if value not in choices:
        raise ValueError(
            f"{fn}: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}"
        )


def check_positive(name: str, value: Any, fn: str) -> None:
    """value: a finite number > 0 or a tensor of them."""
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise ValueError(f"{fn}: {name} must be > 0 (floating point), got dtype {value.dtype}")
        if value.device.type != "cpu" or torch.compiler.is_compiling():
            # Checked on the device: reading the result back would sync every training step
            # (and cannot be traced by torch.compile).
            torch._assert_async(torch.all(value > 0), f"{fn}: {name} must be > 0")
        elif not bool(torch.all(value > 0)):
            raise ValueError(f"{fn}: {name} must be > 0 (floating point), got {value}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a number > 0, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {value!r}")


def check_int(name: str, value: Any, minimum: int, fn: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{fn}: {name} must be an integer >= {minimum}, got {value!r}")


def check_generator(generator: Any, fn: str) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{fn}: generator must be a torch.Generator or None, got "
            f"{type(generator).__name__} {generator!r} (for a fixed seed use "
            "torch.Generator().manual_seed(seed))"
        )


def check_callable(model: Any, fn: str, name: str = "model") -> None:
    """model: what the loss or sampler calls; checked before anything else is done with it."""
    if not callable(model):
        raise TypeError(
            f"{fn}: {name} must be callable (a torch.nn.Module or function), "
            f"got {type(model).__name__}"
        )


def check_x(x: Any, fn: str, finite_differences: bool) -> None:
    """x must be a floating tensor (B, *event_shape) with B >= 1 and d >= 1."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(
            f"{fn}: x must have a batch dimension first, shape (B, *event_shape), "
            f"got shape {tuple(x.shape)} (use x[:, None] for one-dimensional data)"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{fn}: x has zero samples (shape {tuple(x.shape)}); need B >= 1")
    if x[0].numel() == 0:
        raise ValueError(f"{fn}: x has empty samples (shape {tuple(x.shape)}); need d >= 1")
    if finite_differences and x.dtype in (torch.float16, torch.bfloat16):
        u = torch.finfo(x.dtype).eps / 2
        raise TypeError(
            f"{fn}: x has dtype {x.dtype}; finite differences in half precision are noise: "
            f"the unit round-off of {x.dtype} is u = {u:.2g}, and the scaled second "
            f"difference loses about u*|L|*d/eps^2 = {u / 0.01:.2g}*|L|*d per sample at "
            "eps=0.1. Pass float32 or float64 x (see fdsm_ext.precision for what a model "
            "that autocasts internally costs, and fdsm_ext.suggest_eps)."
        )


def check_reduction_output(output: str, reduction: str, fn: str) -> None:
    check_choice("output", output, OUTPUTS, fn)
    check_choice("reduction", reduction, REDUCTIONS, fn)


def call_model(
    model: Callable[..., Tensor],
    inputs: Tensor,
    args: ModelArgs,
    fn: str,
    batch: int | None = None,
) -> Tensor:
    """One model call; checks that it returned a tensor with one row per input row.

    ``batch``: the user's batch size when ``inputs`` stacks several copies of it (named in
    the error message, so that a row count can be traced back to the stacking).
    """
    out = model(inputs, *args.args, **args.kwargs)
    if not isinstance(out, Tensor):
        raise TypeError(f"{fn}: the model must return a tensor, got {type(out).__name__}")
    if out.dim() == 0 or out.shape[0] != inputs.shape[0]:
        rows = inputs.shape[0]
        stacking = ""
        if batch is not None and rows != batch:
            stacking = f" = {rows // batch} stacked copies x batch {batch}"
        got = "a 0-d tensor" if out.dim() == 0 else f"{out.shape[0]} rows"
        raise ValueError(
            f"{fn}: the model returned {got} (shape {tuple(out.shape)}) for {rows} input "
            f"rows{stacking}; it must return one row per input row"
        )
    return out


def output_kind(out: Tensor, event_shape: torch.Size, output: str, fn: str) -> tuple[str, float]:
    """Classify a model output as (SCALAR, sign) or (SCORE, 1.0) and check it matches ``output``.

    sign converts the scalar to a log-density: +1 for log-densities, -1 for energies.
    ``output="auto"`` accepts only what is unambiguous: an x-shaped output that is not also a
    per-sample scalar is a score. Per-sample scalars are refused (log-density or energy? the
    sign of every loss and sampler depends on it), and so is a (N, 1) output for 1-d data
    (score or scalar?).
    """
    per_sample = out.dim() == 1 or (out.dim() == 2 and out.shape[1] == 1)
    x_shaped = out.shape[1:] == event_shape
    if output == "auto":
        if x_shaped and not per_sample:
            return SCORE, 1.0
        if per_sample:
            also = ", or output='score' if it is a score of 1-d data" if x_shaped else ""
            raise ValueError(
                f"{fn}: the model returned per-sample scalars (shape {tuple(out.shape)}), which "
                "output='auto' does not guess: pass output='energy' if it returns "
                f"E = -log p + const, output='log_density' if it returns log p + const{also}"
            )
    elif output == "score" and x_shaped:
        return SCORE, 1.0
    elif output in ("log_density", "energy") and per_sample:
        return SCALAR, 1.0 if output == "log_density" else -1.0
    expected = {
        "auto": f"scores shaped like x (N, *{tuple(event_shape)}) (declare output='energy' "
        "or 'log_density' for per-sample scalars)",
        "score": f"scores shaped like x: (N, *{tuple(event_shape)})",
        "log_density": "per-sample scalars of shape (N,) or (N, 1)",
        "energy": "per-sample scalars of shape (N,) or (N, 1)",
    }[output]
    raise ValueError(
        f"{fn}: with output={output!r} the model must return {expected}; "
        f"it returned shape {tuple(out.shape)}"
    )


def reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn from ``generator`` (on its own device)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def model_score(
    model: Callable[..., Tensor],
    x: Tensor,
    args: ModelArgs,
    output: str,
    fn: str,
    create_graph: bool,
) -> tuple[Tensor, Tensor]:
    """(s, x_in): the score s (N, d) at x_in, a version of x that requires grad.

    Score models are called directly; for scalar models s = sign * grad_x out by autograd
    (with ``create_graph`` so that second derivatives or parameter gradients can follow).
    """
    if not create_graph and torch.compiler.is_compiling():
        return _compiled_score(model, x, args, output, fn), x
    x_in = x if x.requires_grad else x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = call_model(model, x_in, args, fn)
        kind, sign = output_kind(out, x.shape[1:], output, fn)
        if kind == SCALAR:
            (score,) = torch.autograd.grad(sign * out.sum(), x_in, create_graph=create_graph)
        else:
            score = out
    return score.reshape(x.shape[0], -1), x_in


def _compiled_score(
    model: Callable[..., Tensor], x: Tensor, args: ModelArgs, output: str, fn: str
) -> Tensor:
    """model_score without a graph, in a form torch.compile can trace (torch.autograd.grad
    inside a compiled region breaks the graph; torch.func.vjp does not)."""
    out, vjp = torch.func.vjp(lambda x_in: call_model(model, x_in, args, fn), x.detach())
    kind, sign = output_kind(out, x.shape[1:], output, fn)
    if kind != SCALAR:
        return out.reshape(x.shape[0], -1)
    (grad,) = vjp(torch.ones_like(out))
    return (sign * grad).reshape(x.shape[0], -1)


def per_sample_sigma(sigma: float | Tensor, x: Tensor, fn: str) -> Tensor:
    """sigma as a tensor (B,) in x's dtype and device, checked > 0."""
    check_positive("sigma", sigma, fn)
    if isinstance(sigma, Tensor):
        if sigma.dim() == 0:
            sigma = sigma.expand(x.shape[0])
        sigma = sigma.reshape(-1)
        if sigma.shape[0] != x.shape[0]:
            raise ValueError(
                f"{fn}: sigma must be a number or a tensor of shape (B,) = ({x.shape[0]},), "
                f"got shape {tuple(sigma.shape)}"
            )
        return sigma.to(device=x.device, dtype=x.dtype)
    return torch.full((x.shape[0],), float(sigma), device=x.device, dtype=x.dtype)


class ModelArgs(NamedTuple):
    """Extra model inputs, the model being called as ``model(x, *args, **kwargs)``.

    ``per_sample`` holds the positions (int) and names (str) of the per-sample tensors.
    """

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    per_sample: frozenset[int | str] = frozenset()

    def repeat(self, copies: int) -> ModelArgs:
        """The inputs for ``copies`` stacked copies of the batch: per-sample tensors repeated."""
        if copies == 1:
            return self

        def rep(key: int | str, a: Any) -> Any:
            return torch.cat([a] * copies) if key in self.per_sample else a

        return self._replace(
            args=tuple(rep(i, a) for i, a in enumerate(self.args)),
            kwargs={k: rep(k, a) for k, a in self.kwargs.items()},
        )


def sort_model_args(
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None,
    shared: int | str | Sequence[int | str],
    batch: int,
    fn: str,
) -> ModelArgs:
    """Sort the extra model inputs by the rule (shapes are never used to guess):

    a tensor with at least one dimension, positional or keyword, is per-sample (one row per
    sample of x, so its leading dimension must be B; the losses repeat it for every stacked
    copy of the batch) unless ``shared`` lists its position or name; shared tensors,
    0-dimensional tensors and non-tensors are passed unchanged to every call.
    """
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(
            f"{fn}: model_kwargs must be a dict of keyword arguments for the model, "
            f"got {type(kwargs).__name__}"
        )
    shared = (shared,) if isinstance(shared, (int, str)) else tuple(shared)
    for key in shared:
        if isinstance(key, str):
            valid = key in kwargs
        else:
            valid = isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(args)
        if not valid:
            raise ValueError(
                f"{fn}: shared entry {key!r} names no model argument; shared lists positions "
                f"in model_args (0..{len(args) - 1}) and keys of model_kwargs "
                f"({', '.join(map(repr, kwargs)) or 'none'})"
            )
    named = [(i, f"model_args[{i}]", a) for i, a in enumerate(args)]
    named += [(k, f"model_kwargs[{k!r}]", a) for k, a in kwargs.items()]
    per_sample = set()
    for key, name, a in named:
        if not isinstance(a, Tensor) or a.dim() == 0 or key in shared:
            continue
        if a.shape[0] != batch:
            raise ValueError(
                f"{fn}: {name} has shape {tuple(a.shape)}, but a tensor model argument is "
                f"per-sample (leading dimension B = {batch}, the batch size of x) unless "
                f"listed in shared=; pass shared=[{key!r}] if it is the same for every sample"
            )
        per_sample.add(key)
    return ModelArgs(tuple(args), dict(kwargs), frozenset(per_sample))
