// Pillow-exact bicubic resampling into normalized tiles: the per-pixel arithmetic, shared by the
// CUDA kernels and the C++ host kernel (shared/docs/pillow-resample.md).
//
// A job resizes one image (its tile grid, or its thumbnail) in at most two separable passes. A
// pass along an axis computes, per output sample i and channel, acc = 2^21 + Σ_t pixel[start_i+t]
// · weight_i,t in int32 and stores clip(acc >> 22) as uint8; the second pass reads the first
// pass's uint8 result. Coefficients come from the host (nvlm_kernels/preprocess/resample.py), one
// block per pass: start[n], taps[n], weights[n · window] (int32), n = samples along the axis.
#pragma once

#include <cstdint>

#include "core/macros.h"

namespace nvlm::preprocess {

constexpr int kPrecisionBits = 22;
constexpr int kAxisVertical = 0;
constexpr int kAxisHorizontal = 1;
constexpr int kAxisNone = -1;

// A uint8 image [height, width, channels] with any strides (bytes). channels == 1 is grayscale,
// replicated to R, G, B; channels == 4 carries an alpha that RGB conversion drops.
struct PixelSource {
  const uint8_t* data;
  int64_t stride_y, stride_x, stride_c;
  int32_t width, height, channels;
};

struct AxisPass {
  int32_t axis;    // kAxisVertical, kAxisHorizontal or kAxisNone
  int32_t window;  // weights per output sample
  int64_t offset;  // of the pass's coefficient block in the coefficient buffer
};

struct ResizeJob {
  PixelSource image;
  int32_t out_width, out_height;  // the resized image (tile_cols · S × tile_rows · S, or S × S)
  int32_t mid_width, mid_height;  // after the first pass (when there is one)
  int64_t scratch_offset;         // bytes: the first pass's [mid_height, mid_width, 3] result
  AxisPass first, second;         // first.axis == kAxisNone: the second pass reads the image
  int32_t tile_base, tile_cols;   // output tile of the job's top-left tile; tiles per row
};

NVLM_HOST_DEVICE uint8_t clip8(int32_t acc) {
  if (acc <= 0) return 0;
  if (acc >= (1 << kPrecisionBits << 8)) return 255;
  return static_cast<uint8_t>(acc >> kPrecisionBits);
}

NVLM_HOST_DEVICE uint8_t read_channel(const PixelSource& src, int32_t y, int32_t x, int32_t c) {
  const int32_t channel = src.channels == 1 ? 0 : c;
  return src.data[y * src.stride_y + x * src.stride_x + channel * src.stride_c];
}

// Output sample (x, y) of a pass along `axis` over `src` (x, y index the pass's output; along the
// other axis it keeps the source's coordinate). `out_size` = samples along the axis.
NVLM_HOST_DEVICE void resample_rgb(const PixelSource& src, int32_t axis, const int32_t* block, int32_t out_size,
                                   int32_t window, int32_t x, int32_t y, uint8_t rgb[3]) {
  const int32_t i = axis == kAxisHorizontal ? x : y;
  const int32_t start = block[i];
  const int32_t taps = block[out_size + i];
  const int32_t* weights = block + 2 * out_size + static_cast<int64_t>(i) * window;
  int32_t acc[3] = {1 << (kPrecisionBits - 1), 1 << (kPrecisionBits - 1), 1 << (kPrecisionBits - 1)};
  for (int32_t t = 0; t < taps; ++t) {
    const int32_t sy = axis == kAxisHorizontal ? y : start + t;
    const int32_t sx = axis == kAxisHorizontal ? start + t : x;
    const int32_t w = weights[t];
    for (int32_t c = 0; c < 3; ++c) {
      acc[c] += static_cast<int32_t>(read_channel(src, sy, sx, c)) * w;
    }
  }
  for (int32_t c = 0; c < 3; ++c) rgb[c] = clip8(acc[c]);
}

// The source the second pass reads: the first pass's intermediate, or the image itself.
NVLM_HOST_DEVICE PixelSource second_pass_source(const ResizeJob& job, const uint8_t* scratch) {
  if (job.first.axis == kAxisNone) return job.image;
  PixelSource mid;
  mid.data = scratch + job.scratch_offset;
  mid.stride_y = static_cast<int64_t>(job.mid_width) * 3;
  mid.stride_x = 3;
  mid.stride_c = 1;
  mid.width = job.mid_width;
  mid.height = job.mid_height;
  mid.channels = 3;
  return mid;
}

// Pixel (x, y) of the job's resized image, as uint8 RGB.
NVLM_HOST_DEVICE void resized_rgb(const ResizeJob& job, const uint8_t* scratch, const int32_t* coefficients,
                                  int32_t x, int32_t y, uint8_t rgb[3]) {
  const PixelSource src = second_pass_source(job, scratch);
  if (job.second.axis == kAxisNone) {  // same size: Pillow copies
    for (int32_t c = 0; c < 3; ++c) rgb[c] = read_channel(src, y, x, c);
    return;
  }
  const int32_t out_size = job.second.axis == kAxisHorizontal ? job.out_width : job.out_height;
  resample_rgb(src, job.second.axis, coefficients + job.second.offset, out_size, job.second.window, x, y, rgb);
}

// Pixel (x, y) of the first pass's result.
NVLM_HOST_DEVICE void first_pass_rgb(const ResizeJob& job, const int32_t* coefficients, int32_t x, int32_t y,
                                     uint8_t rgb[3]) {
  const int32_t out_size = job.first.axis == kAxisHorizontal ? job.mid_width : job.mid_height;
  resample_rgb(job.image, job.first.axis, coefficients + job.first.offset, out_size, job.first.window, x, y, rgb);
}

// Element strides of the output [tiles, 3, S, S]: contiguous (planar) or channels-last.
struct TileLayout {
  int64_t tile, channel, row, col;
};

NVLM_HOST_DEVICE TileLayout tile_layout(int32_t tile_size, bool channels_last) {
  const int64_t s = tile_size;
  return channels_last ? TileLayout{3 * s * s, 1, 3 * s, 3} : TileLayout{3 * s * s, s * s, s, 1};
}

// Element offset in the output of channel 0 of resized pixel (x, y).
NVLM_HOST_DEVICE int64_t tile_offset(const ResizeJob& job, int32_t tile_size, const TileLayout& layout, int32_t x,
                                     int32_t y) {
  const int32_t tile = job.tile_base + (y / tile_size) * job.tile_cols + (x / tile_size);
  return tile * layout.tile + (y % tile_size) * layout.row + (x % tile_size) * layout.col;
}

}  // namespace nvlm::preprocess
