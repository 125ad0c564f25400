#pragma once

// Counter-based RNG (Random123 Philox4x32-10). Element i of row r is a pure function of
// (seed, r, i), so CPU threads and CUDA threads draw identical directions with no shared
// state and no host synchronisation. The recipe is the one of
// fdsm_ext.reference._philox_directions, which is the test oracle.

#include <cmath>
#include <cstdint>

#ifndef __CUDA_ARCH__
#include <bit>
#endif

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

// Counter of group j (elements 4j..4j+3) of row r: (j lo, r lo, r hi, j hi), all 64 bits of
// both, so rows past 2^32 (n_projections * B) never repeat earlier ones. The high words sit
// where the 32-bit counter (j, r, 0, 0) had zeros: below 2^32 the directions are unchanged.
FDSM_HOST_DEVICE inline Uint4x32 philox_counter(uint64_t row, uint64_t group) {
  return Uint4x32{{static_cast<uint32_t>(group), static_cast<uint32_t>(row),
                   static_cast<uint32_t>(row >> 32), static_cast<uint32_t>(group >> 32)}};
}

// Words o0..o3 for elements 4j..4j+3 of row `row`: counter philox_counter(row, j), key
// (seed lo, seed hi).
FDSM_HOST_DEVICE inline Uint4x32 philox_block(uint64_t seed, uint64_t row, uint64_t group) {
  const Uint4x32 c = philox_counter(row, group);
  return philox4x32_10(c.v[0], c.v[1], c.v[2], c.v[3], static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

FDSM_HOST_DEVICE inline float rademacher_from_word(uint32_t word) {
  return (word & 1u) ? 1.0f : -1.0f;
}

// ---------------------------------------------------------------------------------------
// Float32 math of Box-Muller, written out once so that g++ (CPU, auto-vectorised) and nvcc
// (CUDA) evaluate literally the same operations in the same order, and so that the oracle
// fdsm_ext.reference._philox_directions can replay them with float32 torch ops. Branch-free:
// integer bit tricks, polynomials and selects only. On the device the products and sums are
// spelled __fmul_rn/__fadd_rn so that nvcc does not contract them into FMAs (baseline x86-64
// has no FMA, so g++ rounds every operation too): CPU and GPU give bit-identical values.

#ifdef __CUDA_ARCH__
FDSM_HOST_DEVICE inline float fmul_rn(float a, float b) { return __fmul_rn(a, b); }
FDSM_HOST_DEVICE inline float fadd_rn(float a, float b) { return __fadd_rn(a, b); }
FDSM_HOST_DEVICE inline float fsub_rn(float a, float b) { return __fsub_rn(a, b); }
FDSM_HOST_DEVICE inline int32_t float_bits(float f) { return __float_as_int(f); }
FDSM_HOST_DEVICE inline float bits_float(int32_t i) { return __int_as_float(i); }
#else
inline float fmul_rn(float a, float b) { return a * b; }
inline float fadd_rn(float a, float b) { return a + b; }
inline float fsub_rn(float a, float b) { return a - b; }
inline int32_t float_bits(float f) { return std::bit_cast<int32_t>(f); }
inline float bits_float(int32_t i) { return std::bit_cast<float>(i); }
#endif

// float32 rounding of a uint32, via two exact int32 conversions and one rounded sum (equal
// to a direct conversion; SSE2 only converts signed int32, so this one vectorises).
FDSM_HOST_DEVICE inline float uint32_to_float(uint32_t w) {
  const float hi = static_cast<float>(static_cast<int32_t>(w >> 16)) * 65536.0f;  // exact
  const float lo = static_cast<float>(static_cast<int32_t>(w & 0xFFFFu));          // exact
  return fadd_rn(hi, lo);
}

// Natural log of a positive normal float32 (Cephes logf): x = 2^e m with m in
// [sqrt(1/2), sqrt(2)) found by integer arithmetic on the bits, f = m - 1 (exact),
// log x = f - f^2/2 + f^3 P(f) + e log 2 with log 2 split in two. Max error ~1 ulp.
FDSM_HOST_DEVICE inline float log_poly(float x) {
  constexpr int32_t kSqrtHalfBits = 0x3F3504F3;  // bits of sqrt(1/2)
  const int32_t shifted = float_bits(x) - kSqrtHalfBits;
  const int32_t e = shifted >> 23;  // arithmetic shift: floor
  const float m = bits_float((shifted & 0x007FFFFF) + kSqrtHalfBits);
  const float f = fsub_rn(m, 1.0f);
  const float fe = static_cast<float>(e);
  float p = 7.0376836292e-2f;
  p = fadd_rn(fmul_rn(p, f), -1.1514610310e-1f);
  p = fadd_rn(fmul_rn(p, f), 1.1676998740e-1f);
  p = fadd_rn(fmul_rn(p, f), -1.2420140846e-1f);
  p = fadd_rn(fmul_rn(p, f), 1.4249322787e-1f);
  p = fadd_rn(fmul_rn(p, f), -1.6668057665e-1f);
  p = fadd_rn(fmul_rn(p, f), 2.0000714765e-1f);
  p = fadd_rn(fmul_rn(p, f), -2.4999993993e-1f);
  p = fadd_rn(fmul_rn(p, f), 3.3333331174e-1f);
  const float z = fmul_rn(f, f);
  float y = fmul_rn(fmul_rn(f, z), p);
  y = fadd_rn(y, fmul_rn(fe, -2.12194440e-4f));
  y = fsub_rn(y, fmul_rn(0.5f, z));
  return fadd_rn(fadd_rn(f, y), fmul_rn(fe, 0.693359375f));
}

// cos(2 pi u) and sin(2 pi u) for u in [0, 1]: q = round(4u), r = u - q/4 in [-1/8, 1/8]
// (both exact), x = 2 pi r in [-pi/4, pi/4], Cephes minimax polynomials for sin x and cos x,
// then the quadrant q selects and negates them. Max error ~1 ulp (absolute ~6e-8).
FDSM_HOST_DEVICE inline void sincos_2pi(float u, float& c_out, float& s_out) {
  constexpr float kTwoPi = 6.283185307179586f;
  const int32_t q = static_cast<int32_t>(fadd_rn(fmul_rn(u, 4.0f), 0.5f));  // u >= 0: floor
  const float r = fsub_rn(u, fmul_rn(static_cast<float>(q), 0.25f));
  const float x = fmul_rn(r, kTwoPi);
  const float z = fmul_rn(x, x);
  float ps = -1.9515295891e-4f;
  ps = fadd_rn(fmul_rn(ps, z), 8.3321608736e-3f);
  ps = fadd_rn(fmul_rn(ps, z), -1.6666654611e-1f);
  const float s = fadd_rn(fmul_rn(fmul_rn(ps, z), x), x);
  float pc = 2.443315711809948e-5f;
  pc = fadd_rn(fmul_rn(pc, z), -1.388731625493765e-3f);
  pc = fadd_rn(fmul_rn(pc, z), 4.166664568298827e-2f);
  const float c = fadd_rn(fsub_rn(fmul_rn(fmul_rn(pc, z), z), fmul_rn(0.5f, z)), 1.0f);
  // cos(q pi/2 + x) = c, -s, -c, s and sin(q pi/2 + x) = s, c, -s, -c for q mod 4 = 0..3.
  const bool odd = (q & 1) != 0;
  const float cos_abs = odd ? s : c;
  const float sin_abs = odd ? c : s;
  c_out = ((q + 1) & 2) != 0 ? -cos_abs : cos_abs;
  s_out = (q & 2) != 0 ? -sin_abs : sin_abs;
}

// Box-Muller in float32, as in the oracle: u1 = (o + 1) 2^-32 is in (0, 1] so log(u1) is
// finite; the float32 rounding of o is part of the recipe.
FDSM_HOST_DEVICE inline void box_muller(uint32_t even, uint32_t odd, float& n_even,
                                        float& n_odd) {
  constexpr float kTwoPow32Inv = 2.3283064365386963e-10f;  // 2^-32, exact in float32
  const float u1 = fmul_rn(fadd_rn(uint32_to_float(even), 1.0f), kTwoPow32Inv);
  const float u2 = fmul_rn(uint32_to_float(odd), kTwoPow32Inv);
  const float radius = sqrtf(fmul_rn(-2.0f, log_poly(u1)));
  float c, s;
  sincos_2pi(u2, c, s);
  n_even = fmul_rn(radius, c);
  n_odd = fmul_rn(radius, s);
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
