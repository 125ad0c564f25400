// CPU kernels of stencil_batch, random_stencil_batch and stencil_batch_backward.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string_view>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "checks.h"
#include "fd_math.h"
#include "philox.h"
#include "sphere_norm.h"

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

#if defined(__GNUC__) && defined(__x86_64__)
#define FDSM_X86_DISPATCH 1
#else
#define FDSM_X86_DISPATCH 0
#endif

constexpr int64_t kPhiloxChunk = 64;

#if FDSM_X86_DISPATCH
// philox_block(seed, row, group0 + j) for j < len, eight counters at a time. The 32x32->64
// products of even and odd lanes are two vpmuludq, recombined by shifts and blends: no
// lane-crossing shuffles (g++'s own vectorisation of philox4x32_10 needs many), ~2x faster.
// group0 is a multiple of kPhiloxChunk >= len, so within a chunk only the counter's low group
// word changes (it cannot wrap): the other three words are broadcast.
__attribute__((target("avx2"))) void philox_chunk_avx2(uint64_t seed, uint64_t row,
                                                       uint64_t group0, int64_t len,
                                                       uint32_t (*w)[kPhiloxChunk]) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const Uint4x32 counter0 = philox_counter(row, group0);
  const __m256i m0 = _mm256_set1_epi64x(0xD2511F53u), m1 = _mm256_set1_epi64x(0xCD9E8D57u);
  __m256i key0[10], key1[10];
  for (int round = 0; round < 10; ++round) {
    key0[round] = _mm256_set1_epi32(static_cast<int>(k0 + round * 0x9E3779B9u));
    key1[round] = _mm256_set1_epi32(static_cast<int>(k1 + round * 0xBB67AE85u));
  }
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    __m256i c0 =
        _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(counter0.v[0] + j)), lanes);
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(counter0.v[1]));
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(counter0.v[2]));
    __m256i c3 = _mm256_set1_epi32(static_cast<int>(counter0.v[3]));
    for (int round = 0; round < 10; ++round) {
      const __m256i even0 = _mm256_mul_epu32(c0, m0);
      const __m256i odd0 = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
      const __m256i even1 = _mm256_mul_epu32(c2, m1);
      const __m256i odd1 = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
      const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(even0, 32), odd0, 0xAA);
      const __m256i lo0 = _mm256_blend_epi32(even0, _mm256_slli_epi64(odd0, 32), 0xAA);
      const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(even1, 32), odd1, 0xAA);
      const __m256i lo1 = _mm256_blend_epi32(even1, _mm256_slli_epi64(odd1, 32), 0xAA);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), key0[round]);
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), key1[round]);
      c1 = lo1;
      c3 = lo0;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[0] + j), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[1] + j), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[2] + j), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[3] + j), c3);
  }
  for (; j < len; ++j) {
    const Uint4x32 o = philox_block(seed, row, group0 + static_cast<uint64_t>(j));
    for (int lane = 0; lane < 4; ++lane) w[lane][j] = o.v[lane];
  }
}
#endif

// The unscaled directions g[0 .. 4*groups) of one row (philox_directions4 for every group),
// in structure-of-arrays chunks so that g++ vectorises the Philox rounds and the branch-free
// Box-Muller of philox.h; the values are those of philox_directions4, bit for bit. Compiled
// twice: for baseline x86-64 (SSE2) and, picked at run time, for AVX2. AVX2 without FMA
// rounds every operation like SSE2 does, so both give the same bits.
template <bool kAvx2>
__attribute__((always_inline)) inline void philox_directions_row_impl(uint64_t seed,
                                                                      uint64_t row,
                                                                      int64_t groups,
                                                                      Noise noise, float* g) {
  alignas(64) uint32_t w[4][kPhiloxChunk];
  alignas(64) float n[4][kPhiloxChunk];
  for (int64_t j0 = 0; j0 < groups; j0 += kPhiloxChunk) {
    const int64_t len = std::min(kPhiloxChunk, groups - j0);
#if FDSM_X86_DISPATCH
    if constexpr (kAvx2) {
      philox_chunk_avx2(seed, row, static_cast<uint64_t>(j0), len, w);
    } else
#endif
    {
      for (int64_t j = 0; j < len; ++j) {
        const Uint4x32 o = philox_block(seed, row, static_cast<uint64_t>(j0 + j));
        w[0][j] = o.v[0];
        w[1][j] = o.v[1];
        w[2][j] = o.v[2];
        w[3][j] = o.v[3];
      }
    }
    float* out = g + 4 * j0;
    if (noise == Noise::Rademacher) {
      for (int64_t j = 0; j < len; ++j) {
        for (int lane = 0; lane < 4; ++lane) out[4 * j + lane] = rademacher_from_word(w[lane][j]);
      }
      continue;
    }
    for (int64_t j = 0; j < len; ++j) box_muller(w[0][j], w[1][j], n[0][j], n[1][j]);
    for (int64_t j = 0; j < len; ++j) box_muller(w[2][j], w[3][j], n[2][j], n[3][j]);
    for (int64_t j = 0; j < len; ++j) {
      for (int lane = 0; lane < 4; ++lane) out[4 * j + lane] = n[lane][j];
    }
  }
}

using DirectionsRowFn = void (*)(uint64_t, uint64_t, int64_t, Noise, float*);

void philox_directions_row_baseline(uint64_t seed, uint64_t row, int64_t groups, Noise noise,
                                    float* g) {
  philox_directions_row_impl<false>(seed, row, groups, noise, g);
}

#if FDSM_X86_DISPATCH
__attribute__((target("avx2"))) void philox_directions_row_avx2(uint64_t seed, uint64_t row,
                                                                int64_t groups, Noise noise,
                                                                float* g) {
  philox_directions_row_impl<true>(seed, row, groups, noise, g);
}
#endif

DirectionsRowFn directions_row_fn() {
#if FDSM_X86_DISPATCH
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return &philox_directions_row_avx2;
#endif
  return &philox_directions_row_baseline;
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
    const DirectionsRowFn directions_row = directions_row_fn();
    at::parallel_for(0, rows, row_grain(d), [&](int64_t begin, int64_t end) {
      std::vector<float> g(static_cast<size_t>(groups * 4));
      for (int64_t r = begin; r < end; ++r) {
        directions_row(seed, static_cast<uint64_t>(r), groups, noise, g.data());
        acc_t factor = flat_factor;
        if (noise == Noise::Sphere) {
          factor = sphere_factor<acc_t>(eps, sphere_sum_sq<acc_t>(g.data(), d));
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

// The unscaled directions g (float32, shape (rows, d)) of rows first_row .. first_row +
// rows - 1: what random_stencil_batch draws for those rows. A test hook: it checks rows past
// 2^32 against fdsm_ext.reference._philox_directions without allocating 2^32 rows.
at::Tensor philox_directions_cpu(const at::Tensor& seed_t, int64_t first_row, int64_t rows,
                                 int64_t d, c10::string_view noise_name) {
  TORCH_CHECK(seed_t.scalar_type() == at::kLong && seed_t.numel() == 1,
              "philox_directions: seed must be an int64 tensor of shape (1,), got ",
              seed_t.scalar_type(), " of shape ", seed_t.sizes());
  TORCH_CHECK(first_row >= 0 && rows >= 0 &&
                  rows <= std::numeric_limits<int64_t>::max() - first_row,
              "philox_directions: need first_row >= 0 and rows >= 0 with first_row + rows < "
              "2^63, got first_row=", first_row, ", rows=", rows);
  TORCH_CHECK(d >= 1, "philox_directions: d must be >= 1, got ", d);
  const Noise noise = parse_noise(std::string_view(noise_name.data(), noise_name.size()));
  const uint64_t seed = static_cast<uint64_t>(seed_t.reshape({1}).const_data_ptr<int64_t>()[0]);
  const int64_t groups = (d + 3) / 4;
  at::Tensor g = at::empty({rows, 4 * groups}, seed_t.options().dtype(at::kFloat));
  float* gp = g.mutable_data_ptr<float>();
  const DirectionsRowFn directions_row = directions_row_fn();
  at::parallel_for(0, rows, row_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      directions_row(seed, static_cast<uint64_t>(first_row + r), groups, noise,
                     gp + r * 4 * groups);
    }
  });
  return g.narrow(1, 0, d).contiguous();
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
          if (gvp != nullptr) std::fill(acc_v.begin(), acc_v.end(), acc_t(0));
          const int64_t r = p * B + b;
          for (int k = 0; k < L.n_offsets; ++k) {
            if (L.gamma[k] == 0.0) continue;
            const acc_t gamma = static_cast<acc_t>(L.gamma[k]);
            const scalar_t* row = gp + (L.start[k] + r) * d;
            if (gvp == nullptr) {  // random directions: v has no gradient to accumulate
              for (int64_t i = 0; i < d; ++i) acc_x[i] += static_cast<acc_t>(row[i]);
              continue;
            }
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
  m.impl("philox_directions", &philox_directions_cpu);
}

}  // namespace fdsm
