#pragma once
// The machine's streaming read bandwidth: the yardstick that the decode benchmarks
// (roofline.hpp, BM_read_bandwidth) and attnkit-compare --batch divide a kernel's KV bytes per
// second by. Each of `threads` workers sums its share of a buffer far larger than the caches,
// allocated like a KV cache (2 MiB-aligned, huge pages advised) so that the yardstick and the
// kernels read memory the same way.
//
// The sum is written with GCC / Clang vector types, four independent 64-byte accumulators of
// 64-bit integers, so that it keeps up with the memory whatever -march the includer builds with:
// a plain loop is vectorised or not depending on -O and -march, and a sum slower than the memory
// measures the adder, not the memory (a scalar sum built without -march read half of what this
// one reads, and attnkit-compare then put a decode at 134% of the "bandwidth").
#include <attnkit/core/aligned_buffer.hpp>
#include <attnkit/core/executor.hpp>

#include <cstdint>
#include <cstring>
#include <vector>

namespace attnkit::bench {

class read_stream {
 public:
  /// A buffer of `bytes` (rounded down to whole 256-byte steps per worker), written once.
  explicit read_stream(std::int64_t bytes = std::int64_t{1} << 30)
      : words_(bytes / 8 / step_words * step_words),
        buf_(detail::aligned_alloc_array<std::uint64_t>(words_)) {
    for (std::int64_t i = 0; i < words_; ++i) buf_[i] = static_cast<std::uint64_t>(i);
  }
  std::int64_t bytes() const { return words_ * 8; }  ///< bytes one pass reads.

  /// One pass over the buffer, split into `threads` contiguous parts run on pool's workers.
  template <class Executor>
  std::uint64_t pass(Executor& pool, int threads) const {
    std::vector<std::uint64_t> sums(static_cast<std::size_t>(threads));
    const std::int64_t part = words_ / threads / step_words * step_words;
    pool.parallel_for(threads, [&](std::int64_t t) {
      sums[static_cast<std::size_t>(t)] = sum(buf_.get() + t * part, part);
    });
    std::uint64_t s = 0;
    for (const std::uint64_t x : sums) s += x;
    return s;
  }

 private:
  static constexpr std::int64_t step_words = 32;  // 256 bytes: four 64-byte vectors

  /// Sum of n words (n a multiple of step_words).
  static std::uint64_t sum(const std::uint64_t* p, std::int64_t n) {
    using v8 = std::uint64_t __attribute__((vector_size(64)));
    v8 a{}, b{}, c{}, d{};
    for (std::int64_t i = 0; i < n; i += step_words) {
      v8 x[4];
      std::memcpy(x, p + i, sizeof x);
      a += x[0], b += x[1], c += x[2], d += x[3];
    }
    a += b + c + d;
    std::uint64_t s = 0;
    for (int j = 0; j < 8; ++j) s += a[j];
    return s;
  }

  std::int64_t words_;
  std::unique_ptr<std::uint64_t[], detail::aligned_free> buf_;
};

}  // namespace attnkit::bench
