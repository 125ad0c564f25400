#pragma once

// Code in the shared headers is compiled twice: by g++ for the CPU kernels and by nvcc for
// the CUDA kernels, so that both devices evaluate literally the same formulas.
#ifdef __CUDACC__
#define FDSM_HOST_DEVICE __host__ __device__
#else
#define FDSM_HOST_DEVICE
#endif

namespace fdsm {

// Stencils longer than this would need a device-side offsets buffer (and a host-to-device
// copy per call); real FD stencils have at most about a dozen points.
constexpr int kMaxOffsets = 32;

enum class Noise : int { Sphere = 0, Gaussian = 1, Rademacher = 2 };

}  // namespace fdsm
