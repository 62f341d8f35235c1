// Pixel shuffle launchers: x [N, L, C] -> [N, L/r², r²·C] (forward) and its inverse (backward).
#pragma once

#include <ATen/ATen.h>

#include "pixel_shuffle/pixel_shuffle_index.h"

namespace nvlm::pixel_shuffle {

// A validated copy: the source, the freshly allocated destination, and the geometry in units.
struct CopyPlan {
  at::Tensor source;
  at::Tensor destination;
  ShuffleGeometry geometry;
  int32_t unit_bytes;
  bool forward;  // source is the unshuffled tensor
};

// Validate `x` (forward) or `grad_out` (backward), allocate the output, choose the copy unit.
CopyPlan plan_forward(const at::Tensor& x, int64_t downscale, bool v2);
CopyPlan plan_backward(const at::Tensor& grad_out, int64_t downscale, bool v2);

#if NVLM_WITH_CUDA
void run_cuda(const CopyPlan& plan);
#endif

}  // namespace nvlm::pixel_shuffle
