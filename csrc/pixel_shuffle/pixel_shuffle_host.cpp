// Pixel shuffle: argument checks, copy plan, and the C++ host kernel (CPU dispatch key).
//
// The host kernel walks the unshuffled tokens and copies each one's channel run with the same
// token_offsets() and copy unit the CUDA kernel uses, so the CPU tests exercise the device
// kernel's index math and its alignment decisions.
#include <algorithm>
#include <cmath>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "core/checks.h"
#include "core/copy_unit.h"
#include "core/host_parallel.h"
#include "core/nvtx.h"
#include "pixel_shuffle/pixel_shuffle.h"

namespace nvlm::pixel_shuffle {
namespace {

int64_t exact_sqrt(int64_t value) {
  auto root = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(value))));
  while (root * root > value) --root;
  while ((root + 1) * (root + 1) <= value) ++root;
  return root;
}

void check_downscale(int64_t downscale) {
  NVLM_CHECK_ARG(downscale >= 2 && downscale <= 64, "downscale", "must be an integer in [2, 64] (1/scale_factor), got ",
                 downscale);
}

CopyPlan make_plan(const at::Tensor& source, at::Tensor destination, const at::Tensor& unshuffled,
                   const at::Tensor& shuffled, int64_t downscale, bool v2, bool forward) {
  const int64_t n = unshuffled.size(0);
  const int64_t tokens = unshuffled.size(1);
  const int64_t channels = unshuffled.size(2);
  const int64_t element_size = static_cast<int64_t>(unshuffled.element_size());
  const int64_t unshuffled_strides[3] = {unshuffled.stride(0), unshuffled.stride(1), unshuffled.stride(2)};
  const int64_t shuffled_strides[3] = {shuffled.stride(0), shuffled.stride(1), shuffled.stride(2)};
  const int32_t unit =
      copy_unit_bytes(static_cast<int32_t>(element_size), channels, reinterpret_cast<uintptr_t>(unshuffled.data_ptr()),
                      reinterpret_cast<uintptr_t>(shuffled.data_ptr()), unshuffled_strides, shuffled_strides);
  const int64_t per_unit = unit / element_size;  // elements per unit; strides of channels are 1 when > 1

  ShuffleGeometry g{};
  g.total_tokens = n * tokens;
  g.tokens = static_cast<int32_t>(tokens);
  g.side = static_cast<int32_t>(exact_sqrt(tokens));
  g.downscale = static_cast<int32_t>(downscale);
  g.v2 = v2;
  g.units_per_token = static_cast<int32_t>(channels / per_unit);
  g.unshuffled_stride_n = unshuffled_strides[0] / per_unit;
  g.unshuffled_stride_l = unshuffled_strides[1] / per_unit;
  g.unshuffled_stride_c = unshuffled_strides[2];
  g.shuffled_stride_n = shuffled_strides[0] / per_unit;
  g.shuffled_stride_l = shuffled_strides[1] / per_unit;
  g.shuffled_stride_c = shuffled_strides[2];
  return CopyPlan{source, std::move(destination), g, unit, forward};
}

template <typename Unit>
void copy_tokens_host(const CopyPlan& plan) {
  const ShuffleGeometry g = plan.geometry;
  const auto* source = static_cast<const Unit*>(plan.source.const_data_ptr());
  auto* destination = static_cast<Unit*>(plan.destination.data_ptr());
  // A token moves C elements; aim for ~64 KiB of work per task.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (int64_t{g.units_per_token} * sizeof(Unit) + 1));
  // threads (started per call) only for copies worth it: from 1 MiB
  const int64_t bytes = g.total_tokens * g.units_per_token * static_cast<int64_t>(sizeof(Unit));
  const int64_t threads = bytes >= (int64_t{1} << 20) ? at::get_num_threads() : 1;
  parallel_rows(g.total_tokens, threads, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const TokenOffsets offsets = token_offsets(t, g);
      const int64_t src = plan.forward ? offsets.unshuffled : offsets.shuffled;
      const int64_t dst = plan.forward ? offsets.shuffled : offsets.unshuffled;
      const int64_t src_stride = plan.forward ? g.unshuffled_stride_c : g.shuffled_stride_c;
      const int64_t dst_stride = plan.forward ? g.shuffled_stride_c : g.unshuffled_stride_c;
      for (int32_t c = 0; c < g.units_per_token; ++c) {
        destination[dst + c * dst_stride] = source[src + c * src_stride];
      }
    }
  });
}

void run_host(const CopyPlan& plan) {
  if (plan.geometry.total_tokens == 0 || plan.geometry.units_per_token == 0) return;
  dispatch_copy_unit(plan.unit_bytes, [&](auto tag) { copy_tokens_host<typename decltype(tag)::type>(plan); });
}

at::Tensor pixel_shuffle_fwd_cpu(const at::Tensor& x, int64_t downscale, bool v2) {
  NvtxRange range("nvlm.C.pixel_shuffle.fwd");
  CopyPlan plan = plan_forward(x, downscale, v2);
  run_host(plan);
  return plan.destination;
}

at::Tensor pixel_shuffle_bwd_cpu(const at::Tensor& grad_out, int64_t downscale, bool v2) {
  NvtxRange range("nvlm.C.pixel_shuffle.bwd");
  CopyPlan plan = plan_backward(grad_out, downscale, v2);
  run_host(plan);
  return plan.destination;
}

}  // namespace

CopyPlan plan_forward(const at::Tensor& x, int64_t downscale, bool v2) {
  check_dim(x, 3, "x", "[N, L, C]");
  check_floating(x, "x");
  check_downscale(downscale);
  const int64_t tokens = x.size(1);
  const int64_t side = exact_sqrt(tokens);
  NVLM_CHECK_ARG(side * side == tokens, "x", "L = x.shape[1] must be a square number (drop the CLS token), got ",
                 tokens);
  NVLM_CHECK_ARG(side % downscale == 0, "x", "the token grid side ", side, " must be divisible by ", downscale);
  NVLM_CHECK_ARG(tokens < (int64_t{1} << 31) && x.size(2) * downscale * downscale < (int64_t{1} << 31), "x",
                 "L and r²·C must be below 2^31, got shape ", x.sizes());
  const int64_t r2 = downscale * downscale;
  at::Tensor out = at::empty({x.size(0), tokens / r2, x.size(2) * r2}, x.options());
  return make_plan(x, out, x, out, downscale, v2, /*forward=*/true);
}

CopyPlan plan_backward(const at::Tensor& grad_out, int64_t downscale, bool v2) {
  check_dim(grad_out, 3, "grad_out", "[N, L/r², r²·C]");
  check_floating(grad_out, "grad_out");
  check_downscale(downscale);
  const int64_t r2 = downscale * downscale;
  const int64_t out_tokens = grad_out.size(1);
  const int64_t side_out = exact_sqrt(out_tokens);
  NVLM_CHECK_ARG(side_out * side_out == out_tokens && grad_out.size(2) % r2 == 0, "grad_out",
                 "expected shape [N, (side/r)², r²·C] for r = ", downscale, ", got ", grad_out.sizes());
  NVLM_CHECK_ARG(out_tokens * r2 < (int64_t{1} << 31) && grad_out.size(2) < (int64_t{1} << 31), "grad_out",
                 "L and r²·C must be below 2^31, got shape ", grad_out.sizes());
  at::Tensor grad_in = at::empty({grad_out.size(0), out_tokens * r2, grad_out.size(2) / r2}, grad_out.options());
  return make_plan(grad_out, grad_in, grad_in, grad_out, downscale, v2, /*forward=*/false);
}

// The copy unit (bytes) the forward would use for `x`: lets the tests prove that NVLM's shapes,
// CLS-dropped views included, take the 16-byte path.
int64_t pixel_shuffle_copy_unit(const at::Tensor& x, int64_t downscale, bool v2) {
  return plan_forward(x, downscale, v2).unit_bytes;
}

TORCH_LIBRARY_IMPL(nvlm_C, CPU, m) {
  m.impl("pixel_shuffle_fwd", &pixel_shuffle_fwd_cpu);
  m.impl("pixel_shuffle_bwd", &pixel_shuffle_bwd_cpu);
}

TORCH_LIBRARY_IMPL(nvlm_C, CompositeExplicitAutograd, m) {
  m.impl("pixel_shuffle_copy_unit", &pixel_shuffle_copy_unit);
}

}  // namespace nvlm::pixel_shuffle
