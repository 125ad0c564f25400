"""The CUDA kernels of csrc/cuda, run on the CPU under host emulation, against the CPU ops.

python_tests/cuda_emulation compiles the very same .cu sources with g++ and an emulation
header: every CUDA thread is a fiber, __syncthreads / warp shuffles are barriers, blocks run
one after another. The registered CUDA ops' bodies (csrc/cuda/op_bodies.h) run on CPU
tensors, so every launcher, its launch configuration, index math, grid- and block-stride
loops, block and warp reductions and dtype dispatch are exercised here without a GPU, also
with the grid capped at 1 and 3 blocks so that every grid-stride loop wraps. Device rounding
and races between threads are not (see README, "What has run on a GPU").
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

import fdsm_ext  # noqa: F401  (registers torch.ops.fdsm)

ROOT = Path(__file__).resolve().parents[1]
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"
SOURCES = ["bindings.cpp", "emulator.cpp", "emulator_cases.cpp", "stencil_kernels.cpp",
           "fd_combine_kernels.cpp", "fd_ssm_kernels.cpp", "fd_dsm_kernels.cpp"]
ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# (batch B, dimension d, projections P, offsets): d = 1, d not a multiple of 32, d > 1024
# (more than one block-stride pass in every row kernel), each with a zero offset in the
# middle. B and P give every kernel more rows than a capped grid holds (256 rows of d = 1,
# 8 rows of d = 37 per block), so that the grid-stride loops wrap.
SHAPES = {
    "d1": (300, 1, 2, (-1.0, 0.0, 1.0)),
    "d37": (20, 37, 3, (-2.0, -1.0, 0.0, 1.0, 2.0)),
    "d1100": (2, 1100, 2, (1.0, 0.0, -1.0)),
}
GRID_CAPS = (0, 1, 3)  # 0: the launchers' own grids


def cuda_include_candidates() -> list[Path]:
    candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include",
                  Path("/usr/local/cuda/include")]
    return candidates + [Path(p) / "nvidia" / "cu13" / "include" for p in sys.path if p]


def cuda_include_dir() -> Path | None:
    """A directory with the CUDA runtime headers (they compile as host C++)."""
    for path in cuda_include_candidates():
        if (path / "cuda_runtime.h").is_file() and (path / "cuda_bf16.h").is_file():
            return path
    return None


def cannot_build(reason: str) -> None:
    """Skip with the reason (shown by ``pytest -rs``); in CI (CI=true) or where CUDA kernels
    are expected (FDSM_EXPECT_CUDA_KERNELS=1) fail with it instead: there the emulation must
    run."""
    if (os.environ.get("CI", "").lower() in ("true", "1")
            or os.environ.get("FDSM_EXPECT_CUDA_KERNELS") == "1"):
        pytest.fail(f"CUDA emulation cannot be built: {reason}", pytrace=False)
    pytest.skip(f"CUDA emulation cannot be built: {reason}")


@pytest.fixture(scope="module")
def emu():
    """The emulated CUDA ops (compiled once into build/cuda_emulation, then cached)."""
    include = cuda_include_dir()
    if include is None:
        cannot_build("CUDA runtime headers (cuda_runtime.h, cuda_bf16.h) not found in "
                     f"{cuda_include_candidates()[0]}, /usr/local/cuda/include or "
                     "nvidia/cu13/include on sys.path: set CUDA_HOME")
    build = ROOT / "build" / "cuda_emulation"
    build.mkdir(parents=True, exist_ok=True)
    try:
        module = cpp_extension.load(
            name="fdsm_cuda_emulation",
            sources=[str(EMULATION / s) for s in SOURCES],
            extra_include_paths=[str(ROOT / "csrc"), str(include)],
            # -ffp-contract=off: the shared math rounds every operation, as on the GPU build.
            extra_cflags=["-std=c++20", "-O2", "-ffp-contract=off", "-fvisibility=hidden",
                          "-Wno-unknown-pragmas"],
            build_directory=str(build),
            with_cuda=False,
        )
    except Exception as err:  # a compiler error, a missing g++ or ninja
        lines = str(err).strip().splitlines() or [type(err).__name__]
        cannot_build(f"building the emulation with headers from {include} failed: {lines[-1]}"
                     f" (full log: {build})")
    yield module
    module.set_grid_cap(0)


@pytest.fixture(params=GRID_CAPS, ids=lambda c: f"grid{c}" if c else "grid")
def capped(emu, request):
    emu.set_grid_cap(request.param)
    yield emu
    emu.set_grid_cap(0)


def rand(*shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def n_rows(offsets, batch, n_proj):
    return sum(batch if g == 0 else n_proj * batch for g in offsets)


def assert_bitwise(got, expected):
    for g, e in zip(got if isinstance(got, tuple) else (got,),
                    expected if isinstance(expected, tuple) else (expected,)):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert torch.equal(g, e), f"max abs difference {(g.double() - e.double()).abs().max()}"


def reduction_tol(dtype):
    """Reductions are summed in a different order (warp/block trees vs a loop): float32
    accumulation (also for 16-bit inputs) within rtol = atol = 1e-5, float64 within 1e-12."""
    return {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5,
                                                                           "atol": 1e-5}


ops = torch.ops.fdsm
dtypes = pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
shapes = pytest.mark.parametrize("shape", SHAPES, ids=str)


# ---------------------------------------------------------------------------------------
# The emulator itself


def test_emulated_block_sum_and_shuffles(emu):
    assert emu.run_case("block_sum_1024") == [1024 * 1025 / 2] * 1024
    assert emu.run_case("block_sum_96") == [96 * 97 / 2] * 96
    got = emu.run_case("shuffles")
    lanes = range(32)
    assert got[:32] == [float(i ^ 1) for i in lanes]
    assert got[32:64] == [float(i + 2 if i % 8 < 6 else i) for i in lanes]
    assert got[64:] == [float(i // 8 * 8 + 3) for i in lanes]


@pytest.mark.parametrize("cap,expected", [(0, 10), (1, 1), (3, 3)])
def test_emulated_grid_cap(emu, cap, expected):
    emu.set_grid_cap(cap)
    try:
        got = emu.run_case("grid_10")
    finally:
        emu.set_grid_cap(0)
    assert got == [float(expected)] * expected + [0.0] * (10 - expected)


@pytest.mark.parametrize("case,message", [
    ("skip_barrier", r"__syncthreads\(\) at emulator_cases.cpp:\d+: threads 5 exited"),
    ("early_exit_shuffle", r"__shfl_down_sync at cuda_utils.cuh:\d+ in warp 0: threads 16, 17"),
    ("partial_warp_shuffle", r"full mask in warp 1, which has only 16 threads"),
    ("partial_mask", r"partial mask 0xffff"),
    ("barrier_vs_shuffle", r"deadlock: threads 0, 1, .* wait at __syncthreads\(\) at "
                           r"emulator_cases.cpp:\d+, threads 48, 49, .* at __shfl_down_sync"),
    ("block_too_large", r"invalid launch configuration of warp_sum_kernel: block \(2048"),
    ("empty_grid", r"invalid launch configuration of warp_sum_kernel: grid \(0"),
    ("too_much_shared_memory", r"65536 bytes of dynamic shared memory exceed 49152"),
])
def test_emulator_reports_faults(emu, case, message):
    with pytest.raises(RuntimeError, match=message):
        emu.run_case(case)
    assert emu.run_case("block_sum_96")[0] == 96 * 97 / 2  # and it recovers


# ---------------------------------------------------------------------------------------
# Every launcher == the CPU op. Element-wise ops and the directions: bit for bit.


@dtypes
@shapes
def test_stencil_batch(capped, dtype, shape):
    B, d, P, offsets = SHAPES[shape]
    x, v = rand(B, d, dtype=dtype, seed=0), rand(P * B, d, dtype=dtype, seed=1)
    assert_bitwise(capped.stencil_batch(x, v, offsets), ops.stencil_batch(x, v, offsets))


@dtypes
@shapes
@pytest.mark.parametrize("noise", ["sphere", "gaussian", "rademacher"])
def test_random_stencil_batch(capped, dtype, shape, noise):
    B, d, P, offsets = SHAPES[shape]
    x = rand(B, d, dtype=dtype, seed=0)
    seed = torch.tensor([2**40 + 7], dtype=torch.int64)
    # The sphere's row norm is summed in the same order on both (csrc/sphere_norm.h).
    assert_bitwise(capped.random_stencil_batch(x, seed, offsets, P, noise, 0.1),
                   ops.random_stencil_batch(x, seed, offsets, P, noise, 0.1))


@dtypes
@shapes
@pytest.mark.parametrize("grad_v", [True, False], ids=["grad_v", "no_grad_v"])
def test_stencil_batch_backward(capped, dtype, shape, grad_v):
    B, d, P, offsets = SHAPES[shape]
    grad = rand(n_rows(offsets, B, P), d, dtype=dtype, seed=2)
    assert_bitwise(capped.stencil_batch_backward(grad, offsets, P, grad_v),
                   ops.stencil_batch_backward(grad, offsets, P, grad_v))


@dtypes
@shapes
def test_fd_combine_and_backward(capped, dtype, shape):
    B, d, _, offsets = SHAPES[shape]
    weights = [0.5 * g for g in offsets]
    y = rand(len(offsets) * B, d, dtype=dtype, seed=3)
    assert_bitwise(capped.fd_combine(y, weights), ops.fd_combine(y, weights))
    grad = rand(B, d, dtype=dtype, seed=4)
    assert_bitwise(capped.fd_combine_backward(grad, weights),
                   ops.fd_combine_backward(grad, weights))


@dtypes
@shapes
def test_fd_ssm_scalar_and_backward(capped, dtype, shape):
    B, _, P, _ = SHAPES[shape]
    f = rand((1 + 2 * P) * B, dtype=dtype, seed=5)
    for sign in (1.0, -1.0):
        assert_bitwise(capped.fd_ssm_scalar(f, P, 0.7, sign), ops.fd_ssm_scalar(f, P, 0.7, sign))
        grad = rand(B, dtype=acc(dtype), seed=6)
        assert_bitwise(capped.fd_ssm_scalar_backward(grad, f, P, 0.7, sign),
                       ops.fd_ssm_scalar_backward(grad, f, P, 0.7, sign))


@dtypes
@shapes
@pytest.mark.parametrize("vr", [True, False], ids=["vr", "plain"])
def test_fd_ssm_score_and_backward(capped, dtype, shape, vr):
    B, d, P, _ = SHAPES[shape]
    s, v = rand(2 * P * B, d, dtype=dtype, seed=7), rand(P * B, d, dtype=dtype, seed=8)
    torch.testing.assert_close(capped.fd_ssm_score(s, v, P, vr, 0.3),
                               ops.fd_ssm_score(s, v, P, vr, 0.3), **reduction_tol(dtype))
    grad = rand(B, dtype=acc(dtype), seed=9)
    got = capped.fd_ssm_score_backward(grad, s, v, P, vr, 0.3)
    expected = ops.fd_ssm_score_backward(grad, s, v, P, vr, 0.3)
    if vr:  # element-wise
        assert_bitwise(got, expected)
    else:  # every entry scales with the row sum v.(s+ + s-), rounded once more in 16 bits
        torch.testing.assert_close(got.to(acc(dtype)), expected.to(acc(dtype)),
                                   **reduction_tol(dtype) if dtype in (torch.float32,
                                                                       torch.float64)
                                   else {"rtol": 1e-2, "atol": 1e-3})


@dtypes
@shapes
def test_fd_dsm_scalar_and_backward(capped, dtype, shape):
    B, d, _, _ = SHAPES[shape]
    f = rand(2 * B, dtype=dtype, seed=10)
    v, target = rand(B, d, dtype=dtype, seed=11), rand(B, d, dtype=dtype, seed=12)
    loss, residual = capped.fd_dsm_scalar(f, v, target, 0.4, -1.0)
    loss_cpu, residual_cpu = ops.fd_dsm_scalar(f, v, target, 0.4, -1.0)
    torch.testing.assert_close(residual, residual_cpu, **reduction_tol(dtype))
    torch.testing.assert_close(loss, loss_cpu, **reduction_tol(dtype))
    grad = rand(B, dtype=acc(dtype), seed=13)
    assert_bitwise(capped.fd_dsm_scalar_backward(grad, residual_cpu, 0.4, -1.0),
                   ops.fd_dsm_scalar_backward(grad, residual_cpu, 0.4, -1.0))


def test_emulated_ops_validate_like_the_cpu_ops(emu):
    x = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="v must have as many columns as x"):
        emu.stencil_batch(x, torch.zeros(2, 4), [1.0])
    with pytest.raises(RuntimeError, match="noise must be one of"):
        emu.random_stencil_batch(x, torch.zeros(1, dtype=torch.int64), [1.0], 1, "uniform", 0.1)
