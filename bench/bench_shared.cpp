// Shared attention (kernels/shared.hpp): a span of 5 layers (a donor and 4 followers, the
// paper's Llama-2-7B plan of donor 22 with followers 23-26) against 5 unshared GQA layers, bf16
// caches, attention only (projections are the same in both and left out), with the machine's
// read bandwidth and FMA peak measured in the same run (roofline.hpp).
//   BM_span_decode_{unshared,shared}/T/H_kv/threads: one decode step through the span; bytes:
//     the KV read (and for the shared span the weights P [H, T] written once, read 4 times).
//   BM_span_prefill_{unshared,flash,materialised}/T/T/H_kv/threads/products: a causal prefill
//     of T tokens through the span, f32 (0) or bf16 products (1: every layer's, the followers'
//     P V included, where the CPU runs them faster than f32; elsewhere f32); counters:
//     handoff_bytes (what the donor hands on: LSE [T, H] in the flash form, P [T, H, T]
//     materialised) and workspace_bytes (the followers' scratch).
//   BM_span_chunk_{flash,materialised}/Tq/T/H_kv/threads: a chunk of Tq queries at the end of a
//     T-token context through the shared span in each form: the data behind the automatic rule
//     of shared_stack (materialised while P of the block fits its byte limit).
//   BM_follower_value_heads/Tq/T/H_kv/threads/products: one flash follower call, Tq queries at
//     the end of T tokens, over a donor of 8 KV heads (Llama-3-8B attention) whose follower keeps
//     H_kv value heads: 8 (a donor item's rows read one value head) or 32 (one per query head:
//     each value head's rows gathered over the item's tokens).
#include <attnkit/attention.hpp>
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "roofline.hpp"

namespace {
namespace ak = attnkit;
using ak::bf16;
constexpr std::int64_t H = 32, D = 128, SPAN = 5;

std::vector<float> random_floats(std::int64_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = nd(rng);
  return v;
}

/// T tokens at positions 0..T-1 appended in chunks (K and V random; V only for a value cache).
template <class Cache>
Cache filled(Cache cache, std::int64_t t, std::int64_t hkv, unsigned seed) {
  const std::int64_t chunk = 1024;
  const auto k = random_floats(chunk * hkv * D, seed), v = random_floats(chunk * hkv * D, seed + 1);
  std::vector<std::int64_t> pos(chunk);
  for (std::int64_t s = 0; s < t; s += chunk) {
    const std::int64_t n = std::min(chunk, t - s);
    for (std::int64_t i = 0; i < n; ++i) pos[static_cast<std::size_t>(i)] = s + i;
    const ak::tensor3_view<const float> kv(k.data(), {n, hkv, D}), vv(v.data(), {n, hkv, D});
    const auto p = std::span<const std::int64_t>(pos).first(static_cast<std::size_t>(n));
    if constexpr (std::same_as<Cache, ak::value_cache<bf16>>)
      cache.append(vv, p);
    else
      cache.append(kv, vv, p);
  }
  return cache;
}

struct span_caches {
  std::vector<ak::dense_cache<bf16>> dense;  // unshared: 5 layers; shared: the donor
  std::vector<ak::value_cache<bf16>> values;  // shared: the 4 followers
};

span_caches make_span(std::int64_t t, std::int64_t hkv, bool shared) {
  span_caches s;
  for (std::int64_t i = 0; i < SPAN; ++i) {
    if (shared && i > 0)
      s.values.push_back(filled(ak::value_cache<bf16>({hkv, D, t}), t, hkv, unsigned(10 + i)));
    else
      s.dense.push_back(filled(ak::dense_cache<bf16>({hkv, D, D, t}), t, hkv, unsigned(10 + i)));
  }
  return s;
}

std::int64_t kv_bytes(const span_caches& s, std::int64_t t) {
  std::int64_t b = 0;
  for (const auto& c : s.dense) b += c.bytes_per_token() * t;
  for (const auto& c : s.values) b += c.bytes_per_token() * t;
  return b;
}

void BM_span_decode(benchmark::State& state, bool shared) {
  const std::int64_t t = state.range(0), hkv = state.range(1);
  const span_caches s = make_span(t, hkv, shared);
  const auto q = random_floats(H * D, 3);
  std::vector<float> out(H * D), p(static_cast<std::size_t>(H * t));
  const std::int64_t qpos = t - 1;
  ak::thread_pool pool(static_cast<int>(state.range(2)));
  ak::attention_workspace ws;
  const ak::tensor3_view<const float> qv(q.data(), {1, H, D});
  const ak::tensor3_view<float> ov(out.data(), {1, H, D});
  for (auto _ : state) {
    if (shared) {
      ak::attend(qv, std::span(&qpos, 1), s.dense[0], ov,
                 {.weights = ak::tensor3_view<float>(p.data(), {1, H, t})}, pool, &ws);
      for (const auto& v : s.values)
        ak::attend_shared(ak::tensor3_view<const float>(p.data(), {1, H, t}), v, ov, pool, &ws);
    } else {
      for (const auto& c : s.dense) ak::attend(qv, std::span(&qpos, 1), c, ov, {}, pool, &ws);
    }
    benchmark::DoNotOptimize(out.data());
  }
  const std::int64_t weights_bytes = shared ? H * t * 4 * (1 + (SPAN - 1)) : 0;
  state.SetBytesProcessed(state.iterations() * (kv_bytes(s, t) + weights_bytes));
  state.counters["kv_bytes"] = static_cast<double>(kv_bytes(s, t));
  state.SetLabel(shared ? "donor + 4 followers (materialised P)" : "5 GQA layers");
}

void BM_span_decode_unshared(benchmark::State& state) { BM_span_decode(state, false); }
void BM_span_decode_shared(benchmark::State& state) { BM_span_decode(state, true); }

enum class prefill_kind { unshared, flash, materialised };

/// Tq queries at the last positions of a T-token context (Tq == T: a causal prefill).
void BM_span_prefill(benchmark::State& state, prefill_kind kind) {
  const std::int64_t tq = state.range(0), t = state.range(1), hkv = state.range(2);
  const span_caches s = make_span(t, hkv, kind != prefill_kind::unshared);
  const auto q = random_floats(tq * H * D, 4);
  std::vector<float> out(static_cast<std::size_t>(tq * H * D)), lse(static_cast<std::size_t>(tq * H));
  std::vector<float> p(kind == prefill_kind::materialised ? static_cast<std::size_t>(tq * H * t) : 0);
  std::vector<std::int64_t> pos(static_cast<std::size_t>(tq));
  for (std::int64_t i = 0; i < tq; ++i) pos[static_cast<std::size_t>(i)] = t - tq + i;
  ak::thread_pool pool(static_cast<int>(state.range(3)));
  const auto products = state.range(4) ? ak::product_math::bf16 : ak::product_math::f32;
  ak::attention_workspace ws, follower_ws;
  const ak::tensor3_view<const float> qv(q.data(), {tq, H, D});
  const ak::tensor3_view<float> ov(out.data(), {tq, H, D});
  const ak::matrix_view<float> lv(lse.data(), {tq, H});
  for (auto _ : state) {
    if (kind == prefill_kind::unshared) {
      for (const auto& c : s.dense) ak::attend(qv, pos, c, ov, {.products = products}, pool, &ws);
    } else if (kind == prefill_kind::flash) {
      ak::attend(qv, pos, s.dense[0], ov, {.lse = lv, .products = products}, pool, &ws);
      for (const auto& v : s.values)
        ak::attend_shared(ak::gqa_scores<bf16>{qv, s.dense[0].view()}, pos,
                          ak::matrix_view<const float>(lv), v, ov, {.products = products}, pool,
                          &follower_ws);
    } else {
      ak::attend(qv, pos, s.dense[0], ov,
                 {.weights = ak::tensor3_view<float>(p.data(), {tq, H, t}), .products = products},
                 pool, &ws);
      for (const auto& v : s.values)
        ak::attend_shared(ak::tensor3_view<const float>(p.data(), {tq, H, t}), v, ov, pool,
                          &follower_ws, ak::tile_strategy::automatic, products);
    }
    benchmark::DoNotOptimize(out.data());
  }
  // Causal: the visible query-key pairs; the flash followers recompute their scores.
  const double pairs = double(tq) * double(t) - double(tq) * double(tq - 1) / 2;
  const double layers_with_scores = kind == prefill_kind::materialised ? 1 : SPAN;
  const double flops = 2.0 * H * D * pairs * (layers_with_scores + SPAN);
  state.counters["FLOPS"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate,
                                               benchmark::Counter::OneK::kIs1000);
  state.counters["handoff_bytes"] = kind == prefill_kind::flash ? double(lse.size() * 4)
                                    : kind == prefill_kind::materialised ? double(p.size() * 4)
                                                                         : 0.0;
  state.counters["workspace_bytes"] = static_cast<double>(follower_ws.bytes());
}

void BM_span_prefill_unshared(benchmark::State& state) {
  BM_span_prefill(state, prefill_kind::unshared);
}
void BM_span_prefill_flash(benchmark::State& state) { BM_span_prefill(state, prefill_kind::flash); }
void BM_span_prefill_materialised(benchmark::State& state) {
  BM_span_prefill(state, prefill_kind::materialised);
}

void BM_follower_value_heads(benchmark::State& state) {
  const std::int64_t tq = state.range(0), t = state.range(1), hkv = state.range(2), donor_kv = 8;
  const auto donor = filled(ak::dense_cache<bf16>({donor_kv, D, D, t}), t, donor_kv, 20);
  const auto values = filled(ak::value_cache<bf16>({hkv, D, t}), t, hkv, 30);
  const auto q = random_floats(tq * H * D, 5);
  std::vector<float> out(static_cast<std::size_t>(tq * H * D)),
      lse(static_cast<std::size_t>(tq * H));
  std::vector<std::int64_t> pos(static_cast<std::size_t>(tq));
  for (std::int64_t i = 0; i < tq; ++i) pos[static_cast<std::size_t>(i)] = t - tq + i;
  ak::thread_pool pool(static_cast<int>(state.range(3)));
  const ak::attention_options opt{.products = state.range(4) ? ak::product_math::bf16
                                                             : ak::product_math::f32};
  ak::attention_workspace ws;
  const ak::tensor3_view<const float> qv(q.data(), {tq, H, D});
  const ak::tensor3_view<float> ov(out.data(), {tq, H, D});
  ak::attention_options donor_opt = opt;
  donor_opt.lse = ak::matrix_view<float>(lse.data(), {tq, H});
  ak::attend(qv, pos, donor, ov, donor_opt, pool, &ws);
  for (auto _ : state) {
    ak::attend_shared(ak::gqa_scores<bf16>{qv, donor.view()}, pos,
                      ak::matrix_view<const float>(lse.data(), {tq, H}), values, ov, opt, pool,
                      &ws);
    benchmark::DoNotOptimize(out.data());
  }
  const double pairs = double(tq) * double(t) - double(tq) * double(tq - 1) / 2;
  state.counters["FLOPS"] =
      benchmark::Counter(4.0 * H * D * pairs, benchmark::Counter::kIsIterationInvariantRate,
                         benchmark::Counter::OneK::kIs1000);
}

// T, H_kv (32: Llama-2-7B, 8: Llama-3-8B), threads
void decode_args(benchmark::internal::Benchmark* b) {
  for (std::int64_t hkv : {32, 8})
    for (std::int64_t t : {4096, 16384}) b->Args({t, hkv, 2});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}
// Tq, T, H_kv, threads, products
void prefill_args(benchmark::internal::Benchmark* b) {
  for (std::int64_t products : {0, 1}) b->Args({2048, 2048, 32, 2, products});
  b->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(2);
}
void chunk_args(benchmark::internal::Benchmark* b) {
  for (std::int64_t tq : {1, 16, 128, 512}) b->Args({tq, 4096, 32, 2, 0});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_span_decode_unshared)->Apply(decode_args);
BENCHMARK(BM_span_decode_shared)->Apply(decode_args);
BENCHMARK(BM_span_prefill_unshared)->Apply(prefill_args);
BENCHMARK(BM_span_prefill_flash)->Apply(prefill_args);
BENCHMARK(BM_span_prefill_materialised)->Apply(prefill_args);
BENCHMARK(BM_span_prefill_flash)->Name("BM_span_chunk_flash")->Apply(chunk_args);
BENCHMARK(BM_span_prefill_materialised)->Name("BM_span_chunk_materialised")->Apply(chunk_args);
// Tq, T, follower H_kv, threads, products
BENCHMARK(BM_follower_value_heads)
    ->ArgsProduct({{128, 512}, {4096}, {8, 32}, {2}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

BENCHMARK_MAIN();
