// GQA decode and causal prefill at the Llama-3-8B attention geometry (H 32, H_kv 8, d 128),
// with the machine's roofline (read bandwidth, FMA peak) measured in the same run.
// Decode is memory-bound: read bytes/s vs BM_read_bandwidth. Prefill is compute-bound: FLOPS
// vs BM_fma_peak. FLOPs per call: 2 * H * Tq * (d_qk + d_v) * Tk, halved for causal prefill.
// bf16 prefill runs twice: f32 products and bf16 products (product_math::bf16).
#include <attnkit/attention.hpp>

#include <atomic>
#include <random>
#include <string>
#include <thread>

#include "gqa_decode.hpp"
#include "roofline.hpp"

namespace {
namespace ak = attnkit;
using attnkit::bench::BM_gqa_decode;
using attnkit::bench::D;
using attnkit::bench::filled_cache;
using attnkit::bench::H;

/// Products: product_math::bf16 (bf16 caches; skipped where the target has no bf16 products).
template <ak::storage_type S, bool Products = false>
void BM_gqa_prefill_causal(benchmark::State& state) {
  const std::int64_t t = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  const ak::bench::target_scope target(state, 2);
  if (Products && target.ok() && !ak::bf16_products_available())
    state.SkipWithError("no bf16 products on this target");
  const ak::attention_options opt{.products = Products ? ak::product_math::bf16 : ak::product_math::f32};
  const auto cache = filled_cache<S>(t);
  std::vector<float> q(static_cast<std::size_t>(t * H * D)), out(q.size());
  std::mt19937 rng(2);
  std::normal_distribution<float> nd;
  for (auto& x : q) x = nd(rng);
  std::vector<std::int64_t> pos(cache.positions().begin(), cache.positions().end());
  ak::thread_pool pool(threads);
  ak::attention_workspace ws;
  for (auto _ : state) {
    ak::attend(ak::tensor3_view<const float>(q.data(), {t, H, D}), pos, cache,
               ak::tensor3_view<float>(out.data(), {t, H, D}), opt, pool, &ws);
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["FLOPS"] = benchmark::Counter(2.0 * H * t * (D + D) * t / 2,
                                               benchmark::Counter::kIsIterationInvariantRate,
                                               benchmark::Counter::OneK::kIs1000);
  state.SetLabel(std::string("compute-bound, ") + ak::storage_name<S>() +
                 (Products ? " products" : "") + ", " + target.name());
}
/// The fixed cost of one parallel_for of two trivial tasks (the hand-off every decode step
/// pays), for pools of 2 threads up to many more than the machine's hardware threads.
void BM_thread_pool_handoff(benchmark::State& state) {
  ak::thread_pool pool(static_cast<int>(state.range(0)));
  std::atomic<std::int64_t> sum{0};
  for (auto _ : state)
    pool.parallel_for(2, [&](std::int64_t i) { sum.fetch_add(i, std::memory_order_relaxed); });
  benchmark::DoNotOptimize(sum.load());
  state.SetLabel(std::to_string(std::thread::hardware_concurrency()) + " hardware threads");
}
}  // namespace

BENCHMARK(BM_thread_pool_handoff)
    ->ArgName("threads")
    ->Arg(2)
    ->Arg(4)
    ->Arg(8)
    ->Arg(32)
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_gqa_decode, float, true)
    ->ArgsProduct({{1024, 4096, 16384}, {1, 2}, ak::bench::target_args()})
    ->ArgNames({"T", "threads", "target"})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_gqa_decode, ak::bf16, true)
    ->ArgsProduct({{1024, 4096, 16384}, {1, 2}, ak::bench::target_args()})
    ->ArgNames({"T", "threads", "target"})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_gqa_prefill_causal, float)
    ->ArgsProduct({{512, 2048}, {1, 2}, ak::bench::target_args()})
    ->ArgNames({"T", "threads", "target"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_gqa_prefill_causal, ak::bf16)
    ->ArgsProduct({{512, 2048}, {1, 2}, ak::bench::target_args()})
    ->ArgNames({"T", "threads", "target"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_gqa_prefill_causal, ak::bf16, true)
    ->ArgsProduct({{512, 2048}, {1, 2}, ak::bench::target_args()})
    ->ArgNames({"T", "threads", "target"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
