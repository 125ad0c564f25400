// Tiny kernels that check the emulator itself: correct barriers and shuffles give known
// values, and each kind of fault is reported instead of hanging.

#include "emulator.h"

#include "cuda/cuda_utils.cuh"

namespace fdsm_emu {
namespace {

__global__ void block_sum_kernel(double* out) {
  __shared__ double shared[32];
  double v[1] = {static_cast<double>(threadIdx.x + 1)};
  fdsm::block_sum<1>(v, shared);
  out[threadIdx.x] = v[0];
}

// Lane l reads lane l ^ 1, l + 2 (down) and lane 3 of its segment of 8 lanes.
__global__ void shuffles_kernel(double* out) {
  const double l = threadIdx.x;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, l, 1, 8);
  out[32 + threadIdx.x] = __shfl_down_sync(0xffffffffu, l, 2, 8);
  out[64 + threadIdx.x] = __shfl_sync(0xffffffffu, l, 3, 8);
}

__global__ void skip_barrier_kernel(double* out) {
  if (threadIdx.x == 5) return;  // the bug: thread 5 never reaches the barrier
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void early_exit_shuffle_kernel(double* out) {
  if (threadIdx.x >= 16) return;  // the bug: half of the warp leaves before the warp sum
  out[threadIdx.x] = fdsm::warp_sum(1.0);
}

__global__ void warp_sum_kernel(double* out) { out[threadIdx.x] = fdsm::warp_sum(1.0); }

__global__ void partial_mask_kernel(double* out) {
  out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, 1.0, 1);
}

// Warp 1 is split: lanes 0-15 wait at the block barrier, lanes 16-31 at a shuffle.
__global__ void barrier_vs_shuffle_kernel(double* out) {
  if (threadIdx.x < 48) {
    __syncthreads();
  } else {
    out[threadIdx.x] = fdsm::warp_sum(1.0);
  }
}

__global__ void grid_kernel(double* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = gridDim.x;
}

void check(cudaError_t status) {
  if (status != cudaSuccess) {
    throw std::runtime_error("launch failed (cudaError " + std::to_string(status) +
                             "): " + last_error_message());
  }
}

}  // namespace

std::vector<double> run_case(const std::string& name) {
  std::vector<double> out(1024, 0.0);
  double* p = out.data();
  if (name == "block_sum_1024") {
    FDSM_LAUNCH(block_sum_kernel, 1, 1024, 0, nullptr)(p);
  } else if (name == "block_sum_96") {
    FDSM_LAUNCH(block_sum_kernel, 1, 96, 0, nullptr)(p);
    out.resize(96);
  } else if (name == "shuffles") {
    FDSM_LAUNCH(shuffles_kernel, 1, 32, 0, nullptr)(p);
    out.resize(96);
  } else if (name == "skip_barrier") {
    FDSM_LAUNCH(skip_barrier_kernel, 1, 64, 0, nullptr)(p);
  } else if (name == "early_exit_shuffle") {
    FDSM_LAUNCH(early_exit_shuffle_kernel, 1, 32, 0, nullptr)(p);
  } else if (name == "partial_warp_shuffle") {
    FDSM_LAUNCH(warp_sum_kernel, 1, 48, 0, nullptr)(p);
  } else if (name == "partial_mask") {
    FDSM_LAUNCH(partial_mask_kernel, 1, 32, 0, nullptr)(p);
  } else if (name == "barrier_vs_shuffle") {
    FDSM_LAUNCH(barrier_vs_shuffle_kernel, 1, 64, 0, nullptr)(p);
  } else if (name == "grid_10") {
    FDSM_LAUNCH(grid_kernel, 10, 32, 0, nullptr)(p);
    out.resize(10);
  } else if (name == "block_too_large") {
    FDSM_LAUNCH(warp_sum_kernel, 1, 2048, 0, nullptr)(p);
  } else if (name == "empty_grid") {
    FDSM_LAUNCH(warp_sum_kernel, 0, 32, 0, nullptr)(p);
  } else if (name == "too_much_shared_memory") {
    FDSM_LAUNCH(warp_sum_kernel, 1, 32, 64 * 1024, nullptr)(p);
  } else {
    throw std::invalid_argument("unknown emulator case '" + name + "'");
  }
  check(cudaGetLastError());
  return out;
}

}  // namespace fdsm_emu
