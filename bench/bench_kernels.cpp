// The streaming kernels of a decode block alone, with their operands in cache, next to the FMA
// peak of the same target in the same run: what each reaches of the peak without the memory
// traffic of a whole decode around it (bench_gqa / bench_mla time that). Every benchmark's last
// argument is the SIMD target (an index into attnkit::all_simd_targets; the ones this CPU lacks
// are skipped), and FLOPS counts 2 per multiply-add.
//   BM_fma_peak/threads:1/target:            the FMA peak (bench/roofline.hpp).
//   BM_kernel_scores<S>/blocks/target:       S = Q K^T of a GQA group's 4 query rows x 64 keys of
//                                            d 128 (detail::scores, the decode's score block), K
//                                            in storage type S; `blocks` blocks of 64 keys in
//                                            turn: 1 (L1) or 16 (256-512 KiB: L2).
//   BM_kernel_pv<S>/blocks/target:           O += P V for the same shape (detail::accumulate_pv).
//   BM_kernel_softmax_rows/target:           the online softmax of a 4 x 64 score block
//                                            (detail::softmax_rows); items = scores.
//   BM_kernel_mla_scores<S>/target,          absorbed MLA's decode tiles (16 heads against 64
//   BM_kernel_mla_pv<S>/target:              latent rows of 576, d_v 512: detail::scores_columns,
//                                            detail::pv_columns), the latent block (72 KiB in
//                                            bf16) read from L2 by each tile of heads.
#include <attnkit/attention.hpp>
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "roofline.hpp"

namespace {
namespace ak = attnkit;
using ak::bf16;

constexpr std::int64_t ROWS = 4, KEYS = 64, D = 128;               // a GQA decode block
constexpr std::int64_t MLA_HEADS = 16, MLA_D = 576, MLA_DV = 512;  // DeepSeek-V2-Lite

/// n elements of S on a cache line, as the library's caches and workspaces are: in a
/// std::vector (16-byte aligned) an AVX-512 vector straddles two lines, and a kernel's figure
/// then moved with where the allocator happened to place its operands.
template <class S>
struct aligned_values {
  std::unique_ptr<S[], ak::detail::aligned_free> p;
  S* data() const { return p.get(); }
};

template <class S>
aligned_values<S> random_values(std::int64_t n, unsigned seed, float scale = 1.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  aligned_values<S> v{ak::detail::aligned_alloc_array<S>(n)};
  for (std::int64_t i = 0; i < n; ++i) v.data()[i] = S(scale * nd(rng));
  return v;
}

aligned_values<float> zeros(std::int64_t n) {
  aligned_values<float> v{ak::detail::aligned_alloc_array<float>(n)};
  std::fill_n(v.data(), n, 0.f);
  return v;
}

/// The timing loop of a kernel benchmark: `run` once per iteration, `out` kept, FLOPs per
/// iteration reported as a rate, the target's name as the label.
template <class Run>
void time_kernel(benchmark::State& state, const ak::bench::target_scope& target,
                 double flops_per_iteration, float* out, Run&& run) {
  for (auto _ : state) {
    run();
    benchmark::DoNotOptimize(out);
  }
  state.counters["FLOPS"] =
      benchmark::Counter(flops_per_iteration, benchmark::Counter::kIsIterationInvariantRate,
                         benchmark::Counter::OneK::kIs1000);
  state.SetLabel(target.name());
}

template <class S>
void BM_kernel_scores(benchmark::State& state) {
  const ak::bench::target_scope target(state, 1);
  if (!target.ok()) return;
  const std::int64_t blocks = state.range(0);
  const auto k = random_values<S>(blocks * KEYS * D, 1);        // [blocks * 64][128]
  const auto q = random_values<float>(ROWS * D, 2);             // [4][128] (paired order for bf16)
  const auto s = zeros(ROWS * KEYS);                            // [4][64]
  time_kernel(state, target, 2.0 * ROWS * KEYS * D * static_cast<double>(blocks), s.data(), [&] {
    for (std::int64_t b = 0; b < blocks; ++b)
      ak::detail::scores(q.data(), D, ROWS, k.data() + b * KEYS * D, D, KEYS, D, s.data(), KEYS,
                         false);
  });
}

template <class S>
void BM_kernel_pv(benchmark::State& state) {
  const ak::bench::target_scope target(state, 1);
  if (!target.ok()) return;
  const std::int64_t blocks = state.range(0);
  const auto v = random_values<S>(blocks * KEYS * D, 1);          // [blocks * 64][128]
  const auto p = random_values<float>(ROWS * KEYS, 2, 0.01f);     // [4][64]
  const auto o = zeros(ROWS * D);                                 // [4][128]
  time_kernel(state, target, 2.0 * ROWS * KEYS * D * static_cast<double>(blocks), o.data(), [&] {
    for (std::int64_t b = 0; b < blocks; ++b)
      ak::detail::accumulate_pv(p.data(), KEYS, ROWS, v.data() + b * KEYS * D, D, KEYS, D, o.data(),
                                D, false);
  });
}

void BM_kernel_softmax_rows(benchmark::State& state) {
  const ak::bench::target_scope target(state, 0);
  if (!target.ok()) return;
  // The block is softmaxed in place each iteration: after the first, its scores are the last
  // probabilities and the running max stays (no rescale), the common case of a long decode.
  const auto s = random_values<float>(ROWS * KEYS, 1, 3.f);  // [4][64]
  std::vector<float> max(ROWS, -INFINITY), sum(ROWS, 0.f), alpha(ROWS);
  for (auto _ : state) {
    ak::detail::softmax_rows(s.data(), KEYS, ROWS, KEYS, max.data(), sum.data(), alpha.data());
    benchmark::DoNotOptimize(s.data());
    benchmark::DoNotOptimize(sum.data());
  }
  state.SetItemsProcessed(state.iterations() * ROWS * KEYS);
  state.SetLabel(target.name());
}

template <class S>
void BM_kernel_mla_scores(benchmark::State& state) {
  const ak::bench::target_scope target(state, 0);
  if (!target.ok()) return;
  const auto k = random_values<S>(KEYS * MLA_D, 1);                  // latent rows [64][576]
  const auto q = random_values<float>(MLA_HEADS * MLA_D, 2);         // [16][576]
  const auto s = zeros(KEYS * MLA_HEADS);                            // S^T [64][16]
  ak::detail::no_prefetch pf;
  time_kernel(state, target, 2.0 * MLA_HEADS * KEYS * MLA_D, s.data(), [&] {
    ak::detail::scores_columns(q.data(), MLA_D, MLA_HEADS,
                               ak::detail::strided_rows<S>{k.data(), MLA_D}, KEYS, MLA_D, s.data(),
                               MLA_HEADS, pf);
  });
}

template <class S>
void BM_kernel_mla_pv(benchmark::State& state) {
  const ak::bench::target_scope target(state, 0);
  if (!target.ok()) return;
  const auto v = random_values<S>(KEYS * MLA_D, 1);                         // latent rows [64][576]
  const auto p = random_values<float>(KEYS * MLA_HEADS, 2, 0.01f);          // P^T [64][16]
  const auto o = zeros(MLA_HEADS * MLA_DV);                                 // [16][512]
  ak::detail::no_prefetch pf;
  time_kernel(state, target, 2.0 * MLA_HEADS * KEYS * MLA_DV, o.data(), [&] {
    ak::detail::pv_columns(p.data(), MLA_HEADS, ak::detail::strided_rows<S>{v.data(), MLA_D}, KEYS,
                           MLA_DV, o.data(), MLA_DV, pf);
  });
}

void block_args(benchmark::internal::Benchmark* b) {
  for (const std::int64_t t : ak::bench::target_args())
    for (const std::int64_t blocks : {1, 16}) b->Args({blocks, t});
  b->ArgNames({"blocks", "target"});
}
void target_only(benchmark::internal::Benchmark* b) {
  for (const std::int64_t t : ak::bench::target_args()) b->Arg(t);
  b->ArgName("target");
}

}  // namespace

BENCHMARK_TEMPLATE(BM_kernel_scores, float)->Apply(block_args);
BENCHMARK_TEMPLATE(BM_kernel_scores, bf16)->Apply(block_args);
BENCHMARK_TEMPLATE(BM_kernel_pv, float)->Apply(block_args);
BENCHMARK_TEMPLATE(BM_kernel_pv, bf16)->Apply(block_args);
BENCHMARK(BM_kernel_softmax_rows)->Apply(target_only);
BENCHMARK_TEMPLATE(BM_kernel_mla_scores, float)->Apply(target_only);
BENCHMARK_TEMPLATE(BM_kernel_mla_scores, bf16)->Apply(target_only);
BENCHMARK_TEMPLATE(BM_kernel_mla_pv, float)->Apply(target_only);
BENCHMARK_TEMPLATE(BM_kernel_mla_pv, bf16)->Apply(target_only);
BENCHMARK_MAIN();
