// Resize to tiles: CUDA launcher and the CUDA dispatch-key registration.
#include <cstring>

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "core/nvtx.h"
#include "preprocess/dispatch.h"
#include "preprocess/resize.cuh"
#include "preprocess/resize.h"

namespace nvlm::preprocess {

at::Tensor resize_to_tiles_cuda(const std::vector<at::Tensor>& images, const at::Tensor& job_table,
                                const at::Tensor& coefficients, const at::Tensor& table, int64_t total_tiles,
                                int64_t tile_size, at::ScalarType dtype, bool channels_last, int64_t num_threads,
                                int64_t isa) {
  (void)num_threads;  // host-kernel options
  (void)isa;
  NvtxRange range("nvlm.C.resize_to_tiles.fwd");
  TORCH_CHECK_VALUE(!images.empty() && images[0].is_cuda(), "nvlm_C: argument 'images' must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(images[0].device());
  const ResizePlan plan = plan_resize(images, job_table, coefficients, table, total_tiles, tile_size, dtype);

  // One pinned staging buffer, one host-to-device copy: the jobs, then the coefficients.
  const int64_t job_bytes = static_cast<int64_t>(plan.jobs.size() * sizeof(ResizeJob));
  const int64_t coefficient_bytes = coefficients.numel() * static_cast<int64_t>(sizeof(int32_t));
  const int64_t coefficient_at = (job_bytes + 15) / 16 * 16;
  at::Tensor staging = at::empty({coefficient_at + coefficient_bytes}, at::TensorOptions(at::kByte).pinned_memory(true));
  std::memcpy(staging.data_ptr<uint8_t>(), plan.jobs.data(), job_bytes);
  std::memcpy(staging.data_ptr<uint8_t>() + coefficient_at, coefficients.const_data_ptr<int32_t>(), coefficient_bytes);
  at::Tensor metadata = staging.to(images[0].device(), /*non_blocking=*/true);
  const auto* jobs = reinterpret_cast<const ResizeJob*>(metadata.const_data_ptr<uint8_t>());
  const auto* coeffs = reinterpret_cast<const int32_t*>(metadata.const_data_ptr<uint8_t>() + coefficient_at);

  at::Tensor scratch = at::empty({std::max<int64_t>(plan.scratch_bytes, 1)}, images[0].options());
  at::Tensor out = at::empty({total_tiles, 3, tile_size, tile_size}, table.options().dtype(dtype).memory_format(
                                 channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  const TileLayout layout = tile_layout(static_cast<int32_t>(tile_size), channels_last);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const unsigned job_count = static_cast<unsigned>(plan.jobs.size());
  TORCH_CHECK(job_count <= 65535, "nvlm_C.resize_to_tiles: at most 65535 jobs per call, got ", job_count);
  if (plan.any_first_pass) {
    const dim3 grid(static_cast<unsigned>((plan.max_mid_pixels + kResizeThreads - 1) / kResizeThreads), job_count);
    resize_first_pass_kernel<<<grid, kResizeThreads, 0, stream>>>(jobs, coeffs, scratch.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const dim3 grid(static_cast<unsigned>((plan.max_out_pixels + kResizeThreads - 1) / kResizeThreads), job_count);
  NVLM_DISPATCH_TILE_DTYPES(dtype, "resize_to_tiles_cuda", [&] {
    resize_second_pass_kernel<scalar_t><<<grid, kResizeThreads, 0, stream>>>(
        jobs, coeffs, scratch.const_data_ptr<uint8_t>(), table.const_data_ptr<float>(),
        static_cast<int32_t>(tile_size), layout, static_cast<scalar_t*>(out.data_ptr()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(nvlm_C, CUDA, m) { m.impl("resize_to_tiles", &resize_to_tiles_cuda); }

}  // namespace nvlm::preprocess
