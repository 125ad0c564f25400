// The unchanged CUDA kernels of csrc/cuda/fd_ssm_kernels.cu, compiled for the host emulator.

#include "emulator.h"

#include "cuda/fd_ssm_kernels.cu"
