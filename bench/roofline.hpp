#pragma once
// The machine's own limits, measured in the same run as the kernels they judge:
//   BM_read_bandwidth/threads: streaming read of a 1 GiB buffer (DRAM bandwidth).
//   BM_fma_peak/threads:       independent FP32 FMA chains in registers (FLOP/s peak).
#include <attnkit/cache/dense_cache.hpp>
#include <attnkit/core/executor.hpp>
#include <attnkit/core/simd.hpp>
#include <attnkit/version.hpp>
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#if ATTNKIT_HAS_AVX512
#include <immintrin.h>
#endif

namespace attnkit::bench {

inline float read_sum(const float* p, std::int64_t n) {
#if ATTNKIT_HAS_AVX512
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (std::int64_t i = 0; i + 64 <= n; i += 64) {
    a0 = _mm512_add_ps(a0, _mm512_load_ps(p + i));
    a1 = _mm512_add_ps(a1, _mm512_load_ps(p + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_load_ps(p + i + 32));
    a3 = _mm512_add_ps(a3, _mm512_load_ps(p + i + 48));
  }
  return detail::hsum16(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
  float s[8] = {};
  for (std::int64_t i = 0; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += p[i + j];
  return s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
#endif
}

inline void BM_read_bandwidth(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  const std::int64_t n = std::int64_t{1} << 28;  // 1 GiB of floats
  // Allocated like a cache buffer (2 MiB-aligned, huge pages advised) so that the kernels and
  // their yardstick read memory the same way.
  static auto buf = [&] {
    auto b = detail::aligned_alloc_array<float>(n);
    for (std::int64_t i = 0; i < n; ++i) b[i] = 1e-9f * static_cast<float>(i & 1023);
    return b;
  }();
  thread_pool pool(threads);
  std::vector<float> sums(static_cast<std::size_t>(threads));
  for (auto _ : state) {
    pool.parallel_for(threads, [&](std::int64_t t) {
      const std::int64_t chunk = n / threads;
      sums[static_cast<std::size_t>(t)] = read_sum(buf.get() + t * chunk, chunk);
    });
    benchmark::DoNotOptimize(sums.data());
  }
  state.SetBytesProcessed(state.iterations() * n * static_cast<std::int64_t>(sizeof(float)));
}

inline float fma_chains(std::int64_t iters) {
#if ATTNKIT_HAS_AVX512
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(1.f + 0.001f * static_cast<float>(i));
  const __m512 b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
  for (std::int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(a[i], b, c);
  __m512 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, a[i]);
  return detail::hsum16(s);
#else
  float a[12][8];
  for (auto& r : a)
    for (float& x : r) x = 1.f;
  for (std::int64_t it = 0; it < iters; ++it)
    for (auto& r : a)
      for (float& x : r) x = x * 0.999999f + 1e-7f;
  return a[0][0];
#endif
}

/// FLOPs per fma_chains iteration: 12 chains x 16 lanes x 2 (AVX-512), else 12 x 8 x 2.
constexpr std::int64_t fma_flops_per_iter = ATTNKIT_HAS_AVX512 ? 12 * 16 * 2 : 12 * 8 * 2;

inline void BM_fma_peak(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  const std::int64_t iters = 1 << 22;
  thread_pool pool(threads);
  std::vector<float> out(static_cast<std::size_t>(threads));
  for (auto _ : state) {
    pool.parallel_for(
        threads, [&](std::int64_t t) { out[static_cast<std::size_t>(t)] = fma_chains(iters); });
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["FLOPS"] = benchmark::Counter(
      static_cast<double>(iters * fma_flops_per_iter * threads),
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
    ->Arg(1)
    ->Arg(2)
    ->ArgName("threads")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
