#pragma once

// Glue between ATen tensors and the ATen-free launchers (g++ only).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launchers.h"

namespace fdsm {

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::Float;
    case at::kDouble:
      return DType::Double;
    case at::kHalf:
      return DType::Half;
    case at::kBFloat16:
      return DType::BFloat16;
    default:
      TORCH_CHECK(false, "fdsm CUDA kernels support float16, bfloat16, float32 and float64, got ",
                  t);
  }
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
}

inline Weights to_weights(at::ArrayRef<double> weights) {
  Weights w{};
  w.n = static_cast<int>(weights.size());
  for (int k = 0; k < w.n; ++k) w.w[k] = weights[k];
  return w;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace fdsm
