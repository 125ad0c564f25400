// CPU kernels of fd_combine (sum_k w_k y_k over the K blocks of a stencil batch) and its
// adjoint.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"

namespace fdsm {
namespace {

constexpr int64_t kGrain = 16384;

at::Tensor fd_combine_cpu(const at::Tensor& y_in, at::ArrayRef<double> weights) {
  check_fd_combine(y_in, weights);
  const at::Tensor y = y_in.contiguous();
  const int64_t K = static_cast<int64_t>(weights.size());
  std::vector<int64_t> out_shape(y.sizes().begin(), y.sizes().end());
  out_shape[0] /= K;
  at::Tensor out = at::empty(out_shape, y.options().dtype(acc_dtype(y.scalar_type())));
  const int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "fd_combine_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    acc_t* op = out.mutable_data_ptr<acc_t>();
    std::vector<acc_t> w(weights.begin(), weights.end());
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        acc_t sum = 0;
        for (int64_t k = 0; k < K; ++k) sum += w[k] * static_cast<acc_t>(yp[k * n + j]);
        op[j] = sum;
      }
    });
  });
  return out;
}

// Returns the gradient in grad's dtype (the forward's accumulation dtype); the Python
// autograd formula casts it to y's dtype, which this op cannot see.
at::Tensor fd_combine_backward_cpu(const at::Tensor& grad_in, at::ArrayRef<double> weights) {
  check_fd_combine_backward(grad_in, weights);
  const at::Tensor grad = grad_in.contiguous();
  const int64_t K = static_cast<int64_t>(weights.size());
  std::vector<int64_t> out_shape(grad.sizes().begin(), grad.sizes().end());
  out_shape[0] *= K;
  at::Tensor out = at::empty(out_shape, grad.options());
  const int64_t n = grad.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "fd_combine_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t k = 0; k < K; ++k) {
        const acc_t w = static_cast<acc_t>(weights[k]);
        for (int64_t j = begin; j < end; ++j) {
          op[k * n + j] = static_cast<scalar_t>(w * static_cast<acc_t>(gp[j]));
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fdsm, CPU, m) {
  m.impl("fd_combine", &fd_combine_cpu);
  m.impl("fd_combine_backward", &fd_combine_backward_cpu);
}

}  // namespace fdsm
