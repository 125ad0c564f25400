// CUDA wrappers of the FD-DSM reduction (kernels in fd_dsm_kernels.cu).

#include <torch/library.h>

#include "checks.h"
#include "cuda/cuda_common.h"

namespace fdsm {
namespace {

std::tuple<at::Tensor, at::Tensor> fd_dsm_scalar_cuda(const at::Tensor& f, const at::Tensor& v,
                                                      const at::Tensor& target, double scale,
                                                      double sign) {
  const int64_t B = check_fd_dsm_scalar(f, v, target);
  check_cuda(f, "f");
  const c10::cuda::CUDAGuard guard(f.device());
  return run_fd_dsm_scalar(f, v, target, B, scale, sign, current_stream(), check_launch);
}

at::Tensor fd_dsm_scalar_backward_cuda(const at::Tensor& grad, const at::Tensor& residual,
                                       double scale, double sign) {
  check_fd_dsm_scalar_backward(grad, residual);
  check_cuda(residual, "residual");
  const c10::cuda::CUDAGuard guard(residual.device());
  return run_fd_dsm_scalar_backward(grad, residual, scale, sign, current_stream(), check_launch);
}

}  // namespace

TORCH_LIBRARY_IMPL(fdsm, CUDA, m) {
  m.impl("fd_dsm_scalar", &fd_dsm_scalar_cuda);
  m.impl("fd_dsm_scalar_backward", &fd_dsm_scalar_backward_cuda);
}

}  // namespace fdsm
