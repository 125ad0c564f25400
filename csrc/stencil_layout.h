#pragma once

// Row layout of a stacked stencil batch (see fdsm_ext/reference.py): blocks in the order of
// the offsets; a zero offset is one block of B rows (x itself), any other offset a block of
// P*B rows (x repeated P times plus gamma v). Plain data so it can be passed by value to a
// CUDA kernel without a device buffer.

#include <cstdint>

#include "macros.h"

namespace fdsm {

struct StencilLayout {
  int n_offsets;
  int64_t batch;       // B
  int64_t n_proj;      // P
  int64_t total_rows;  // rows of the stacked batch
  double gamma[kMaxOffsets];
  int64_t start[kMaxOffsets];  // first row of each block
};

FDSM_HOST_DEVICE inline int64_t block_rows(const StencilLayout& L, int k) {
  return L.gamma[k] == 0.0 ? L.batch : L.n_proj * L.batch;
}

}  // namespace fdsm
