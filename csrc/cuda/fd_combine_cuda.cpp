// CUDA wrappers of fd_combine and fd_combine_backward (kernels in fd_combine_kernels.cu).

#include <torch/library.h>

#include "checks.h"
#include "cuda/cuda_common.h"

namespace fdsm {
namespace {

at::Tensor fd_combine_cuda(const at::Tensor& y, at::ArrayRef<double> weights) {
  check_fd_combine(y, weights);
  check_cuda(y, "y");
  const c10::cuda::CUDAGuard guard(y.device());
  return run_fd_combine(y, weights, current_stream(), check_launch);
}

at::Tensor fd_combine_backward_cuda(const at::Tensor& grad, at::ArrayRef<double> weights) {
  check_fd_combine_backward(grad, weights);
  check_cuda(grad, "grad");
  const c10::cuda::CUDAGuard guard(grad.device());
  return run_fd_combine_backward(grad, weights, current_stream(), check_launch);
}

}  // namespace

TORCH_LIBRARY_IMPL(fdsm, CUDA, m) {
  m.impl("fd_combine", &fd_combine_cuda);
  m.impl("fd_combine_backward", &fd_combine_backward_cuda);
}

}  // namespace fdsm
