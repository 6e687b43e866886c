#pragma once
// The foundation's GQA decode and causal prefill at the Llama-3-8B attention geometry (H 32,
// H_kv 8, d 128), shared by the benchmark binaries so that every variant is compared with them in
// the same run. Args: T, threads[, target: roofline.hpp]. Decode bytes: the KV read; FLOPs:
// 2 H (d_qk + d_v) T per query token, halved for causal prefill.
#include <attnkit/attention.hpp>
#include <benchmark/benchmark.h>

#include "roofline.hpp"

#include <optional>
#include <random>
#include <string>
#include <vector>

namespace attnkit::bench {
namespace ak = attnkit;
constexpr std::int64_t H = 32, HKV = 8, D = 128;

template <ak::storage_type S>
ak::dense_cache<S> filled_cache(std::int64_t t) {
  ak::dense_cache<S> cache({.kv_heads = HKV, .head_dim = D, .v_head_dim = D, .capacity = t});
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  const std::int64_t chunk = 1024;
  std::vector<float> k(static_cast<std::size_t>(chunk * HKV * D)), v(k.size());
  std::vector<std::int64_t> pos(chunk);
  for (std::int64_t s = 0; s < t; s += chunk) {
    const std::int64_t n = std::min(chunk, t - s);
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
    for (std::int64_t i = 0; i < n; ++i) pos[static_cast<std::size_t>(i)] = s + i;
    cache.append(ak::tensor3_view<const float>(k.data(), {n, HKV, D}),
                 ak::tensor3_view<const float>(v.data(), {n, HKV, D}),
                 std::span(pos).first(static_cast<std::size_t>(n)));
  }
  return cache;
}

/// One decode step of H query heads against a cache of T tokens. Products: product_math::bf16
/// (bf16 caches; skipped where the target has no bf16 products).
template <ak::storage_type S, bool TargetArg = false, bool Products = false>
void BM_gqa_decode(benchmark::State& state) {
  const std::int64_t t = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  // The target argument where the benchmark has one (bench_gqa), else the default target.
  std::optional<target_scope> target;
  if constexpr (TargetArg) target.emplace(state, 2);
  if (Products && (!target || target->ok()) && !ak::bf16_products_available())
    state.SkipWithError("no bf16 products on this target");
  const ak::attention_options opt{.products =
                                      Products ? ak::product_math::bf16 : ak::product_math::f32};
  const auto cache = filled_cache<S>(t);
  std::vector<float> q(H * D, 0.01f), out(H * D);
  const std::int64_t qpos = t - 1;
  ak::thread_pool pool(threads);
  ak::attention_workspace ws;
  for (auto _ : state) {
    ak::attend(ak::tensor3_view<const float>(q.data(), {1, H, D}), std::span(&qpos, 1), cache,
               ak::tensor3_view<float>(out.data(), {1, H, D}), opt, pool, &ws);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(state.iterations() * t * cache.bytes_per_token());
  state.counters["FLOPS"] =
      benchmark::Counter(2.0 * H * (D + D) * t, benchmark::Counter::kIsIterationInvariantRate,
                         benchmark::Counter::OneK::kIs1000);
  state.SetLabel(std::string("memory-bound, ") + ak::storage_name<S>() +
                 (Products ? " products" : "") + ", " + ak::target_name(ak::active_target()));
}

/// A model step's decode: one query token against each of LAYERS layers' caches of T tokens in
/// turn, each layer's cache in memory of its own (a copy of one filled cache). Repeating one
/// layer's decode (BM_gqa_decode) keeps its cache in the last-level cache wherever that holds it
/// (64 MiB at T 16384 in bf16), which a model step never does: between two visits of a layer the
/// other layers' caches stream past. Bytes: every layer's KV read. Args: T, threads, target.
constexpr std::int64_t LAYERS = 32;  // Llama-3-8B's layer count

template <ak::storage_type S>
void BM_gqa_decode_model_step(benchmark::State& state) {
  const std::int64_t t = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  const target_scope target(state, 2);
  if (!target.ok()) return;  // skipped: spare the gigabytes of caches

  const std::int64_t elements = HKV * t * D;  // one layer's K (or V) [H_kv, T, d]
  std::vector<std::int64_t> positions(static_cast<std::size_t>(t));
  std::vector<ak::dense_cache<S>> layers;
  std::vector<decltype(ak::detail::aligned_alloc_array<S>(0))> memory;  // [LAYERS * 2]
  {
    const auto first = filled_cache<S>(t);
    std::copy(first.positions().begin(), first.positions().end(), positions.begin());
    const auto view = first.view();
    for (std::int64_t l = 0; l < LAYERS; ++l) {
      for (const auto& rows : {view.keys(), view.values()}) {
        memory.push_back(ak::detail::aligned_alloc_array<S>(elements));
        std::copy_n(rows.row(0, 0), elements, memory.back().get());
      }
      layers.emplace_back(first.config(), memory[memory.size() - 2].get(), memory.back().get(),
                          positions.data(), t);
    }
  }
  std::vector<float> q(H * D, 0.01f), out(H * D);
  const std::int64_t qpos = t - 1;
  ak::thread_pool pool(threads);
  ak::attention_workspace ws;
  for (auto _ : state) {
    for (const auto& cache : layers)
      ak::attend(ak::tensor3_view<const float>(q.data(), {1, H, D}), std::span(&qpos, 1), cache,
                 ak::tensor3_view<float>(out.data(), {1, H, D}), {}, pool, &ws);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(state.iterations() * LAYERS * t * layers.front().bytes_per_token());
  state.SetLabel(std::to_string(LAYERS) + " layers, " + ak::storage_name<S>() + ", " +
                 target.name());
}

/// Causal prefill of T tokens. Products: product_math::bf16 (bf16 caches; skipped where the
/// target has no bf16 products). E: the queries' and outputs' type (bf16: as an engine running
/// bf16 activations, and PyTorch's bf16 SDPA, pass them).
template <ak::storage_type S, bool Products = false, bool TargetArg = true,
          ak::activation_type E = float>
void BM_gqa_prefill_causal(benchmark::State& state) {
  const std::int64_t t = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  std::optional<target_scope> target;
  if constexpr (TargetArg) target.emplace(state, 2);
  if (Products && (!target || target->ok()) && !ak::bf16_products_available())
    state.SkipWithError("no bf16 products on this target");
  const ak::attention_options opt{.products =
                                      Products ? ak::product_math::bf16 : ak::product_math::f32};
  const auto cache = filled_cache<S>(t);
  // q and out aligned as an engine's (and torch's) activations are: std::vector's large blocks
  // sit 16 bytes past a page, which splits every vector access of their rows across two lines.
  const std::int64_t n = t * H * D;
  const auto q = ak::detail::aligned_alloc_array<E>(n), out = ak::detail::aligned_alloc_array<E>(n);
  std::mt19937 rng(2);
  std::normal_distribution<float> nd;
  for (std::int64_t i = 0; i < n; ++i) q[i] = E(nd(rng)), out[i] = E(0.f);
  std::vector<std::int64_t> pos(cache.positions().begin(), cache.positions().end());
  ak::thread_pool pool(threads);
  ak::attention_workspace ws;
  for (auto _ : state) {
    ak::attend(ak::tensor3_view<const E>(q.get(), {t, H, D}), pos, cache,
               ak::tensor3_view<E>(out.get(), {t, H, D}), opt, pool, &ws);
    benchmark::DoNotOptimize(out.get());
  }
  state.counters["FLOPS"] = benchmark::Counter(2.0 * H * t * (D + D) * t / 2,
                                               benchmark::Counter::kIsIterationInvariantRate,
                                               benchmark::Counter::OneK::kIs1000);
  state.SetLabel(std::string("compute-bound, ") + ak::storage_name<S>() +
                 (Products ? " products" : "") + (std::same_as<E, ak::bf16> ? ", bf16 q/out" : "") +
                 ", " + ak::target_name(ak::active_target()));
}

}  // namespace attnkit::bench
