// CUDA wrappers of the FD-SSM reductions (kernels in fd_ssm_kernels.cu).

#include <torch/library.h>

#include "checks.h"
#include "cuda/cuda_common.h"

namespace fdsm {
namespace {

at::Tensor fd_ssm_scalar_cuda(const at::Tensor& f_in, int64_t n_projections, double scale,
                              double sign) {
  const int64_t B = check_fd_ssm_scalar(f_in, n_projections);
  check_cuda(f_in, "f");
  const c10::cuda::CUDAGuard guard(f_in.device());
  const at::Tensor f = f_in.contiguous();
  at::Tensor loss = at::empty({B}, f.options().dtype(acc_dtype(f.scalar_type())));
  C10_CUDA_CHECK(launch_fd_ssm_scalar(to_dtype(f.scalar_type()), f.const_data_ptr(),
                                      loss.mutable_data_ptr(), B, n_projections, scale, sign,
                                      current_stream()));
  return loss;
}

at::Tensor fd_ssm_scalar_backward_cuda(const at::Tensor& grad_in, const at::Tensor& f_in,
                                       int64_t n_projections, double scale, double sign) {
  const int64_t B = check_fd_ssm_scalar(f_in, n_projections);
  check_reduction_grad(grad_in, f_in, B, "f");
  check_cuda(f_in, "f");
  const c10::cuda::CUDAGuard guard(f_in.device());
  const at::Tensor f = f_in.contiguous();
  const at::Tensor grad = grad_in.to(acc_dtype(f.scalar_type())).contiguous();
  at::Tensor grad_f = at::empty_like(f);
  C10_CUDA_CHECK(launch_fd_ssm_scalar_backward(to_dtype(f.scalar_type()), grad.const_data_ptr(),
                                               f.const_data_ptr(), grad_f.mutable_data_ptr(), B,
                                               n_projections, scale, sign, current_stream()));
  return grad_f;
}

at::Tensor fd_ssm_score_cuda(const at::Tensor& s_in, const at::Tensor& v_in,
                             int64_t n_projections, bool variance_reduction, double scale) {
  const int64_t B = check_fd_ssm_score(s_in, v_in, n_projections);
  check_cuda(s_in, "s");
  const c10::cuda::CUDAGuard guard(s_in.device());
  const at::Tensor s = s_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  at::Tensor loss = at::empty({B}, s.options().dtype(acc_dtype(s.scalar_type())));
  C10_CUDA_CHECK(launch_fd_ssm_score(to_dtype(s.scalar_type()), s.const_data_ptr(),
                                     v.const_data_ptr(), loss.mutable_data_ptr(), B,
                                     n_projections, s.size(1), variance_reduction, scale,
                                     current_stream()));
  return loss;
}

at::Tensor fd_ssm_score_backward_cuda(const at::Tensor& grad_in, const at::Tensor& s_in,
                                      const at::Tensor& v_in, int64_t n_projections,
                                      bool variance_reduction, double scale) {
  const int64_t B = check_fd_ssm_score(s_in, v_in, n_projections);
  check_reduction_grad(grad_in, s_in, B, "s");
  check_cuda(s_in, "s");
  const c10::cuda::CUDAGuard guard(s_in.device());
  const at::Tensor s = s_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  const at::Tensor grad = grad_in.to(acc_dtype(s.scalar_type())).contiguous();
  at::Tensor grad_s = at::empty_like(s);
  C10_CUDA_CHECK(launch_fd_ssm_score_backward(
      to_dtype(s.scalar_type()), grad.const_data_ptr(), s.const_data_ptr(), v.const_data_ptr(),
      grad_s.mutable_data_ptr(), B, n_projections, s.size(1), variance_reduction, scale,
      current_stream()));
  return grad_s;
}

}  // namespace

TORCH_LIBRARY_IMPL(fdsm, CUDA, m) {
  m.impl("fd_ssm_scalar", &fd_ssm_scalar_cuda);
  m.impl("fd_ssm_scalar_backward", &fd_ssm_scalar_backward_cuda);
  m.impl("fd_ssm_score", &fd_ssm_score_cuda);
  m.impl("fd_ssm_score_backward", &fd_ssm_score_backward_cuda);
}

}  // namespace fdsm
