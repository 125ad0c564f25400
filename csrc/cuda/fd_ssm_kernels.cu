// CUDA kernels of the FD-SSM reductions and their backward passes (ATen-free).

#include "cuda_utils.cuh"
#include "fd_math.h"

namespace fdsm {
namespace {

template <typename scalar_t>
__global__ void fd_ssm_scalar_kernel(const scalar_t* __restrict__ f,
                                     acc_type_t<scalar_t>* __restrict__ loss, int64_t B,
                                     int64_t P, double scale, double sign) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t PB = P * B;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < B;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t f0 = static_cast<acc_t>(f[b]);
    acc_t sum = 0;
    for (int64_t p = 0; p < P; ++p) {
      sum += ssm_scalar_term<acc_t>(f0, static_cast<acc_t>(f[B + p * B + b]),
                                    static_cast<acc_t>(f[B + PB + p * B + b]),
                                    static_cast<acc_t>(sign));
    }
    loss[b] = static_cast<acc_t>(scale) * (sum / static_cast<acc_t>(P));
  }
}

template <typename scalar_t>
__global__ void fd_ssm_scalar_backward_kernel(const acc_type_t<scalar_t>* __restrict__ grad,
                                              const scalar_t* __restrict__ f,
                                              scalar_t* __restrict__ grad_f, int64_t B,
                                              int64_t P, double scale, double sign) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t PB = P * B;
  const acc_t sgn = static_cast<acc_t>(sign);
  const acc_t per_proj = static_cast<acc_t>(scale) / static_cast<acc_t>(P);
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < B;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t g = grad[b];
    grad_f[b] = static_cast<scalar_t>(g * static_cast<acc_t>(scale) * ssm_scalar_dcentre(sgn));
    for (int64_t p = 0; p < P; ++p) {
      const int64_t ip = B + p * B + b, im = B + PB + p * B + b;
      const acc_t fplus = static_cast<acc_t>(f[ip]), fminus = static_cast<acc_t>(f[im]);
      grad_f[ip] = static_cast<scalar_t>(g * per_proj * ssm_scalar_dplus(fplus, fminus, sgn));
      grad_f[im] = static_cast<scalar_t>(g * per_proj * ssm_scalar_dminus(fplus, fminus, sgn));
    }
  }
}

// Stage 1 of fd_ssm_score: the term of every projection row r (= p*B + b), rows spread over
// row_blocks (all P*B rows in parallel, not the projections of a sample one after another).
template <typename scalar_t>
__global__ void fd_ssm_score_rows_kernel(const scalar_t* __restrict__ s,
                                         const scalar_t* __restrict__ v,
                                         acc_type_t<scalar_t>* __restrict__ terms, int64_t PB,
                                         int64_t d, bool variance_reduction, double scale) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ acc_t shared[3 * 32];
  // Loop bounds are uniform over the block: row_sum needs every lane.
  for (int64_t r0 = blockIdx.x * static_cast<int64_t>(blockDim.y); r0 < PB;
       r0 += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t r = r0 + threadIdx.y;
    acc_t sums[3] = {acc_t(0), acc_t(0), acc_t(0)};  // ||add||^2, v.add, v.sub
    for (int64_t i = threadIdx.x; r < PB && i < d; i += blockDim.x) {
      const acc_t a = static_cast<acc_t>(s[r * d + i]);
      const acc_t m = static_cast<acc_t>(s[(PB + r) * d + i]);
      const acc_t vi = static_cast<acc_t>(v[r * d + i]);
      sums[0] += (a + m) * (a + m);
      sums[1] += vi * (a + m);
      sums[2] += vi * (a - m);
    }
    row_sum<3>(sums, shared);
    if (r < PB && threadIdx.x == 0) {
      terms[r] = ssm_score_term<acc_t>(variance_reduction, sums[0], sums[1], sums[2],
                                       static_cast<acc_t>(scale));
    }
  }
}

// Stage 2: the mean over projections of each sample, summed in projection order (as the CPU).
template <typename acc_t>
__global__ void fd_ssm_score_mean_kernel(const acc_t* __restrict__ terms,
                                         acc_t* __restrict__ loss, int64_t B, int64_t P) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < B;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t total = 0;
    for (int64_t p = 0; p < P; ++p) total += terms[p * B + b];
    loss[b] = total / static_cast<acc_t>(P);
  }
}

// Projection rows over row_blocks; the plain form needs the row's v.add first.
template <typename scalar_t>
__global__ void fd_ssm_score_backward_kernel(const acc_type_t<scalar_t>* __restrict__ grad,
                                             const scalar_t* __restrict__ s,
                                             const scalar_t* __restrict__ v,
                                             scalar_t* __restrict__ grad_s, int64_t B, int64_t P,
                                             int64_t d, bool variance_reduction, double scale) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ acc_t shared[32];
  const int64_t PB = P * B;
  const acc_t sc = static_cast<acc_t>(scale);
  for (int64_t r0 = blockIdx.x * static_cast<int64_t>(blockDim.y); r0 < PB;
       r0 += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t r = r0 + threadIdx.y;
    acc_t v_add[1] = {acc_t(0)};
    if (!variance_reduction) {
      for (int64_t i = threadIdx.x; r < PB && i < d; i += blockDim.x) {
        v_add[0] += static_cast<acc_t>(v[r * d + i]) *
                    (static_cast<acc_t>(s[r * d + i]) + static_cast<acc_t>(s[(PB + r) * d + i]));
      }
      row_sum<1>(v_add, shared);
    }
    if (r >= PB) continue;
    const acc_t coef = grad[r % B] / static_cast<acc_t>(P);
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      acc_t d_plus, d_minus;
      const acc_t add = static_cast<acc_t>(s[r * d + i]) + static_cast<acc_t>(s[(PB + r) * d + i]);
      ssm_score_grad<acc_t>(variance_reduction, add, static_cast<acc_t>(v[r * d + i]), v_add[0],
                            sc, d_plus, d_minus);
      grad_s[r * d + i] = static_cast<scalar_t>(coef * d_plus);
      grad_s[(PB + r) * d + i] = static_cast<scalar_t>(coef * d_minus);
    }
  }
}

}  // namespace

cudaError_t launch_fd_ssm_scalar(DType dtype, const void* f, void* loss, int64_t B, int64_t P,
                                 double scale, double sign, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    FDSM_LAUNCH(fd_ssm_scalar_kernel<scalar_t>, grid_for(B), kThreads, 0, stream)(
        static_cast<const scalar_t*>(f), static_cast<acc_type_t<scalar_t>*>(loss), B, P, scale,
        sign);
  });
}

cudaError_t launch_fd_ssm_scalar_backward(DType dtype, const void* grad, const void* f,
                                          void* grad_f, int64_t B, int64_t P, double scale,
                                          double sign, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    FDSM_LAUNCH(fd_ssm_scalar_backward_kernel<scalar_t>, grid_for(B), kThreads, 0, stream)(
        static_cast<const acc_type_t<scalar_t>*>(grad), static_cast<const scalar_t*>(f),
        static_cast<scalar_t*>(grad_f), B, P, scale, sign);
  });
}

cudaError_t launch_fd_ssm_score(DType dtype, const void* s, const void* v, void* terms,
                                void* loss, int64_t B, int64_t P, int64_t d,
                                bool variance_reduction, double scale, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  const dim3 block = row_block(d);
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type_t<scalar_t>;
    FDSM_LAUNCH(fd_ssm_score_rows_kernel<scalar_t>, grid_for_rows(P * B, block), block, 0,
                stream)(static_cast<const scalar_t*>(s), static_cast<const scalar_t*>(v),
                        static_cast<acc_t*>(terms), P * B, d, variance_reduction, scale);
    FDSM_LAUNCH(fd_ssm_score_mean_kernel<acc_t>, grid_for(B), kThreads, 0, stream)(
        static_cast<const acc_t*>(terms), static_cast<acc_t*>(loss), B, P);
  });
}

cudaError_t launch_fd_ssm_score_backward(DType dtype, const void* grad, const void* s,
                                         const void* v, void* grad_s, int64_t B, int64_t P,
                                         int64_t d, bool variance_reduction, double scale,
                                         cudaStream_t stream) {
  if (B == 0 || d == 0) return cudaSuccess;
  const dim3 block = row_block(d);
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    FDSM_LAUNCH(fd_ssm_score_backward_kernel<scalar_t>, grid_for_rows(P * B, block), block, 0,
                stream)(static_cast<const acc_type_t<scalar_t>*>(grad),
                        static_cast<const scalar_t*>(s), static_cast<const scalar_t*>(v),
                        static_cast<scalar_t*>(grad_s), B, P, d, variance_reduction, scale);
  });
}

}  // namespace fdsm
