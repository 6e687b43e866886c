#pragma once
// Row helpers of the kernels: conversions into storage types, NaN-keeping max, scaling; the
// vector loops (exp, row max, widening loads, micro-kernels) are compiled once per instruction
// set in simd/targets.hpp and run on the active one. Internal: the API is in attnkit::detail.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../simd/targets.hpp"
#include "storage.hpp"

namespace attnkit::detail {

/// Converts n floats into storage type S (round to nearest even).
template <storage_type S>
inline void from_float_row(const float* src, S* dst, std::int64_t n) {
  if constexpr (std::same_as<S, float>) {
    std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(float));
  } else {
    for (std::int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(src[i]);
  }
}

/// n floats at src[i * stride] into storage type S at dst[0, n).
template <storage_type S>
inline void from_float_strided(const float* src, std::int64_t stride, S* dst, std::int64_t n) {
  if (stride == 1) {
    from_float_row(src, dst, n);
  } else {
    for (std::int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(src[i * stride]);
  }
}

/// max(a, b), NaN if either is NaN: a NaN score must reach the softmax state, whose max then
/// carries it to the row's output and LSE (std::max and a > b ? a : b drop it).
inline float max_nan(float a, float b) { return a != a || a > b ? a : b; }

/// x[i] *= a.
inline void scale_row(float* x, std::int64_t n, float a) {
  ATTNKIT_SIMD_DISPATCH(scale_row(x, n, a))
}

}  // namespace attnkit::detail
