// Pixel-shuffle index math, shared by the CUDA kernel and the C++ host kernel (nvlm-spec §4.2).
//
// The unshuffled tensor is [N, L, C] with L = side² tokens on a square grid (row-major, CLS
// dropped); the shuffled one is [N, L/r², r²·C]. Input token (row, col) lands in output token
// (row/r, col/r) — scanned row-major for v2 (NVLM), column-major for v1 — at channel segment
// (row%r)·r + col%r, and its C channels stay one contiguous run there. So a kernel can walk the
// unshuffled tokens and copy each one's channels as a single contiguous run on both sides.
//
// All lengths and strides are in "units": the widest power-of-two byte chunk (16, 8, 4, 2 or 1
// bytes) that every address of both tensors is aligned to (see copy_unit_bytes). A 16-byte unit
// turns every load and store into one 128-bit access.
#pragma once

#include <cstdint>

#include "core/macros.h"

namespace nvlm::pixel_shuffle {

struct ShuffleGeometry {
  int64_t total_tokens;     // N·L, unshuffled tokens over all images
  int32_t tokens;           // L
  int32_t side;             // sqrt(L)
  int32_t downscale;        // r
  bool v2;                  // row-major output tokens (NVLM) vs transposed (v1)
  int32_t units_per_token;  // C in units
  // Strides in units: unshuffled [N, L, C] and shuffled [N, L/r², r²·C].
  int64_t unshuffled_stride_n, unshuffled_stride_l, unshuffled_stride_c;
  int64_t shuffled_stride_n, shuffled_stride_l, shuffled_stride_c;
};

// Where unshuffled token `token` (0 <= token < L, within one image) goes.
struct ShuffledPlace {
  int32_t token;    // output token
  int32_t segment;  // which of the r² channel segments of that token (each C wide)
};

NVLM_HOST_DEVICE ShuffledPlace shuffled_place(int32_t token, int32_t side, int32_t downscale, bool v2) {
  const int32_t row = token / side;
  const int32_t col = token - row * side;
  const int32_t block_row = row / downscale;
  const int32_t block_col = col / downscale;
  const int32_t side_out = side / downscale;
  ShuffledPlace place;
  place.token = v2 ? block_row * side_out + block_col : block_col * side_out + block_row;
  place.segment = (row - block_row * downscale) * downscale + (col - block_col * downscale);
  return place;
}

// Offsets (in units) of channel 0 of unshuffled token `flat_token` (over all N·L) in both tensors.
struct TokenOffsets {
  int64_t unshuffled;
  int64_t shuffled;
};

NVLM_HOST_DEVICE TokenOffsets token_offsets(int64_t flat_token, const ShuffleGeometry& g) {
  const int64_t image = flat_token / g.tokens;
  const int32_t token = static_cast<int32_t>(flat_token - image * g.tokens);
  const ShuffledPlace place = shuffled_place(token, g.side, g.downscale, g.v2);
  TokenOffsets offsets;
  offsets.unshuffled = image * g.unshuffled_stride_n + token * g.unshuffled_stride_l;
  offsets.shuffled = image * g.shuffled_stride_n + place.token * g.shuffled_stride_l +
                     static_cast<int64_t>(place.segment) * g.units_per_token * g.shuffled_stride_c;
  return offsets;
}

// The widest unit (bytes) such that a token's channel run can be copied unit by unit in both
// tensors: channels contiguous in both, and every base address, token/image stride and the run
// length (C·element_size) a multiple of the unit. Strided channels fall back to one element.
NVLM_HOST_DEVICE int32_t copy_unit_bytes(int32_t element_size, int64_t channels, uintptr_t unshuffled_address,
                                         uintptr_t shuffled_address, const int64_t unshuffled_strides[3],
                                         const int64_t shuffled_strides[3]) {
  if (unshuffled_strides[2] != 1 || shuffled_strides[2] != 1) {
    return element_size;
  }
  // Bitwise OR of everything that must be a multiple of the unit; its lowest set bit bounds it.
  uint64_t bits = static_cast<uint64_t>(unshuffled_address) | static_cast<uint64_t>(shuffled_address) |
                  static_cast<uint64_t>(channels * element_size);
  for (int i = 0; i < 2; ++i) {
    bits |= static_cast<uint64_t>(unshuffled_strides[i] * element_size);
    bits |= static_cast<uint64_t>(shuffled_strides[i] * element_size);
  }
  int32_t unit = 16;
  while (unit > element_size && (bits & static_cast<uint64_t>(unit - 1)) != 0) {
    unit /= 2;
  }
  return unit;
}

}  // namespace nvlm::pixel_shuffle
