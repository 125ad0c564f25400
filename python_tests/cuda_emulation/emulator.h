#pragma once

// Host emulation of the CUDA execution model, for tests only (never part of the package).
// The kernels of csrc/cuda/*.cu are compiled unchanged by g++ with this header included
// first: every CUDA thread runs as a fiber (ucontext), blocks run one after another, and
// __syncthreads / __syncwarp / __shfl_*_sync are barriers between the fibers of a block or
// warp. What a GPU would hang on or leave undefined is reported as a KernelFault: a barrier
// that some threads of the block (or lanes of the warp) never reach, a full-mask shuffle in
// a partial warp, a partial mask. An invalid launch configuration sets the error that
// cudaGetLastError() returns, as on a GPU. Fibers run in thread order, each to its next
// barrier, so a missing barrier shows only when a thread reads what a later thread writes
// (or overwrites what a later thread has yet to read); other races, device rounding and
// memory spaces are not emulated. Single-threaded.

// Per-block static storage: blocks run one after another, so one copy per kernel is enough.
#define __shared__ static

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "emulator_control.h"

namespace fdsm_emu {

// Coordinates of the running fiber (set by the scheduler before every switch).
extern uint3 thread_idx, block_idx;
extern dim3 block_dim, grid_dim;

cudaError_t get_last_error();

void run_grid(const char* kernel, dim3 grid, dim3 block, size_t shared_bytes,
              const std::function<void()>& body);

void syncthreads(const std::source_location& where);

enum class Shuffle { Down, Xor, Index, Sync };
// Exchanges `bits` (the value's bytes) among the lanes of the calling warp.
uint64_t warp_exchange(Shuffle kind, unsigned mask, uint64_t bits, int size, int arg, int width,
                       const std::source_location& where);

template <typename T>
T shuffle(Shuffle kind, unsigned mask, T value, int arg, int width,
          const std::source_location& where) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t));
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = warp_exchange(kind, mask, bits, sizeof(T), arg, width, where);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// The <<<grid, block, shared, stream>>> of one kernel: arguments are converted to the
// kernel's parameter types and copied once, as a CUDA launch does.
template <typename... Params>
struct Launch {
  const char* name;
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t shared_bytes;

  template <typename... Args>
  void operator()(Args&&... args) const {
    const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    run_grid(name, grid, block, shared_bytes, [&] { std::apply(kernel, params); });
  }
};

template <typename... Params>
Launch<Params...> launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                         size_t shared_bytes) {
  return Launch<Params...>{name, kernel, grid, block, shared_bytes};
}

}  // namespace fdsm_emu

#define FDSM_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  ::fdsm_emu::launch(#kernel, kernel, grid, block, shared_bytes)

#define threadIdx (::fdsm_emu::thread_idx)
#define blockIdx (::fdsm_emu::block_idx)
#define blockDim (::fdsm_emu::block_dim)
#define gridDim (::fdsm_emu::grid_dim)
#define cudaGetLastError ::fdsm_emu::get_last_error

inline void __syncthreads(
    const std::source_location& where = std::source_location::current()) {
  fdsm_emu::syncthreads(where);
}

inline void __syncwarp(unsigned mask = 0xffffffffu,
                       const std::source_location& where = std::source_location::current()) {
  fdsm_emu::warp_exchange(fdsm_emu::Shuffle::Sync, mask, 0, 0, 0, 32, where);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32,
                   const std::source_location& where = std::source_location::current()) {
  return fdsm_emu::shuffle(fdsm_emu::Shuffle::Down, mask, value, static_cast<int>(delta), width,
                           where);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32,
                  const std::source_location& where = std::source_location::current()) {
  return fdsm_emu::shuffle(fdsm_emu::Shuffle::Xor, mask, value, lane_mask, width, where);
}

template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32,
              const std::source_location& where = std::source_location::current()) {
  return fdsm_emu::shuffle(fdsm_emu::Shuffle::Index, mask, value, src_lane, width, where);
}
