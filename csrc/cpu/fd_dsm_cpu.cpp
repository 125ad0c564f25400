// CPU kernels of the FD-DSM reduction for scalar models and its backward pass.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "fd_math.h"

namespace fdsm {
namespace {

std::tuple<at::Tensor, at::Tensor> fd_dsm_scalar_cpu(const at::Tensor& f_in,
                                                     const at::Tensor& v_in,
                                                     const at::Tensor& target_in, double scale,
                                                     double sign) {
  const int64_t B = check_fd_dsm_scalar(f_in, v_in, target_in);
  const at::Tensor f = f_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t d = v.size(1);
  const auto acc_options = f.options().dtype(acc_dtype(f.scalar_type()));
  at::Tensor loss = at::empty({B}, acc_options);
  at::Tensor residual = at::empty({B}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "fd_dsm_scalar_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const scalar_t* tp = target.const_data_ptr<scalar_t>();
    acc_t* lp = loss.mutable_data_ptr<acc_t>();
    acc_t* rp = residual.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        acc_t dot = 0;
        for (int64_t i = 0; i < d; ++i) {
          dot += static_cast<acc_t>(vp[b * d + i]) * static_cast<acc_t>(tp[b * d + i]);
        }
        const acc_t res = dsm_residual<acc_t>(static_cast<acc_t>(fp[b]),
                                              static_cast<acc_t>(fp[B + b]), dot,
                                              static_cast<acc_t>(sign));
        rp[b] = res;
        lp[b] = dsm_loss<acc_t>(res, static_cast<acc_t>(scale));
      }
    });
  });
  return {loss, residual};
}

// Returns the gradient in the residual's (accumulation) dtype; the Python autograd formula
// casts it to f's dtype, which this op cannot see.
at::Tensor fd_dsm_scalar_backward_cpu(const at::Tensor& grad_in, const at::Tensor& residual_in,
                                      double scale, double sign) {
  check_fd_dsm_scalar_backward(grad_in, residual_in);
  const at::Tensor residual = residual_in.contiguous();
  const at::Tensor grad = grad_in.to(residual.scalar_type()).contiguous();
  const int64_t B = residual.size(0);
  at::Tensor grad_f = at::empty({2 * B}, residual.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual.scalar_type(),
                                  "fd_dsm_scalar_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* rp = residual.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* op = grad_f.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const acc_t g = static_cast<acc_t>(gp[b]) *
                        dsm_dplus<acc_t>(static_cast<acc_t>(rp[b]), static_cast<acc_t>(scale),
                                         static_cast<acc_t>(sign));
        op[b] = static_cast<scalar_t>(g);
        op[B + b] = static_cast<scalar_t>(-g);
      }
    });
  });
  return grad_f;
}

}  // namespace

TORCH_LIBRARY_IMPL(fdsm, CPU, m) {
  m.impl("fd_dsm_scalar", &fd_dsm_scalar_cpu);
  m.impl("fd_dsm_scalar_backward", &fd_dsm_scalar_backward_cpu);
}

}  // namespace fdsm
