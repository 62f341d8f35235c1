// Resize to tiles: argument checks, job plan, and the C++ host kernel (CPU dispatch key).
//
// The host kernel is the CPU path of preprocess_images. Per call, two phases, each a list of work
// units (a job's block of at most kRows output rows) that `num_threads` workers (run_workers) take
// from a shared counter, largest first: the first passes (into a uint8 intermediate per job, as
// Pillow rounds between passes), then the second passes, whose rows are normalized through a
// [3, 256] lookup table straight into the output tiles (planar or channels-last, any of the three
// float dtypes: no float image in between, no extra pass). Units write disjoint bytes, so any
// thread count gives the same output. The loops (resize_host_loops.h) are compiled for the
// baseline ISA and for AVX2, chosen by the CPU's features; isa=0 runs the per-pixel functions the
// CUDA kernels run (resize_index.h), which is how the tests compare all three with Pillow.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "core/checks.h"
#include "core/host_parallel.h"
#include "core/nvtx.h"
#include "core/recycling_allocator.h"
#include "preprocess/dispatch.h"
#include "preprocess/resize.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define NVLM_HOST_AVX2 1
#include <immintrin.h>
#else
#define NVLM_HOST_AVX2 0
#endif

// x86-64: SSE2's streaming stores for the tiles (emit_run)
#if defined(__x86_64__) || defined(_M_X64)
#define NVLM_HOST_STREAM 1
#include <emmintrin.h>
#else
#define NVLM_HOST_STREAM 0
#endif

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

constexpr int64_t kIsaAuto = -1, kIsaScalar = 0, kIsaBaseline = 1, kIsaAvx2 = 2;

// A uint8 image the loops read: rows `stride` bytes apart, `step` bytes per pixel (3, or 4 with
// the fourth ignored), channels 0-2 at bytes 0-2.
struct HostImage {
  const uint8_t* data;
  int64_t stride;
  int32_t step, width, height;
};

// A pass's coefficient block (resize_index.h) and its output size along its axis.
struct HostPass {
  int32_t axis, size, window;
  const int32_t *start, *taps, *weights;
};

// Per-thread buffers: transposed columns of a horizontal block and its results (also columns), a
// 4-byte-per-pixel row, and kRows rows of the resized image (3 bytes per pixel) on their way to
// the tiles.
struct HostScratch {
  std::vector<uint8_t> column_buffer, packed_buffer, wide_buffer, row_buffer;
  uint8_t *columns, *packed, *wide, *rows;
};

namespace baseline {
#include "preprocess/resize_host_loops.h"
}  // namespace baseline

#if NVLM_HOST_AVX2
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2")
#endif
#define NVLM_HOST_LOOPS_AVX2 1
namespace avx2 {
#include "preprocess/resize_host_loops.h"
}  // namespace avx2
#undef NVLM_HOST_LOOPS_AVX2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

using PassRowsFn = void (*)(const HostImage&, const HostPass*, uint8_t* const*, const int64_t*, int32_t, int32_t,
                            int32_t, HostScratch&);

bool cpu_has_avx2() {
#if NVLM_HOST_AVX2
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

PassRowsFn pass_rows_for(int64_t isa) {
  if (isa == kIsaAuto) isa = cpu_has_avx2() ? kIsaAvx2 : kIsaBaseline;
#if NVLM_HOST_AVX2
  if (isa == kIsaAvx2) return &avx2::pass_rows;
#endif
  return &baseline::pass_rows;
}

HostPass host_pass(const AxisPass& pass, int32_t size, const int32_t* coefficients) {
  const int32_t* block = coefficients + pass.offset;
  return HostPass{pass.axis, size, pass.window, block, block + size, block + 2 * static_cast<int64_t>(size)};
}

// Passes over one source whose outputs have the same rows: the first passes of an image's jobs
// (horizontal ones share the transposed rows), or one job's second pass (`job`: whose tiles).
struct PassGroup {
  HostImage src;
  int32_t height = 0, job = -1;
  std::vector<HostPass> passes;
  std::vector<uint8_t*> outs;  // row 0 of each output (second passes: the thread's row buffer)
  std::vector<int64_t> strides;
  int64_t cost_per_row = 0;
};

// A unit of work: rows [y0, y1) of a group's outputs; `cost` orders the units.
struct Unit {
  int32_t group, y0, y1;
  int64_t cost;
};

// Per-worker buffers, kept between calls (no fresh pages per call; the buffers' stale bytes only
// ever feed lanes whose results are dropped): a worker leases one set and gives it back.
class HostScratchPool {
 public:
  std::unique_ptr<HostScratch> take() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (free_.empty()) return std::make_unique<HostScratch>();
    std::unique_ptr<HostScratch> scratch = std::move(free_.back());
    free_.pop_back();
    return scratch;
  }
  void give_back(std::unique_ptr<HostScratch> scratch) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (free_.size() < kKeep) free_.push_back(std::move(scratch));
  }

 private:
  static constexpr size_t kKeep = 64;
  std::mutex mutex_;
  std::vector<std::unique_ptr<HostScratch>> free_;
};

HostScratchPool& host_scratch_pool() {
  static HostScratchPool pool;
  return pool;
}

// Runs fn(unit, scratch) for every unit on up to `threads` workers, each taking the next unit from
// a shared counter (units sorted by decreasing cost).
template <typename Fn>
void run_units(std::vector<Unit>& units, int64_t threads, int64_t column_bytes, int64_t row_bytes, const Fn& fn) {
  if (units.empty()) return;  // e.g. the first passes of a batch that needs no resampling
  std::stable_sort(units.begin(), units.end(), [](const Unit& a, const Unit& b) { return a.cost > b.cost; });
  std::atomic<int64_t> next{0};
  const int64_t count = static_cast<int64_t>(units.size());
  const int64_t workers = std::max<int64_t>(1, std::min(threads, count));
  run_workers(workers, [&](int64_t) {
    std::unique_ptr<HostScratch> lease = host_scratch_pool().take();
    HostScratch& scratch = *lease;
    const auto grow = [](std::vector<uint8_t>& buffer, int64_t bytes) {
      if (static_cast<int64_t>(buffer.size()) < bytes) buffer.resize(bytes);
      return buffer.data();
    };
    scratch.columns = grow(scratch.column_buffer, std::max<int64_t>(column_bytes, 1));
    scratch.packed = grow(scratch.packed_buffer, std::max<int64_t>(row_bytes / 3 * baseline::kLanes, 1));
    scratch.wide = grow(scratch.wide_buffer, std::max<int64_t>(row_bytes / 3 * 4, 1));
    scratch.rows = grow(scratch.row_buffer, std::max<int64_t>(row_bytes * baseline::kRows, 1));
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) fn(units[i], scratch);
    host_scratch_pool().give_back(std::move(lease));
  });
}

// Every group's rows in units of at most kRows rows.
std::vector<Unit> units_of(const std::vector<PassGroup>& groups) {
  std::vector<Unit> units;
  for (size_t g = 0; g < groups.size(); ++g) {
    for (int32_t y = 0; y < groups[g].height; y += baseline::kRows) {
      const int32_t y1 = std::min(groups[g].height, y + baseline::kRows);
      units.push_back(Unit{static_cast<int32_t>(g), y, y1, groups[g].cost_per_row * (y1 - y)});
    }
  }
  return units;
}

// The tiles are written with non-temporal (streaming) stores, 16 bytes at a time, where x86-64's
// baseline (SSE2) has them. Ordinary stores first read every output line into the cache; two
// threads writing four 448x448 float32 tiles (9.6 MB) then got 1.4x of one thread here and
// sixteen tiles 0.85x, against 1.8x and 1.75x with streaming stores, which were also 8-15 %
// faster on one thread (2-core EPYC VM, a loop like emit_run's). The output then starts out of
// the cache: its reader (a copy to the GPU, a patch embedding) streams it from memory.
// (NVLM_HOST_STREAM: where those stores exist, set at the top of the file.)

// Output elements as raw bits (the [3, 256] table converted once): float32 as uint32_t, float16
// and bfloat16 as uint16_t, so one code path writes all three.
template <typename Out>
using OutBits = std::conditional_t<sizeof(Out) == 4, uint32_t, uint16_t>;

#if NVLM_HOST_STREAM
// 16 bytes of elements value(0), value(1), ... (4 of 4 bytes or 8 of 2), streamed to `dst`.
template <typename Bits, typename Value>
inline void stream_lanes(Bits* dst, const Value& value) {
  __m128i v;
  if constexpr (sizeof(Bits) == 4) {
    v = _mm_setr_epi32(static_cast<int>(value(0)), static_cast<int>(value(1)), static_cast<int>(value(2)),
                       static_cast<int>(value(3)));
  } else {
    v = _mm_setr_epi16(static_cast<short>(value(0)), static_cast<short>(value(1)), static_cast<short>(value(2)),
                       static_cast<short>(value(3)), static_cast<short>(value(4)), static_cast<short>(value(5)),
                       static_cast<short>(value(6)), static_cast<short>(value(7)));
  }
  _mm_stream_si128(reinterpret_cast<__m128i*>(dst), v);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }
#endif

// One run of `n` resized pixels (`Step` bytes apart) -> normalized values: three planes
// `channel` elements apart, or one channels-last run of 3·n. Each pixel's three bytes are read in
// one pass, with Step known to the compiler: a pass per channel with a run-time step took 1.3-1.8x
// as long here (2-core EPYC, 448-pixel runs). Lookups stay scalar: AVX2 gathers were slower still.
// Whole vectors are streamed where the run is 16-byte aligned (always for even tile sizes that
// are multiples of 4); the rest is stored one element at a time.
template <int Step, typename Bits>
void emit_run(const uint8_t* px, int32_t n, const Bits* lut, bool planar, int64_t channel, Bits* dst) {
  const Bits* red = lut;
  const Bits* green = lut + 256;
  const Bits* blue = lut + 512;
  int32_t x = 0;
  if (planar) {
    Bits* __restrict r = dst;
    Bits* __restrict g = dst + channel;
    Bits* __restrict b = dst + 2 * channel;
#if NVLM_HOST_STREAM
    constexpr int32_t kLanes = 16 / sizeof(Bits);
    if (aligned16(r) && aligned16(g) && aligned16(b)) {
      for (; x + kLanes <= n; x += kLanes) {
        const uint8_t* p = px + x * Step;
        stream_lanes(r + x, [&](int i) { return red[p[i * Step]]; });
        stream_lanes(g + x, [&](int i) { return green[p[i * Step + 1]]; });
        stream_lanes(b + x, [&](int i) { return blue[p[i * Step + 2]]; });
      }
    }
#endif
    for (; x < n; ++x) {
      const uint8_t* p = px + x * Step;
      r[x] = red[p[0]];
      g[x] = green[p[1]];
      b[x] = blue[p[2]];
    }
  } else {
#if NVLM_HOST_STREAM
    constexpr int32_t kLanes = 16 / sizeof(Bits);
    if (aligned16(dst)) {
      // kLanes pixels = 3 vectors: element j of the group is channel j % 3 of pixel j / 3
      for (; x + kLanes <= n; x += kLanes) {
        const uint8_t* p = px + x * Step;
        Bits* d = dst + 3 * x;
        const auto vector = [&](int v) {
          stream_lanes(d + v * kLanes, [&](int i) {
            const int j = v * kLanes + i;
            return lut[(j % 3) * 256 + p[(j / 3) * Step + j % 3]];
          });
        };
        vector(0);
        vector(1);
        vector(2);
      }
    }
#endif
    for (; x < n; ++x) {
      const uint8_t* p = px + x * Step;
      dst[3 * x] = red[p[0]];
      dst[3 * x + 1] = green[p[1]];
      dst[3 * x + 2] = blue[p[2]];
    }
  }
}

// Resized rows [y0, y1) of a job (row y at rows + (y - y0) · stride, `step` = 3 or 4 bytes per
// pixel) -> tiles.
template <typename Bits>
void emit_rows(const ResizeJob& job, const uint8_t* rows, int64_t stride, int32_t step, int32_t y0, int32_t y1,
               const Bits* lut, int32_t tile_size, const TileLayout& layout, Bits* out) {
  const int32_t cols = job.out_width / tile_size;
  const bool planar = layout.col == 1;
  for (int32_t y = y0; y < y1; ++y) {
    const uint8_t* row = rows + (y - y0) * stride;
    for (int32_t tx = 0; tx < cols; ++tx) {
      const uint8_t* px = row + static_cast<int64_t>(tx) * tile_size * step;
      Bits* dst = out + tile_offset(job, tile_size, layout, tx * tile_size, y);
      if (step == 4) {
        emit_run<4>(px, tile_size, lut, planar, layout.channel, dst);
      } else {
        emit_run<3>(px, tile_size, lut, planar, layout.channel, dst);
      }
    }
  }
#if NVLM_HOST_STREAM
  _mm_sfence();  // streaming stores are weakly ordered: visible before the unit counts as done
#endif
}

// The images as the loops read them: RGB or RGBX/RGBA rows with bytes as channels as they are;
// grayscale, channel-planar or otherwise strided images are packed to RGB once (shared by the
// image's grid and thumbnail jobs).
std::vector<at::Tensor> packed_images(const std::vector<at::Tensor>& images) {
  std::vector<at::Tensor> packed;
  packed.reserve(images.size());
  for (const at::Tensor& image : images) {
    const int64_t c = image.size(2);
    const bool direct = image.stride(2) == 1 && (c == 3 || c == 4) && image.stride(1) == c && image.stride(0) >= c * image.size(1);
    if (direct) {
      packed.push_back(image);
    } else {
      packed.push_back(c == 1 ? image.expand({image.size(0), image.size(1), 3}).contiguous()
                              : image.narrow(2, 0, 3).contiguous());
    }
  }
  return packed;
}

HostImage host_image(const at::Tensor& image) {
  return HostImage{image.const_data_ptr<uint8_t>(), image.stride(0), static_cast<int32_t>(image.stride(1)),
                   static_cast<int32_t>(image.size(1)), static_cast<int32_t>(image.size(0))};
}

template <typename Out>
void run_host(const ResizePlan& plan, const std::vector<at::Tensor>& images, const std::vector<int64_t>& image_of_job,
              const at::Tensor& coefficients, const Out* lut, int64_t tile_size, const TileLayout& layout, int64_t isa,
              int64_t threads, at::Tensor& out) {
  const int32_t* coeffs = coefficients.const_data_ptr<int32_t>();
  const int32_t size = static_cast<int32_t>(tile_size);
  Out* dst = static_cast<Out*>(out.data_ptr());
  const int64_t count = static_cast<int64_t>(plan.jobs.size());
  if (isa == kIsaScalar) {
    at::Tensor scratch = at::empty({std::max<int64_t>(plan.scratch_bytes, 1)}, at::kByte);
    uint8_t* mid = scratch.data_ptr<uint8_t>();  // the CUDA kernels' per-pixel functions, one row per task
    for (const ResizeJob& job : plan.jobs) {
      if (job.first.axis == kAxisNone) continue;
      parallel_rows(job.mid_height, threads, 1, [&](int64_t begin, int64_t end) {
        for (int32_t y = begin; y < end; ++y) {
          for (int32_t x = 0; x < job.mid_width; ++x) {
            first_pass_rgb(job, coeffs, x, y, mid + job.scratch_offset + (int64_t{y} * job.mid_width + x) * 3);
          }
        }
      });
    }
    for (const ResizeJob& job : plan.jobs) {
      parallel_rows(job.out_height, threads, 1, [&](int64_t begin, int64_t end) {
        for (int32_t y = begin; y < end; ++y) {
          for (int32_t x = 0; x < job.out_width; ++x) {
            uint8_t rgb[3];
            resized_rgb(job, mid, coeffs, x, y, rgb);
            const int64_t offset = tile_offset(job, size, layout, x, y);
            for (int c = 0; c < 3; ++c) dst[offset + c * layout.channel] = lut[c * 256 + rgb[c]];
          }
        }
      });
    }
    return;
  }

  const PassRowsFn pass_rows = pass_rows_for(isa);
  using Bits = OutBits<Out>;
  static_assert(sizeof(Bits) == sizeof(Out));
  Bits lut_bits[3 * 256];
  std::memcpy(lut_bits, lut, sizeof(lut_bits));
  Bits* dst_bits = static_cast<Bits*>(out.data_ptr());
  // Waves of consecutive jobs (an image's jobs never split) whose intermediates total about
  // kWaveBytes: each wave runs both phases, so a batch's intermediates are read back while they
  // are still in cache, and one buffer of a wave's size serves every wave.
  constexpr int64_t kWaveBytes = int64_t{8} << 20;
  std::vector<int64_t> wave_end;             // one past each wave's last job
  std::vector<int64_t> wave_base(count, 0);  // scratch offset where the job's wave starts
  int64_t lease_bytes = 1;
  for (int64_t j = 0, base = 0, top = 0; j < count; ++j) {
    const ResizeJob& job = plan.jobs[j];
    if (job.first.axis != kAxisNone) {  // offsets grow in job order (plan_resize)
      top = std::max(top, job.scratch_offset + int64_t{job.mid_width} * job.mid_height * 3);
    }
    wave_base[j] = base;
    if (j + 1 == count || (top - base >= kWaveBytes && image_of_job[j + 1] != image_of_job[j])) {
      wave_end.push_back(j + 1);
      lease_bytes = std::max(lease_bytes, top - base);
      base = top;
    }
  }
  // Kept between calls by the recycling allocator (fresh pages for tens of MB, zeroed by the
  // kernel on first touch, cost as much as a pass).
  const c10::DataPtr lease = RecyclingHostAllocator::get().allocate(lease_bytes);
  uint8_t* mid = static_cast<uint8_t*>(lease.get());
  for (size_t w = 0, begin = 0; w < wave_end.size(); begin = wave_end[w++]) {
    std::vector<PassGroup> firsts, seconds;
    std::vector<int64_t> first_group_of_image(images.size(), -1);
    int64_t column_bytes = 0, row_bytes = 0;
    for (int64_t j = begin; j < wave_end[w]; ++j) {
      const ResizeJob& job = plan.jobs[j];
      const HostImage image = host_image(images[image_of_job[j]]);
      row_bytes = std::max<int64_t>(row_bytes, int64_t{image.width} * 3);
      HostImage second_src = image;
      if (job.first.axis != kAxisNone) {
        const bool horizontal = job.first.axis == kAxisHorizontal;
        const int64_t stride = int64_t{job.mid_width} * 3;
        uint8_t* job_mid = mid + (job.scratch_offset - wave_base[j]);
        int64_t& shared = first_group_of_image[image_of_job[j]];
        if (!horizontal || shared < 0) {
          PassGroup group;
          group.src = image;
          group.height = job.mid_height;
          if (horizontal) shared = static_cast<int64_t>(firsts.size());
          firsts.push_back(std::move(group));
        }
        PassGroup& group = firsts[horizontal ? shared : static_cast<int64_t>(firsts.size()) - 1];
        group.passes.push_back(host_pass(job.first, horizontal ? job.mid_width : job.mid_height, coeffs));
        group.outs.push_back(job_mid);
        group.strides.push_back(stride);
        group.cost_per_row += int64_t{job.first.window} * (horizontal ? job.mid_width : image.width);
        if (horizontal) column_bytes = std::max<int64_t>(column_bytes, image.width * baseline::kColumnStride);
        second_src = HostImage{job_mid, stride, 3, job.mid_width, job.mid_height};
      }
      PassGroup group;
      group.src = second_src;
      group.height = job.out_height;
      group.job = static_cast<int32_t>(j);
      const int32_t out_size = job.second.axis == kAxisHorizontal ? job.out_width : job.out_height;
      group.passes.push_back(job.second.axis == kAxisNone ? HostPass{kAxisNone, 0, 0, nullptr, nullptr, nullptr}
                                                          : host_pass(job.second, out_size, coeffs));
      group.outs.push_back(nullptr);
      group.strides.push_back(int64_t{job.out_width} * 3);
      group.cost_per_row = int64_t{job.out_width} * (job.second.window + 1);
      if (job.second.axis == kAxisHorizontal) {
        column_bytes = std::max<int64_t>(column_bytes, second_src.width * baseline::kColumnStride);
      }
      row_bytes = std::max<int64_t>(row_bytes, std::max<int64_t>(second_src.width, job.out_width) * 3);
      seconds.push_back(std::move(group));
    }
    std::vector<Unit> units = units_of(firsts);
    run_units(units, threads, column_bytes, row_bytes, [&](const Unit& unit, HostScratch& scratch) {
      const PassGroup& group = firsts[unit.group];
      std::vector<uint8_t*> outs(group.outs);
      for (size_t i = 0; i < outs.size(); ++i) outs[i] += unit.y0 * group.strides[i];
      pass_rows(group.src, group.passes.data(), outs.data(), group.strides.data(),
                static_cast<int32_t>(group.passes.size()), unit.y0, unit.y1, scratch);
    });
    units = units_of(seconds);
    run_units(units, threads, column_bytes, row_bytes, [&](const Unit& unit, HostScratch& scratch) {
      const PassGroup& group = seconds[unit.group];
      const ResizeJob& job = plan.jobs[group.job];
      if (group.passes[0].axis == kAxisNone) {  // same size: the tiles straight from the source rows
        emit_rows(job, group.src.data + unit.y0 * group.src.stride, group.src.stride, group.src.step, unit.y0,
                  unit.y1, lut_bits, size, layout, dst_bits);
        return;
      }
      uint8_t* rows = scratch.rows;
      pass_rows(group.src, group.passes.data(), &rows, group.strides.data(), 1, unit.y0, unit.y1, scratch);
      emit_rows(job, rows, group.strides[0], 3, unit.y0, unit.y1, lut_bits, size, layout, dst_bits);
    });
  }
}

at::Tensor resize_to_tiles_cpu(const std::vector<at::Tensor>& images, const at::Tensor& job_table,
                               const at::Tensor& coefficients, const at::Tensor& table, int64_t total_tiles,
                               int64_t tile_size, at::ScalarType dtype, bool channels_last, int64_t num_threads,
                               int64_t isa) {
  NvtxRange range("nvlm.C.resize_to_tiles.fwd");
  NVLM_CHECK_ARG(isa >= kIsaAuto && isa <= kIsaAvx2, "isa", "must be -1 (auto), 0 (scalar), 1 (baseline) or 2 (avx2)");
  NVLM_CHECK_ARG(isa != kIsaAvx2 || cpu_has_avx2(), "isa", "this CPU (or build) has no AVX2");
  NVLM_CHECK_ARG(num_threads >= 0, "num_threads", "must be >= 0 (0: torch's thread count), got ", num_threads);
  const ResizePlan plan = plan_resize(images, job_table, coefficients, table, total_tiles, tile_size, dtype);
  const std::vector<at::Tensor> packed = isa == kIsaScalar ? images : packed_images(images);
  std::vector<int64_t> image_of_job;
  const int64_t* rows = job_table.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < job_table.size(0); ++j) image_of_job.push_back(rows[j * kJobFields]);
  const int64_t threads = num_threads == 0 ? at::get_num_threads() : std::min<int64_t>(num_threads, at::get_num_threads());
  // Every byte is written below; a freed output of an earlier call is reused (recycling_allocator.h).
  at::Tensor out = recycled_host_empty({total_tiles, 3, tile_size, tile_size}, dtype,
                                       channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const TileLayout layout = tile_layout(static_cast<int32_t>(tile_size), channels_last);
  const float* values = table.const_data_ptr<float>();
  NVLM_DISPATCH_TILE_DTYPES(dtype, "resize_to_tiles_cpu", [&] {
    std::vector<scalar_t> lut(3 * 256);
    for (int i = 0; i < 3 * 256; ++i) lut[i] = static_cast<scalar_t>(values[i]);
    run_host<scalar_t>(plan, packed, image_of_job, coefficients, lut.data(), tile_size, layout, isa, threads, out);
  });
  return out;
}

at::Tensor host_buffer(int64_t nbytes) {
  NVLM_CHECK_ARG(nbytes >= 0, "nbytes", "must be >= 0, got ", nbytes);
  return recycled_host_empty({nbytes}, at::kByte);
}

}  // namespace

TORCH_LIBRARY_IMPL(nvlm_C, CPU, m) { m.impl("resize_to_tiles", &resize_to_tiles_cpu); }
// No tensor argument to dispatch on: one kernel for every key.
TORCH_LIBRARY_IMPL(nvlm_C, CompositeExplicitAutograd, m) { m.impl("host_buffer", &host_buffer); }

}  // namespace nvlm::preprocess
