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

/// Hardware threads of this machine (at least 1), read once.
int hardware_threads();

/// Most threads one call uses: kThreadsPerCore x hardware_threads(). Larger requests are
/// capped (results never depend on the thread count), so no num_threads can start thousands
/// of threads, and the pool never holds more than max_threads() - 1 workers.
constexpr int kThreadsPerCore = 4;
inline int max_threads() { return kThreadsPerCore * hardware_threads(); }

/// Threads to use for n work items: num_threads <= 0 means all hardware threads; at most
/// max_threads() and n.
inline int resolve_threads(int num_threads, std::int64_t n) {
  if (num_threads <= 0) num_threads = hardware_threads();
  num_threads = std::min(num_threads, max_threads());
  return static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(num_threads, n)));
}

/// A new process-wide mutex that fork() never leaves locked in the child: pthread_atfork
/// handlers take every such mutex before fork() and release them in parent and child, so a
/// child does not inherit one held by a thread that does not exist there (the parent's other
/// threads may be inside the kernels). For short critical sections on process-wide registries
/// (free lists); never destroyed.
std::mutex& fork_safe_mutex();

/// A process-wide pool of worker threads, so a round does not pay for thread start-up. Work
/// is submitted as `n` jobs job(0..n-1); the caller runs job(0) itself and waits for the rest.
/// Concurrent callers (several Python threads) share the workers; jobs never block on each
/// other. The pool starts at most max_threads() - 1 workers (jobs beyond them queue). After
/// fork() the child builds a fresh pool (the parent's threads do not exist there; an atfork
/// handler drops the parent's pool, whose mutexes may have been held at the fork).
/// An idle thread polls briefly before it blocks (parallel.cpp says why), unless oversubscribed.
class ThreadPool {
 public:
  static ThreadPool& instance();

  void run(int n, const std::function<void(int)>& job);

 private:
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
