#pragma once
// The absorbed MLA decode benchmark, shared by bench_mla (DeepSeek shapes) and bench_convert (the
// converted Llama-3-8B layer, which has DeepSeek's head shapes with H = 32): attend_latent over a
// latent cache of d_c = 512 plus one rope key of d_R = 64 (576 elements per token).
// FLOPs per step: 2 H (2 d_c + d_R) T (scores over 576, values over 512); bytes: T * 576 *
// sizeof(S).
#include <benchmark/benchmark.h>

#include <attnkit/attention.hpp>

#include <cmath>
#include <random>
#include <string>
#include <vector>

namespace attnkit::bench {
namespace ak = attnkit;
constexpr std::int64_t DC = 512, DR = 64, DN = 128, DV = 128;

template <ak::storage_type S>
ak::latent_cache<S> filled_latent(std::int64_t t) {
  ak::latent_cache<S> cache({.latent_dim = DC, .rope_dim = DR, .rope_heads = 1, .capacity = t});
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  const std::int64_t chunk = 1024;
  std::vector<float> c(static_cast<std::size_t>(chunk * DC)),
      kr(static_cast<std::size_t>(chunk * DR));
  std::vector<std::int64_t> pos(chunk);
  for (std::int64_t s = 0; s < t; s += chunk) {
    const std::int64_t n = std::min(chunk, t - s);
    for (auto& x : c) x = nd(rng);
    for (auto& x : kr) x = nd(rng);
    for (std::int64_t i = 0; i < n; ++i) pos[static_cast<std::size_t>(i)] = s + i;
    cache.append(ak::matrix_view<const float>(c.data(), {n, DC}),
                 ak::tensor3_view<const float>(kr.data(), {n, 1, DR}),
                 std::span(pos).first(static_cast<std::size_t>(n)));
  }
  return cache;
}

/// Products: product_math::bf16 (skipped where the CPU has no bf16 products).
template <ak::storage_type S, bool Products = false>
void BM_mla_absorbed_decode(benchmark::State& state) {
  const std::int64_t h = state.range(0), t = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  if (Products && !ak::bf16_products_available()) state.SkipWithError("no bf16 products here");
  const auto cache = filled_latent<S>(t);
  std::vector<float> ql(static_cast<std::size_t>(h * DC), 0.01f),
      qr(static_cast<std::size_t>(h * DR), 0.01f), out(static_cast<std::size_t>(h * DC));
  const std::int64_t qpos = t - 1;
  ak::thread_pool pool(threads);
  ak::attention_workspace ws;
  ak::attention_options opt;
  opt.scale = 1.f / std::sqrt(float(DN + DR));
  opt.products = Products ? ak::product_math::bf16 : ak::product_math::f32;
  for (auto _ : state) {
    ak::attend_latent(ak::tensor3_view<const float>(ql.data(), {1, h, DC}),
                      ak::tensor3_view<const float>(qr.data(), {1, h, DR}), std::span(&qpos, 1),
                      cache, ak::tensor3_view<float>(out.data(), {1, h, DC}), opt, pool, &ws);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(state.iterations() * t * cache.bytes_per_token());
  state.counters["FLOPS"] =
      benchmark::Counter(2.0 * h * (2 * DC + DR) * t, benchmark::Counter::kIsIterationInvariantRate,
                         benchmark::Counter::OneK::kIs1000);
  state.SetLabel(std::string("compute-bound, ") + ak::storage_name<S>() +
                 (Products ? " products" : ""));
}

}  // namespace attnkit::bench
