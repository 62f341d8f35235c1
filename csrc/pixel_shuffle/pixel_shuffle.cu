// Pixel shuffle: CUDA launcher and the CUDA dispatch-key registration.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "core/copy_unit.h"
#include "core/nvtx.h"
#include "pixel_shuffle/pixel_shuffle.cuh"
#include "pixel_shuffle/pixel_shuffle.h"

namespace nvlm::pixel_shuffle {

void run_cuda(const CopyPlan& plan) {
  const ShuffleGeometry& g = plan.geometry;
  if (g.total_tokens == 0 || g.units_per_token == 0) return;
  const int64_t blocks = (g.total_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "nvlm_C.pixel_shuffle: too many tokens (", g.total_tokens, ")");
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_copy_unit(plan.unit_bytes, [&](auto tag) {
    using Unit = typename decltype(tag)::type;
    const auto* source = static_cast<const Unit*>(plan.source.const_data_ptr());
    auto* destination = static_cast<Unit*>(plan.destination.data_ptr());
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(source, destination, g);
    };
    const bool contiguous = g.unshuffled_stride_c == 1 && g.shuffled_stride_c == 1;
    if (contiguous) {
      launch(plan.forward ? pixel_shuffle_kernel<Unit, true, true> : pixel_shuffle_kernel<Unit, false, true>);
    } else if constexpr (sizeof(Unit) <= 8) {  // units wider than an element imply contiguous channels
      launch(plan.forward ? pixel_shuffle_kernel<Unit, true, false> : pixel_shuffle_kernel<Unit, false, false>);
    } else {
      TORCH_CHECK(false, "nvlm_C.pixel_shuffle: internal error: 16-byte units with strided channels");
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {

at::Tensor pixel_shuffle_fwd_cuda(const at::Tensor& x, int64_t downscale, bool v2) {
  NvtxRange range("nvlm.C.pixel_shuffle.fwd");
  const c10::cuda::CUDAGuard guard(x.device());
  CopyPlan plan = plan_forward(x, downscale, v2);
  run_cuda(plan);
  return plan.destination;
}

at::Tensor pixel_shuffle_bwd_cuda(const at::Tensor& grad_out, int64_t downscale, bool v2) {
  NvtxRange range("nvlm.C.pixel_shuffle.bwd");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  CopyPlan plan = plan_backward(grad_out, downscale, v2);
  run_cuda(plan);
  return plan.destination;
}

}  // namespace

TORCH_LIBRARY_IMPL(nvlm_C, CUDA, m) {
  m.impl("pixel_shuffle_fwd", &pixel_shuffle_fwd_cuda);
  m.impl("pixel_shuffle_bwd", &pixel_shuffle_bwd_cuda);
}

}  // namespace nvlm::pixel_shuffle
