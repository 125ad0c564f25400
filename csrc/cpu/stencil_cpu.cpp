// CPU kernels of stencil_batch, random_stencil_batch and stencil_batch_backward.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string_view>
#include <vector>

#include "checks.h"
#include "fd_math.h"
#include "philox.h"

namespace fdsm {
namespace {

// Enough work per task to amortise the OpenMP dispatch, whatever the row length.
int64_t row_grain(int64_t d) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)); }

// Writes every stencil row that depends on projection row r (= p*B + b): x + gamma_k v_r for
// each non-zero offset, and, once per sample (p == 0), the copy of x for a zero offset.
template <typename scalar_t, typename acc_t>
void write_stencil_rows(const StencilLayout& L, int64_t r, int64_t d, const scalar_t* x,
                        const scalar_t* v_row, scalar_t* out) {
  const int64_t b = r % L.batch;
  const scalar_t* x_row = x + b * d;
  for (int k = 0; k < L.n_offsets; ++k) {
    if (L.gamma[k] == 0.0) {
      if (r < L.batch) std::copy(x_row, x_row + d, out + (L.start[k] + b) * d);
      continue;
    }
    const acc_t gamma = static_cast<acc_t>(L.gamma[k]);
    scalar_t* o = out + (L.start[k] + r) * d;
    for (int64_t i = 0; i < d; ++i) {
      o[i] = static_cast<scalar_t>(stencil_point<acc_t>(static_cast<acc_t>(x_row[i]), gamma,
                                                        static_cast<acc_t>(v_row[i])));
    }
  }
}

at::Tensor stencil_batch_cpu(const at::Tensor& x_in, const at::Tensor& v_in,
                             at::ArrayRef<double> offsets) {
  const StencilLayout L = check_stencil_batch(x_in, v_in, offsets);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  const int64_t d = x.size(1);
  at::Tensor out = at::empty({L.total_rows, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stencil_batch_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, L.n_proj * L.batch, row_grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        write_stencil_rows<scalar_t, acc_t>(L, r, d, xp, vp + r * d, op);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> random_stencil_batch_cpu(const at::Tensor& x_in,
                                                            const at::Tensor& seed_t,
                                                            at::ArrayRef<double> offsets,
                                                            int64_t n_projections,
                                                            c10::string_view noise_name,
                                                            double eps) {
  const StencilLayout L = check_random_stencil_batch(x_in, seed_t, offsets, n_projections, eps);
  const Noise noise = parse_noise(std::string_view(noise_name.data(), noise_name.size()));
  const at::Tensor x = x_in.contiguous();
  const uint64_t seed = static_cast<uint64_t>(seed_t.reshape({1}).const_data_ptr<int64_t>()[0]);
  const int64_t d = x.size(1);
  const int64_t rows = L.n_proj * L.batch;
  at::Tensor out = at::empty({L.total_rows, d}, x.options());
  at::Tensor v = at::empty({rows, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "random_stencil_batch_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* vp = v.mutable_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t groups = (d + 3) / 4;
    // The unnormalised scale is formed in double and rounded once, like the oracle's
    // Python-float factor; the sphere norm needs the row's sum of squares first.
    const acc_t flat_factor = static_cast<acc_t>(eps / std::sqrt(static_cast<double>(d)));
    at::parallel_for(0, rows, row_grain(d), [&](int64_t begin, int64_t end) {
      std::vector<float> g(static_cast<size_t>(groups * 4));
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t j = 0; j < groups; ++j) {
          philox_directions4(seed, static_cast<uint64_t>(r), static_cast<uint64_t>(j), noise,
                             g.data() + 4 * j);
        }
        acc_t factor = flat_factor;
        if (noise == Noise::Sphere) {
          acc_t sum_sq = 0;
          for (int64_t i = 0; i < d; ++i) {
            const acc_t gi = static_cast<acc_t>(g[i]);
            sum_sq += gi * gi;
          }
          factor = static_cast<acc_t>(eps) / std::sqrt(sum_sq);
        }
        scalar_t* v_row = vp + r * d;
        for (int64_t i = 0; i < d; ++i) {
          v_row[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * factor);
        }
        write_stencil_rows<scalar_t, acc_t>(L, r, d, xp, v_row, op);
      }
    });
  });
  return {out, v};
}

std::tuple<at::Tensor, at::Tensor> stencil_batch_backward_cpu(const at::Tensor& grad_in,
                                                              at::ArrayRef<double> offsets,
                                                              int64_t n_projections,
                                                              bool compute_grad_v) {
  const StencilLayout L = check_stencil_batch_backward(grad_in, offsets, n_projections);
  const at::Tensor grad = grad_in.contiguous();
  const int64_t d = grad.size(1);
  const int64_t B = L.batch;
  at::Tensor grad_x = at::empty({B, d}, grad.options());
  at::Tensor grad_v = compute_grad_v ? at::empty({L.n_proj * B, d}, grad.options())
                                     : at::empty({0}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "stencil_batch_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    scalar_t* gvp = compute_grad_v ? grad_v.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B, row_grain(d * L.n_proj * L.n_offsets), [&](int64_t begin,
                                                                      int64_t end) {
      std::vector<acc_t> acc_x(d), acc_v(d);
      for (int64_t b = begin; b < end; ++b) {
        std::fill(acc_x.begin(), acc_x.end(), acc_t(0));
        for (int k = 0; k < L.n_offsets; ++k) {
          if (L.gamma[k] != 0.0) continue;
          const scalar_t* row = gp + (L.start[k] + b) * d;
          for (int64_t i = 0; i < d; ++i) acc_x[i] += static_cast<acc_t>(row[i]);
        }
        for (int64_t p = 0; p < L.n_proj; ++p) {
          std::fill(acc_v.begin(), acc_v.end(), acc_t(0));
          const int64_t r = p * B + b;
          for (int k = 0; k < L.n_offsets; ++k) {
            if (L.gamma[k] == 0.0) continue;
            const acc_t gamma = static_cast<acc_t>(L.gamma[k]);
            const scalar_t* row = gp + (L.start[k] + r) * d;
            for (int64_t i = 0; i < d; ++i) {
              const acc_t val = static_cast<acc_t>(row[i]);
              acc_x[i] += val;
              acc_v[i] += gamma * val;
            }
          }
          if (gvp != nullptr) {
            for (int64_t i = 0; i < d; ++i) gvp[r * d + i] = static_cast<scalar_t>(acc_v[i]);
          }
        }
        for (int64_t i = 0; i < d; ++i) gxp[b * d + i] = static_cast<scalar_t>(acc_x[i]);
      }
    });
  });
  return {grad_x, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fdsm, CPU, m) {
  m.impl("stencil_batch", &stencil_batch_cpu);
  m.impl("random_stencil_batch", &random_stencil_batch_cpu);
  m.impl("stencil_batch_backward", &stencil_batch_backward_cpu);
}

}  // namespace fdsm
