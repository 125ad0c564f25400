#pragma once

// The sum of squares of a sphere direction row, in one fixed order on every device, so that
// the CPU op, the CUDA kernel and fdsm_ext.reference.scale_directions scale the directions
// bit for bit alike. The d entries come in Philox groups of four (philox_directions4).
// Lane l of sphere_lanes(d) lanes sums the squares of groups l, l + lanes, l + 2 lanes, ...
// in that order, entries 4j..4j+3 of a group in order; then the lane sums are added
// pairwise, lane l + h into lane l for h = lanes/2, ..., 1 (the CUDA kernel's xor butterfly
// across the lanes of a row gives every lane this same total).

#include <cmath>
#include <cstdint>

#include "macros.h"

namespace fdsm {

constexpr int kWarpSize = 32;

// Threads per direction row: enough for one group each, a power of two, at most a warp.
FDSM_HOST_DEVICE inline int sphere_lanes(int64_t d) {
  const int64_t groups = (d + 3) / 4;
  int lanes = 1;
  while (lanes < groups && lanes < kWarpSize) lanes *= 2;
  return lanes;
}

// Adds the squares of the first n entries of one group to a lane's running sum.
template <typename acc_t>
FDSM_HOST_DEVICE inline acc_t add_squares4(acc_t sum, const float g[4], int64_t n) {
  for (int k = 0; k < 4 && k < n; ++k) {
    const acc_t gk = static_cast<acc_t>(g[k]);
    sum += gk * gk;
  }
  return sum;
}

// eps / ||g||, with correctly rounded sqrt and division (std::sqrt: the float overload).
template <typename acc_t>
FDSM_HOST_DEVICE inline acc_t sphere_factor(double eps, acc_t sum_sq) {
#ifdef __CUDA_ARCH__
  return static_cast<acc_t>(eps) / sqrt(sum_sq);
#else
  return static_cast<acc_t>(eps) / std::sqrt(sum_sq);
#endif
}

// The CPU's side: the row's sum of squares from its entries g[0, d), in the order above.
template <typename acc_t>
inline acc_t sphere_sum_sq(const float* g, int64_t d) {
  const int lanes = sphere_lanes(d);
  acc_t part[kWarpSize] = {};
  // Whole passes of 4*lanes entries with the lanes innermost, so that this vectorises; each
  // lane still adds its entries in order.
  int64_t base = 0;
  for (; base + 4 * lanes <= d; base += 4 * lanes) {
    for (int k = 0; k < 4; ++k) {
      for (int l = 0; l < lanes; ++l) {
        const acc_t gk = static_cast<acc_t>(g[base + 4 * l + k]);
        part[l] += gk * gk;
      }
    }
  }
  for (int64_t j = base / 4; 4 * j < d; ++j) {
    part[j % lanes] = add_squares4(part[j % lanes], g + 4 * j, d - 4 * j);
  }
  for (int h = lanes / 2; h > 0; h /= 2) {
    for (int l = 0; l < h; ++l) part[l] += part[l + h];
  }
  return part[0];
}

}  // namespace fdsm
