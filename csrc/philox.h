#pragma once

// Counter-based RNG (Random123 Philox4x32-10). Element i of row r is a pure function of
// (seed, r, i), so CPU threads and CUDA threads draw identical directions with no shared
// state and no host synchronisation. The recipe is the one of
// fdsm_ext.reference.philox_directions, which is the test oracle.

#include <cmath>
#include <cstdint>

#include "macros.h"

namespace fdsm {

struct Uint4x32 {
  uint32_t v[4];
};

FDSM_HOST_DEVICE inline void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

FDSM_HOST_DEVICE inline Uint4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2,
                                               uint32_t c3, uint32_t k0, uint32_t k1) {
#ifdef __CUDACC__
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, c0, hi0, lo0);
    mulhilo32(0xCD9E8D57u, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Uint4x32{{c0, c1, c2, c3}};
}

// Words o0..o3 for elements 4j..4j+3 of row `row`: counter (j, row, 0, 0), key (seed lo, hi).
FDSM_HOST_DEVICE inline Uint4x32 philox_block(uint64_t seed, uint64_t row, uint64_t group) {
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(row), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

FDSM_HOST_DEVICE inline float rademacher_from_word(uint32_t word) {
  return (word & 1u) ? 1.0f : -1.0f;
}

// Box-Muller in float32, as in the oracle: u1 = (o + 1) 2^-32 is in (0, 1] so log(u1) is
// finite; the float32 rounding of o is part of the recipe.
FDSM_HOST_DEVICE inline void box_muller(uint32_t even, uint32_t odd, float& n_even,
                                        float& n_odd) {
  constexpr float kTwoPow32Inv = 2.3283064365386963e-10f;  // 2^-32, exact in float32
  constexpr float kTwoPi = 6.283185307179586f;
  const float u1 = (static_cast<float>(even) + 1.0f) * kTwoPow32Inv;
  const float u2 = static_cast<float>(odd) * kTwoPow32Inv;
  const float radius = sqrtf(-2.0f * logf(u1));
  const float angle = kTwoPi * u2;
  n_even = radius * cosf(angle);
  n_odd = radius * sinf(angle);
}

// The four unscaled direction entries g[4j..4j+3] of one row.
FDSM_HOST_DEVICE inline void philox_directions4(uint64_t seed, uint64_t row, uint64_t group,
                                                Noise noise, float out[4]) {
  const Uint4x32 w = philox_block(seed, row, group);
  if (noise == Noise::Rademacher) {
    for (int lane = 0; lane < 4; ++lane) out[lane] = rademacher_from_word(w.v[lane]);
  } else {
    box_muller(w.v[0], w.v[1], out[0], out[1]);
    box_muller(w.v[2], w.v[3], out[2], out[3]);
  }
}

}  // namespace fdsm
