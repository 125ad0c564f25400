#pragma once

// Glue between the registered CUDA ops and the launchers (g++ only): device checks, the
// current stream, and C10_CUDA_CHECK for the launch status.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/op_bodies.h"

namespace fdsm {

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_launch(cudaError_t status) { C10_CUDA_CHECK(status); }

}  // namespace fdsm
