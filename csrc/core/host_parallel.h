// Host-side parallel loops for the C++ host kernels (CPU dispatch key).
//
// Not at::parallel_for: with torch's OpenMP backend that is an inline `#pragma omp parallel`,
// which runs on one thread in an extension built without -fopenmp (measured on the preprocess
// host kernel: 2 threads = 1.0x, CPU time = wall time), and building with -fopenmp would load a
// second OpenMP runtime beside torch's. Plain std::threads, started per call,
// so callers keep small work on one thread.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace nvlm {

// Runs body(worker) for worker in [0, workers): worker 0 on the calling thread, the others on
// threads of their own, joined before returning; the first exception is rethrown here.
template <typename Body>
void run_workers(int64_t workers, const Body& body) {
  std::exception_ptr error;
  std::mutex error_mutex;
  const auto guarded = [&](int64_t worker) {
    try {
      body(worker);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(std::max<int64_t>(workers - 1, 0));
  for (int64_t w = 1; w < workers; ++w) pool.emplace_back(guarded, w);
  guarded(0);
  for (std::thread& thread : pool) thread.join();
  if (error) std::rethrow_exception(error);
}

// Rows [begin, end) of [0, count) in chunks of `grain`, taken from a shared counter by up to
// `threads` workers.
template <typename Fn>
void parallel_rows(int64_t count, int64_t threads, int64_t grain, const Fn& fn) {
  std::atomic<int64_t> next{0};
  const int64_t chunks = (count + grain - 1) / grain;
  run_workers(std::max<int64_t>(1, std::min(threads, chunks)), [&](int64_t) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
      fn(c * grain, std::min(count, (c + 1) * grain));
    }
  });
}

}  // namespace nvlm
