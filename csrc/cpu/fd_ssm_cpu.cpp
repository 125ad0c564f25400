// CPU kernels of the FD-SSM reductions (scalar and score models) and their backward passes.

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

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(work_per_item, 1));
}

at::Tensor fd_ssm_scalar_cpu(const at::Tensor& f_in, int64_t n_projections, double scale,
                             double sign) {
  const int64_t B = check_fd_ssm_scalar(f_in, n_projections);
  const at::Tensor f = f_in.contiguous();
  at::Tensor loss = at::empty({B}, f.options().dtype(acc_dtype(f.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "fd_ssm_scalar_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    acc_t* lp = loss.mutable_data_ptr<acc_t>();
    const int64_t PB = n_projections * B;
    at::parallel_for(0, B, grain_for(n_projections), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const acc_t f0 = static_cast<acc_t>(fp[b]);
        acc_t sum = 0;
        for (int64_t p = 0; p < n_projections; ++p) {
          sum += ssm_scalar_term<acc_t>(f0, static_cast<acc_t>(fp[B + p * B + b]),
                                        static_cast<acc_t>(fp[B + PB + p * B + b]),
                                        static_cast<acc_t>(sign));
        }
        lp[b] = static_cast<acc_t>(scale) * (sum / static_cast<acc_t>(n_projections));
      }
    });
  });
  return loss;
}

at::Tensor fd_ssm_scalar_backward_cpu(const at::Tensor& grad_in, const at::Tensor& f_in,
                                      int64_t n_projections, double scale, double sign) {
  const int64_t B = check_fd_ssm_scalar(f_in, n_projections);
  check_reduction_grad(grad_in, f_in, B, "f");
  const at::Tensor f = f_in.contiguous();
  const at::Tensor grad = grad_in.to(acc_dtype(f.scalar_type())).contiguous();
  at::Tensor grad_f = at::empty_like(f);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(),
                                  "fd_ssm_scalar_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    const acc_t* gp = grad.const_data_ptr<acc_t>();
    scalar_t* op = grad_f.mutable_data_ptr<scalar_t>();
    const int64_t PB = n_projections * B;
    const acc_t sgn = static_cast<acc_t>(sign);
    const acc_t per_proj = static_cast<acc_t>(scale) / static_cast<acc_t>(n_projections);
    at::parallel_for(0, B, grain_for(n_projections), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const acc_t g = gp[b];
        // The centre appears in every projection, so its mean-over-P weight sums to one.
        op[b] = static_cast<scalar_t>(g * static_cast<acc_t>(scale) * ssm_scalar_dcentre(sgn));
        for (int64_t p = 0; p < n_projections; ++p) {
          const int64_t ip = B + p * B + b, im = B + PB + p * B + b;
          const acc_t fplus = static_cast<acc_t>(fp[ip]), fminus = static_cast<acc_t>(fp[im]);
          op[ip] = static_cast<scalar_t>(g * per_proj * ssm_scalar_dplus(fplus, fminus, sgn));
          op[im] = static_cast<scalar_t>(g * per_proj * ssm_scalar_dminus(fplus, fminus, sgn));
        }
      }
    });
  });
  return grad_f;
}

at::Tensor fd_ssm_score_cpu(const at::Tensor& s_in, const at::Tensor& v_in,
                            int64_t n_projections, bool variance_reduction, double scale) {
  const int64_t B = check_fd_ssm_score(s_in, v_in, n_projections);
  const at::Tensor s = s_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  const int64_t d = s.size(1);
  const int64_t PB = n_projections * B;
  at::Tensor loss = at::empty({B}, s.options().dtype(acc_dtype(s.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "fd_ssm_score_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    acc_t* lp = loss.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B, grain_for(n_projections * d), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        acc_t total = 0;
        for (int64_t p = 0; p < n_projections; ++p) {
          const int64_t r = p * B + b;
          const scalar_t* plus = sp + r * d;
          const scalar_t* minus = sp + (PB + r) * d;
          const scalar_t* vr = vp + r * d;
          acc_t add_sq = 0, v_add = 0, v_sub = 0;
          for (int64_t i = 0; i < d; ++i) {
            const acc_t a = static_cast<acc_t>(plus[i]), m = static_cast<acc_t>(minus[i]);
            const acc_t vi = static_cast<acc_t>(vr[i]);
            add_sq += (a + m) * (a + m);
            v_add += vi * (a + m);
            v_sub += vi * (a - m);
          }
          total += ssm_score_term<acc_t>(variance_reduction, add_sq, v_add, v_sub,
                                         static_cast<acc_t>(scale));
        }
        lp[b] = total / static_cast<acc_t>(n_projections);
      }
    });
  });
  return loss;
}

at::Tensor fd_ssm_score_backward_cpu(const at::Tensor& grad_in, const at::Tensor& s_in,
                                     const at::Tensor& v_in, int64_t n_projections,
                                     bool variance_reduction, double scale) {
  const int64_t B = check_fd_ssm_score(s_in, v_in, n_projections);
  check_reduction_grad(grad_in, s_in, B, "s");
  const at::Tensor s = s_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  const at::Tensor grad = grad_in.to(acc_dtype(s.scalar_type())).contiguous();
  const int64_t d = s.size(1);
  const int64_t PB = n_projections * B;
  at::Tensor grad_s = at::empty_like(s);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(),
                                  "fd_ssm_score_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const acc_t* gp = grad.const_data_ptr<acc_t>();
    scalar_t* op = grad_s.mutable_data_ptr<scalar_t>();
    const acc_t sc = static_cast<acc_t>(scale);
    at::parallel_for(0, PB, grain_for(d), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const acc_t coef = gp[r % B] / static_cast<acc_t>(n_projections);
        const scalar_t* plus = sp + r * d;
        const scalar_t* minus = sp + (PB + r) * d;
        const scalar_t* vr = vp + r * d;
        acc_t v_add = 0;
        if (!variance_reduction) {
          for (int64_t i = 0; i < d; ++i) {
            v_add += static_cast<acc_t>(vr[i]) *
                     (static_cast<acc_t>(plus[i]) + static_cast<acc_t>(minus[i]));
          }
        }
        for (int64_t i = 0; i < d; ++i) {
          acc_t d_plus, d_minus;
          ssm_score_grad<acc_t>(variance_reduction,
                                static_cast<acc_t>(plus[i]) + static_cast<acc_t>(minus[i]),
                                static_cast<acc_t>(vr[i]), v_add, sc, d_plus, d_minus);
          op[r * d + i] = static_cast<scalar_t>(coef * d_plus);
          op[(PB + r) * d + i] = static_cast<scalar_t>(coef * d_minus);
        }
      }
    });
  });
  return grad_s;
}

}  // namespace

TORCH_LIBRARY_IMPL(fdsm, CPU, m) {
  m.impl("fd_ssm_scalar", &fd_ssm_scalar_cpu);
  m.impl("fd_ssm_scalar_backward", &fd_ssm_scalar_backward_cpu);
  m.impl("fd_ssm_score", &fd_ssm_score_cpu);
  m.impl("fd_ssm_score_backward", &fd_ssm_score_backward_cpu);
}

}  // namespace fdsm
