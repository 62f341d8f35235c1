// Host-side parallel loops for the C++ host kernels (CPU dispatch key).
//
// Not at::parallel_for: with torch's OpenMP backend that is an inline `#pragma omp parallel`,
// which runs on one thread in an extension built without -fopenmp (measured on the preprocess
// host kernel: 2 threads = 1.0x, CPU time = wall time), and building with -fopenmp would load a
// second OpenMP runtime beside torch's. Instead, torch's inter-op thread pool (at::launch), whose
// threads persist: starting a std::thread per call cost 39 us against 10 us for a pool task
// (measured here, 2-core EPYC), a quarter of the whole call for four 448x448 images. Callers
// still keep small work on one thread.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <vector>

#include <ATen/Parallel.h>

namespace nvlm {

// Runs body(worker) for worker in [0, workers): worker 0 on the calling thread, the others as
// tasks of torch's inter-op thread pool (at::launch: threads kept between calls, and the caller's
// thread-local state, grad and inference mode among it, set in them). The bodies take their work
// from shared counters, so a task the pool starts only after the caller's body finished has
// nothing left to do: the caller then closes the call and waits only for tasks already running
// (never for the pool itself, which may be busy or be the caller's own thread). The first
// exception is rethrown here.
template <typename Body>
void run_workers(int64_t workers, const Body& body) {
  struct Call {
    std::mutex mutex;
    std::condition_variable idle;
    int64_t running = 0;
    bool closed = false;
    std::exception_ptr error;
    void fail() {
      std::lock_guard<std::mutex> lock(mutex);
      if (!error) error = std::current_exception();
    }
  };
  const auto call = std::make_shared<Call>();
  for (int64_t w = 1; w < workers; ++w) {
    at::launch([call, &body, w] {
      {
        std::lock_guard<std::mutex> lock(call->mutex);
        if (call->closed) return;
        ++call->running;
      }
      try {
        body(w);
      } catch (...) {
        call->fail();
      }
      std::lock_guard<std::mutex> lock(call->mutex);
      if (--call->running == 0) call->idle.notify_all();
    });
  }
  try {
    body(0);
  } catch (...) {
    call->fail();
  }
  std::unique_lock<std::mutex> lock(call->mutex);
  call->closed = true;
  call->idle.wait(lock, [&] { return call->running == 0; });
  if (call->error) std::rethrow_exception(call->error);
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
