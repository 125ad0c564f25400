// CUDA wrappers of the FD-DSM reduction (kernels in fd_dsm_kernels.cu).

#include <torch/library.h>

#include "checks.h"
#include "cuda/cuda_common.h"

namespace fdsm {
namespace {

std::tuple<at::Tensor, at::Tensor> fd_dsm_scalar_cuda(const at::Tensor& f_in,
                                                      const at::Tensor& v_in,
                                                      const at::Tensor& target_in, double scale,
                                                      double sign) {
  const int64_t B = check_fd_dsm_scalar(f_in, v_in, target_in);
  check_cuda(f_in, "f");
  const c10::cuda::CUDAGuard guard(f_in.device());
  const at::Tensor f = f_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const auto acc_options = f.options().dtype(acc_dtype(f.scalar_type()));
  at::Tensor loss = at::empty({B}, acc_options);
  at::Tensor residual = at::empty({B}, acc_options);
  C10_CUDA_CHECK(launch_fd_dsm_scalar(to_dtype(f.scalar_type()), f.const_data_ptr(),
                                      v.const_data_ptr(), target.const_data_ptr(),
                                      loss.mutable_data_ptr(), residual.mutable_data_ptr(), B,
                                      v.size(1), scale, sign, current_stream()));
  return {loss, residual};
}

at::Tensor fd_dsm_scalar_backward_cuda(const at::Tensor& grad_in, const at::Tensor& residual_in,
                                       double scale, double sign) {
  check_fd_dsm_scalar_backward(grad_in, residual_in);
  check_cuda(residual_in, "residual");
  const c10::cuda::CUDAGuard guard(residual_in.device());
  const at::Tensor residual = residual_in.contiguous();
  const at::Tensor grad = grad_in.to(residual.scalar_type()).contiguous();
  const int64_t B = residual.size(0);
  at::Tensor grad_f = at::empty({2 * B}, residual.options());
  C10_CUDA_CHECK(launch_fd_dsm_scalar_backward(to_dtype(residual.scalar_type()),
                                               grad.const_data_ptr(), residual.const_data_ptr(),
                                               grad_f.mutable_data_ptr(), B, scale, sign,
                                               current_stream()));
  return grad_f;
}

}  // namespace

TORCH_LIBRARY_IMPL(fdsm, CUDA, m) {
  m.impl("fd_dsm_scalar", &fd_dsm_scalar_cuda);
  m.impl("fd_dsm_scalar_backward", &fd_dsm_scalar_backward_cuda);
}

}  // namespace fdsm
