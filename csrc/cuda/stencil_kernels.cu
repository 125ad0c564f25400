// CUDA kernels of stencil_batch, random_stencil_batch and stencil_batch_backward.
// Only CUDA and the shared headers are included here: ATen would cost ~30 s per file.

#include "cuda_utils.cuh"
#include "fd_math.h"
#include "philox.h"

namespace fdsm {
namespace {

__device__ inline int block_of_row(const StencilLayout& L, int64_t row) {
  int k = L.n_offsets - 1;
  while (k > 0 && L.start[k] > row) --k;
  return k;
}

template <typename scalar_t>
__global__ void stencil_batch_kernel(const scalar_t* __restrict__ x,
                                     const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                                     StencilLayout L, int64_t d) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t n = L.total_rows * d;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / d, i = idx - row * d;
    const int k = block_of_row(L, row);
    const int64_t local = row - L.start[k];
    if (L.gamma[k] == 0.0) {
      out[idx] = x[local * d + i];
    } else {
      const int64_t b = local % L.batch;
      out[idx] = static_cast<scalar_t>(stencil_point<acc_t>(
          static_cast<acc_t>(x[b * d + i]), static_cast<acc_t>(L.gamma[k]),
          static_cast<acc_t>(v[local * d + i])));
    }
  }
}

// One block per direction row: the sphere needs the row's norm before any entry is final,
// so the Philox words are drawn twice (cheaper than staging d values in shared memory).
template <typename scalar_t>
__global__ void random_stencil_batch_kernel(const scalar_t* __restrict__ x,
                                            const int64_t* __restrict__ seed_ptr,
                                            scalar_t* __restrict__ out, scalar_t* __restrict__ v,
                                            StencilLayout L, int64_t d, Noise noise,
                                            double eps) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ acc_t shared[32];
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const int64_t rows = L.n_proj * L.batch;
  const int64_t groups = (d + 3) / 4;
  const acc_t flat_factor = static_cast<acc_t>(eps / sqrt(static_cast<double>(d)));
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    acc_t factor = flat_factor;
    if (noise == Noise::Sphere) {
      acc_t sum_sq[1] = {acc_t(0)};
      for (int64_t j = threadIdx.x; j < groups; j += blockDim.x) {
        float g[4];
        philox_directions4(seed, static_cast<uint64_t>(r), static_cast<uint64_t>(j), noise, g);
        for (int lane = 0; lane < 4 && 4 * j + lane < d; ++lane) {
          const acc_t gi = static_cast<acc_t>(g[lane]);
          sum_sq[0] += gi * gi;
        }
      }
      block_sum<1>(sum_sq, shared);
      factor = static_cast<acc_t>(eps) / sqrt(sum_sq[0]);
    }
    const int64_t b = r % L.batch;
    for (int64_t j = threadIdx.x; j < groups; j += blockDim.x) {
      float g[4];
      philox_directions4(seed, static_cast<uint64_t>(r), static_cast<uint64_t>(j), noise, g);
      for (int lane = 0; lane < 4 && 4 * j + lane < d; ++lane) {
        const int64_t i = 4 * j + lane;
        const scalar_t vi = static_cast<scalar_t>(static_cast<acc_t>(g[lane]) * factor);
        v[r * d + i] = vi;
        const scalar_t xi = x[b * d + i];
        for (int k = 0; k < L.n_offsets; ++k) {
          if (L.gamma[k] == 0.0) {
            if (r < L.batch) out[(L.start[k] + b) * d + i] = xi;
          } else {
            out[(L.start[k] + r) * d + i] = static_cast<scalar_t>(stencil_point<acc_t>(
                static_cast<acc_t>(xi), static_cast<acc_t>(L.gamma[k]), static_cast<acc_t>(vi)));
          }
        }
      }
    }
  }
}

template <typename scalar_t>
__global__ void stencil_batch_backward_kernel(const scalar_t* __restrict__ grad,
                                              scalar_t* __restrict__ grad_x,
                                              scalar_t* __restrict__ grad_v, StencilLayout L,
                                              int64_t d) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t n = L.batch * d;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / d, i = idx - b * d;
    acc_t acc_x = 0;
    for (int k = 0; k < L.n_offsets; ++k) {
      if (L.gamma[k] == 0.0) acc_x += static_cast<acc_t>(grad[(L.start[k] + b) * d + i]);
    }
    for (int64_t p = 0; p < L.n_proj; ++p) {
      const int64_t r = p * L.batch + b;
      acc_t acc_v = 0;
      for (int k = 0; k < L.n_offsets; ++k) {
        if (L.gamma[k] == 0.0) continue;
        const acc_t val = static_cast<acc_t>(grad[(L.start[k] + r) * d + i]);
        acc_x += val;
        acc_v += static_cast<acc_t>(L.gamma[k]) * val;
      }
      if (grad_v != nullptr) grad_v[r * d + i] = static_cast<scalar_t>(acc_v);
    }
    grad_x[idx] = static_cast<scalar_t>(acc_x);
  }
}

}  // namespace

cudaError_t launch_stencil_batch(DType dtype, const void* x, const void* v, void* out,
                                 const StencilLayout& L, int64_t d, cudaStream_t stream) {
  const int64_t n = L.total_rows * d;
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    FDSM_LAUNCH(stencil_batch_kernel<scalar_t>, grid_for(n), kThreads, 0, stream)(
        static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(v),
        static_cast<scalar_t*>(out), L, d);
  });
}

cudaError_t launch_random_stencil_batch(DType dtype, const void* x, const int64_t* seed,
                                        void* out, void* v, const StencilLayout& L, int64_t d,
                                        Noise noise, double eps, cudaStream_t stream) {
  const int64_t rows = L.n_proj * L.batch;
  if (rows == 0 || d == 0) return cudaSuccess;
  // Each thread handles groups of four entries (one Philox call); small rows get small blocks.
  const int64_t groups = (d + 3) / 4;
  const int threads = groups >= 256 ? 256 : (groups >= 128 ? 128 : (groups >= 64 ? 64 : 32));
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    FDSM_LAUNCH(random_stencil_batch_kernel<scalar_t>, grid_rows(rows), threads, 0, stream)(
        static_cast<const scalar_t*>(x), seed, static_cast<scalar_t*>(out),
        static_cast<scalar_t*>(v), L, d, noise, eps);
  });
}

cudaError_t launch_stencil_batch_backward(DType dtype, const void* grad, void* grad_x,
                                          void* grad_v, const StencilLayout& L, int64_t d,
                                          cudaStream_t stream) {
  const int64_t n = L.batch * d;
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    FDSM_LAUNCH(stencil_batch_backward_kernel<scalar_t>, grid_for(n), kThreads, 0, stream)(
        static_cast<const scalar_t*>(grad), static_cast<scalar_t*>(grad_x),
        static_cast<scalar_t*>(grad_v), L, d);
  });
}

}  // namespace fdsm
