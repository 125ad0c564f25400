// CUDA kernels of fd_combine and its adjoint (ATen-free, see stencil_kernels.cu).

#include "cuda_utils.cuh"

namespace fdsm {
namespace {

template <typename scalar_t>
__global__ void fd_combine_kernel(const scalar_t* __restrict__ y,
                                  acc_type_t<scalar_t>* __restrict__ out, Weights w, int64_t n) {
  using acc_t = acc_type_t<scalar_t>;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t sum = 0;
    for (int k = 0; k < w.n; ++k) sum += static_cast<acc_t>(w.w[k]) * static_cast<acc_t>(y[k * n + j]);
    out[j] = sum;
  }
}

template <typename scalar_t>
__global__ void fd_combine_backward_kernel(const scalar_t* __restrict__ grad,
                                           scalar_t* __restrict__ out, Weights w, int64_t n) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t total = n * w.n;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = idx / n, j = idx - k * n;
    out[idx] = static_cast<scalar_t>(static_cast<acc_t>(w.w[k]) * static_cast<acc_t>(grad[j]));
  }
}

}  // namespace

cudaError_t launch_fd_combine(DType dtype, const void* y, void* out, const Weights& w,
                              int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    FDSM_LAUNCH(fd_combine_kernel<scalar_t>, grid_for(n), kThreads, 0, stream)(
        static_cast<const scalar_t*>(y), static_cast<acc_type_t<scalar_t>*>(out), w, n);
  });
}

cudaError_t launch_fd_combine_backward(DType dtype, const void* grad, void* out,
                                       const Weights& w, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    FDSM_LAUNCH(fd_combine_backward_kernel<scalar_t>, grid_for(n * w.n), kThreads, 0, stream)(
        static_cast<const scalar_t*>(grad), static_cast<scalar_t*>(out), w, n);
  });
}

}  // namespace fdsm
