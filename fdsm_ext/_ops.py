"""Loads the compiled ``fdsm`` ops and makes them traceable and differentiable.

The kernels live in ``fdsm_ext._C`` (C++/CUDA, registered with ``TORCH_LIBRARY``); this
module adds what torch needs around them: fake (meta) implementations for ``torch.compile``
and autograd formulas (each backward is itself a fused op). The wrappers below are the
functions the loss code calls; their semantics are those of the same-named functions in
:mod:`fdsm_ext.reference` (the test oracle), whose module docstring gives the row layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_BUILD_HINT = (
    "Build it from the source tree with `pip install --no-build-isolation -e .` "
    "(install torch first; build isolation would compile against a different torch)."
)

try:
    from . import _build_info
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        f"fdsm_ext is not built (fdsm_ext._build_info is missing). {_BUILD_HINT}"
    ) from exc

if _build_info.TORCH_VERSION != torch.__version__:  # pragma: no cover - depends on the install
    raise ImportError(
        f"fdsm_ext was built against torch {_build_info.TORCH_VERSION} but torch "
        f"{torch.__version__} is installed; the C++ ABI differs between versions. "
        f"Rebuild: {_BUILD_HINT}"
    )

try:
    from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        f"fdsm_ext's compiled extension fdsm_ext._C failed to load ({exc}). {_BUILD_HINT}"
    ) from exc

_ops = torch.ops.fdsm

__all__ = [
    "draw_seed",
    "fd_combine",
    "fd_dsm_scalar",
    "fd_ssm_scalar",
    "fd_ssm_score",
    "has_cuda_kernels",
    "random_stencil_batch",
    "stencil_batch",
]


def has_cuda_kernels() -> bool:
    """Whether this build of fdsm_ext compiled its CUDA kernels (False: CPU only)."""
    return bool(_build_info.CUDA_KERNELS)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _floats(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values]


def _stencil_rows(offsets: Sequence[float], batch, proj_rows):
    return sum(batch if g == 0 else proj_rows for g in offsets)


# ---------------------------------------------------------------------------------------
# Fake implementations: shapes and dtypes only, so torch.compile can trace through the ops.


@torch.library.register_fake("fdsm::stencil_batch")
def _(x, v, offsets):
    return x.new_empty((_stencil_rows(offsets, x.shape[0], v.shape[0]), x.shape[1]))


@torch.library.register_fake("fdsm::random_stencil_batch")
def _(x, seed, offsets, n_projections, noise, eps):
    torch._check(
        seed.dtype == torch.int64 and seed.numel() == 1,
        lambda: f"seed must be an int64 tensor of shape (1,), got {seed.dtype} {tuple(seed.shape)}",
    )
    torch._check(
        seed.device == x.device,
        lambda: f"seed must be on the same device as x ({x.device}), got {seed.device}",
    )
    rows = n_projections * x.shape[0]
    return (
        x.new_empty((_stencil_rows(offsets, x.shape[0], rows), x.shape[1])),
        x.new_empty((rows, x.shape[1])),
    )


@torch.library.register_fake("fdsm::stencil_batch_backward")
def _(grad, offsets, n_projections, compute_grad_v):
    per_sample = sum(1 if g == 0 else n_projections for g in offsets)
    batch = grad.shape[0] // per_sample
    grad_v_shape = (n_projections * batch, grad.shape[1]) if compute_grad_v else (0,)
    return grad.new_empty((batch, grad.shape[1])), grad.new_empty(grad_v_shape)


@torch.library.register_fake("fdsm::fd_combine")
def _(y, weights):
    shape = (y.shape[0] // len(weights), *y.shape[1:])
    return y.new_empty(shape, dtype=_acc_dtype(y.dtype))


@torch.library.register_fake("fdsm::fd_combine_backward")
def _(grad, weights):
    return grad.new_empty((grad.shape[0] * len(weights), *grad.shape[1:]))


@torch.library.register_fake("fdsm::fd_ssm_scalar")
def _(f, n_projections, scale, sign):
    return f.new_empty((f.shape[0] // (1 + 2 * n_projections),), dtype=_acc_dtype(f.dtype))


@torch.library.register_fake("fdsm::fd_ssm_scalar_backward")
def _(grad, f, n_projections, scale, sign):
    return torch.empty_like(f, memory_format=torch.contiguous_format)


@torch.library.register_fake("fdsm::fd_ssm_score")
def _(s, v, n_projections, variance_reduction, scale):
    return s.new_empty((v.shape[0] // n_projections,), dtype=_acc_dtype(s.dtype))


@torch.library.register_fake("fdsm::fd_ssm_score_backward")
def _(grad, s, v, n_projections, variance_reduction, scale):
    return torch.empty_like(s, memory_format=torch.contiguous_format)


@torch.library.register_fake("fdsm::fd_dsm_scalar")
def _(f, v, target, scale, sign):
    acc = _acc_dtype(f.dtype)
    return f.new_empty((v.shape[0],), dtype=acc), f.new_empty((v.shape[0],), dtype=acc)


@torch.library.register_fake("fdsm::fd_dsm_scalar_backward")
def _(grad, residual, scale, sign):
    return residual.new_empty((2 * residual.shape[0],))


# ---------------------------------------------------------------------------------------
# Autograd: every backward is one fused op; the ops themselves are first-order only.


def _stencil_setup(ctx, inputs, output):
    x, v, offsets = inputs
    ctx.offsets = offsets
    ctx.n_projections = v.shape[0] // x.shape[0]
    ctx.needs_grad_v = ctx.needs_input_grad[1]


def _stencil_backward(ctx, grad):
    grad_x, grad_v = _ops.stencil_batch_backward(
        grad, ctx.offsets, ctx.n_projections, ctx.needs_grad_v
    )
    return grad_x, (grad_v if ctx.needs_grad_v else None), None


torch.library.register_autograd(
    "fdsm::stencil_batch", _stencil_backward, setup_context=_stencil_setup
)


def _random_stencil_setup(ctx, inputs, output):
    x, seed, offsets, n_projections, noise, eps = inputs
    ctx.offsets = offsets
    ctx.n_projections = n_projections
    ctx.mark_non_differentiable(output[1])


def _random_stencil_backward(ctx, grad, grad_v):
    grad_x, _ = _ops.stencil_batch_backward(grad, ctx.offsets, ctx.n_projections, False)
    return grad_x, None, None, None, None, None


torch.library.register_autograd(
    "fdsm::random_stencil_batch", _random_stencil_backward, setup_context=_random_stencil_setup
)


def _combine_setup(ctx, inputs, output):
    y, weights = inputs
    ctx.weights = weights
    ctx.y_dtype = y.dtype


def _combine_backward(ctx, grad):
    return _ops.fd_combine_backward(grad, ctx.weights).to(ctx.y_dtype), None


torch.library.register_autograd("fdsm::fd_combine", _combine_backward, setup_context=_combine_setup)


def _ssm_scalar_setup(ctx, inputs, output):
    f, n_projections, scale, sign = inputs
    ctx.save_for_backward(f)
    ctx.args = (n_projections, scale, sign)


def _ssm_scalar_backward(ctx, grad):
    (f,) = ctx.saved_tensors
    return _ops.fd_ssm_scalar_backward(grad, f, *ctx.args), None, None, None


torch.library.register_autograd(
    "fdsm::fd_ssm_scalar", _ssm_scalar_backward, setup_context=_ssm_scalar_setup
)


def _ssm_score_setup(ctx, inputs, output):
    s, v, n_projections, variance_reduction, scale = inputs
    ctx.save_for_backward(s, v)
    ctx.args = (n_projections, variance_reduction, scale)


def _ssm_score_backward(ctx, grad):
    s, v = ctx.saved_tensors
    return _ops.fd_ssm_score_backward(grad, s, v, *ctx.args), None, None, None, None


torch.library.register_autograd(
    "fdsm::fd_ssm_score", _ssm_score_backward, setup_context=_ssm_score_setup
)


def _dsm_setup(ctx, inputs, output):
    f, v, target, scale, sign = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])
    ctx.args = (scale, sign)
    ctx.f_dtype = f.dtype


def _dsm_backward(ctx, grad, grad_residual):
    (residual,) = ctx.saved_tensors
    grad_f = _ops.fd_dsm_scalar_backward(grad, residual, *ctx.args).to(ctx.f_dtype)
    return grad_f, None, None, None, None


torch.library.register_autograd("fdsm::fd_dsm_scalar", _dsm_backward, setup_context=_dsm_setup)


# ---------------------------------------------------------------------------------------
# Public wrappers.


def stencil_batch(x: Tensor, v: Tensor, offsets: Sequence[float]) -> Tensor:
    """Stacked evaluation batch ``[x + gamma_k v]_k`` for ``x`` (B, d) and ``v`` (P*B, d).

    Blocks follow the order of ``offsets``: a zero offset contributes ``x`` once (B rows),
    any other ``gamma`` contributes ``x.repeat(P, 1) + gamma * v`` (P*B rows), so one model
    call evaluates every stencil point. Differentiable in ``x`` and ``v``.
    """
    return _ops.stencil_batch(x, v, _floats(offsets))


def random_stencil_batch(
    x: Tensor,
    seed: Tensor,
    offsets: Sequence[float],
    n_projections: int,
    noise: str,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Draw directions and build the stencil batch in one pass; returns ``(batch, v)``.

    ``g`` (P*B, d) comes from Philox4x32-10 keyed by ``seed`` (int64 tensor of shape (1,) on
    x's device, see :func:`draw_seed`): N(0, 1) entries for ``"sphere"``/``"gaussian"``, +-1
    for ``"rademacher"``. Then ``v = eps g / ||g||`` per row (sphere) or ``v = eps g / sqrt(d)``,
    so ``E[v v^T] = (eps^2/d) I``, and the batch is ``stencil_batch(x, v, offsets)``.
    Differentiable in ``x``; ``v`` is not differentiable.
    """
    return _ops.random_stencil_batch(
        x, seed, _floats(offsets), int(n_projections), str(noise), float(eps)
    )


def fd_combine(y: Tensor, weights: Sequence[float]) -> Tensor:
    """Finite-difference combination ``sum_k w_k y[k*B:(k+1)*B]`` of a (K*B, ...) output.

    With the weights of a stencil this approximates ``d^T/dt^T f(x + t v)`` at ``t = 0``. The
    result has shape (B, ...) and is accumulated (and returned) in float32 for half/bfloat16
    inputs, in the input precision otherwise.
    """
    return _ops.fd_combine(y, _floats(weights))


def fd_ssm_scalar(f: Tensor, n_projections: int, scale: float, sign: float) -> Tensor:
    """Per-sample FD-SSM for scalar outputs ``f = [f0 (B) | f+ (P*B) | f- (P*B)]``.

    ``loss[b] = mean_p scale * (1/8 (f+ - f-)^2 + sign * (f+ + f- - 2 f0))`` with
    ``scale = d/eps^2`` and ``sign = +1`` for log-densities, ``-1`` for energies. Returns
    (B,), float32 for 16-bit inputs. Differentiable in ``f``.
    """
    return _ops.fd_ssm_scalar(f, int(n_projections), float(scale), float(sign))


def _common_dtype(a: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    # Mixed precision (e.g. a half model output with float32 directions): the reduction
    # runs in a's accumulation dtype anyway, so cast everything there, like the oracle.
    if all(t.dtype == a.dtype for t in others):
        return (a, *others)
    acc = _acc_dtype(a.dtype)
    return tuple(t.to(acc) for t in (a, *others))


def fd_ssm_score(
    s: Tensor, v: Tensor, n_projections: int, variance_reduction: bool, scale: float
) -> Tensor:
    """Per-sample FD-SSM for score outputs ``s = [s(x+v) (P*B, d) | s(x-v) (P*B, d)]``.

    With ``scale = d/eps^2``, variance-reduced: ``mean_p 1/8 ||s+ + s-||^2 + scale/2 v.(s+ - s-)``;
    plain: ``mean_p scale * (1/8 (v.(s+ + s-))^2 + 1/2 v.(s+ - s-))``. Returns (B,), float32
    for 16-bit inputs. Differentiable in ``s`` only.
    """
    s, v = _common_dtype(s, v)
    return _ops.fd_ssm_score(s, v, int(n_projections), bool(variance_reduction), float(scale))


def fd_dsm_scalar(f: Tensor, v: Tensor, target: Tensor, scale: float, sign: float) -> Tensor:
    """Per-sample FD-DSM loss for ``f = [f(x~+v) (B) | f(x~-v) (B)]``.

    With ``target = (x~ - x)/sigma^2`` and ``scale = d/(2 eps^2)``:
    ``loss = scale * (sign * 1/2 (f+ - f-) + v.target)^2``, shape (B,), float32 for 16-bit
    inputs. Differentiable in ``f`` only.
    """
    f, v, target = _common_dtype(f, v, target)
    loss, _ = _ops.fd_dsm_scalar(f, v, target, float(scale), float(sign))
    return loss


@torch.library.custom_op(
    "fdsm::draw_seed", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def _draw_seed_default(device: torch.device) -> Tensor:
    # An op of the library, not a bare torch.randint: torch.compile keeps an opaque op as it
    # is, so compiled code draws the same key from the default generator as eager code and
    # advances it identically (inductor would replace torch.randint by its own generator).
    # The nondeterministic_seeded tag keeps two draws from being merged into one, or a draw
    # from being recomputed in the backward.
    return _randint_key(device)


def _randint_key(device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, generator=generator, device=device)


@_draw_seed_default.register_fake
def _(device):
    return torch.empty((1,), dtype=torch.int64, device=device)


def draw_seed(device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
    """A fresh Philox key: int64 tensor of shape (1,) in ``[0, 2^62)`` on ``device``.

    Drawn with ``torch.randint`` from ``generator`` (on the generator's device, then moved;
    eager only: a Generator cannot be traced by torch.compile) or, through the op
    ``fdsm::draw_seed``, from torch's default generator of ``device``, the same value in
    eager and compiled code. It never leaves the device (no ``.item()``), so there is no
    host synchronisation.
    """
    if generator is not None:
        return _randint_key(generator.device, generator).to(device)
    if not torch.compiler.is_compiling():
        # Eager: the op's body itself, the same draw without the cost of the op's dispatch.
        return _randint_key(torch.device(device))
    return _draw_seed_default(torch.device(device))
