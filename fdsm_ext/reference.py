"""Pure-PyTorch versions of the fused ``fdsm`` ops: the specification and the test oracle.

Layout shared by every op (``x`` flattened to (B, d), ``P`` = number of projections):

* directions ``v``: (P*B, d), row ``p*B + b`` is projection ``p`` of sample ``b``;
* stacked batch for offsets ``gamma_0..gamma_{K-1}``: the blocks are concatenated in the
  order of the offsets; a zero offset contributes ``x`` once (B rows), any other offset
  contributes ``x.repeat(P, 1) + gamma_k * v`` (P*B rows).

Reductions accumulate in float32 for half/bfloat16 inputs (and return float32), in the
input precision otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

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


def philox_directions(seed: int, rows: int, d: int, noise: str) -> Tensor:
    """Unscaled directions g (rows, d), float32: N(0, 1) for sphere/gaussian, +-1 for rademacher.

    Element (r, i) is a pure function of (seed, r, i): Philox4x32-10 with key
    (seed mod 2^32, seed >> 32) and counter (i // 4, r, 0, 0) gives four words o0..o3;
    element i uses word i % 4 (rademacher: +1 if its lowest bit is set, else -1) or, for
    normals, Box-Muller in float32 on the pair (o0, o1) for i % 4 in {0, 1} and (o2, o3)
    for {2, 3}: u1 = (o_even + 1) 2^-32, u2 = o_odd 2^-32,
    n_even = sqrt(-2 log u1) cos(2 pi u2), n_odd = sqrt(-2 log u1) sin(2 pi u2).
    """
    key = (seed & _MASK32, (seed >> 32) & _MASK32)
    i = torch.arange(d, dtype=torch.int64)
    r = torch.arange(rows, dtype=torch.int64)[:, None]
    words = philox4x32_10((i // 4, r, 0, 0), key)
    lane = (i % 4).expand(rows, d)
    if noise == "rademacher":
        w = torch.stack(torch.broadcast_tensors(*words), dim=-1).gather(-1, lane[..., None])[..., 0]
        return torch.where((w & 1) == 1, 1.0, -1.0).to(torch.float32)
    normals = []
    for even, odd in ((words[0], words[1]), (words[2], words[3])):
        u1 = (even.to(torch.float32) + 1.0) * 2.0**-32
        u2 = odd.to(torch.float32) * 2.0**-32
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = 2.0 * math.pi * u2
        normals += [radius * torch.cos(angle), radius * torch.sin(angle)]
    stacked = torch.stack(torch.broadcast_tensors(*normals), dim=-1)
    return stacked.gather(-1, lane[..., None])[..., 0]


def scale_directions(g: Tensor, noise: str, eps: float) -> Tensor:
    """Scale unit-variance directions so that E[v v^T] = (eps^2/d) I.

    sphere: v = eps g / ||g|| (||v|| = eps); gaussian, rademacher: v = eps g / sqrt(d).
    """
    if noise == "sphere":
        return g * (eps / g.norm(dim=1, keepdim=True))
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
    """Directions v = scale_directions(philox_directions(seed, P*B, d)) and stencil_batch(x, v)."""
    g = philox_directions(seed, n_projections * x.shape[0], x.shape[1], noise).to(x.device)
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
