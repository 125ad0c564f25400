// The unchanged CUDA kernels of csrc/cuda/stencil_kernels.cu, compiled for the host emulator.

#include "emulator.h"

#include "cuda/stencil_kernels.cu"
