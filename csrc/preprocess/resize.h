// Resize-to-tiles launchers (nvlm_C::resize_to_tiles): a batch of uint8 images -> normalized
// tiles [T, 3, S, S], Pillow-exact (csrc/preprocess/resize_index.h has the arithmetic).
#pragma once

#include <vector>

#include <ATen/ATen.h>

#include "preprocess/resize_index.h"

namespace nvlm::preprocess {

// Number of int64 fields per row of the job table built by nvlm_kernels/preprocess/cuda.py.
constexpr int kJobFields = 13;

struct ResizePlan {
  std::vector<ResizeJob> jobs;  // image pointers filled in, scratch offsets assigned
  int64_t scratch_bytes = 0;
  int64_t max_mid_pixels = 0;
  int64_t max_out_pixels = 0;
  bool any_first_pass = false;
};

// Validates every argument (so no kernel can read or write out of bounds) and builds the jobs.
ResizePlan plan_resize(const std::vector<at::Tensor>& images, const at::Tensor& job_table,
                       const at::Tensor& coefficients, const at::Tensor& table, int64_t total_tiles,
                       int64_t tile_size, at::ScalarType dtype);

#if NVLM_WITH_CUDA
at::Tensor resize_to_tiles_cuda(const std::vector<at::Tensor>& images, const at::Tensor& job_table,
                                const at::Tensor& coefficients, const at::Tensor& table, int64_t total_tiles,
                                int64_t tile_size, at::ScalarType dtype, bool channels_last, int64_t num_threads,
                                int64_t isa);
#endif

}  // namespace nvlm::preprocess
