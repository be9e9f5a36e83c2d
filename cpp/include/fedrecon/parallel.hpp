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
class ThreadPool {
 public:
  static ThreadPool& instance() {
    static std::mutex guard;
    static ThreadPool* pool = nullptr;
    static long owner = 0;
    std::lock_guard<std::mutex> lock(guard);
    if (pool == nullptr || owner != current_pid()) {
      pool = new ThreadPool();  // intentionally leaked: idle workers may outlive static destructors
      owner = current_pid();
    }
    return *pool;
  }

  void run(int n, const std::function<void(int)>& job) {
    if (in_worker()) {
      // A job that itself parallelises would wait on the queue it is serving: run inline.
      for (int t = 0; t < n; ++t) job(t);
      return;
    }
    struct Batch {
      std::mutex m;
      std::condition_variable done;
      int remaining;
    } batch;
    batch.remaining = n - 1;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (static_cast<int>(workers_.size()) < n - 1) workers_.emplace_back([this] { loop(); });
      for (int t = 1; t < n; ++t)
        tasks_.push_back([&batch, &job, t] {
          job(t);
          std::lock_guard<std::mutex> l(batch.m);
          if (--batch.remaining == 0) batch.done.notify_one();
        });
    }
    wake_.notify_all();
    job(0);
    std::unique_lock<std::mutex> lock(batch.m);
    batch.done.wait(lock, [&] { return batch.remaining == 0; });
  }

 private:
  static long current_pid();

  static bool& in_worker() {
    static thread_local bool flag = false;
    return flag;
  }

  void loop() {
    in_worker() = true;
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [this] { return !tasks_.empty(); });
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
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
