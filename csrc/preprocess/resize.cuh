// Resize-to-tiles CUDA kernels: one launch for every job's first pass, one for every job's second
// pass with the normalization and the scatter into tiles. blockIdx.y is the job; a thread makes
// one pixel (three channels); blocks past the end of a smaller job return at once. The output is
// planar or channels-last (TileLayout), written in place either way.
//
// Consecutive threads make consecutive pixels of a row, so a vertical pass reads consecutive
// bytes at each tap and the tile stores are coalesced within each channel plane; a horizontal
// pass's windows overlap between neighbours and come from L1.
#pragma once

#include <cstdint>

#include "preprocess/resize_index.h"

namespace nvlm::preprocess {

constexpr int kResizeThreads = 256;

__global__ void __launch_bounds__(kResizeThreads)
    resize_first_pass_kernel(const ResizeJob* __restrict__ jobs, const int32_t* __restrict__ coefficients,
                             uint8_t* __restrict__ scratch) {
  const ResizeJob job = jobs[blockIdx.y];
  if (job.first.axis == kAxisNone) return;
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * kResizeThreads + threadIdx.x;
  if (pixel >= static_cast<int64_t>(job.mid_width) * job.mid_height) return;
  const int32_t y = static_cast<int32_t>(pixel / job.mid_width);
  const int32_t x = static_cast<int32_t>(pixel - static_cast<int64_t>(y) * job.mid_width);
  uint8_t rgb[3];
  first_pass_rgb(job, coefficients, x, y, rgb);
  uint8_t* out = scratch + job.scratch_offset + pixel * 3;
  out[0] = rgb[0];
  out[1] = rgb[1];
  out[2] = rgb[2];
}

template <typename Out>
__global__ void __launch_bounds__(kResizeThreads)
    resize_second_pass_kernel(const ResizeJob* __restrict__ jobs, const int32_t* __restrict__ coefficients,
                              const uint8_t* __restrict__ scratch, const float* __restrict__ table, int32_t tile_size,
                              TileLayout layout, Out* __restrict__ out) {
  const ResizeJob job = jobs[blockIdx.y];
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * kResizeThreads + threadIdx.x;
  if (pixel >= static_cast<int64_t>(job.out_width) * job.out_height) return;
  const int32_t y = static_cast<int32_t>(pixel / job.out_width);
  const int32_t x = static_cast<int32_t>(pixel - static_cast<int64_t>(y) * job.out_width);
  uint8_t rgb[3];
  resized_rgb(job, scratch, coefficients, x, y, rgb);
  const int64_t offset = tile_offset(job, tile_size, layout, x, y);
#pragma unroll
  for (int c = 0; c < 3; ++c) {
    out[offset + c * layout.channel] = static_cast<Out>(table[c * 256 + rgb[c]]);
  }
}

}  // namespace nvlm::preprocess
