// GQA decode and causal prefill at the Llama-3-8B attention geometry (H 32, H_kv 8, d 128),
// with the machine's roofline (read bandwidth, FMA peak) measured in the same run.
// Decode is memory-bound: read bytes/s vs BM_read_bandwidth. Prefill is compute-bound: FLOPS
// vs BM_fma_peak. FLOPs per call: 2 * H * Tq * (d_qk + d_v) * Tk, halved for causal prefill.
// bf16 prefill runs three times: f32 products, bf16 products (product_math::bf16), and bf16
// products with bf16 queries and outputs.
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
using attnkit::bench::BM_gqa_decode_model_step;
using attnkit::bench::BM_gqa_prefill_causal;
using attnkit::bench::D;
using attnkit::bench::filled_cache;
using attnkit::bench::H;

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
BENCHMARK_TEMPLATE(BM_gqa_decode, ak::bf16, true, true)
    ->ArgsProduct({{1024, 4096, 16384}, {1, 2}, ak::bench::target_args()})
    ->ArgNames({"T", "threads", "target"})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
// Short decodes (the first tokens of a sequence): what a call costs besides its keys' work.
BENCHMARK_TEMPLATE(BM_gqa_decode, float)
    ->ArgsProduct({{1, 64}, {1, 2}})
    ->ArgNames({"T", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_gqa_decode, ak::bf16)
    ->ArgsProduct({{1, 64}, {1, 2}})
    ->ArgNames({"T", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_gqa_decode_model_step, float)
    ->ArgsProduct({{4096, 16384}, {1, 2}, ak::bench::target_args()})
    ->ArgNames({"T", "threads", "target"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_gqa_decode_model_step, ak::bf16)
    ->ArgsProduct({{4096, 16384}, {1, 2}, ak::bench::target_args()})
    ->ArgNames({"T", "threads", "target"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
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
BENCHMARK_TEMPLATE(BM_gqa_prefill_causal, ak::bf16, true, true, ak::bf16)
    ->ArgsProduct({{512, 2048}, {1, 2}, ak::bench::target_args()})
    ->ArgNames({"T", "threads", "target"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
