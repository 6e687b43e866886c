// Executors: serial, the shipped thread pool, and user callables.
#include <atomic>
#include <set>
#include <thread>

#include "test_util.hpp"

using namespace attnkit;

TEST_CASE("serial_executor runs every index once, in order", "[executor]") {
  std::vector<std::int64_t> seen;
  serial_executor{}.parallel_for(5, [&](std::int64_t i) { seen.push_back(i); });
  CHECK(seen == std::vector<std::int64_t>{0, 1, 2, 3, 4});
  static_assert(executor<serial_executor>);
  CHECK(concurrency_of(serial_executor{}) == 1);
}

TEST_CASE("thread_pool runs every index exactly once, on several threads", "[executor]") {
  const int threads = GENERATE(1, 2, 3);
  thread_pool pool(threads);
  CHECK(concurrency_of(pool) == threads);
  for (int rep = 0; rep < 50; ++rep) {
    const std::int64_t n = 1 + rep * 7;
    std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
    pool.parallel_for(n, [&](std::int64_t i) { hits[static_cast<std::size_t>(i)].fetch_add(1); });
    for (auto& h : hits) REQUIRE(h.load() == 1);
  }
  // Work actually spreads when tasks block long enough for the other threads to join.
  if (threads > 1) {
    std::mutex m;
    std::set<std::thread::id> ids;
    pool.parallel_for(64, [&](std::int64_t) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      std::lock_guard lock(m);
      ids.insert(std::this_thread::get_id());
    });
    CHECK(ids.size() > 1);
  }
}

TEST_CASE("thread_pool: nested parallel_for runs inline instead of deadlocking", "[executor]") {
  thread_pool pool(2);
  std::atomic<int> count{0};
  pool.parallel_for(
      4, [&](std::int64_t) { pool.parallel_for(3, [&](std::int64_t) { count.fetch_add(1); }); });
  CHECK(count.load() == 12);
}

TEST_CASE("thread_pool rejects a non-positive thread count", "[executor]") {
  ATTNKIT_CHECK_INVALID(thread_pool(0), "threads must be >= 1", "got 0");
}

TEST_CASE("callable_executor adapts an engine's parallel_for", "[executor]") {
  int calls = 0;
  callable_executor ex(
      [&](std::int64_t n, const std::function<void(std::int64_t)>& fn) {
        ++calls;
        for (std::int64_t i = n; i-- > 0;) fn(i);  // any order is allowed
      },
      3);
  static_assert(executor<decltype(ex)>);
  CHECK(concurrency_of(ex) == 3);
  std::int64_t sum = 0;
  ex.parallel_for(10, [&](std::int64_t i) { sum += i; });
  CHECK(sum == 45);
  CHECK(calls == 1);
  ATTNKIT_CHECK_INVALID(callable_executor([](std::int64_t, auto) {}, 0),
                        "concurrency must be >= 1");
}

TEST_CASE("an executor without concurrency() is planned with the hardware thread count",
          "[executor]") {
  struct bare {
    void parallel_for(std::int64_t n, const std::function<void(std::int64_t)>& fn) {
      for (std::int64_t i = 0; i < n; ++i) fn(i);
    }
  };
  static_assert(executor<bare>);
  CHECK(concurrency_of(bare{}) ==
        static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
}
