// How an inference engine drives attnkit: the engine owns the KV memory and its thread pool;
// attnkit wraps the memory as a dense cache, and runs prefill, then decode steps, then a
// speculative-decoding rollback, on the engine's threads.
#include <attnkit/attention.hpp>

#include <cstdio>
#include <functional>
#include <random>
#include <vector>

namespace ak = attnkit;

// Stand-in for the engine's own pool: anything with parallel_for(n, fn) works.
struct engine_pool {
  ak::thread_pool impl{2};
  int concurrency() const { return 2; }
  void parallel_for(std::int64_t n, const std::function<void(std::int64_t)>& fn) {
    impl.parallel_for(n, fn);
  }
};

int main() {
  const std::int64_t dm = 256, h = 8, hkv = 2, d = 32, capacity = 512;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.f, 1.f / 16.f);
  auto random = [&](std::size_t n) {
    std::vector<float> v(n);
    for (auto& x : v) x = nd(rng);
    return v;
  };
  // Weights as the engine loaded them (nn.Linear layout), viewed, not copied.
  const auto wq = random(h * d * dm), wk = random(hkv * d * dm), wv = random(hkv * d * dm),
             wo = random(dm * h * d);
  ak::gqa_layer layer({.model_dim = dm,
                       .heads = h,
                       .kv_heads = hkv,
                       .head_dim = d,
                       .rope = {.theta = 500000.0, .layout = ak::rope_layout::half_split}},
                      {ak::matrix_view<const float>(wq.data(), {h * d, dm}),
                       ak::matrix_view<const float>(wk.data(), {hkv * d, dm}),
                       ak::matrix_view<const float>(wv.data(), {hkv * d, dm}),
                       ak::matrix_view<const float>(wo.data(), {dm, h * d})});

  // KV memory owned by the engine, in bf16, head-major.
  std::vector<ak::bf16> k_mem(static_cast<std::size_t>(hkv * capacity * d)), v_mem(k_mem.size());
  std::vector<std::int64_t> pos_mem(capacity);
  ak::dense_cache<ak::bf16> cache(
      {.kv_heads = hkv, .head_dim = d, .v_head_dim = d, .capacity = capacity}, k_mem.data(),
      v_mem.data(), pos_mem.data());
  engine_pool pool;

  // Prefill a 100-token prompt in chunks of 32 (chunked prefill is the same call).
  const std::int64_t prompt = 100;
  const auto x = random(static_cast<std::size_t>(prompt * dm));
  std::vector<float> y(x.size());
  std::vector<std::int64_t> pos(prompt);
  for (std::int64_t i = 0; i < prompt; ++i) pos[static_cast<std::size_t>(i)] = i;
  for (std::int64_t s = 0; s < prompt; s += 32) {
    const std::int64_t n = std::min<std::int64_t>(32, prompt - s);
    layer.forward(ak::matrix_view<const float>(x.data() + s * dm, {n, dm}),
                  std::span(pos).subspan(s, n), cache,
                  ak::matrix_view<float>(y.data() + s * dm, {n, dm}), pool);
  }
  // Speculative decoding: verify 4 draft tokens at once, accept 2, roll back the rest.
  const auto draft = random(4 * dm);
  std::vector<float> yd(draft.size());
  const std::int64_t draft_pos[4] = {100, 101, 102, 103};
  layer.forward(ak::matrix_view<const float>(draft.data(), {4, dm}), draft_pos, cache,
                ak::matrix_view<float>(yd.data(), {4, dm}), pool);
  cache.truncate(prompt + 2);
  // Plain decode steps.
  for (std::int64_t step = 0; step < 5; ++step) {
    const std::int64_t p = cache.size();
    const auto tok = random(dm);
    std::vector<float> out(dm);
    layer.forward(ak::matrix_view<const float>(tok.data(), {1, dm}), std::span(&p, 1), cache,
                  ak::matrix_view<float>(out.data(), {1, dm}), pool);
  }
  std::printf(
      "engine integration: cache holds %lld tokens (%lld bytes/token, bf16), last position %lld\n",
      (long long)cache.size(), (long long)cache.bytes_per_token(),
      (long long)cache.positions().back());
  return cache.size() == prompt + 2 + 5 && cache.positions().back() == prompt + 6 ? 0 : 1;
}
