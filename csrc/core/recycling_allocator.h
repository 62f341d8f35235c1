// A CPU allocator for the host kernels' large outputs that keeps recently freed blocks for the
// next call.
//
// Why: glibc serves blocks above its mmap threshold (32 MB at most) with fresh pages from the
// kernel on every call, which are zeroed and faulted in 4 KB at a time on first write. Measured
// on this project's 2-core AMD EPYC CI machine: torch.empty + fill_ of 67 MB (the float32 tiles
// of four photos) takes 21 ms, against 2 ms for 29 MB that glibc recycles; the preprocess host
// kernel's whole call for four 4032x3024 photos is about 200 ms. A server calls it again and
// again with similar sizes, so the freed output of one call is the next call's.
//
// Blocks of at least kMinBytes are kept when freed, up to NVLM_KERNELS_HOST_CACHE_MB in all
// (default 512: four photos' staging copies and their float32 tiles; 0 keeps nothing; the oldest
// go first); a request takes the smallest kept block that fits it and wastes at most half of it.
// Smaller blocks go straight to c10's allocator, which glibc recycles well. Tensors made with it
// are ordinary resizable CPU tensors (the storage keeps this allocator).
#pragma once

#include <cstddef>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <optional>

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

namespace nvlm {

class RecyclingHostAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t{1} << 20;

  // Never destroyed: a tensor may be freed after static destructors ran.
  static RecyclingHostAllocator& get() {
    static RecyclingHostAllocator* allocator = new RecyclingHostAllocator();
    return *allocator;
  }

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinBytes) {
      void* data = nbytes == 0 ? nullptr : c10::alloc_cpu(nbytes);
      return {data, data, &c10::free_cpu, c10::Device(c10::DeviceType::CPU)};
    }
    Block* block = take(nbytes);
    if (block == nullptr) block = new Block{c10::alloc_cpu(nbytes), nbytes, this};
    return {block->data, block, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  // Bytes kept for reuse now (for tests).
  size_t kept_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return kept_;
  }

 private:
  struct Block {
    void* data;
    size_t bytes;
    RecyclingHostAllocator* owner;
  };

  Block* take(size_t nbytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if ((*it)->bytes >= nbytes && (*it)->bytes - nbytes <= (*it)->bytes / 2 &&
          (best == free_.end() || (*it)->bytes < (*best)->bytes)) {
        best = it;
      }
    }
    if (best == free_.end()) return nullptr;
    Block* block = *best;
    free_.erase(best);
    kept_ -= block->bytes;
    return block;
  }

  static void release(void* context) {
    Block* block = static_cast<Block*>(context);
    RecyclingHostAllocator& self = *block->owner;
    std::deque<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(self.mutex_);
      self.free_.push_back(block);
      self.kept_ += block->bytes;
      while (self.kept_ > self.keep_bytes_) {
        evicted.push_back(self.free_.front());
        self.kept_ -= self.free_.front()->bytes;
        self.free_.pop_front();
      }
    }
    for (Block* old : evicted) {
      c10::free_cpu(old->data);
      delete old;
    }
  }

  static size_t keep_bytes_from_env() {
    const char* text = std::getenv("NVLM_KERNELS_HOST_CACHE_MB");
    if (text == nullptr || *text == '\0') return size_t{512} << 20;
    char* end = nullptr;
    const long long megabytes = std::strtoll(text, &end, 10);
    TORCH_CHECK(end != text && *end == '\0' && megabytes >= 0,
                "NVLM_KERNELS_HOST_CACHE_MB must be a number of megabytes >= 0, got '", text, "'");
    return static_cast<size_t>(megabytes) << 20;
  }

  const size_t keep_bytes_ = keep_bytes_from_env();
  std::mutex mutex_;
  std::deque<Block*> free_;  // oldest first
  size_t kept_ = 0;
};

// An uninitialized CPU tensor whose storage comes from RecyclingHostAllocator.
inline at::Tensor recycled_host_empty(at::IntArrayRef sizes, at::ScalarType dtype,
                                      std::optional<at::MemoryFormat> memory_format = std::nullopt) {
  return at::detail::empty_generic(sizes, &RecyclingHostAllocator::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, memory_format);
}

}  // namespace nvlm
