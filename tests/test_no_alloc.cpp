// Steady-state decode with a reused workspace performs no heap allocation: every kernel (GQA,
// absorbed MLA, TPA) and every layer, with the serial executor, the shipped thread pool and an
// engine's callable. Counts every global operator new in this test binary, and Eigen's own
// heap allocations (which use malloc): EIGEN_RUNTIME_NO_MALLOC makes Eigen check each one, and
// this file's eigen_assert counts the checks that fail while allocation is forbidden. Runs in
// the AVX-512 build and in the portable (sanitizer) build, whose GEMM tiles are Eigen products.
#include <atomic>

namespace attnkit_test {
inline std::atomic<long> eigen_assert_failures{0};
}
#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x)                                                                    \
  do {                                                                                     \
    if (!(x)) attnkit_test::eigen_assert_failures.fetch_add(1, std::memory_order_relaxed); \
  } while (false)
#include <cstdlib>
#include <new>

#include "layer_fixture.hpp"
#include "mla_fixture.hpp"
#include "tpa_fixture.hpp"

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
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  return std::malloc(n ? n : 1);
}
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

namespace {

/// Runs `step` with every executor kind after a warm-up and checks that neither operator new
/// nor Eigen allocated during the steady-state steps.
template <class Step>
void check_steady_state(Step&& step) {
  thread_pool pool(2);
  serial_executor serial;
  callable_executor engine(
      [&](std::int64_t n, const std::function<void(std::int64_t)>& fn) {
        pool.parallel_for(n, fn);
      },
      2);
  step(serial);  // warm-up: workspaces and layer buffers grow here
  step(pool);
  step(engine);
  const long before = allocations.load(), eigen_before = attnkit_test::eigen_assert_failures.load();
  Eigen::internal::set_is_malloc_allowed(false);
  step(serial);
  for (int i = 0; i < 5; ++i) step(pool);
  step(engine);
  Eigen::internal::set_is_malloc_allowed(true);
  CHECK(allocations.load() - before == 0);
  CHECK(attnkit_test::eigen_assert_failures.load() - eigen_before == 0);
}

}  // namespace

TEST_CASE("the allocation counters see operator new and Eigen's malloc", "[alloc]") {
  const long before = allocations.load(), eigen_before = attnkit_test::eigen_assert_failures.load();
  Eigen::internal::set_is_malloc_allowed(false);
  Eigen::MatrixXf m(64, 64);  // Eigen's aligned_malloc, not operator new
  Eigen::internal::set_is_malloc_allowed(true);
  auto* p = new int(3);
  delete p;
  CHECK(attnkit_test::eigen_assert_failures.load() - eigen_before >= 1);
  CHECK(allocations.load() - before >= 1);
  CHECK(m.size() == 64 * 64);
}

TEMPLATE_TEST_CASE("GQA decode with a reused workspace does not allocate", "[gqa][alloc]", float,
                   bf16) {
  std::mt19937_64 rng(5);
  const std::int64_t h = 8, hkv = GENERATE(1, 2), d = 64, t = 3000;
  const fmat k = random_matrix(rng, t, hkv * d), v = random_matrix(rng, t, hkv * d),
             q = random_matrix(rng, 1, h * d);
  std::vector<std::int64_t> pos(t);
  for (std::int64_t i = 0; i < t; ++i) pos[static_cast<std::size_t>(i)] = i;
  dense_cache<TestType> cache({.kv_heads = hkv, .head_dim = d, .capacity = t});
  cache.append(tensor3_view<const float>(k.data(), {t, hkv, d}),
               tensor3_view<const float>(v.data(), {t, hkv, d}), pos);
  fmat out(1, h * d), lse(1, h);
  const std::int64_t qpos = t - 1;
  attention_workspace ws;
  const std::vector<float> sinks(static_cast<std::size_t>(h), 0.5f);
  check_steady_state([&](auto& exec) {
    attend(tensor3_view<const float>(q.data(), {1, h, d}), std::span(&qpos, 1), cache,
           tensor3_view<float>(out.data(), {1, h, d}),
           {.logit_softcap = 30.f, .sinks = sinks, .lse = view_of(lse)}, exec, &ws);
  });
}

TEMPLATE_TEST_CASE("MLA and TPA decode kernels with a reused workspace do not allocate",
                   "[mla][tpa][alloc]", float, bf16) {
  std::mt19937_64 rng(6);
  const std::int64_t t = 2000, h = 16, dc = 64, dr = 16, d = 32, rk = 2, rv = 2, rq = 4;
  std::vector<std::int64_t> pos(t);
  for (std::int64_t i = 0; i < t; ++i) pos[static_cast<std::size_t>(i)] = i;
  const std::int64_t qpos = t - 1;
  latent_cache<TestType> lc({.latent_dim = dc, .rope_dim = dr, .capacity = t});
  const fmat c = random_matrix(rng, t, dc), kr = random_matrix(rng, t, dr);
  lc.append(view_of(c), tensor3_view<const float>(kr.data(), {t, 1, dr}), pos);
  factorized_cache<TestType> fc(
      {.heads = h, .head_dim = d, .k_rank = rk, .v_rank = rv, .capacity = t});
  const fmat ak = random_matrix(rng, t, rk * h), bk = random_matrix(rng, t, rk * d),
             av = random_matrix(rng, t, rv * h), bv = random_matrix(rng, t, rv * d);
  fc.append({tensor3_view<const float>(ak.data(), {t, rk, h}),
             tensor3_view<const float>(bk.data(), {t, rk, d}),
             tensor3_view<const float>(av.data(), {t, rv, h}),
             tensor3_view<const float>(bv.data(), {t, rv, d}), pos});
  const fmat ql = random_matrix(rng, 1, h * dc), qr = random_matrix(rng, 1, h * dr),
             aq = random_matrix(rng, 1, rq * h), bq = random_matrix(rng, 1, rq * d);
  fmat ol(1, h * dc), ot(1, h * d);
  attention_workspace ws_mla, ws_tpa;
  check_steady_state([&](auto& exec) {
    attend_latent(tensor3_view<const float>(ql.data(), {1, h, dc}),
                  tensor3_view<const float>(qr.data(), {1, h, dr}), std::span(&qpos, 1), lc,
                  tensor3_view<float>(ol.data(), {1, h, dc}), {}, exec, &ws_mla);
    attend_factorized(tensor3_view<const float>(aq.data(), {1, rq, h}),
                      tensor3_view<const float>(bq.data(), {1, rq, d}), std::span(&qpos, 1), fc,
                      tensor3_view<float>(ot.data(), {1, h, d}), {}, exec, &ws_tpa);
  });
}

TEST_CASE("layer decode steps (GQA, MLA absorbed, TPA) do not allocate", "[layer][alloc]") {
  std::mt19937_64 rng(7);
  const std::int64_t steps = 64, prompt = 40;
  std::vector<std::int64_t> pos(steps + prompt);
  for (std::size_t i = 0; i < pos.size(); ++i) pos[i] = static_cast<std::int64_t>(i);

  const gqa_config gc{.model_dim = 64, .heads = 8, .kv_heads = 2, .head_dim = 16};
  const auto gw = make_layer_data(rng, gc, true, true);
  gqa_layer gl(gc, gw.weights());
  auto gcache = gl.make_cache<bf16>(steps + prompt);

  const mla_config mc{.model_dim = 64,
                      .heads = 4,
                      .q_lora_rank = 24,
                      .latent_dim = 32,
                      .nope_dim = 16,
                      .rope_dim = 8,
                      .v_head_dim = 16};
  const auto mw = make_mla(rng, mc, true, true);
  mla_layer ml(mc, mw.weights());
  auto mcache = ml.make_cache<float>(steps + prompt);

  const tpa_config tc{
      .model_dim = 64, .heads = 4, .head_dim = 16, .q_rank = 3, .k_rank = 2, .v_rank = 2};
  const auto tw = make_tpa(rng, tc, false);
  tpa_layer tl(tc, tw.weights());
  auto tcache = tl.make_cache<float>(steps + prompt);

  const fmat xp = random_matrix(rng, prompt, 64), x = random_matrix(rng, 1, 64);
  fmat yp(prompt, 64), y(1, 64);
  const auto prompt_pos = std::span(pos).first(prompt);
  gl.forward(view_of(xp), prompt_pos, gcache, view_of(yp));
  ml.forward(view_of(xp), prompt_pos, mcache, view_of(yp));
  tl.forward(view_of(xp), prompt_pos, tcache, view_of(yp));
  std::size_t next = static_cast<std::size_t>(prompt);
  check_steady_state([&](auto& exec) {
    const auto p = std::span(pos).subspan(next++, 1);
    gl.forward(view_of(x), p, gcache, view_of(y), exec);
    ml.forward(view_of(x), p, mcache, view_of(y), exec, mla_path::absorbed);
    tl.forward(view_of(x), p, tcache, view_of(y), exec);
  });
}

TEST_CASE("a decode loop allocates in its first step only, while its context grows 1 to 2600",
          "[layer][alloc]") {
  // The number of key splits rises with the context (at 512, 768, 1280, 2304 keys for two
  // workers); the workspace is sized for the most splits on the first call.
  std::mt19937_64 rng(9);
  const std::int64_t steps = 2600;
  const gqa_config gc{.model_dim = 32, .heads = 4, .kv_heads = 1, .head_dim = 8};
  const auto gw = make_layer_data(rng, gc, false, false);
  gqa_layer gl(gc, gw.weights());
  auto cache = gl.make_cache<float>(steps);
  const fmat x = random_matrix(rng, 1, 32);
  fmat y(1, 32);
  thread_pool pool(2);
  long allocating_steps = 0;
  for (std::int64_t t = 0; t < steps; ++t) {
    const long before = allocations.load(),
               eigen_before = attnkit_test::eigen_assert_failures.load();
    if (t > 0) Eigen::internal::set_is_malloc_allowed(false);
    gl.forward(view_of(x), std::span(&t, 1), cache, view_of(y), pool);
    Eigen::internal::set_is_malloc_allowed(true);
    if (t > 0 && (allocations.load() != before ||
                  attnkit_test::eigen_assert_failures.load() != eigen_before)) {
      INFO("step " << t << " allocated");
      ++allocating_steps;
    }
  }
  CHECK(allocating_steps == 0);
}

TEST_CASE("shared-stack decode steps (donor, followers, both weights forms) do not allocate",
          "[shared][alloc]") {
  std::mt19937_64 rng(11);
  const std::int64_t steps = 64, prompt = 40, d = 64;
  std::vector<std::int64_t> pos(steps + prompt);
  for (std::size_t i = 0; i < pos.size(); ++i) pos[i] = static_cast<std::int64_t>(i);
  const gqa_config gc{.model_dim = d, .heads = 8, .kv_heads = 2, .head_dim = 16};
  const auto g0 = make_layer_data(rng, gc, true), g3 = make_layer_data(rng, gc, false);
  const fmat fv = random_matrix(rng, 2 * 16, d), fo = random_matrix(rng, d, 8 * 16);
  const follower_config fc{.model_dim = d, .heads = 8, .kv_heads = 2, .v_head_dim = 16};
  std::vector<stack_layer> layers;
  layers.emplace_back(gqa_layer(gc, g0.weights()));
  layers.emplace_back(follower_layer(fc, {view_of(fv), view_of(fo)}));
  layers.emplace_back(follower_layer(fc, {view_of(fv), view_of(fo)}));
  layers.emplace_back(gqa_layer(gc, g3.weights()));
  shared_stack stack(std::move(layers), {{0, 1, 2}});
  for (const weights_form form : {weights_form::materialised, weights_form::flash}) {
    auto caches = stack.make_caches<bf16>(steps + prompt);
    fmat xp = random_matrix(rng, prompt, d), x = random_matrix(rng, 1, d);
    stack.forward(view_of(xp), std::span(pos).first(prompt), caches, serial_executor{}, form);
    std::size_t next = static_cast<std::size_t>(prompt);
    check_steady_state([&](auto& exec) {
      stack.forward(view_of(x), std::span(pos).subspan(next++, 1), caches, exec, form);
    });
  }
}
