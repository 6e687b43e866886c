// Steady-state decode with a reused workspace performs no heap allocation (serial executor and
// the shipped thread pool). Counts every global operator new in this test binary.
#include <atomic>
#include <cstdlib>
#include <new>

#include "test_util.hpp"

namespace {
std::atomic<long> allocations{0};
}
// Every unaligned form is replaced, so that allocation and release always meet (AddressSanitizer
// checks that new/delete and new[]/delete[] pair up). The aligned forms count too.
namespace {
void* counted(std::size_t n) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
}  // namespace
void* operator new(std::size_t n) { return counted(n); }
void* operator new[](std::size_t n) { return counted(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return std::malloc(n ? n : 1); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return std::malloc(n ? n : 1); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void* operator new(std::size_t n, std::align_val_t a) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  const std::size_t al = static_cast<std::size_t>(a);
  if (void* p = std::aligned_alloc(al, (n + al - 1) / al * al)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n, std::align_val_t a) { return operator new(n, a); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

using namespace attnkit;
using namespace attnkit::test;

TEMPLATE_TEST_CASE("decode with a reused workspace does not allocate", "[gqa][alloc]", float, bf16) {
  std::mt19937_64 rng(5);
  const std::int64_t h = 8, hkv = GENERATE(1, 2), d = 64, t = 3000;
  const fmat k = random_matrix(rng, t, hkv * d), v = random_matrix(rng, t, hkv * d), q = random_matrix(rng, 1, h * d);
  std::vector<std::int64_t> pos(t);
  for (std::int64_t i = 0; i < t; ++i) pos[static_cast<std::size_t>(i)] = i;
  dense_cache<TestType> cache({.kv_heads = hkv, .head_dim = d, .capacity = t});
  cache.append(tensor3_view<const float>(k.data(), {t, hkv, d}), tensor3_view<const float>(v.data(), {t, hkv, d}), pos);
  fmat out(1, h * d);
  const std::int64_t qpos = t - 1;
  thread_pool pool(2);
  attention_workspace ws;
  auto step = [&](auto& exec) {
    attend(tensor3_view<const float>(q.data(), {1, h, d}), std::span(&qpos, 1), cache,
           tensor3_view<float>(out.data(), {1, h, d}), {}, exec, &ws);
  };
  serial_executor serial;
  step(serial);  // warm-up: the workspace grows here
  step(pool);
  long before = allocations.load();
  step(serial);
  CHECK(allocations.load() - before == 0);
  before = allocations.load();
  for (int i = 0; i < 10; ++i) step(pool);
  CHECK(allocations.load() - before == 0);
  callable_executor engine([&](std::int64_t n, const std::function<void(std::int64_t)>& fn) { pool.parallel_for(n, fn); }, 2);
  step(engine);
  before = allocations.load();
  step(engine);
  CHECK(allocations.load() - before == 0);
}
