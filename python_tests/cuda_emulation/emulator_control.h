#pragma once

// The emulator's controls, for code that does not include the emulated CUDA names
// (emulator.h defines threadIdx, blockDim, ... as macros).

#include <stdexcept>
#include <string>
#include <vector>

namespace fdsm_emu {

// What a GPU would hang on or leave undefined (thrown out of the launch).
struct KernelFault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Clamps every grid dimension to `cap` at launch (0: no cap). Kernels must be correct for
// any grid, so a cap of 1 or 3 makes every grid-stride and block-stride loop wrap.
void set_grid_cap(unsigned cap);

// The message of the last invalid launch (cudaGetLastError() returns only its code).
std::string last_error_message();

// Tiny kernels that check the emulator itself (emulator_cases.cpp): returns what the kernel
// wrote, or throws what the emulator reports.
std::vector<double> run_case(const std::string& name);

}  // namespace fdsm_emu
