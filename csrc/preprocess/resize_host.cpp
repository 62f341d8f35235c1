// Resize to tiles: argument checks, job plan, and the C++ host kernel (CPU dispatch key).
//
// The host kernel runs the same per-pixel functions as the CUDA kernels (resize_index.h), so the
// CPU tests compare the device arithmetic with Pillow byte for byte.
#include <algorithm>
#include <string>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "core/checks.h"
#include "core/nvtx.h"
#include "preprocess/dispatch.h"
#include "preprocess/resize.h"

namespace nvlm::preprocess {
namespace {

// Coefficient block of a pass: n output samples over an axis of `in_size` input samples.
void check_block(const at::Tensor& coefficients, const AxisPass& pass, int64_t n, int64_t in_size, int64_t job) {
  const std::string where = "job " + std::to_string(job);
  NVLM_CHECK_ARG(pass.window > 0 && pass.offset >= 0 && pass.offset + (2 + pass.window) * n <= coefficients.numel(),
                 "coefficients", where, ": coefficient block out of range");
  const int32_t* block = coefficients.const_data_ptr<int32_t>() + pass.offset;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t start = block[i], taps = block[n + i];
    NVLM_CHECK_ARG(start >= 0 && taps >= 0 && taps <= pass.window && start + taps <= in_size, "coefficients", where,
                   ": window of sample ", i, " reads outside the ", in_size, " input samples");
  }
}

}  // namespace

ResizePlan plan_resize(const std::vector<at::Tensor>& images, const at::Tensor& job_table,
                       const at::Tensor& coefficients, const at::Tensor& table, int64_t total_tiles,
                       int64_t tile_size, at::ScalarType dtype) {
  NVLM_CHECK_ARG(!images.empty(), "images", "no images");
  NVLM_CHECK_ARG(tile_size > 0 && tile_size <= 65535, "tile_size", "must be in [1, 65535], got ", tile_size);
  NVLM_CHECK_ARG(total_tiles > 0, "total_tiles", "must be positive, got ", total_tiles);
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "nvlm_C: argument 'dtype' must be float32, float16 or bfloat16, got ", dtype);
  NVLM_CHECK_ARG(job_table.device().is_cpu() && job_table.scalar_type() == at::kLong && job_table.dim() == 2 &&
                     job_table.size(1) == kJobFields && job_table.is_contiguous(),
                 "job_table", "must be a contiguous CPU int64 tensor [jobs, ", kJobFields, "]");
  NVLM_CHECK_ARG(coefficients.device().is_cpu() && coefficients.scalar_type() == at::kInt &&
                     coefficients.dim() == 1 && coefficients.is_contiguous(),
                 "coefficients", "must be a contiguous CPU int32 tensor");
  const at::Device device = images[0].device();
  NVLM_CHECK_ARG(table.device() == device && table.scalar_type() == at::kFloat && table.dim() == 2 &&
                     table.size(0) == 3 && table.size(1) == 256 && table.is_contiguous(),
                 "table", "must be a contiguous float32 [3, 256] tensor on the images' device");
  for (size_t i = 0; i < images.size(); ++i) {
    const at::Tensor& image = images[i];
    const std::string name = "images[" + std::to_string(i) + "]";
    NVLM_CHECK_ARG(image.device() == device, name.c_str(), "is on ", image.device(), ", images[0] on ", device);
    NVLM_CHECK_ARG(image.scalar_type() == at::kByte && image.dim() == 3 &&
                       (image.size(2) == 1 || image.size(2) == 3 || image.size(2) == 4) && image.size(0) > 0 &&
                       image.size(1) > 0 && image.size(0) < (1 << 30) && image.size(1) < (1 << 30),
                   name.c_str(), "must be a non-empty uint8 [H, W, C] tensor with C in (1, 3, 4), got ",
                   image.scalar_type(), " ", image.sizes());
  }

  ResizePlan plan;
  const int64_t count = job_table.size(0);
  NVLM_CHECK_ARG(count > 0, "job_table", "has no jobs");
  const int64_t* rows = job_table.const_data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> tile_ranges;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t* f = rows + j * kJobFields;
    const std::string where = "job " + std::to_string(j);
    NVLM_CHECK_ARG(f[0] >= 0 && f[0] < static_cast<int64_t>(images.size()), "job_table", where, ": image index ",
                   f[0], " out of range");
    const at::Tensor& image = images[f[0]];
    ResizeJob job{};
    job.image = PixelSource{image.const_data_ptr<uint8_t>(), image.stride(0), image.stride(1), image.stride(2),
                            static_cast<int32_t>(image.size(1)), static_cast<int32_t>(image.size(0)),
                            static_cast<int32_t>(image.size(2))};
    const int64_t in_w = image.size(1), in_h = image.size(0), out_w = f[1], out_h = f[2];
    NVLM_CHECK_ARG(out_w > 0 && out_h > 0 && out_w % tile_size == 0 && out_h % tile_size == 0 && out_w < (1 << 30) &&
                       out_h < (1 << 30),
                   "job_table", where, ": output ", out_w, "x", out_h, " is not a grid of ", tile_size, " tiles");
    NVLM_CHECK_ARG(f[12] == out_w / tile_size, "job_table", where, ": tile_cols must be ", out_w / tile_size);
    job.out_width = static_cast<int32_t>(out_w);
    job.out_height = static_cast<int32_t>(out_h);
    job.first = AxisPass{static_cast<int32_t>(f[5]), static_cast<int32_t>(f[6]), f[7]};
    job.second = AxisPass{static_cast<int32_t>(f[8]), static_cast<int32_t>(f[9]), f[10]};
    job.tile_base = static_cast<int32_t>(f[11]);
    job.tile_cols = static_cast<int32_t>(f[12]);

    // The passes must chain from the image size to the output size.
    int64_t src_w = in_w, src_h = in_h;
    if (job.first.axis == kAxisHorizontal || job.first.axis == kAxisVertical) {
      const bool horizontal = job.first.axis == kAxisHorizontal;
      NVLM_CHECK_ARG(job.second.axis == (horizontal ? kAxisVertical : kAxisHorizontal), "job_table", where,
                     ": the second pass must run along the other axis");
      job.mid_width = static_cast<int32_t>(horizontal ? out_w : in_w);
      job.mid_height = static_cast<int32_t>(horizontal ? in_h : out_h);
      check_block(coefficients, job.first, horizontal ? out_w : out_h, horizontal ? in_w : in_h, j);
      job.scratch_offset = plan.scratch_bytes;
      const int64_t mid_pixels = int64_t{job.mid_width} * job.mid_height;
      plan.scratch_bytes += mid_pixels * 3;
      plan.max_mid_pixels = std::max(plan.max_mid_pixels, mid_pixels);
      plan.any_first_pass = true;
      src_w = job.mid_width;
      src_h = job.mid_height;
    } else {
      NVLM_CHECK_ARG(job.first.axis == kAxisNone, "job_table", where, ": unknown axis ", job.first.axis);
    }
    if (job.second.axis == kAxisHorizontal) {
      NVLM_CHECK_ARG(src_h == out_h, "job_table", where, ": a horizontal pass cannot change the height");
      check_block(coefficients, job.second, out_w, src_w, j);
    } else if (job.second.axis == kAxisVertical) {
      NVLM_CHECK_ARG(src_w == out_w, "job_table", where, ": a vertical pass cannot change the width");
      check_block(coefficients, job.second, out_h, src_h, j);
    } else {
      NVLM_CHECK_ARG(job.second.axis == kAxisNone && src_w == out_w && src_h == out_h, "job_table", where,
                     ": without a resampling pass the output must have the image's size");
    }
    const int64_t tiles = (out_w / tile_size) * (out_h / tile_size);
    tile_ranges.emplace_back(f[11], f[11] + tiles);
    plan.max_out_pixels = std::max(plan.max_out_pixels, out_w * out_h);
    plan.jobs.push_back(job);
  }
  // Every output tile is written by exactly one job (no gap left uninitialized, no overlap).
  std::sort(tile_ranges.begin(), tile_ranges.end());
  int64_t next = 0;
  for (const auto& [begin, end] : tile_ranges) {
    NVLM_CHECK_ARG(begin == next, "job_table", "the jobs' tiles must cover [0, total_tiles) exactly once");
    next = end;
  }
  NVLM_CHECK_ARG(next == total_tiles, "total_tiles", "the jobs write ", next, " tiles, not ", total_tiles);
  return plan;
}

namespace {

template <typename Out>
void run_host(const ResizePlan& plan, const at::Tensor& coefficients, const at::Tensor& table, int64_t tile_size,
              at::Tensor& out) {
  at::Tensor scratch = at::empty({std::max<int64_t>(plan.scratch_bytes, 1)}, at::kByte);
  uint8_t* mid = scratch.data_ptr<uint8_t>();
  const int32_t* coeffs = coefficients.const_data_ptr<int32_t>();
  const float* lut = table.const_data_ptr<float>();
  Out* dst = static_cast<Out*>(out.data_ptr());
  const int64_t plane = tile_size * tile_size;
  for (const ResizeJob& job : plan.jobs) {
    if (job.first.axis != kAxisNone) {
      at::parallel_for(0, job.mid_height, 1, [&](int64_t begin, int64_t end) {
        for (int32_t y = begin; y < end; ++y) {
          for (int32_t x = 0; x < job.mid_width; ++x) {
            first_pass_rgb(job, coeffs, x, y, mid + job.scratch_offset + (int64_t{y} * job.mid_width + x) * 3);
          }
        }
      });
    }
  }
  for (const ResizeJob& job : plan.jobs) {
    at::parallel_for(0, job.out_height, 1, [&](int64_t begin, int64_t end) {
      for (int32_t y = begin; y < end; ++y) {
        for (int32_t x = 0; x < job.out_width; ++x) {
          uint8_t rgb[3];
          resized_rgb(job, mid, coeffs, x, y, rgb);
          const int64_t offset = tile_offset(job, static_cast<int32_t>(tile_size), x, y);
          for (int c = 0; c < 3; ++c) dst[offset + c * plane] = static_cast<Out>(lut[c * 256 + rgb[c]]);
        }
      }
    });
  }
}

at::Tensor resize_to_tiles_cpu(const std::vector<at::Tensor>& images, const at::Tensor& job_table,
                               const at::Tensor& coefficients, const at::Tensor& table, int64_t total_tiles,
                               int64_t tile_size, at::ScalarType dtype) {
  NvtxRange range("nvlm.C.resize_to_tiles.fwd");
  const ResizePlan plan = plan_resize(images, job_table, coefficients, table, total_tiles, tile_size, dtype);
  at::Tensor out = at::empty({total_tiles, 3, tile_size, tile_size}, table.options().dtype(dtype));
  NVLM_DISPATCH_TILE_DTYPES(dtype, "resize_to_tiles_cpu", [&] {
    run_host<scalar_t>(plan, coefficients, table, tile_size, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nvlm_C, CPU, m) { m.impl("resize_to_tiles", &resize_to_tiles_cpu); }

}  // namespace nvlm::preprocess
