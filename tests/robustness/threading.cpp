// The thread pool under throwing tasks and oversubscription: the first exception reaches the
// caller after every worker has left the call (no task runs on a dead stack, no
// std::terminate), the pool stays usable, and a pool with many more threads than cores still
// computes the right thing.
#include <atomic>
#include <stdexcept>
#include <thread>

#include "test_util.hpp"

using namespace attnkit;
using namespace attnkit::test;

TEST_CASE("thread_pool: a task that throws on the caller or a worker reaches the caller",
          "[robustness][executor]") {
  const int threads = GENERATE(2, 4);
  thread_pool pool(threads);
  const auto caller = std::this_thread::get_id();
  for (int where = 0; where < 3; ++where) {  // 0: caller's thread, 1: a worker, 2: every task
    INFO("threads " << threads << ", throwing on " << where);
    std::atomic<int> running{0}, started{0};
    bool caught = false;
    try {
      pool.parallel_for(64, [&](std::int64_t i) {
        running.fetch_add(1);
        started.fetch_add(1);
        const bool mine = std::this_thread::get_id() == caller;
        // Keep the other tasks busy a little, so that they are still running when one throws.
        std::this_thread::sleep_for(std::chrono::microseconds(200));
        running.fetch_sub(1);
        if (where == 2 || (where == 0 && mine) || (where == 1 && !mine))
          throw std::runtime_error("task " + std::to_string(i));
      });
    } catch (const std::runtime_error& e) {
      caught = true;
      CHECK(std::string(e.what()).rfind("task ", 0) == 0);
    }
    // where == 1 throws only if a worker ran a task; with 64 tasks of 200 us one always does.
    CHECK(caught);
    CHECK(running.load() == 0);  // nothing still running on the caller's stack
    if (where == 2) CHECK(started.load() <= 2 * threads);  // the rest was cancelled
    // The pool works afterwards, every index once.
    std::vector<std::atomic<int>> hits(1000);
    pool.parallel_for(1000,
                      [&](std::int64_t i) { hits[static_cast<std::size_t>(i)].fetch_add(1); });
    for (auto& h : hits) CHECK(h.load() == 1);
  }
}

TEST_CASE("thread_pool: an exception thrown inside an attention call reaches the caller",
          "[robustness][executor]") {
  std::mt19937_64 rng(5);
  constexpr std::int64_t tk = 2000, d = 16;
  const fmat q = random_matrix(rng, 1, 2 * d), k = random_matrix(rng, tk, d),
             v = random_matrix(rng, tk, d);
  std::vector<std::int64_t> pos(tk);
  for (std::int64_t i = 0; i < tk; ++i) pos[static_cast<std::size_t>(i)] = i;
  const kv_view<float> kv(tensor3_view<const float>(k.data(), {tk, 1, d}),
                          tensor3_view<const float>(v.data(), {tk, 1, d}), pos);
  fmat out(1, 2 * d);
  thread_pool pool(2);
  const std::int64_t qp = tk;
  auto throwing_mask = [](const mask_args& a) {
    if (a.k_pos == 1500) throw std::logic_error("mask");
    return true;
  };
  CHECK_THROWS_AS(
      attend(tensor3_view<const float>(q.data(), {1, 2, d}), std::span(&qp, 1), kv,
             tensor3_view<float>(out.data(), {1, 2, d}), {}, pool, nullptr, throwing_mask),
      std::logic_error);
  // And the pool still runs attention correctly.
  fmat serial(1, 2 * d);
  attend(tensor3_view<const float>(q.data(), {1, 2, d}), std::span(&qp, 1), kv,
         tensor3_view<float>(serial.data(), {1, 2, d}));
  attend(tensor3_view<const float>(q.data(), {1, 2, d}), std::span(&qp, 1), kv,
         tensor3_view<float>(out.data(), {1, 2, d}), {}, pool);
  CHECK(max_abs_diff(to_double(out), to_double(serial)) <= 1e-6);
}

TEST_CASE("thread_pool: oversubscribed pools compute the same answers", "[robustness][executor]") {
  const int threads = 4 * static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  thread_pool pool(threads);
  std::mt19937_64 rng(6);
  constexpr std::int64_t tk = 3000, d = 32, h = 4;
  const fmat q = random_matrix(rng, 1, h * d), k = random_matrix(rng, tk, 2 * d),
             v = random_matrix(rng, tk, 2 * d);
  std::vector<std::int64_t> pos(tk);
  for (std::int64_t i = 0; i < tk; ++i) pos[static_cast<std::size_t>(i)] = i;
  const kv_view<float> kv(tensor3_view<const float>(k.data(), {tk, 2, d}),
                          tensor3_view<const float>(v.data(), {tk, 2, d}), pos);
  const std::int64_t qp = tk;
  fmat serial(1, h * d), out(1, h * d);
  attend(tensor3_view<const float>(q.data(), {1, h, d}), std::span(&qp, 1), kv,
         tensor3_view<float>(serial.data(), {1, h, d}));
  for (int call = 0; call < 200; ++call) {  // many short calls: hand-offs, sleeps and wake-ups
    attend(tensor3_view<const float>(q.data(), {1, h, d}), std::span(&qp, 1), kv,
           tensor3_view<float>(out.data(), {1, h, d}), {}, pool);
    REQUIRE(max_abs_diff(to_double(out), to_double(serial)) <= 1e-5);
  }
}
