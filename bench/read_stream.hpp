#pragma once
// The machine's streaming read bandwidth: the yardstick that the decode benchmarks
// (roofline.hpp, BM_read_bandwidth) and attnkit-compare --batch divide a kernel's KV bytes per
// second by. Each of `threads` workers sums its share of a 1 GiB buffer of floats, allocated like
// a KV cache (2 MiB-aligned, huge pages advised) so that the yardstick and the kernels read
// memory the same way.
//
// The sum runs the same code whatever -march the includer builds with: on x86 CPUs with AVX2 a
// copy compiled for AVX2 (per-function target), elsewhere the baseline one. A sum compiled for
// the includer's flags measured the flags: the compare tool's scalar one, built without -march,
// read far less than the memory gives and put the GQA batch above 100% of the "bandwidth". Of the
// loops tried (docs/benchmarks.md, 2026-12-07) this one, 8-float vectors summed into 64 lanes,
// read the most, so the shares measured against it are the conservative ones.
#include <attnkit/core/aligned_buffer.hpp>
#include <attnkit/core/cpu.hpp>

#include <cstdint>
#include <memory>
#include <vector>

namespace attnkit::bench {

class read_stream {
 public:
  /// A buffer of `bytes` (rounded down to whole 256-byte steps), written once.
  explicit read_stream(std::int64_t bytes = std::int64_t{1} << 30)
      : floats_(bytes / 256 * 64), buf_(attnkit::detail::aligned_alloc_array<float>(floats_)) {
    for (std::int64_t i = 0; i < floats_; ++i) buf_[i] = 1e-9f * static_cast<float>(i & 1023);
  }
  std::int64_t bytes() const { return floats_ * 4; }  ///< bytes one pass reads.

  /// One pass over the buffer, split into `threads` contiguous parts run on pool's workers.
  template <class Executor>
  float pass(Executor& pool, int threads) const {
    std::vector<float> sums(static_cast<std::size_t>(threads));
    const std::int64_t part = floats_ / threads / 64 * 64;
    pool.parallel_for(threads, [&](std::int64_t t) {
      sums[static_cast<std::size_t>(t)] = sum_best(buf_.get() + t * part, part);
    });
    float s = 0.f;
    for (const float x : sums) s += x;
    return s;
  }

 private:
  /// Sum of n floats (n a multiple of 64) in 64 independent lanes.
  static float sum(const float* p, std::int64_t n) {
    float s[64] = {};
    for (std::int64_t i = 0; i + 64 <= n; i += 64)
      for (int j = 0; j < 64; ++j) s[j] += p[i + j];
    float t = 0.f;
    for (const float x : s) t += x;
    return t;
  }
#if ATTNKIT_X86_TARGETS
  __attribute__((target("avx2"))) static float sum_avx2(const float* p, std::int64_t n) {
    return sum(p, n);
  }
#endif
  static float sum_best(const float* p, std::int64_t n) {
#if ATTNKIT_X86_TARGETS
    static const bool avx2 = attnkit::detail::detect_x86().avx2;
    if (avx2) return sum_avx2(p, n);
#endif
    return sum(p, n);
  }

  std::int64_t floats_;
  std::unique_ptr<float[], attnkit::detail::aligned_free> buf_;
};

}  // namespace attnkit::bench
