// MLA decode: the absorbed kernel (attend_latent over a 576-element latent cache) for H 16
// (DeepSeek-V2-Lite) and H 128 (DeepSeek-V3), the naive path (K/V materialised from the latent,
// then the GQA kernel as MHA), and the foundation's Llama-3-8B GQA decode at the same context,
// with the machine's roofline (read bandwidth, FMA peak) in the same run.
// FLOPs per absorbed step: 2 H (2 d_c + d_R) T (scores over 576, values over 512): with ~H
// FLOP per latent byte it is compute-bound for H >= 16 on this machine; bytes: T * 576 * sizeof(S).
#include <attnkit/attention.hpp>

#include <random>

#include "gqa_decode.hpp"
#include "mla_decode.hpp"
#include "roofline.hpp"

namespace {
namespace ak = attnkit;
using namespace attnkit::bench;

/// The naive decode step: K_i = [W_UK_i c ; k_rope], V_i = W_UV_i c for all cached tokens, then
/// one query against them with the GQA kernel as MHA (what mla_layer's naive path does).
void BM_mla_naive_decode(benchmark::State& state) {
  const std::int64_t h = state.range(0), t = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  const auto cache = filled_latent<float>(t);
  std::mt19937 rng(2);
  std::normal_distribution<float> nd(0.f, 0.05f);
  ak::row_matrix<float> kvb(h * (DN + DV), DC);
  for (std::int64_t i = 0; i < kvb.size(); ++i) kvb.data()[i] = nd(rng);
  ak::row_matrix<float> k(t, h * (DN + DR)), v(t, h * DV);
  std::vector<float> q(static_cast<std::size_t>(h * (DN + DR)), 0.01f),
      out(static_cast<std::size_t>(h * DV));
  const std::int64_t qpos = t - 1, w = DC + DR;
  ak::thread_pool pool(threads);
  ak::attention_workspace ws;
  using cmap = Eigen::Map<const ak::row_matrix<float>, Eigen::Unaligned, Eigen::OuterStride<>>;
  using mmap = Eigen::Map<ak::row_matrix<float>, Eigen::Unaligned, Eigen::OuterStride<>>;
  for (auto _ : state) {
    pool.parallel_for(h, [&](std::int64_t i) {
      const cmap c(cache.rows(), t, DC, Eigen::OuterStride<>(w));
      mmap(k.data() + i * (DN + DR), t, DN, Eigen::OuterStride<>(h * (DN + DR))).noalias() =
          c * cmap(kvb.data() + i * (DN + DV) * DC, DN, DC, Eigen::OuterStride<>(DC)).transpose();
      mmap(v.data() + i * DV, t, DV, Eigen::OuterStride<>(h * DV)).noalias() =
          c * cmap(kvb.data() + (i * (DN + DV) + DN) * DC, DV, DC, Eigen::OuterStride<>(DC))
                  .transpose();
      for (std::int64_t s = 0; s < t; ++s)
        std::copy(cache.rows() + s * w + DC, cache.rows() + s * w + w,
                  k.data() + s * h * (DN + DR) + i * (DN + DR) + DN);
    });
    ak::attention_options opt;
    opt.scale = 1.f / std::sqrt(float(DN + DR));
    const ak::kv_view<float> kv(ak::tensor3_view<const float>(k.data(), {t, h, DN + DR}),
                                ak::tensor3_view<const float>(v.data(), {t, h, DV}),
                                cache.positions());
    ak::attend(ak::tensor3_view<const float>(q.data(), {1, h, DN + DR}), std::span(&qpos, 1), kv,
               ak::tensor3_view<float>(out.data(), {1, h, DV}), opt, pool, &ws);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(state.iterations() * t * cache.bytes_per_token());
  state.counters["FLOPS"] = benchmark::Counter(
      2.0 * t * h * DC * (DN + DV) + 2.0 * h * (DN + DR + DV) * t,
      benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::OneK::kIs1000);
  state.SetLabel("compute-bound (K/V materialised), f32");
}

}  // namespace

BENCHMARK_TEMPLATE(BM_mla_absorbed_decode, float)
    ->ArgsProduct({{16, 128}, {1024, 4096, 16384}, {2}})
    ->ArgNames({"H", "T", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_mla_absorbed_decode, ak::bf16)
    ->ArgsProduct({{16, 128}, {1024, 4096, 16384}, {2}})
    ->ArgNames({"H", "T", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_mla_absorbed_decode, ak::bf16, true)
    ->ArgsProduct({{16, 128}, {1024, 4096, 16384}, {2}})
    ->ArgNames({"H", "T", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
// Short decodes: what a call costs besides its keys' work (128 heads: a 256 KiB output).
BENCHMARK_TEMPLATE(BM_mla_absorbed_decode, float)
    ->ArgsProduct({{16, 128}, {1, 64}, {1, 2}})
    ->ArgNames({"H", "T", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_mla_absorbed_decode, ak::bf16)
    ->ArgsProduct({{16, 128}, {1, 64}, {1, 2}})
    ->ArgNames({"H", "T", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_mla_naive_decode)
    ->ArgsProduct({{16}, {1024, 4096, 16384}, {2}})
    ->Args({128, 1024, 2})
    ->Args({128, 4096, 2})
    ->ArgNames({"H", "T", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_gqa_decode, float)
    ->ArgsProduct({{1024, 4096, 16384}, {2}})
    ->ArgNames({"T", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_gqa_decode, ak::bf16)
    ->ArgsProduct({{1024, 4096, 16384}, {2}})
    ->ArgNames({"T", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

BENCHMARK_MAIN();
