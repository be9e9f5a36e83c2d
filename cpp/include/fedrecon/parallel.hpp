// parallel_for over clients: std::thread workers pulling indices from an atomic counter
// (dynamic scheduling, since client sizes are skewed). The first exception stops the work and
// is rethrown after join. Each index writes only its own outputs, so results never depend on
// the thread count.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace fedrecon {

/// Threads to use for n work items: num_threads <= 0 means all hardware threads.
inline int resolve_threads(int num_threads, std::int64_t n) {
  if (num_threads <= 0) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(num_threads, n)));
}

/// Calls fn(i, thread_index) for i in [0, n) on `threads` threads (from resolve_threads).
template <class F>
void parallel_for(std::int64_t n, int threads, F&& fn) {
  if (n <= 0) return;
  if (threads <= 1) {
    for (std::int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  std::atomic<std::int64_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&](int tid) {
    while (!failed.load(std::memory_order_relaxed)) {
      const std::int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) break;
      try {
        fn(i, tid);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        failed.store(true);
      }
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<std::size_t>(threads - 1));
  for (int t = 1; t < threads; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace fedrecon
