// Pixel-shuffle CUDA kernel: a pure permutation, so it is bound by memory bandwidth.
//
// One warp per unshuffled token: the warp computes the token's two base offsets once (the
// integer divisions of token_offsets() are paid per token, not per element) and its lanes copy
// the token's channel run, which is contiguous in both tensors. With 16-byte units and NVLM's
// C = 3200 bf16 that is 400 units = 12.5 per lane; each lane issues kUnroll loads before its
// stores so enough bytes are in flight to cover DRAM latency.
#pragma once

#include <cstdint>

#include "pixel_shuffle/pixel_shuffle_index.h"

namespace nvlm::pixel_shuffle {

constexpr int kWarpsPerBlock = 8;
constexpr int kUnroll = 4;

// kContiguous: both tensors' channel strides are 1 (always so for units wider than an element),
// which lets the compiler fold the stride multiplications away.
template <typename Unit, bool kForward, bool kContiguous>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    pixel_shuffle_kernel(const Unit* __restrict__ source, Unit* __restrict__ destination, const ShuffleGeometry g) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (token >= g.total_tokens) {
    return;
  }
  const TokenOffsets offsets = token_offsets(token, g);
  const Unit* src = source + (kForward ? offsets.unshuffled : offsets.shuffled);
  Unit* dst = destination + (kForward ? offsets.shuffled : offsets.unshuffled);
  const int64_t src_stride = kContiguous ? 1 : (kForward ? g.unshuffled_stride_c : g.shuffled_stride_c);
  const int64_t dst_stride = kContiguous ? 1 : (kForward ? g.shuffled_stride_c : g.unshuffled_stride_c);
  const int32_t units = g.units_per_token;

  for (int32_t base = 0; base < units; base += 32 * kUnroll) {
    Unit values[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int32_t c = base + k * 32 + lane;
      if (c < units) {
        values[k] = src[c * src_stride];
      }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int32_t c = base + k * 32 + lane;
      if (c < units) {
        dst[c * dst_stride] = values[k];
      }
    }
  }
}

}  // namespace nvlm::pixel_shuffle
