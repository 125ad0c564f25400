// CUDA kernels of stencil_batch, random_stencil_batch and stencil_batch_backward.
// Only CUDA and the shared headers are included here: ATen would cost ~30 s per file.

#include "cuda_utils.cuh"
#include "fd_math.h"
#include "philox.h"
#include "sphere_norm.h"

namespace fdsm {
namespace {

// Writes the stencil entries of column i that depend on projection row r (= p*B + b):
// x + gamma_k v for every non-zero offset, and x itself for a zero offset (once, at p = 0).
template <typename scalar_t, typename acc_t>
__device__ inline void write_stencil_points(const StencilLayout& L, int64_t r, int64_t b,
                                            int64_t i, int64_t d, scalar_t xi, scalar_t vi,
                                            scalar_t* __restrict__ out) {
  for (int k = 0; k < L.n_offsets; ++k) {
    if (L.gamma[k] == 0.0) {
      if (r < L.batch) out[(L.start[k] + b) * d + i] = xi;
    } else {
      out[(L.start[k] + r) * d + i] = static_cast<scalar_t>(stencil_point<acc_t>(
          static_cast<acc_t>(xi), static_cast<acc_t>(L.gamma[k]), static_cast<acc_t>(vi)));
    }
  }
}

// 2-D: projection rows r along y, columns along x (a row_block); each thread reads x and v
// once and writes the entry of every offset.
template <typename scalar_t>
__global__ void stencil_batch_kernel(const scalar_t* __restrict__ x,
                                     const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                                     StencilLayout L, int64_t d) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t rows = L.n_proj * L.batch;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t b = r % L.batch;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      write_stencil_points<scalar_t, acc_t>(L, r, b, i, d, x[b * d + i], v[r * d + i], out);
    }
  }
}

// blockDim.x = sphere_lanes(d) lanes per direction row, blockDim.y rows per block; lane l
// draws the Philox groups l, l + lanes, ... of its row. The sphere needs the row's norm
// before any entry is final: its sum of squares is reduced first, in the order of
// sphere_norm.h, and the words are drawn again for the output (cheaper than keeping d
// values). Each output pass stages 4*lanes entries in shared memory, so that lane l then
// stores entries l, l + lanes, ...: coalesced rows instead of 4-strided stores.
template <typename scalar_t>
__global__ void random_stencil_batch_kernel(const scalar_t* __restrict__ x,
                                            const int64_t* __restrict__ seed_ptr,
                                            scalar_t* __restrict__ out, scalar_t* __restrict__ v,
                                            StencilLayout L, int64_t d, Noise noise,
                                            double eps) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ acc_t staged[4 * kThreads];
  const int lanes = blockDim.x, lane = threadIdx.x;
  acc_t* stage = staged + 4 * lanes * threadIdx.y;
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const int64_t rows = L.n_proj * L.batch;
  const int64_t groups = (d + 3) / 4;
  const acc_t flat_factor = static_cast<acc_t>(eps / sqrt(static_cast<double>(d)));
  // Loop bounds are uniform over the block: the shuffles and __syncwarp need every lane.
  for (int64_t r0 = blockIdx.x * static_cast<int64_t>(blockDim.y); r0 < rows;
       r0 += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t r = r0 + threadIdx.y;
    const bool active = r < rows;
    acc_t factor = flat_factor;
    if (noise == Noise::Sphere) {
      acc_t sum_sq = 0;
      for (int64_t j = lane; active && j < groups; j += lanes) {
        float g[4];
        philox_directions4(seed, static_cast<uint64_t>(r), static_cast<uint64_t>(j), noise, g);
        sum_sq = add_squares4(sum_sq, g, d - 4 * j);
      }
      for (int h = lanes / 2; h > 0; h >>= 1) {
        sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, h, lanes);
      }
      factor = sphere_factor<acc_t>(eps, sum_sq);
    }
    const int64_t b = r % L.batch;
    for (int64_t j0 = 0; j0 < groups; j0 += lanes) {
      const int64_t j = j0 + lane;
      if (active && j < groups) {
        float g[4];
        philox_directions4(seed, static_cast<uint64_t>(r), static_cast<uint64_t>(j), noise, g);
        for (int k = 0; k < 4; ++k) {
          stage[4 * lane + k] =
              static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(g[k]) * factor));
        }
      }
      __syncwarp();
      for (int k = 0; k < 4; ++k) {
        const int e = lane + k * lanes;
        const int64_t i = 4 * j0 + e;
        if (!active || i >= d) continue;
        const scalar_t vi = static_cast<scalar_t>(stage[e]);
        v[r * d + i] = vi;
        write_stencil_points<scalar_t, acc_t>(L, r, b, i, d, x[b * d + i], vi, out);
      }
      __syncwarp();  // the stage is refilled by the next pass
    }
  }
}

// 2-D: samples b along y, columns along x; sums every stencil row of sample b in the CPU's
// order (zero offsets, then each projection's non-zero offsets).
template <typename scalar_t>
__global__ void stencil_batch_backward_kernel(const scalar_t* __restrict__ grad,
                                              scalar_t* __restrict__ grad_x,
                                              scalar_t* __restrict__ grad_v, StencilLayout L,
                                              int64_t d) {
  using acc_t = acc_type_t<scalar_t>;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; b < L.batch;
       b += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
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
      grad_x[b * d + i] = static_cast<scalar_t>(acc_x);
    }
  }
}

}  // namespace

cudaError_t launch_stencil_batch(DType dtype, const void* x, const void* v, void* out,
                                 const StencilLayout& L, int64_t d, cudaStream_t stream) {
  const int64_t rows = L.n_proj * L.batch;
  if (rows == 0 || d == 0) return cudaSuccess;
  const dim3 block = row_block(d);
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    FDSM_LAUNCH(stencil_batch_kernel<scalar_t>, grid_for_rows(rows, block), block, 0, stream)(
        static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(v),
        static_cast<scalar_t*>(out), L, d);
  });
}

cudaError_t launch_random_stencil_batch(DType dtype, const void* x, const int64_t* seed,
                                        void* out, void* v, const StencilLayout& L, int64_t d,
                                        Noise noise, double eps, cudaStream_t stream) {
  const int64_t rows = L.n_proj * L.batch;
  if (rows == 0 || d == 0) return cudaSuccess;
  const dim3 block = row_block_lanes(sphere_lanes(d));
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    FDSM_LAUNCH(random_stencil_batch_kernel<scalar_t>, grid_for_rows(rows, block), block, 0,
                stream)(
        static_cast<const scalar_t*>(x), seed, static_cast<scalar_t*>(out),
        static_cast<scalar_t*>(v), L, d, noise, eps);
  });
}

cudaError_t launch_stencil_batch_backward(DType dtype, const void* grad, void* grad_x,
                                          void* grad_v, const StencilLayout& L, int64_t d,
                                          cudaStream_t stream) {
  if (L.batch == 0 || d == 0) return cudaSuccess;
  const dim3 block = row_block(d);
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    FDSM_LAUNCH(stencil_batch_backward_kernel<scalar_t>, grid_for_rows(L.batch, block), block, 0,
                stream)(
        static_cast<const scalar_t*>(grad), static_cast<scalar_t*>(grad_x),
        static_cast<scalar_t*>(grad_v), L, d);
  });
}

}  // namespace fdsm
