#pragma once

// Device helpers for the .cu files: dtype dispatch without ATen, grid sizing, block sums.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "launchers.h"

// Every launch goes through FDSM_LAUNCH(kernel, grid, block, shared_bytes, stream)(args...):
// <<<...>>> under nvcc; the host emulation of the kernels (python_tests/cuda_emulation, g++)
// defines it as its fiber launcher before including this file.
#ifdef __CUDACC__
#define FDSM_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  kernel<<<grid, block, shared_bytes, stream>>>
#elif !defined(FDSM_LAUNCH)
#error "the .cu files are compiled by nvcc, or by g++ with python_tests/cuda_emulation/emulator.h"
#endif

namespace fdsm {

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_type_t = typename AccType<T>::type;

// Calls fn with a value of the storage type of `dtype` (the value only carries the type).
template <typename Fn>
cudaError_t dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float:
      fn(float{});
      break;
    case DType::Double:
      fn(double{});
      break;
    case DType::Half:
      fn(__half{});
      break;
    case DType::BFloat16:
      fn(__nv_bfloat16{});
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

constexpr int kThreads = 256;

// Grid-stride loops cover any size; the cap only bounds the launch itself.
inline unsigned grid_for(int64_t n, int threads = kThreads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, 1 << 20)));
}

// Row kernels use 2-D blocks: blockDim.x threads along a row (its lanes), blockDim.y rows
// per block. Up to 1023 entries a row gets a part of a warp (at most 32 lanes, so rows
// reduce with warp shuffles alone and short rows do not idle most of a block); longer rows
// get a whole block each.
inline dim3 row_block(int64_t d) {
  unsigned lanes = 1;
  while (lanes < d && lanes < 32) lanes *= 2;
  if (d >= 1024) lanes = kThreads;
  return dim3(lanes, kThreads / lanes);
}
inline dim3 row_block_lanes(int lanes) { return dim3(lanes, kThreads / lanes); }
inline unsigned grid_for_rows(int64_t rows, dim3 block) { return grid_for(rows, block.y); }

template <typename T>
__device__ inline T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sums N values over the block; every thread gets the totals. Deterministic (fixed tree),
// so CUDA results do not depend on scheduling. `shared` needs N * 32 slots.
template <int N, typename T>
__device__ inline void block_sum(T (&vals)[N], T* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n_warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int j = 0; j < N; ++j) vals[j] = warp_sum(vals[j]);
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < N; ++j) shared[j * 32 + warp] = vals[j];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      T v = lane < n_warps ? shared[j * 32 + lane] : T(0);
      v = warp_sum(v);
      if (lane == 0) shared[j * 32] = v;
    }
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < N; ++j) vals[j] = shared[j * 32];
  // The slots are reused by the next call of the same block.
  __syncthreads();
}

// Sums N values over the lanes of each row of a row_block: an xor butterfly within the row's
// blockDim.x <= 32 lanes, else (one row per block) block_sum. Every lane gets the totals.
// All threads of the block must call it (inactive rows with zeros): it holds barriers.
template <int N, typename T>
__device__ inline void row_sum(T (&vals)[N], T* shared) {
  if (blockDim.x > 32) {
    block_sum<N>(vals, shared);
    return;
  }
#pragma unroll
  for (int j = 0; j < N; ++j) {
    for (int h = blockDim.x / 2; h > 0; h >>= 1) {
      vals[j] += __shfl_xor_sync(0xffffffffu, vals[j], h, blockDim.x);
    }
  }
}

}  // namespace fdsm
