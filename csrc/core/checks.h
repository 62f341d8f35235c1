// Argument checks for the private nvlm_C ops. The Python layer validates first with friendlier
// messages; these keep a direct torch.ops.nvlm_C call from ever reaching a kernel with bad input.
#pragma once

#include <ATen/ATen.h>

#define NVLM_CHECK_ARG(cond, name, ...) TORCH_CHECK_VALUE(cond, "nvlm_C: argument '", name, "': ", __VA_ARGS__)

namespace nvlm {

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
                   "nvlm_C: argument '", name, "' must be float32, float16, bfloat16 or float64, got ", dtype);
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* shape) {
  NVLM_CHECK_ARG(t.dim() == dim, name, "expected shape ", shape, " (", dim, " dims), got ", t.sizes());
}

}  // namespace nvlm
