#pragma once
// RMSNorm as DeepSeek and Llama define it: y = x / sqrt(mean(x^2) + eps) * w, computed in
// double for the mean (fp32 in, fp32 out), weight optional (empty = 1).
#include <cmath>
#include <cstdint>
#include <span>

namespace attnkit {

/// In place: x[i] <- x[i] / sqrt(mean(x^2) + eps) * weight[i] for x [n] (weight empty: 1),
/// accumulated in double.
inline void rms_norm(float* x, std::int64_t n, std::span<const float> weight, float eps) {
  double ss = 0;
  for (std::int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
  for (std::int64_t i = 0; i < n; ++i)
    x[i] = x[i] * inv * (weight.empty() ? 1.f : weight[static_cast<std::size_t>(i)]);
}

}  // namespace attnkit
