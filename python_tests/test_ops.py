"""The compiled fdsm ops against the pure-PyTorch oracle (fdsm_ext.reference)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fdsm_ext import _build_info
from fdsm_ext import _ops as ops
from fdsm_ext import reference as ref

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
FLOATS = (torch.float32, torch.float64)
ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Philox4x32-10 known answers (docs/math.rst, section "Philox4x32-10"): counter, key, output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (0xFFFFFFFF,) * 4,
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def tol(dtype: torch.dtype) -> dict:
    return {
        torch.float16: {"rtol": 2e-3, "atol": 2e-3},
        torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
        torch.float32: {"rtol": 1e-5, "atol": 1e-5},
        torch.float64: {"rtol": 1e-11, "atol": 1e-11},
    }[dtype]


def rand(*shape, dtype=torch.float32, device="cpu", contiguous=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    else:  # every other column of a wider tensor: non-unit stride
        wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=torch.float64)
        t = wide.to(dtype=dtype, device=device)[..., ::2]
    assert t.is_contiguous() == contiguous or t.numel() <= 1
    return t


def seed_tensor(value: int, device="cpu") -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64, device=device)


def n_rows(offsets, batch, n_proj):
    return sum(batch if g == 0 else n_proj * batch for g in offsets)


# ---------------------------------------------------------------------------------------
# Philox


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_reference_philox_known_answers(counter, key, expected):
    words = ref.philox4x32_10([torch.tensor(c) for c in counter], key)
    assert [int(w) for w in words] == list(expected)


def test_compiled_philox_known_answer_rademacher():
    # seed 0, row 0, entries 0..3 use counter (0, 0, 0, 0), key (0, 0): the signs are the
    # lowest bits of the first known answer.
    x = torch.zeros(1, 4)
    batch, v = ops.random_stencil_batch(x, seed_tensor(0), [1.0], 1, "rademacher", 2.0)
    expected = [1.0 if w & 1 else -1.0 for w in PHILOX_KAT[0][2]]
    assert v.tolist() == [expected]
    assert batch.tolist() == [expected]


def test_compiled_philox_known_answer_gaussian():
    o = PHILOX_KAT[0][2]
    normals = []
    for even, odd in ((o[0], o[1]), (o[2], o[3])):
        radius = math.sqrt(-2 * math.log((even + 1) * 2.0**-32))
        angle = 2 * math.pi * odd * 2.0**-32
        normals += [radius * math.cos(angle), radius * math.sin(angle)]
    x = torch.zeros(1, 4)
    _, v = ops.random_stencil_batch(x, seed_tensor(0), [1.0], 1, "gaussian", 2.0)
    np.testing.assert_allclose(v[0].numpy(), np.array(normals), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("noise", ref.NOISES)
@pytest.mark.parametrize("seed", [0, 1, 2**40 + 12345, 2**62 - 1, -(2**63)])
@pytest.mark.parametrize("d", [1, 37, 300])  # 1, 16 and 32 lanes in the sphere norm's order
def test_directions_match_reference(noise, seed, d):
    batch, n_proj = 3, 2
    x = torch.zeros(batch, d)
    _, v = ops.random_stencil_batch(x, seed_tensor(seed), [1.0], n_proj, noise, 0.1)
    g = ref._philox_directions(seed % 2**64, n_proj * batch, d, noise)
    expected = ref.scale_directions(g, noise, 0.1)
    # Same float32 recipe (polynomial log/sincos in csrc/philox.h) and, for the sphere, the
    # same summation order of the row norm (csrc/sphere_norm.h): bit-identical.
    torch.testing.assert_close(v, expected, rtol=0, atol=0)


def philox_directions_op(seed: int, first_row: int, rows: int, d: int, noise: str):
    """The compiled CPU draws of rows first_row .. first_row + rows - 1 (test hook op)."""
    return torch.ops.fdsm.philox_directions(seed_tensor(seed), first_row, rows, d, noise)


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_directions_hook_draws_what_random_stencil_batch_draws(noise):
    batch, d, n_proj = 3, 37, 2
    _, v = ops.random_stencil_batch(torch.zeros(batch, d), seed_tensor(5), [1.0], n_proj, noise,
                                    0.1)
    g = philox_directions_op(5, 0, n_proj * batch, d, noise)
    torch.testing.assert_close(v, ref.scale_directions(g, noise, 0.1), rtol=0, atol=0)


@pytest.mark.parametrize("noise", ref.NOISES)
@pytest.mark.parametrize("d", [37, 301])  # 10 groups; 76 groups (a 64-group chunk and a tail)
@pytest.mark.parametrize("first_row", [2**32 - 3, 2**33 + 2**32 + 7, 2**62])
def test_directions_past_2_32_rows_match_reference(noise, d, first_row):
    # The counter carries the row's high word: rows past 2^32 (n_projections * B) are new
    # draws, identical to the oracle's, not repeats of rows mod 2^32.
    seed = 2**40 + 99
    g = philox_directions_op(seed, first_row, 6, d, noise)
    expected = ref._philox_directions(seed, 6, d, noise, first_row=first_row)
    torch.testing.assert_close(g, expected, rtol=0, atol=0)
    last = first_row + 5  # past 2^32 in every case; a 32-bit counter would give this row:
    wrapped = philox_directions_op(seed, last % 2**32, 1, d, noise)
    assert not torch.equal(g[-1:], wrapped)


def test_reference_counter_layout_past_2_32_rows():
    # Row r, group j use counter (j lo, r lo, r hi, j hi): row 2^32 + 5 is counter (j, 5, 1, 0).
    seed, d = 12345, 8
    g = ref._philox_directions(seed, 1, d, "rademacher", first_row=2**32 + 5)
    for j in range(d // 4):
        words = ref.philox4x32_10([torch.tensor(c) for c in (j, 5, 1, 0)], (seed, 0))
        expected = [1.0 if int(w) & 1 else -1.0 for w in words]
        assert g[0, 4 * j:4 * j + 4].tolist() == expected
    # below 2^32 the high words are zero: the 32-bit counter (j, r, 0, 0) of earlier versions
    g_low = ref._philox_directions(seed, 1, 4, "rademacher", first_row=5)
    words = ref.philox4x32_10([torch.tensor(c) for c in (0, 5, 0, 0)], (seed, 0))
    assert g_low[0].tolist() == [1.0 if int(w) & 1 else -1.0 for w in words]


def test_directions_hook_rejects_bad_rows():
    with pytest.raises(RuntimeError, match="philox_directions: need first_row >= 0"):
        philox_directions_op(0, -1, 2, 4, "gaussian")
    with pytest.raises(RuntimeError, match="philox_directions: need first_row >= 0"):
        philox_directions_op(0, 2**63 - 2, 4, 4, "gaussian")
    with pytest.raises(RuntimeError, match="philox_directions: d must be >= 1"):
        philox_directions_op(0, 0, 2, 0, "gaussian")


def test_directions_statistics():
    x = torch.zeros(4000, 8)
    _, v = ops.random_stencil_batch(x, seed_tensor(7), [1.0], 1, "gaussian", math.sqrt(8))
    assert abs(v.mean().item()) < 0.02
    cov = v.T @ v / v.shape[0]
    torch.testing.assert_close(cov, torch.eye(8), atol=0.08, rtol=0)


# ---------------------------------------------------------------------------------------
# Every op == reference


@pytest.mark.parametrize("dtype", ALL_FLOATS)
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("offsets", [(0.0, 1.0, -1.0), (-2.0, -1.0, 1.0, 2.0), (1.5,)])
def test_stencil_batch(dtype, contiguous, offsets):
    x = rand(5, 7, dtype=dtype, contiguous=contiguous)
    v = rand(10, 7, dtype=dtype, contiguous=contiguous, seed=1)
    torch.testing.assert_close(
        ops.stencil_batch(x, v, offsets), ref.stencil_batch(x, v, offsets), **tol(dtype)
    )


@pytest.mark.parametrize("dtype", ALL_FLOATS)
@pytest.mark.parametrize("noise", ref.NOISES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_random_stencil_batch(dtype, noise, contiguous):
    x = rand(4, 11, dtype=dtype, contiguous=contiguous)
    offsets = (0.0, 1.0, -1.0)
    batch, v = ops.random_stencil_batch(x, seed_tensor(99), offsets, 3, noise, 0.1)
    rbatch, rv = ref.random_stencil_batch(x, 99, offsets, 3, noise, 0.1)
    assert batch.dtype == v.dtype == dtype
    # The reference replays csrc's own float32 log and sincos recipes: bit for bit.
    assert torch.equal(v, rv)
    assert torch.equal(batch, rbatch)


@pytest.mark.parametrize("dtype", ALL_FLOATS)
@pytest.mark.parametrize("offsets", [(0.0, 1.0, -1.0), (-1.0, 1.0), (0.0, 0.5)])
def test_stencil_batch_backward(dtype, offsets):
    n_proj, batch, d = 2, 3, 5
    grad = rand(n_rows(offsets, batch, n_proj), d, dtype=dtype)
    gx, gv = torch.ops.fdsm.stencil_batch_backward(grad, list(offsets), n_proj, True)
    rgx, rgv = ref.stencil_batch_backward(grad, offsets, n_proj)
    torch.testing.assert_close(gx, rgx, **tol(dtype))
    torch.testing.assert_close(gv, rgv, **tol(dtype))
    gx2, empty = torch.ops.fdsm.stencil_batch_backward(grad, list(offsets), n_proj, False)
    assert empty.numel() == 0
    torch.testing.assert_close(gx2, gx, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ALL_FLOATS)
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("trailing", [(), (6,), (2, 3)])
def test_fd_combine(dtype, contiguous, trailing):
    weights = (1.0, -2.0, 1.0)
    if trailing:
        y = rand(12, *trailing, dtype=dtype, contiguous=contiguous)
    else:
        y = rand(12, 4, dtype=dtype, contiguous=contiguous)[:, 1]
    out = ops.fd_combine(y, weights)
    assert out.dtype == ref.acc_dtype(dtype)
    torch.testing.assert_close(out, ref.fd_combine(y, weights), **tol(out.dtype))


@pytest.mark.parametrize("dtype", ALL_FLOATS)
@pytest.mark.parametrize("n_proj", [1, 3])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_fd_ssm_scalar(dtype, n_proj, sign):
    f = rand(5 * (1 + 2 * n_proj), dtype=dtype)
    out = ops.fd_ssm_scalar(f, n_proj, 7.5, sign)
    assert out.dtype == ref.acc_dtype(dtype)
    torch.testing.assert_close(out, ref.fd_ssm_scalar(f, n_proj, 7.5, sign), **tol(out.dtype))


@pytest.mark.parametrize("dtype", ALL_FLOATS)
@pytest.mark.parametrize("n_proj", [1, 2])
@pytest.mark.parametrize("variance_reduction", [True, False])
@pytest.mark.parametrize("contiguous", [True, False])
def test_fd_ssm_score(dtype, n_proj, variance_reduction, contiguous):
    batch, d = 3, 9
    s = rand(2 * n_proj * batch, d, dtype=dtype, contiguous=contiguous)
    v = rand(n_proj * batch, d, dtype=dtype, contiguous=contiguous, seed=2)
    out = ops.fd_ssm_score(s, v, n_proj, variance_reduction, 4.0)
    assert out.dtype == ref.acc_dtype(dtype)
    expected = ref.fd_ssm_score(s, v, n_proj, variance_reduction, 4.0)
    torch.testing.assert_close(out, expected, **tol(out.dtype))


@pytest.mark.parametrize("dtype", ALL_FLOATS)
@pytest.mark.parametrize("contiguous", [True, False])
def test_fd_dsm_scalar(dtype, contiguous):
    batch, d = 4, 6
    f = rand(2 * batch, dtype=dtype)
    v = rand(batch, d, dtype=dtype, contiguous=contiguous, seed=1)
    target = rand(batch, d, dtype=dtype, contiguous=contiguous, seed=2)
    out = ops.fd_dsm_scalar(f, v, target, 3.0, -1.0)
    assert out.dtype == ref.acc_dtype(dtype)
    torch.testing.assert_close(out, ref.fd_dsm_scalar(f, v, target, 3.0, -1.0)[0], **tol(out.dtype))


def test_mixed_dtypes_follow_reference():
    s = rand(4, 5, dtype=torch.float16)
    v = rand(2, 5, dtype=torch.float32, seed=1)
    torch.testing.assert_close(
        ops.fd_ssm_score(s, v, 1, True, 2.0), ref.fd_ssm_score(s, v, 1, True, 2.0)
    )
    f = rand(4, dtype=torch.bfloat16)
    target = rand(2, 5, seed=3)
    torch.testing.assert_close(
        ops.fd_dsm_scalar(f, v, target, 2.0, 1.0), ref.fd_dsm_scalar(f, v, target, 2.0, 1.0)[0]
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradients_keep_input_dtype(dtype):
    f = rand(6, dtype=dtype).requires_grad_()
    ops.fd_ssm_scalar(f, 1, 2.0, 1.0).sum().backward()
    assert f.grad.dtype == dtype
    y = rand(6, 3, dtype=dtype).requires_grad_()
    ops.fd_combine(y, [1.0, -1.0]).sum().backward()
    assert y.grad.dtype == dtype
    g = rand(4, dtype=dtype).requires_grad_()
    v, target = rand(2, 3, dtype=dtype), rand(2, 3, dtype=dtype, seed=1)
    ops.fd_dsm_scalar(g, v, target, 1.0, 1.0).sum().backward()
    assert g.grad.dtype == dtype


# ---------------------------------------------------------------------------------------
# Gradients


def test_gradcheck_stencil_batch():
    x = rand(3, 4, dtype=torch.float64).requires_grad_()
    v = rand(6, 4, dtype=torch.float64, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ops.stencil_batch(a, b, [0.0, 1.0, -2.0]), (x, v))
    # Only x requires grad: the backward skips grad_v.
    assert torch.autograd.gradcheck(
        lambda a: ops.stencil_batch(a, v.detach(), [0.0, 1.0, -2.0]), (x,)
    )


@pytest.mark.parametrize("noise", ref.NOISES)
def test_gradcheck_random_stencil_batch(noise):
    x = rand(3, 5, dtype=torch.float64).requires_grad_()
    seed = seed_tensor(5)

    def fn(a):
        return ops.random_stencil_batch(a, seed, [0.0, 1.0, -1.0], 2, noise, 0.1)[0]

    assert torch.autograd.gradcheck(fn, (x,))
    _, v = ops.random_stencil_batch(x, seed, [0.0, 1.0, -1.0], 2, noise, 0.1)
    assert not v.requires_grad


def test_gradcheck_fd_combine():
    y = rand(6, 2, 3, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.fd_combine(t, [0.5, -1.0, 0.25]), (y,))


@pytest.mark.parametrize("n_proj", [1, 2])
def test_gradcheck_fd_ssm_scalar(n_proj):
    f = rand(3 * (1 + 2 * n_proj), dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.fd_ssm_scalar(t, n_proj, 3.0, -1.0), (f,))


@pytest.mark.parametrize("variance_reduction", [True, False])
def test_gradcheck_fd_ssm_score(variance_reduction):
    s = rand(8, 5, dtype=torch.float64).requires_grad_()
    v = rand(4, 5, dtype=torch.float64, seed=1)
    assert torch.autograd.gradcheck(
        lambda t: ops.fd_ssm_score(t, v, 2, variance_reduction, 3.0), (s,)
    )


def test_gradcheck_fd_dsm_scalar():
    f = rand(6, dtype=torch.float64).requires_grad_()
    v = rand(3, 4, dtype=torch.float64, seed=1)
    target = rand(3, 4, dtype=torch.float64, seed=2)
    assert torch.autograd.gradcheck(lambda t: ops.fd_dsm_scalar(t, v, target, 2.0, -1.0), (f,))


# ---------------------------------------------------------------------------------------
# opcheck (schema, fake kernels, autograd registration, AOT dispatch)


def _opcheck_cases(dtype, device="cpu", contiguous=True):
    def r(*shape, seed=0, grad=False):
        t = rand(*shape, dtype=dtype, device=device, seed=seed, contiguous=contiguous)
        return t.requires_grad_(grad)

    offsets = [0.0, 1.0, -1.0]
    f = torch.ops.fdsm
    acc = ref.acc_dtype(dtype)
    return [
        (f.stencil_batch, (r(3, 4, grad=True), r(6, 4, seed=1, grad=True), offsets)),
        (
            f.random_stencil_batch,
            (r(3, 4, grad=True), seed_tensor(3, device), offsets, 2, "sphere", 0.1),
        ),
        (f.stencil_batch_backward, (r(15, 4), offsets, 2, True)),
        (f.stencil_batch_backward, (r(15, 4), offsets, 2, False)),
        (f.fd_combine, (r(6, 4, grad=True), [1.0, -2.0, 1.0])),
        (f.fd_combine_backward, (r(2, 4).to(acc), [1.0, -2.0, 1.0])),
        (f.fd_ssm_scalar, (r(10, grad=True), 2, 3.0, 1.0)),
        (f.fd_ssm_scalar_backward, (r(2).to(acc), r(10), 2, 3.0, 1.0)),
        (f.fd_ssm_score, (r(8, 5, grad=True), r(4, 5, seed=1), 2, True, 3.0)),
        (f.fd_ssm_score_backward, (r(2).to(acc), r(8, 5), r(4, 5, seed=1), 2, False, 3.0)),
        (f.fd_dsm_scalar, (r(6, grad=True), r(3, 4), r(3, 4, seed=2), 2.0, -1.0)),
        (f.fd_dsm_scalar_backward, (r(3).to(acc), r(3, seed=1).to(acc), 2.0, -1.0)),
    ]


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", range(12))
def test_opcheck_cpu(dtype, case, contiguous):
    op, args = _opcheck_cases(dtype, contiguous=contiguous)[case]
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------
# Property tests


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 5),
    d=st.integers(1, 13),
    n_proj=st.integers(1, 3),
    offsets=st.lists(
        st.sampled_from([0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5]), min_size=1, max_size=5
    ),
    noise=st.sampled_from(ref.NOISES),
    eps=st.floats(1e-3, 2.0),
    seed=st.integers(0, 2**62 - 1),
    dtype=st.sampled_from(FLOATS),
)
def test_property_stencil_ops(batch, d, n_proj, offsets, noise, eps, seed, dtype):
    x = rand(batch, d, dtype=dtype, seed=seed % 1000)
    out, v = ops.random_stencil_batch(x, seed_tensor(seed), offsets, n_proj, noise, eps)
    rout, rv = ref.random_stencil_batch(x, seed, offsets, n_proj, noise, eps)
    torch.testing.assert_close(v, rv, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(out, rout, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(
        ops.stencil_batch(x, v, offsets), ref.stencil_batch(x, v, offsets), **tol(dtype)
    )
    grad = rand(out.shape[0], d, dtype=dtype, seed=1)
    gx, gv = torch.ops.fdsm.stencil_batch_backward(grad, offsets, n_proj, True)
    rgx, rgv = ref.stencil_batch_backward(grad, offsets, n_proj)
    torch.testing.assert_close(gx, rgx, **tol(dtype))
    torch.testing.assert_close(gv, rgv, **tol(dtype))


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 6),
    d=st.integers(1, 17),
    n_proj=st.integers(1, 3),
    scale=st.floats(0.1, 100.0),
    sign=st.sampled_from([1.0, -1.0]),
    variance_reduction=st.booleans(),
    weights=st.lists(st.floats(-3, 3), min_size=1, max_size=5),
    dtype=st.sampled_from(ALL_FLOATS),
)
def test_property_reductions(batch, d, n_proj, scale, sign, variance_reduction, weights, dtype):
    acc = ref.acc_dtype(dtype)
    t = {"rtol": 1e-4, "atol": 1e-4} if acc == torch.float32 else tol(acc)
    f = rand((1 + 2 * n_proj) * batch, dtype=dtype)
    torch.testing.assert_close(
        ops.fd_ssm_scalar(f, n_proj, scale, sign), ref.fd_ssm_scalar(f, n_proj, scale, sign), **t
    )
    s = rand(2 * n_proj * batch, d, dtype=dtype, seed=1)
    v = rand(n_proj * batch, d, dtype=dtype, seed=2)
    torch.testing.assert_close(
        ops.fd_ssm_score(s, v, n_proj, variance_reduction, scale),
        ref.fd_ssm_score(s, v, n_proj, variance_reduction, scale),
        **t,
    )
    y = rand(len(weights) * batch, d, dtype=dtype, seed=3)
    torch.testing.assert_close(ops.fd_combine(y, weights), ref.fd_combine(y, weights), **t)
    f2, vb, target = rand(2 * batch, dtype=dtype), v[:batch], rand(batch, d, dtype=dtype, seed=4)
    torch.testing.assert_close(
        ops.fd_dsm_scalar(f2, vb, target, scale, sign),
        ref.fd_dsm_scalar(f2, vb, target, scale, sign)[0],
        **t,
    )


# ---------------------------------------------------------------------------------------
# Validation


def test_errors_name_the_argument():
    x, v = torch.randn(2, 3), torch.randn(4, 3)
    s0 = seed_tensor(0)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        ops.stencil_batch(torch.randn(2, 3, 1), v, [1.0])
    with pytest.raises(RuntimeError, match="v must have as many columns"):
        ops.stencil_batch(x, torch.randn(4, 2), [1.0])
    with pytest.raises(RuntimeError, match="v must have P\\*B rows"):
        ops.stencil_batch(x, torch.randn(3, 3), [1.0])
    with pytest.raises(RuntimeError, match="v must have the same dtype"):
        ops.stencil_batch(x, v.double(), [1.0])
    with pytest.raises(RuntimeError, match="offsets must not be empty"):
        ops.stencil_batch(x, v, [])
    with pytest.raises(RuntimeError, match="noise must be one of"):
        ops.random_stencil_batch(x, s0, [1.0], 1, "uniform", 0.1)
    with pytest.raises(RuntimeError, match="eps must be"):
        ops.random_stencil_batch(x, s0, [1.0], 1, "sphere", 0.0)
    with pytest.raises(RuntimeError, match="eps must be"):
        ops.random_stencil_batch(x, s0, [1.0], 1, "sphere", -1.0)
    with pytest.raises(RuntimeError, match="seed must be an int64"):
        ops.random_stencil_batch(x, s0.int(), [1.0], 1, "sphere", 0.1)
    with pytest.raises(RuntimeError, match="seed must be an int64 tensor of shape"):
        ops.random_stencil_batch(x, torch.zeros(2, dtype=torch.int64), [1.0], 1, "sphere", 0.1)
    with pytest.raises(RuntimeError, match="n_projections must be >= 1"):
        ops.random_stencil_batch(x, s0, [1.0], 0, "sphere", 0.1)
    with pytest.raises(RuntimeError, match="x must be a floating-point"):
        ops.random_stencil_batch(x.long(), s0, [1.0], 1, "sphere", 0.1)
    with pytest.raises(RuntimeError, match="y must have K\\*B rows"):
        ops.fd_combine(torch.randn(5, 2), [1.0, -1.0])
    with pytest.raises(RuntimeError, match="f must have \\(1 \\+ 2P\\)\\*B"):
        ops.fd_ssm_scalar(torch.randn(4), 1, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="f must be 1-D"):
        ops.fd_ssm_scalar(torch.randn(3, 1), 1, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="s must have shape"):
        ops.fd_ssm_score(torch.randn(6, 3), v, 1, True, 1.0)
    with pytest.raises(RuntimeError, match="target must have the shape of v"):
        ops.fd_dsm_scalar(torch.randn(4), x, torch.randn(2, 4), 1.0, 1.0)
    with pytest.raises(RuntimeError, match="grad must have"):
        torch.ops.fdsm.stencil_batch_backward(torch.randn(4, 3), [0.0, 1.0], 2, True)


@needs_cuda
def test_seed_on_wrong_device():
    with pytest.raises(RuntimeError, match="seed must be on the same device as x"):
        ops.random_stencil_batch(
            torch.randn(2, 3, device="cuda"), seed_tensor(0), [1.0], 1, "sphere", 0.1
        )


def test_seed_on_wrong_device_meta():
    # A CPU x with a meta seed exercises the same check without a GPU.
    with pytest.raises(RuntimeError, match="seed must be on the same device as x"):
        ops.random_stencil_batch(
            torch.randn(2, 3),
            torch.zeros(1, dtype=torch.int64, device="meta"),
            [1.0],
            1,
            "sphere",
            0.1,
        )


# ---------------------------------------------------------------------------------------
# Seeds, build info, torch.compile


def test_draw_seed():
    s = ops.draw_seed("cpu")
    assert s.dtype == torch.int64 and s.shape == (1,) and 0 <= int(s) < 2**62
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert int(ops.draw_seed("cpu", g1)) == int(ops.draw_seed("cpu", g2))
    # Eager draws run the body of the op fdsm::draw_seed (what compiled code calls) directly:
    # the same key and the same default-generator state afterwards.
    draws = []
    for draw in (lambda: ops.draw_seed("cpu"), lambda: torch.ops.fdsm.draw_seed("cpu")):
        torch.manual_seed(7)
        draws.append((draw(), torch.randn(2)))
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])


def test_build_info():
    assert _build_info.TORCH_VERSION == torch.__version__
    assert ops.has_cuda_kernels() == _build_info.CUDA_KERNELS
    if os.environ.get("FDSM_EXPECT_CUDA_KERNELS") == "1":
        assert _build_info.CUDA_KERNELS is True
        assert _build_info.CUDA_ARCHITECTURES


def test_torch_compile_fullgraph_matches_eager():
    def loss_fn(x, seed):
        stacked, v = ops.random_stencil_batch(x, seed, [0.0, 1.0, -1.0], 2, "sphere", 0.1)
        f = (stacked**2).sum(1) * -0.5
        return ops.fd_ssm_scalar(f, 2, x.shape[1] / 0.01, 1.0).mean()

    # float64: in float32 the FD cancellation amplifies inductor's different summation order.
    x = rand(4, 6, dtype=torch.float64).requires_grad_()
    seed = seed_tensor(11)
    eager = loss_fn(x, seed)
    (grad_eager,) = torch.autograd.grad(eager, x)
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    out = compiled(x, seed)
    (grad_compiled,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad_compiled, grad_eager)


# ---------------------------------------------------------------------------------------
# CUDA == CPU


@needs_cuda
@pytest.mark.parametrize("dtype", ALL_FLOATS)
@pytest.mark.parametrize("noise", ref.NOISES)
def test_cuda_random_stencil_batch_matches_cpu(dtype, noise):
    x = rand(5, 1030, dtype=dtype)
    offsets = [0.0, 1.0, -1.0, 2.0]
    cpu = ops.random_stencil_batch(x, seed_tensor(2**50 + 3), offsets, 2, noise, 0.1)
    gpu = ops.random_stencil_batch(x.cuda(), seed_tensor(2**50 + 3, "cuda"), offsets, 2, noise, 0.1)
    # The directions are the same operations in the same order on both devices, and the build
    # pins the rounding (nvcc --fmad=false, exact division and square root; g++
    # -ffp-contract=off): the stacked rows and directions are bit-identical, in every dtype.
    for a, b in zip(cpu, gpu, strict=True):
        assert b.dtype == a.dtype and b.shape == a.shape
        assert torch.equal(b.cpu(), a), f"{noise} {dtype}: CUDA directions differ from CPU"


@needs_cuda
@pytest.mark.parametrize("dtype", ALL_FLOATS)
def test_cuda_ops_match_cpu(dtype):
    """Bit for bit, except the reductions over d (fd_ssm_score, fd_dsm_scalar and the
    backward of fd_ssm_score without variance reduction): the kernels sum them in warp and
    block trees, the CPU in a loop, so they agree to tol(dtype) only (as under emulation,
    test_cuda_emulation.py)."""
    f = torch.ops.fdsm
    for op, args in _opcheck_cases(dtype):
        cuda_args = [a.detach().cuda() if isinstance(a, torch.Tensor) else a for a in args]
        cpu_args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        expected, got = op(*cpu_args), op(*cuda_args)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = got if isinstance(got, tuple) else (got,)
        reduction = op in (f.fd_ssm_score, f.fd_dsm_scalar) or (
            op is f.fd_ssm_score_backward and args[4] is False)
        for e, g in zip(expected, got, strict=True):
            assert g.dtype == e.dtype and g.shape == e.shape
            if reduction:
                torch.testing.assert_close(g.cpu(), e, **tol(e.dtype))
            else:
                assert torch.equal(g.cpu(), e), f"{op}: CUDA differs from CPU"


@needs_cuda
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", range(12))
def test_opcheck_cuda(dtype, case):
    op, args = _opcheck_cases(dtype, "cuda")[case]
    torch.library.opcheck(op, args)
