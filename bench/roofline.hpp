#pragma once
// The machine's own limits, measured in the same run as the kernels they judge:
//   BM_read_bandwidth/threads: streaming read of a 1 GiB buffer (DRAM bandwidth).
//   BM_fma_peak/threads:       independent FP32 FMA chains in registers (FLOP/s peak).
#include <attnkit/cache/dense_cache.hpp>
#include <attnkit/core/executor.hpp>
#include <attnkit/core/simd.hpp>
#include <attnkit/version.hpp>
#include <benchmark/benchmark.h>

#include "read_stream.hpp"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#if ATTNKIT_X86_TARGETS
#include <immintrin.h>
#endif

namespace attnkit::bench {

/// The "target" argument of a benchmark: an index into attnkit::all_simd_targets. target_args()
/// lists the targets this build has, so one run times every target side by side.
inline std::vector<std::int64_t> target_args() {
  std::vector<std::int64_t> out;
  for (std::size_t i = 0; i < all_simd_targets.size(); ++i)
    if (target_compiled(all_simd_targets[i])) out.push_back(static_cast<std::int64_t>(i));
  return out;
}

/// Runs the rest of a benchmark on the target of argument `arg` of `state` and restores the
/// previous target after; skips the benchmark where this CPU lacks it (ok() is then false).
class target_scope {
 public:
  target_scope(benchmark::State& state, int arg) : before_(active_target()) {
    const simd_target t = all_simd_targets.at(static_cast<std::size_t>(state.range(arg)));
    ok_ = cpu_supports(t);
    if (ok_)
      set_target(t);
    else
      state.SkipWithError((std::string(target_name(t)) + ": not supported by this CPU").c_str());
  }
  ~target_scope() { set_target(before_); }
  target_scope(const target_scope&) = delete;
  target_scope& operator=(const target_scope&) = delete;
  bool ok() const { return ok_; }
  const char* name() const { return target_name(active_target()); }

 private:
  simd_target before_;
  bool ok_ = false;
};

inline void BM_read_bandwidth(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  static const read_stream stream;  // 1 GiB, written once per process
  thread_pool pool(threads);
  for (auto _ : state) benchmark::DoNotOptimize(stream.pass(pool, threads));
  state.SetBytesProcessed(state.iterations() * stream.bytes());
}

/// 12 independent FMA chains of `lanes` floats for `iters` steps: the FLOP/s peak of the active
/// target (ATTNKIT_TARGET), compiled for it like the kernels. Every chain feeds the result: a
/// chain whose value is never used is dead code to the compiler, which then times one chain's
/// latency instead of the FMA units' throughput.
#if ATTNKIT_X86_TARGETS
__attribute__((target("avx512f"))) inline float fma_chains_avx512(std::int64_t iters) {
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(1.f + 0.001f * static_cast<float>(i));
  const __m512 b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
  for (std::int64_t it = 0; it < iters; ++it) {
    ATTNKIT_UNROLL  // (at -O2 GCC keeps a rolled loop's chains in memory: a store-load per FMA)
        for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(a[i], b, c);
  }
  for (int i = 1; i < 12; ++i) a[0] = _mm512_add_ps(a[0], a[i]);
  float out[16];
  _mm512_storeu_ps(out, a[0]);
  return out[0];
}
__attribute__((target("avx2,fma"))) inline float fma_chains_avx2(std::int64_t iters) {
  __m256 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(1.f + 0.001f * static_cast<float>(i));
  const __m256 b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
  for (std::int64_t it = 0; it < iters; ++it) {
    ATTNKIT_UNROLL  // (at -O2 GCC keeps a rolled loop's chains in memory: a store-load per FMA)
        for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], b, c);
  }
  for (int i = 1; i < 12; ++i) a[0] = _mm256_add_ps(a[0], a[i]);
  float out[8];
  _mm256_storeu_ps(out, a[0]);
  return out[0];
}
#endif

/// FLOPs per fma_chains iteration on the active target: 12 chains x lanes x 2.
inline std::int64_t fma_flops_per_iter() { return 12 * detail::simd_lanes() * 2; }

inline float fma_chains(std::int64_t iters) {
#if ATTNKIT_X86_TARGETS
  if (active_target() == simd_target::avx512) return fma_chains_avx512(iters);
  if (active_target() == simd_target::avx2) return fma_chains_avx2(iters);
#endif
  float a[12];
  for (int i = 0; i < 12; ++i) a[i] = 1.f + 0.001f * static_cast<float>(i);
  for (std::int64_t it = 0; it < iters; ++it) {
    ATTNKIT_UNROLL
    for (float& x : a) x = x * 0.999999f + 1e-7f;
  }
  float sum = 0;
  for (const float x : a) sum += x;
  return sum;
}

inline void BM_fma_peak(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  const target_scope target(state, 1);
  const std::int64_t iters = 1 << 22;
  thread_pool pool(threads);
  std::vector<float> out(static_cast<std::size_t>(threads));
  for (auto _ : state) {
    pool.parallel_for(
        threads, [&](std::int64_t t) { out[static_cast<std::size_t>(t)] = fma_chains(iters); });
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["FLOPS"] = benchmark::Counter(
      static_cast<double>(iters * fma_flops_per_iter() * threads),
      benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::OneK::kIs1000);
}

}  // namespace attnkit::bench

BENCHMARK(attnkit::bench::BM_read_bandwidth)
    ->Arg(1)
    ->Arg(2)
    ->ArgName("threads")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(attnkit::bench::BM_fma_peak)
    ->ArgsProduct({{1, 2}, attnkit::bench::target_args()})
    ->ArgNames({"threads", "target"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
