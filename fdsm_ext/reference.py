"""Pure-PyTorch versions of the fused ``fdsm`` ops: the specification and the test oracle.

Layout shared by every op (``x`` flattened to (B, d), ``P`` = number of projections):

* directions ``v``: (P*B, d), row ``p*B + b`` is projection ``p`` of sample ``b``;
* stacked batch for offsets ``gamma_0..gamma_{K-1}``: the blocks are concatenated in the
  order of the offsets; a zero offset contributes ``x`` once (B rows), any other offset
  contributes ``x.repeat(P, 1) + gamma_k * v`` (P*B rows).

Reductions accumulate in float32 for half/bfloat16 inputs (and return float32), in the
input precision otherwise. The formulas the ops evaluate are derived on
:doc:`the mathematics page </math>` (docs/math.rst).

The Philox4x32-10 replay of the random directions (``_philox_directions`` and its helpers)
is a test oracle only: the bit-exact stream is an implementation detail, not an API.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "acc_dtype",
    "fd_combine",
    "fd_dsm_scalar",
    "fd_ssm_scalar",
    "fd_ssm_score",
    "random_stencil_batch",
    "scale_directions",
    "sphere_sum_sq",
    "stencil_batch",
    "stencil_batch_backward",
]

NOISES = ("sphere", "gaussian", "rademacher")

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and result) dtype of the FD reductions for inputs of ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a*b, exact in int64 via 16-bit limbs."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    lo_lo = a_lo * b_lo
    mid = a_hi * b_lo + a_lo * b_hi + (lo_lo >> 16)
    lo = ((mid & 0xFFFF) << 16) | (lo_lo & 0xFFFF)
    hi = a_hi * b_hi + (mid >> 16)
    return hi & _MASK32, lo & _MASK32


def philox4x32_10(counter: Sequence[Tensor], key: tuple[int, int]) -> list[Tensor]:
    """Random123's Philox4x32-10 on int64 tensors holding uint32 values (broadcasting)."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
    return [c0, c1, c2, c3]


# Float32 constants of the Box-Muller math (csrc/philox.h: log_poly, sincos_2pi), stored as
# the float32 values the C++ literals round to.
def _f32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


_LOG_P = [_f32(c) for c in (
    7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
    -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)]
_LOG2_LO, _LOG2_HI = _f32(-2.12194440e-4), _f32(0.693359375)
_SIN_P = [_f32(c) for c in (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)]
_COS_P = [_f32(c) for c in (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2)]
_TWO_PI_F32 = _f32(2.0 * math.pi)
_SQRT_HALF_BITS = 0x3F3504F3


def _uint32_to_float(w: Tensor) -> Tensor:
    """float32 rounding of uint32 values (held in int64): exact halves, one rounded sum."""
    return (w >> 16).to(torch.float32) * 65536.0 + (w & 0xFFFF).to(torch.float32)


def log_poly(x: Tensor) -> Tensor:
    """Natural log of positive normal float32 x, as csrc/philox.h::log_poly (Cephes logf):
    x = 2^e m with m in [sqrt(1/2), sqrt(2)) from the bits, f = m - 1,
    log x = (f + (f^3 P(f) + e lo) - f^2/2) + e hi, every operation rounded to float32."""
    shifted = x.view(torch.int32) - _SQRT_HALF_BITS
    e = (shifted >> 23).to(torch.float32)
    m = ((shifted & 0x007FFFFF) + _SQRT_HALF_BITS).view(torch.float32)
    f = m - 1.0
    p = torch.full_like(f, _LOG_P[0])
    for c in _LOG_P[1:]:
        p = p * f + c
    z = f * f
    y = (f * z) * p
    y = y + e * _LOG2_LO
    y = y - 0.5 * z
    return (f + y) + e * _LOG2_HI


def sincos_2pi(u: Tensor) -> tuple[Tensor, Tensor]:
    """(cos 2 pi u, sin 2 pi u) for float32 u in [0, 1], as csrc/philox.h::sincos_2pi:
    q = trunc(4u + 1/2), x = 2 pi (u - q/4) in [-pi/4, pi/4], Cephes sin/cos polynomials,
    quadrant q mod 4 selects and negates them."""
    q = (u * 4.0 + 0.5).to(torch.int32)
    x = (u - q.to(torch.float32) * 0.25) * _TWO_PI_F32
    z = x * x
    ps = torch.full_like(z, _SIN_P[0])
    for c in _SIN_P[1:]:
        ps = ps * z + c
    s = (ps * z) * x + x
    pc = torch.full_like(z, _COS_P[0])
    for c in _COS_P[1:]:
        pc = pc * z + c
    c = ((pc * z) * z - 0.5 * z) + 1.0
    odd = (q & 1) != 0
    cos_abs, sin_abs = torch.where(odd, s, c), torch.where(odd, c, s)
    return (torch.where(((q + 1) & 2) != 0, -cos_abs, cos_abs),
            torch.where((q & 2) != 0, -sin_abs, sin_abs))


def _philox_directions(seed: int, rows: int, d: int, noise: str, first_row: int = 0) -> Tensor:
    """Unscaled directions g of rows first_row .. first_row + rows - 1, shape (rows, d),
    float32: N(0, 1) for sphere/gaussian, +-1 for rademacher.

    Element (r, i) is a pure function of (seed, r, i): Philox4x32-10 with key
    (seed mod 2^32, seed >> 32) and counter (j lo, r lo, r hi, j hi) for j = i // 4 (the
    32-bit halves of j and r; below 2^32 that is (j, r, 0, 0)) gives four words o0..o3;
    element i uses word i % 4 (rademacher: +1 if its lowest bit is set, else -1) or, for
    normals, Box-Muller in float32 on the pair (o0, o1) for i % 4 in {0, 1} and (o2, o3)
    for {2, 3}: u1 = (float32(o_even) + 1) 2^-32, u2 = float32(o_odd) 2^-32,
    n_even = sqrt(-2 log u1) cos(2 pi u2), n_odd = sqrt(-2 log u1) sin(2 pi u2), where log
    and (cos, sin)(2 pi .) are the fixed float32 polynomial recipes log_poly and sincos_2pi
    (shared with the C++/CUDA kernels, within ~1 ulp of the exact functions), so the
    compiled ops reproduce these values bit for bit. Test-only (the oracle of the op
    ``fdsm::philox_directions`` and of the directions of ``random_stencil_batch``).
    """
    key = (seed & _MASK32, (seed >> 32) & _MASK32)
    j = torch.arange(d, dtype=torch.int64) // 4
    r = torch.arange(first_row, first_row + rows, dtype=torch.int64)[:, None]
    words = philox4x32_10((j & _MASK32, r & _MASK32, r >> 32, j >> 32), key)
    lane = (torch.arange(d) % 4).expand(rows, d)
    if noise == "rademacher":
        w = torch.stack(torch.broadcast_tensors(*words), dim=-1).gather(-1, lane[..., None])[..., 0]
        return torch.where((w & 1) == 1, 1.0, -1.0).to(torch.float32)
    normals = []
    for even, odd in ((words[0], words[1]), (words[2], words[3])):
        even, odd = torch.broadcast_tensors(even, odd)
        u1 = (_uint32_to_float(even) + 1.0) * 2.0**-32
        u2 = _uint32_to_float(odd) * 2.0**-32
        # sqrt in float64 rounded to float32 is the correctly rounded float32 sqrt (as C++
        # sqrtf); torch's float32 CPU sqrt can be 1 ulp off.
        radius = torch.sqrt((-2.0 * log_poly(u1)).double()).float()
        cos, sin = sincos_2pi(u2)
        normals += [radius * cos, radius * sin]
    stacked = torch.stack(torch.broadcast_tensors(*normals), dim=-1)
    return stacked.gather(-1, lane[..., None])[..., 0]


def sphere_sum_sq(g: Tensor) -> Tensor:
    """Row sums of g^2, (rows,), in the fixed order of csrc/sphere_norm.h (all devices).

    The entries come in groups of four (one Philox call); lane l of L = min(32, the power of
    two >= ceil(d/4)) lanes sums groups l, l + L, l + 2L, ... in order, the four entries of a
    group in order; then lane l + h is added to lane l for h = L/2, ..., 1.
    """
    rows, d = g.shape
    groups = (d + 3) // 4
    lanes = min(32, 1 << (groups - 1).bit_length())
    chunks = -(-groups // lanes)
    squares = g.new_zeros(rows, chunks * lanes * 4)  # zero padding: adding +0 is exact
    squares[:, :d] = g * g
    squares = squares.view(rows, chunks, lanes, 4)
    part = g.new_zeros(rows, lanes)
    for c in range(chunks):
        for k in range(4):
            part = part + squares[:, c, :, k]
    while lanes > 1:
        lanes //= 2
        part = part[:, :lanes] + part[:, lanes : 2 * lanes]
    return part[:, 0]


def scale_directions(g: Tensor, noise: str, eps: float) -> Tensor:
    """Scale unit-variance directions so that E[v v^T] = (eps^2/d) I.

    sphere: v = eps g / ||g|| (||v|| = eps), with ||g||^2 = sphere_sum_sq(g) and a correctly
    rounded sqrt and division, as the compiled ops; gaussian, rademacher: v = eps g / sqrt(d).
    """
    if noise == "sphere":
        # float64 sqrt rounded to float32 is the correctly rounded float32 sqrt.
        norm = torch.sqrt(sphere_sum_sq(g).double()).to(g.dtype)
        return g * (torch.full_like(norm, eps) / norm)[:, None]
    return g * (eps / math.sqrt(g.shape[1]))


def stencil_batch(x: Tensor, v: Tensor, offsets: Sequence[float]) -> Tensor:
    """Stacked evaluation batch [x + gamma_k v]_k, shape (n_blocks * B, d) (layout above)."""
    n_proj = v.shape[0] // x.shape[0]
    x_rep = x.repeat(n_proj, 1)
    blocks = [x if g == 0 else x_rep + g * v for g in offsets]
    return torch.cat(blocks)


def random_stencil_batch(
    x: Tensor, seed: int, offsets: Sequence[float], n_projections: int, noise: str, eps: float
) -> tuple[Tensor, Tensor]:
    """Directions v = scale_directions(g) and stencil_batch(x, v), where g (P*B, d) are the
    unscaled Philox directions of ``seed`` (N(0, 1) entries, or +-1 for rademacher)."""
    g = _philox_directions(seed, n_projections * x.shape[0], x.shape[1], noise).to(x.device)
    v = scale_directions(g.to(acc_dtype(x.dtype)), noise, eps).to(x.dtype)
    return stencil_batch(x, v, offsets), v


def stencil_batch_backward(
    grad: Tensor, offsets: Sequence[float], n_projections: int
) -> tuple[Tensor, Tensor]:
    """Adjoint of stencil_batch: grad_x[b] = sum of every row of sample b,
    grad_v[p*B + b] = sum_k gamma_k grad[block k, p*B + b]."""
    n_blocks = sum(1 if g == 0 else n_projections for g in offsets)
    batch = grad.shape[0] // n_blocks
    rows = n_projections * batch
    grad_x = torch.zeros_like(grad[:batch])
    grad_v = grad.new_zeros((rows, grad.shape[1]))  # grad may have fewer rows (all offsets 0)
    start = 0
    for g in offsets:
        size = batch if g == 0 else rows
        block = grad[start : start + size]
        grad_x += block.reshape(-1, batch, grad.shape[1]).sum(0)
        if g != 0:
            grad_v += g * block
        start += size
    return grad_x, grad_v


def fd_combine(y: Tensor, weights: Sequence[float]) -> Tensor:
    """sum_k w_k y[k*B : (k+1)*B], for y of shape (K*B, m); result (B, m)."""
    blocks = y.to(acc_dtype(y.dtype)).reshape(len(weights), -1, *y.shape[1:])
    return sum(w * blocks[k] for k, w in enumerate(weights))


def fd_ssm_scalar(f: Tensor, n_projections: int, scale: float, sign: float) -> Tensor:
    """Per-sample FD-SSM for scalar outputs f = [f0 (B) | f+ (P*B) | f- (P*B)]:

    loss[b] = mean_p scale * ( 1/8 (f+ - f-)^2 + sign * (f+ + f- - 2 f0) ),
    with scale = d/eps^2 and sign = +1 for log-densities, -1 for energies.
    """
    f = f.to(acc_dtype(f.dtype))
    batch = f.shape[0] // (1 + 2 * n_projections)
    f0 = f[:batch]
    fp, fm = f[batch:].reshape(2, n_projections, batch)
    per_projection = 0.125 * (fp - fm) ** 2 + sign * (fp + fm - 2 * f0)
    return scale * per_projection.mean(0)


def fd_ssm_score(
    s: Tensor, v: Tensor, n_projections: int, variance_reduction: bool, scale: float
) -> Tensor:
    """Per-sample FD-SSM for score outputs s = [s(x+v) (P*B, d) | s(x-v) (P*B, d)], scale = d/eps^2.

    variance-reduced: mean_p 1/8 ||s+ + s-||^2 + scale/2 v.(s+ - s-)
    plain:            mean_p scale * ( 1/8 (v.(s+ + s-))^2 + 1/2 v.(s+ - s-) )
    """
    acc = acc_dtype(s.dtype)
    sp, sm = s.to(acc).chunk(2)
    v = v.to(acc)
    add, sub = sp + sm, sp - sm
    if variance_reduction:
        per_row = 0.125 * (add * add).sum(1) + 0.5 * scale * (v * sub).sum(1)
    else:
        per_row = scale * (0.125 * (v * add).sum(1) ** 2 + 0.5 * (v * sub).sum(1))
    return per_row.reshape(n_projections, -1).mean(0)


def fd_dsm_scalar(
    f: Tensor, v: Tensor, target: Tensor, scale: float, sign: float
) -> tuple[Tensor, Tensor]:
    """Per-sample FD-DSM for f = [f(x~+v) (B) | f(x~-v) (B)], target = (x~ - x)/sigma^2:

    residual = sign * 1/2 (f+ - f-) + v.target,  loss = scale * residual^2,
    with scale = d/(2 eps^2). Returns (loss, residual); the residual feeds the backward.
    """
    acc = acc_dtype(f.dtype)
    fp, fm = f.to(acc).chunk(2)
    residual = sign * 0.5 * (fp - fm) + (v.to(acc) * target.to(acc)).sum(1)
    return scale * residual**2, residual

