#pragma once

// Per-sample finite-difference formulas and their derivatives, shared verbatim by the CPU
// and CUDA kernels (derived in docs/math.rst, sections "FD-SSM for scalar models", "FD-SSM
// for score models" and "FD-DSM with random directions"). Everything is templated on the
// accumulation type `acc_t` (float for half/bfloat16/float inputs, double for double): FD
// combinations cancel leading digits, so they are never evaluated in 16-bit types.

#include "macros.h"

namespace fdsm {

// One stencil point x + gamma v, computed in the accumulation type and rounded once.
template <typename acc_t>
FDSM_HOST_DEVICE inline acc_t stencil_point(acc_t x, acc_t gamma, acc_t v) {
  return x + gamma * v;
}

// ---------------------------------------------------------------------------------------
// FD-SSM, scalar model (one projection): 1/8 (f+ - f-)^2 + sign (f+ + f- - 2 f0).
// The per-sample loss is scale times the mean of this over projections.
template <typename acc_t>
FDSM_HOST_DEVICE inline acc_t ssm_scalar_term(acc_t f0, acc_t fp, acc_t fm, acc_t sign) {
  const acc_t diff = fp - fm;
  return acc_t(0.125) * diff * diff + sign * (fp + fm - acc_t(2) * f0);
}

// d term / d f+ and d term / d f-; d term / d f0 = -2 sign for every projection.
template <typename acc_t>
FDSM_HOST_DEVICE inline acc_t ssm_scalar_dplus(acc_t fp, acc_t fm, acc_t sign) {
  return acc_t(0.25) * (fp - fm) + sign;
}
template <typename acc_t>
FDSM_HOST_DEVICE inline acc_t ssm_scalar_dminus(acc_t fp, acc_t fm, acc_t sign) {
  return acc_t(-0.25) * (fp - fm) + sign;
}
template <typename acc_t>
FDSM_HOST_DEVICE inline acc_t ssm_scalar_dcentre(acc_t sign) {
  return acc_t(-2) * sign;
}

// ---------------------------------------------------------------------------------------
// FD-SSM, score model (one projection row). With add = s+ + s-, sub = s+ - s-:
//   variance-reduced: 1/8 ||add||^2 + scale/2 v.sub
//   plain:            scale (1/8 (v.add)^2 + 1/2 v.sub)
// The kernels reduce the three row sums ||add||^2, v.add, v.sub and call these.
template <typename acc_t>
FDSM_HOST_DEVICE inline acc_t ssm_score_term(bool variance_reduction, acc_t add_sq,
                                             acc_t v_add, acc_t v_sub, acc_t scale) {
  if (variance_reduction) return acc_t(0.125) * add_sq + acc_t(0.5) * scale * v_sub;
  return scale * (acc_t(0.125) * v_add * v_add + acc_t(0.5) * v_sub);
}

// Element-wise derivatives of ssm_score_term w.r.t. s+_i and s-_i. `v_add` (the row sum)
// is only used by the plain form, whose square couples all entries of the row.
template <typename acc_t>
FDSM_HOST_DEVICE inline void ssm_score_grad(bool variance_reduction, acc_t add_i, acc_t v_i,
                                            acc_t v_add, acc_t scale, acc_t& d_plus,
                                            acc_t& d_minus) {
  if (variance_reduction) {
    const acc_t a = acc_t(0.25) * add_i;
    const acc_t b = acc_t(0.5) * scale * v_i;
    d_plus = a + b;
    d_minus = a - b;
  } else {
    const acc_t a = acc_t(0.25) * v_add * v_i;
    const acc_t b = acc_t(0.5) * v_i;
    d_plus = scale * (a + b);
    d_minus = scale * (a - b);
  }
}

// ---------------------------------------------------------------------------------------
// FD-DSM, scalar model: residual = sign/2 (f+ - f-) + v.target, loss = scale residual^2.
template <typename acc_t>
FDSM_HOST_DEVICE inline acc_t dsm_residual(acc_t fp, acc_t fm, acc_t v_dot_target,
                                           acc_t sign) {
  return sign * acc_t(0.5) * (fp - fm) + v_dot_target;
}
template <typename acc_t>
FDSM_HOST_DEVICE inline acc_t dsm_loss(acc_t residual, acc_t scale) {
  return scale * residual * residual;
}
// d loss / d f+ = scale sign residual; d loss / d f- is its negative.
template <typename acc_t>
FDSM_HOST_DEVICE inline acc_t dsm_dplus(acc_t residual, acc_t scale, acc_t sign) {
  return scale * sign * residual;
}

}  // namespace fdsm
