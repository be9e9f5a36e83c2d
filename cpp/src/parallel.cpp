#include "fedrecon/parallel.hpp"

#include <algorithm>
#include <chrono>

#if !defined(_WIN32)
#include <pthread.h>
#endif

namespace fedrecon {

namespace {

// Waking a thread blocked on a condition variable takes tens of microseconds (a futex call and
// the scheduler): as long as a whole reduction phase of a 100-client round. So a thread that
// runs out of work polls for up to kSpinMicros before it blocks, as OpenMP runtimes do; that
// covers the gaps between a round's phases and between rounds of a training loop.
constexpr int kSpinMicros = 300;

template <class Ready>
void spin_until(const Ready& ready) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
  for (int i = 0; !ready(); ++i) {
    if (i % 64 == 63 && std::chrono::steady_clock::now() > deadline) return;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
}

// The pool pointer and the fork-safe mutexes, behind one mutex that fork() never splits: the
// prepare handler takes it (and then every registered mutex), so no other thread is inside
// them at the instant of the fork; both processes release them afterwards, and the child also
// drops the pool, whose workers exist only in the parent.
struct ForkState {
  std::mutex guard;
  ThreadPool* pool = nullptr;
  std::vector<std::mutex*> mutexes;
};

ForkState& fork_state() {
  static ForkState* state = new ForkState();  // leaked: workers may outlive static destructors
  return *state;
}

#if !defined(_WIN32)
void before_fork() {
  ForkState& s = fork_state();
  s.guard.lock();
  for (std::mutex* m : s.mutexes) m->lock();
}

void after_fork_in_parent() {
  ForkState& s = fork_state();
  for (auto m = s.mutexes.rbegin(); m != s.mutexes.rend(); ++m) (*m)->unlock();
  s.guard.unlock();
}

void after_fork_in_child() {
  ForkState& s = fork_state();
  for (auto m = s.mutexes.rbegin(); m != s.mutexes.rend(); ++m) (*m)->unlock();
  s.pool = nullptr;  // leaked: its threads are gone and its mutexes may be held by them
  s.guard.unlock();
}

[[maybe_unused]] const bool fork_handlers_installed =
    pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child) == 0;
#endif

}  // namespace

int hardware_threads() {
  static const int n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return n;
}

std::mutex& fork_safe_mutex() {
  ForkState& s = fork_state();
  std::lock_guard<std::mutex> lock(s.guard);
  s.mutexes.push_back(new std::mutex());
  return *s.mutexes.back();
}

ThreadPool& ThreadPool::instance() {
  ForkState& s = fork_state();
  std::lock_guard<std::mutex> lock(s.guard);
  if (s.pool == nullptr) s.pool = new ThreadPool();  // leaked, as above
  return *s.pool;
}

void ThreadPool::run(int n, const std::function<void(int)>& job) {
  if (in_worker()) {
    // A job that itself parallelises would wait on the queue it is serving: run inline.
    for (int t = 0; t < n; ++t) job(t);
    return;
  }
  struct Batch {
    std::mutex m;
    std::condition_variable done;
    std::atomic<int> remaining;  // changed under m; also read without it while spinning
  } batch;
  batch.remaining = n - 1;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    // Never more than max_threads() - 1 workers, whatever n a caller asks for.
    const int wanted = std::min(n, max_threads()) - 1;
    while (static_cast<int>(workers_.size()) < wanted) workers_.emplace_back([this] { loop(); });
    // More threads than cores: a polling thread would take a core from one with work.
    spin_.store(static_cast<int>(workers_.size()) < hardware_threads(), std::memory_order_relaxed);
    for (int t = 1; t < n; ++t)
      tasks_.push_back([&batch, &job, t] {
        job(t);
        std::lock_guard<std::mutex> l(batch.m);
        if (--batch.remaining == 0) batch.done.notify_one();
      });
    pending_.store(static_cast<int>(tasks_.size()), std::memory_order_release);
  }
  wake_.notify_all();
  job(0);
  if (spin_.load(std::memory_order_relaxed))
    spin_until([&] { return batch.remaining.load(std::memory_order_acquire) == 0; });
  // Taken even when the spin saw 0: the last worker may still hold m, and batch is on our stack.
  std::unique_lock<std::mutex> lock(batch.m);
  batch.done.wait(lock, [&] { return batch.remaining == 0; });
}

bool& ThreadPool::in_worker() {
  static thread_local bool flag = false;
  return flag;
}

void ThreadPool::loop() {
  in_worker() = true;
  for (;;) {
    if (spin_.load(std::memory_order_relaxed))
      spin_until([this] { return pending_.load(std::memory_order_acquire) > 0; });
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [this] { return !tasks_.empty(); });
      task = std::move(tasks_.front());
      tasks_.pop_front();
      pending_.store(static_cast<int>(tasks_.size()), std::memory_order_relaxed);
    }
    task();
  }
}

}  // namespace fedrecon
