#pragma once
// Online (streaming) softmax: the state (running max, running sum, accumulator) of one
// attention row, updated one key block at a time and merged across key splits with
// log-sum-exp rescaling. LSE is returned in natural log. A row that saw no unmasked key has
// max = -inf and sum = 0; it finalises to output 0 and LSE -inf, never NaN.
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "error.hpp"
#include "simd.hpp"

namespace attnkit {

struct softmax_row_state {
  float max = -std::numeric_limits<float>::infinity();
  float sum = 0.f;
};

namespace detail {
constexpr float neg_inf = -std::numeric_limits<float>::infinity();

/// Absorbs one block of scores: s[0, n) become the unnormalised probabilities exp(s - max').
/// Returns the factor by which the caller must rescale the row's accumulator (1 if unchanged,
/// 0 while the row is still fully masked).
inline float softmax_absorb(softmax_row_state& st, float* s, std::int64_t n) {
  const float block_max = row_max(s, n);
  const float new_max = block_max > st.max ? block_max : st.max;
  if (new_max == neg_inf) {  // everything masked so far: probabilities are all zero
    for (std::int64_t i = 0; i < n; ++i) s[i] = 0.f;
    return 1.f;
  }
  const float alpha = st.max == neg_inf ? 0.f : std::exp(st.max - new_max);
  st.sum = st.sum * alpha + exp_shift_sum(s, n, new_max);
  st.max = new_max;
  return alpha;
}

/// a <- merge(a, b): a's accumulator (d floats) and state absorb b's.
inline void softmax_merge(softmax_row_state& a, float* acc_a, const softmax_row_state& b, const float* acc_b,
                          std::int64_t d) {
  if (b.max == neg_inf) return;
  if (a.max == neg_inf) {
    a = b;
    for (std::int64_t i = 0; i < d; ++i) acc_a[i] = acc_b[i];
    return;
  }
  const float m = a.max > b.max ? a.max : b.max;
  const float fa = std::exp(a.max - m), fb = std::exp(b.max - m);
  for (std::int64_t i = 0; i < d; ++i) acc_a[i] = acc_a[i] * fa + acc_b[i] * fb;
  a.sum = a.sum * fa + b.sum * fb;
  a.max = m;
}

/// out = acc / sum (0 for a fully masked row); returns the natural-log LSE (-inf if masked).
inline float softmax_finalize(const softmax_row_state& st, const float* acc, float* out, std::int64_t out_stride,
                              std::int64_t d) {
  if (st.sum == 0.f) {
    for (std::int64_t i = 0; i < d; ++i) out[i * out_stride] = 0.f;
    return neg_inf;
  }
  const float inv = 1.f / st.sum;
  for (std::int64_t i = 0; i < d; ++i) out[i * out_stride] = acc[i] * inv;
  return st.max + std::log(st.sum);
}
}  // namespace detail

/// Online softmax over `rows` independent rows, each with a `dim`-wide value accumulator:
/// out_r = sum_t softmax(scores_r)_t * values_t, fed block by block. The kernels use the same
/// row primitives; this class is the public, self-contained form (tests, custom kernels).
class online_softmax {
 public:
  online_softmax(std::int64_t rows, std::int64_t dim)
      : rows_(rows), dim_(dim), state_(static_cast<std::size_t>(rows)), acc_(static_cast<std::size_t>(rows * dim)) {
    detail::require(rows >= 0 && dim >= 0, "online_softmax: rows and dim must be >= 0, got rows=", rows,
                    ", dim=", dim);
  }
  std::int64_t rows() const { return rows_; }
  std::int64_t dim() const { return dim_; }
  const softmax_row_state& state(std::int64_t r) const { return state_[static_cast<std::size_t>(r)]; }

  /// Absorbs n keys for row r: scores[n] (use -inf to mask) and values[n][dim] (row stride
  /// `value_stride`). `scores` is used as scratch.
  void update(std::int64_t r, float* scores, const float* values, std::int64_t n, std::int64_t value_stride) {
    float* acc = acc_.data() + r * dim_;
    const float alpha = detail::softmax_absorb(state_[static_cast<std::size_t>(r)], scores, n);
    if (alpha != 1.f) detail::scale_row(acc, dim_, alpha);
    for (std::int64_t t = 0; t < n; ++t) {
      if (scores[t] == 0.f) continue;
      for (std::int64_t i = 0; i < dim_; ++i) acc[i] += scores[t] * values[t * value_stride + i];
    }
  }

  /// Absorbs another softmax over a disjoint key set (same rows and dim).
  void merge(const online_softmax& other) {
    detail::require(other.rows_ == rows_ && other.dim_ == dim_, "online_softmax::merge: shapes differ: [", rows_,
                    ", ", dim_, "] vs [", other.rows_, ", ", other.dim_, "]");
    for (std::int64_t r = 0; r < rows_; ++r)
      detail::softmax_merge(state_[static_cast<std::size_t>(r)], acc_.data() + r * dim_,
                            other.state_[static_cast<std::size_t>(r)], other.acc_.data() + r * dim_, dim_);
  }

  /// Writes the normalised row outputs (out[rows][dim], row stride out_stride) and, if lse is
  /// non-null, the natural-log log-sum-exp of every row.
  void finalize(float* out, std::int64_t out_stride, float* lse = nullptr) const {
    for (std::int64_t r = 0; r < rows_; ++r) {
      const float l = detail::softmax_finalize(state_[static_cast<std::size_t>(r)], acc_.data() + r * dim_,
                                               out + r * out_stride, 1, dim_);
      if (lse) lse[r] = l;
    }
  }

 private:
  std::int64_t rows_, dim_;
  std::vector<softmax_row_state> state_;
  std::vector<float> acc_;
};

}  // namespace attnkit
