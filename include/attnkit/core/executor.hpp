#pragma once
// Executors: the caller decides threading. Kernels call `parallel_for(n, fn)` with fn(i) for
// i in [0, n), and ask `concurrency_of(ex)` how many workers to plan for. attnkit ships a serial
// executor, a small std::thread pool, and an adapter for any user callable; no global state.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <concepts>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "error.hpp"

namespace attnkit {

/// Anything with `parallel_for(n, fn)` that calls fn(i) once for every i in [0, n) and returns
/// when all calls have returned. fn may be called concurrently from several threads.
template <class E>
concept executor = requires(E& e, std::int64_t n, std::function<void(std::int64_t)> fn) {
  e.parallel_for(n, fn);
};

/// Runs everything on the calling thread.
struct serial_executor {
  static constexpr int concurrency() { return 1; }  ///< One worker: the caller.
  /// Calls fn(0), ..., fn(n - 1) in order on the calling thread.
  template <class F>
  void parallel_for(std::int64_t n, F&& fn) const {
    for (std::int64_t i = 0; i < n; ++i) fn(i);
  }
};

/// How many workers to plan for: `ex.concurrency()` where the executor has it, else the
/// hardware's thread count (kernels pull work from a shared counter, so extra workers idle).
template <class E>
int concurrency_of(const E& ex) {
  if constexpr (requires {
                  { ex.concurrency() } -> std::convertible_to<int>;
                }) {
    return std::max(1, static_cast<int>(ex.concurrency()));
  } else {
    return std::max(1u, std::thread::hardware_concurrency());
  }
}

/// Adapts a user callable `f(n, fn)` (an engine's own pool) into an executor.
template <class F>
class callable_executor {
 public:
  /// Wraps `f`, called as f(n, std::function<void(std::int64_t)>) and expected to run every index
  /// once before it returns, with `concurrency` >= 1 workers to plan for.
  callable_executor(F f, int concurrency) : f_(std::move(f)), concurrency_(concurrency) {
    detail::require(concurrency >= 1, "callable_executor: concurrency must be >= 1, got ",
                    concurrency);
  }
  int concurrency() const { return concurrency_; }  ///< The workers kernels plan for.
  /// Hands fn over indices [0, n) to the wrapped callable.
  template <class Fn>
  void parallel_for(std::int64_t n, Fn&& fn) {
    // std::ref: the std::function holds a pointer, so wrapping a large lambda never allocates.
    f_(n, std::function<void(std::int64_t)>(std::ref(fn)));
  }

 private:
  F f_;
  int concurrency_;
};

/// A small persistent std::thread pool. The calling thread takes part in every parallel_for,
/// so `thread_pool(2)` starts one extra thread. Idle workers spin briefly (yielding the core
/// now and then) before they sleep, which keeps the per-call overhead of short kernels (decode)
/// at a few microseconds; a pool with more threads than the machine has hardware threads never
/// spins, so oversubscription costs sleeps and wake-ups, not spinning threads that starve the
/// working ones. A parallel_for issued from inside one of the pool's own tasks runs inline.
/// If tasks throw, the first exception is rethrown on the caller once every worker has left
/// the call; the indices not yet started are skipped.
class thread_pool {
 public:
  /// Starts threads - 1 workers (the caller is the last one); threads >= 1, default the hardware's.
  explicit thread_pool(
      int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency())))
      : threads_(threads),
        spin_(static_cast<unsigned>(threads) <= std::max(1u, std::thread::hardware_concurrency())
                  ? 20000
                  : 0) {
    detail::require(threads >= 1, "thread_pool: threads must be >= 1, got ", threads);
    for (int t = 1; t < threads; ++t) workers_.emplace_back([this] { worker_loop(); });
  }
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;
  ~thread_pool() {
    {
      std::lock_guard lock(mutex_);
      stop_.store(true, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }

  /// Threads taking part in a call, the caller included.
  int concurrency() const { return threads_; }

  /// Runs fn(i) for i in [0, n) on the workers and the caller and returns when all have returned;
  /// rethrows the first exception a task threw.
  template <class F>
  void parallel_for(std::int64_t n, F&& fn) {
    if (n <= 0) return;
    if (n == 1 || workers_.empty() || inside_pool() == this) {
      for (std::int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    std::lock_guard call_lock(call_mutex_);  // one parallel_for at a time per pool
    auto guarded = [&](std::int64_t i) {
      try {
        fn(i);
      } catch (...) {
        if (!failed_.exchange(true, std::memory_order_acq_rel)) error_ = std::current_exception();
        next_.store(n_, std::memory_order_relaxed);  // start no further index
      }
    };
    // std::ref: the std::function holds a pointer, so it never allocates.
    std::function<void(std::int64_t)> task(std::ref(guarded));
    {
      std::lock_guard lock(mutex_);
      task_ = &task;
      n_ = n;
      failed_.store(false, std::memory_order_relaxed);
      error_ = nullptr;
      next_.store(0, std::memory_order_relaxed);
      active_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    run_tasks();
    wait_for_workers();  // no worker may still run `task` (on this stack) after we return
    task_ = nullptr;
    if (failed_.load(std::memory_order_acquire)) {
      std::exception_ptr e = std::move(error_);
      error_ = nullptr;
      std::rethrow_exception(e);
    }
  }

 private:
  static const thread_pool*& inside_pool() {
    thread_local const thread_pool* current = nullptr;
    return current;
  }
  static void pause() {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }
  void run_tasks() {
    const thread_pool* outer = inside_pool();
    inside_pool() = this;
    for (std::int64_t i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < n_;) (*task_)(i);
    inside_pool() = outer;
  }
  /// A short spin for the common case (workers finish together), then yields, then sleep.
  void wait_for_workers() {
    for (int spin = 0; spin < spin_ && active_.load(std::memory_order_acquire) != 0; ++spin)
      relax(spin);
    if (active_.load(std::memory_order_acquire) == 0) return;
    std::unique_lock lock(mutex_);
    done_.wait(lock, [&] { return active_.load(std::memory_order_acquire) == 0; });
  }
  /// One spin step; every 64th yields the core, in case a thread that we wait for needs it.
  static void relax(int spin) {
    if (spin % 64 == 63)
      std::this_thread::yield();
    else
      pause();
  }
  void worker_loop() {
    std::uint64_t seen = 0;
    for (;;) {
      // Spin a little for the next generation, then sleep.
      std::uint64_t g = generation_.load(std::memory_order_acquire);
      for (int spin = 0; g == seen && spin < spin_; ++spin) {
        relax(spin);
        g = generation_.load(std::memory_order_acquire);
      }
      if (g == seen) {
        std::unique_lock lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        g = generation_.load(std::memory_order_acquire);
      }
      seen = g;
      // Not under mutex_: every worker waking at once would queue on it. The acquire load of
      // the generation above orders this read after the destructor's store.
      if (stop_.load(std::memory_order_relaxed)) return;
      run_tasks();
      if (active_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard lock(mutex_);  // the caller may be about to sleep on done_
        done_.notify_one();
      }
    }
  }

  int threads_;
  int spin_;  // spin steps before sleeping: 0 when oversubscribed
  std::vector<std::thread> workers_;
  std::mutex call_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<std::int64_t> next_{0};
  std::atomic<int> active_{0};
  std::function<void(std::int64_t)>* task_ = nullptr;
  std::int64_t n_ = 0;
  std::atomic<bool> stop_{false};
};

}  // namespace attnkit
