// parallel_for over clients: pooled std::thread workers pulling indices from an atomic counter
// (dynamic scheduling, since client sizes are skewed). The first exception stops the work and
// is rethrown after join. Each index writes only its own outputs, so results never depend on
// the thread count.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
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

/// A process-wide pool of worker threads, so a round does not pay for thread start-up. Work
/// is submitted as `n` jobs job(0..n-1); the caller runs job(0) itself and waits for the rest.
/// Concurrent callers (several Python threads) share the workers; jobs never block on each
/// other. After fork() the child builds a fresh pool (the parent's threads do not exist there).
/// An idle thread polls briefly before it blocks (parallel.cpp says why), unless oversubscribed.
class ThreadPool {
 public:
  static ThreadPool& instance();

  void run(int n, const std::function<void(int)>& job);

 private:
  static long current_pid();
  static bool& in_worker();
  void loop();

  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<int> pending_{0};     // tasks_.size(), readable without the mutex
  std::atomic<bool> spin_{false};   // idle threads poll before blocking (not oversubscribed)
  std::deque<std::function<void()>> tasks_;
  std::vector<std::thread> workers_;
};

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
  ThreadPool::instance().run(threads, work);
  if (error) std::rethrow_exception(error);
}

}  // namespace fedrecon
