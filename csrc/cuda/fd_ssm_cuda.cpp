// CUDA wrappers of the FD-SSM reductions (kernels in fd_ssm_kernels.cu).

#include <torch/library.h>

#include "checks.h"
#include "cuda/cuda_common.h"

namespace fdsm {
namespace {

at::Tensor fd_ssm_scalar_cuda(const at::Tensor& f, int64_t n_projections, double scale,
                              double sign) {
  const int64_t B = check_fd_ssm_scalar(f, n_projections);
  check_cuda(f, "f");
  const c10::cuda::CUDAGuard guard(f.device());
  return run_fd_ssm_scalar(f, B, n_projections, scale, sign, current_stream(), check_launch);
}

at::Tensor fd_ssm_scalar_backward_cuda(const at::Tensor& grad, const at::Tensor& f,
                                       int64_t n_projections, double scale, double sign) {
  const int64_t B = check_fd_ssm_scalar(f, n_projections);
  check_reduction_grad(grad, f, B, "f");
  check_cuda(f, "f");
  const c10::cuda::CUDAGuard guard(f.device());
  return run_fd_ssm_scalar_backward(grad, f, B, n_projections, scale, sign, current_stream(),
                                    check_launch);
}

at::Tensor fd_ssm_score_cuda(const at::Tensor& s, const at::Tensor& v, int64_t n_projections,
                             bool variance_reduction, double scale) {
  const int64_t B = check_fd_ssm_score(s, v, n_projections);
  check_cuda(s, "s");
  const c10::cuda::CUDAGuard guard(s.device());
  return run_fd_ssm_score(s, v, B, n_projections, variance_reduction, scale, current_stream(),
                          check_launch);
}

at::Tensor fd_ssm_score_backward_cuda(const at::Tensor& grad, const at::Tensor& s,
                                      const at::Tensor& v, int64_t n_projections,
                                      bool variance_reduction, double scale) {
  const int64_t B = check_fd_ssm_score(s, v, n_projections);
  check_reduction_grad(grad, s, B, "s");
  check_cuda(s, "s");
  const c10::cuda::CUDAGuard guard(s.device());
  return run_fd_ssm_score_backward(grad, s, v, B, n_projections, variance_reduction, scale,
                                   current_stream(), check_launch);
}

}  // namespace

TORCH_LIBRARY_IMPL(fdsm, CUDA, m) {
  m.impl("fd_ssm_scalar", &fd_ssm_scalar_cuda);
  m.impl("fd_ssm_scalar_backward", &fd_ssm_scalar_backward_cuda);
  m.impl("fd_ssm_score", &fd_ssm_score_cuda);
  m.impl("fd_ssm_score_backward", &fd_ssm_score_backward_cuda);
}

}  // namespace fdsm
