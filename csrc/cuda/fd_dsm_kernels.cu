// CUDA kernels of the FD-DSM reduction and its backward pass (ATen-free).

#include "cuda_utils.cuh"
#include "fd_math.h"

namespace fdsm {
namespace {

// Samples b over row_blocks: the row reduction v.target, then the residual and loss.
template <typename scalar_t>
__global__ void fd_dsm_scalar_kernel(const scalar_t* __restrict__ f,
                                     const scalar_t* __restrict__ v,
                                     const scalar_t* __restrict__ target,
                                     acc_type_t<scalar_t>* __restrict__ loss,
                                     acc_type_t<scalar_t>* __restrict__ residual, int64_t B,
                                     int64_t d, double scale, double sign) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ acc_t shared[32];
  // Loop bounds are uniform over the block: row_sum needs every lane.
  for (int64_t b0 = blockIdx.x * static_cast<int64_t>(blockDim.y); b0 < B;
       b0 += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t b = b0 + threadIdx.y;
    acc_t dot[1] = {acc_t(0)};
    for (int64_t i = threadIdx.x; b < B && i < d; i += blockDim.x) {
      dot[0] += static_cast<acc_t>(v[b * d + i]) * static_cast<acc_t>(target[b * d + i]);
    }
    row_sum<1>(dot, shared);
    if (b < B && threadIdx.x == 0) {
      const acc_t res = dsm_residual<acc_t>(static_cast<acc_t>(f[b]),
                                            static_cast<acc_t>(f[B + b]), dot[0],
                                            static_cast<acc_t>(sign));
      residual[b] = res;
      loss[b] = dsm_loss<acc_t>(res, static_cast<acc_t>(scale));
    }
  }
}

template <typename acc_t>
__global__ void fd_dsm_scalar_backward_kernel(const acc_t* __restrict__ grad,
                                              const acc_t* __restrict__ residual,
                                              acc_t* __restrict__ grad_f, int64_t B,
                                              double scale, double sign) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < B;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t g = grad[b] * dsm_dplus<acc_t>(residual[b], static_cast<acc_t>(scale),
                                               static_cast<acc_t>(sign));
    grad_f[b] = g;
    grad_f[B + b] = -g;
  }
}

}  // namespace

cudaError_t launch_fd_dsm_scalar(DType dtype, const void* f, const void* v, const void* target,
                                 void* loss, void* residual, int64_t B, int64_t d, double scale,
                                 double sign, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  const dim3 block = row_block(d);
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type_t<scalar_t>;
    FDSM_LAUNCH(fd_dsm_scalar_kernel<scalar_t>, grid_for_rows(B, block), block, 0, stream)(
        static_cast<const scalar_t*>(f), static_cast<const scalar_t*>(v),
        static_cast<const scalar_t*>(target), static_cast<acc_t*>(loss),
        static_cast<acc_t*>(residual), B, d, scale, sign);
  });
}

cudaError_t launch_fd_dsm_scalar_backward(DType dtype, const void* grad, const void* residual,
                                          void* grad_f, int64_t B, double scale, double sign,
                                          cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (dtype == DType::Double) {
    FDSM_LAUNCH(fd_dsm_scalar_backward_kernel<double>, grid_for(B), kThreads, 0, stream)(
        static_cast<const double*>(grad), static_cast<const double*>(residual),
        static_cast<double*>(grad_f), B, scale, sign);
  } else if (dtype == DType::Float) {
    FDSM_LAUNCH(fd_dsm_scalar_backward_kernel<float>, grid_for(B), kThreads, 0, stream)(
        static_cast<const float*>(grad), static_cast<const float*>(residual),
        static_cast<float*>(grad_f), B, scale, sign);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace fdsm
