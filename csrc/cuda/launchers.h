#pragma once

// Host-side entry points of the CUDA kernels. This header is shared by the nvcc-compiled
// .cu files and the g++-compiled wrappers, so it must not include ATen: tensors cross it
// as raw pointers plus a dtype tag, and every launcher returns the launch status for the
// wrapper to check with C10_CUDA_CHECK.

#include <cuda_runtime_api.h>

#include <cstdint>

#include "macros.h"
#include "stencil_layout.h"

namespace fdsm {

enum class DType : int { Float = 0, Double = 1, Half = 2, BFloat16 = 3 };

struct Weights {
  int n;
  double w[kMaxOffsets];
};

cudaError_t launch_stencil_batch(DType dtype, const void* x, const void* v, void* out,
                                 const StencilLayout& L, int64_t d, cudaStream_t stream);

cudaError_t launch_random_stencil_batch(DType dtype, const void* x, const int64_t* seed,
                                        void* out, void* v, const StencilLayout& L, int64_t d,
                                        Noise noise, double eps, cudaStream_t stream);

// grad_v may be null (compute_grad_v = false).
cudaError_t launch_stencil_batch_backward(DType dtype, const void* grad, void* grad_x,
                                          void* grad_v, const StencilLayout& L, int64_t d,
                                          cudaStream_t stream);

// out is in the accumulation dtype of `dtype`; n = B * (elements per row).
cudaError_t launch_fd_combine(DType dtype, const void* y, void* out, const Weights& w,
                              int64_t n, cudaStream_t stream);

// grad and out share `dtype`.
cudaError_t launch_fd_combine_backward(DType dtype, const void* grad, void* out,
                                       const Weights& w, int64_t n, cudaStream_t stream);

cudaError_t launch_fd_ssm_scalar(DType dtype, const void* f, void* loss, int64_t B, int64_t P,
                                 double scale, double sign, cudaStream_t stream);

// grad is in the accumulation dtype, grad_f in `dtype` (f's).
cudaError_t launch_fd_ssm_scalar_backward(DType dtype, const void* grad, const void* f,
                                          void* grad_f, int64_t B, int64_t P, double scale,
                                          double sign, cudaStream_t stream);

// terms: workspace of P*B values in the accumulation dtype (one per projection row).
cudaError_t launch_fd_ssm_score(DType dtype, const void* s, const void* v, void* terms,
                                void* loss, int64_t B, int64_t P, int64_t d,
                                bool variance_reduction, double scale, cudaStream_t stream);

cudaError_t launch_fd_ssm_score_backward(DType dtype, const void* grad, const void* s,
                                         const void* v, void* grad_s, int64_t B, int64_t P,
                                         int64_t d, bool variance_reduction, double scale,
                                         cudaStream_t stream);

cudaError_t launch_fd_dsm_scalar(DType dtype, const void* f, const void* v, const void* target,
                                 void* loss, void* residual, int64_t B, int64_t d, double scale,
                                 double sign, cudaStream_t stream);

// dtype is the residual's (float or double); grad shares it.
cudaError_t launch_fd_dsm_scalar_backward(DType dtype, const void* grad, const void* residual,
                                          void* grad_f, int64_t B, double scale, double sign,
                                          cudaStream_t stream);

}  // namespace fdsm
