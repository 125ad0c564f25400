// CUDA wrappers of fd_combine and fd_combine_backward (kernels in fd_combine_kernels.cu).

#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cuda/cuda_common.h"

namespace fdsm {
namespace {

at::Tensor fd_combine_cuda(const at::Tensor& y_in, at::ArrayRef<double> weights) {
  check_fd_combine(y_in, weights);
  check_cuda(y_in, "y");
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous();
  std::vector<int64_t> out_shape(y.sizes().begin(), y.sizes().end());
  out_shape[0] /= static_cast<int64_t>(weights.size());
  at::Tensor out = at::empty(out_shape, y.options().dtype(acc_dtype(y.scalar_type())));
  C10_CUDA_CHECK(launch_fd_combine(to_dtype(y.scalar_type()), y.const_data_ptr(),
                                   out.mutable_data_ptr(), to_weights(weights), out.numel(),
                                   current_stream()));
  return out;
}

at::Tensor fd_combine_backward_cuda(const at::Tensor& grad_in, at::ArrayRef<double> weights) {
  check_fd_combine_backward(grad_in, weights);
  check_cuda(grad_in, "grad");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  std::vector<int64_t> out_shape(grad.sizes().begin(), grad.sizes().end());
  out_shape[0] *= static_cast<int64_t>(weights.size());
  at::Tensor out = at::empty(out_shape, grad.options());
  C10_CUDA_CHECK(launch_fd_combine_backward(to_dtype(grad.scalar_type()), grad.const_data_ptr(),
                                            out.mutable_data_ptr(), to_weights(weights),
                                            grad.numel(), current_stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fdsm, CUDA, m) {
  m.impl("fd_combine", &fd_combine_cuda);
  m.impl("fd_combine_backward", &fd_combine_backward_cuda);
}

}  // namespace fdsm
