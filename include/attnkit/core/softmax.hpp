#pragma once
// Online (streaming) softmax. The state of a set of attention rows is one type, softmax_state:
// per row the running max and the running sum of exp(s - max) (struct of arrays, so the column
// form below vectorises across rows), next to each row's value accumulator. Scores come in one
// key block at a time, in one of two layouts:
//   row form     the block's scores of one row are contiguous (softmax_absorb_row);
//   column form  the block's scores of one key are contiguous across rows (softmax_columns, in
//                simd/targets.hpp: vectorised across rows on every target).
// Key splits are merged with log-sum-exp rescaling; the LSE is natural log. A row that saw no
// unmasked key (or only -inf logits) has max = -inf and sum = 0; it finalises to output 0 and
// LSE -inf. A NaN logit makes the row's sum NaN (its p is exp(NaN) = NaN; the row form's max is
// NaN too), and so does a +inf logit (exp(inf - inf)); either way the row finalises to NaN
// output and NaN LSE, as the reference and PyTorch give: one input, one answer on every path
// (docs/math.md, "Special values").
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "error.hpp"
#include "simd.hpp"
#include "view.hpp"

namespace attnkit {

/// Running max and sum of `rows` softmax rows (non-owning).
struct softmax_state {
  float* max = nullptr;  ///< [rows] running maxima of the scores
  float* sum = nullptr;  ///< [rows] running sums of exp(score - max)
  /// Starts `rows` empty rows: max -inf, sum 0.
  void reset(std::int64_t rows) const {
    for (std::int64_t r = 0; r < rows; ++r)
      max[r] = -std::numeric_limits<float>::infinity(), sum[r] = 0.f;
  }
};

namespace detail {
constexpr float neg_inf = -std::numeric_limits<float>::infinity();

/// Row form: s[0, n) become the unnormalised probabilities exp(s - max'). Returns the factor by
/// which the row's accumulator must be rescaled (1 if unchanged, 0 the first time a row that was
/// fully masked sees a key). One row of softmax_rows (simd/targets.hpp).
inline float softmax_absorb_row(float& max, float& sum, float* s, std::int64_t n) {
  float alpha;
  softmax_rows(s, n, 1, n, &max, &sum, &alpha);
  return alpha;
}

/// A given normalisation (a row whose LSE is known): p = exp(x - lse); 0 when lse is -inf (the
/// row sees no key, so every x is -inf too).
inline float exp_given(float x, float lse) {
  return std::exp(x - (lse == neg_inf ? std::numeric_limits<float>::infinity() : lse));
}
/// s[0, n) <- exp_given(s, lse).
inline void exp_given_row(float* s, std::int64_t n, float lse) {
  exp_shift_sum(s, n, lse == neg_inf ? std::numeric_limits<float>::infinity() : lse);
}
/// (max_a, sum_a, acc_a) <- merge with (max_b, sum_b, acc_b) over a disjoint key set (d floats).
inline void softmax_merge(float& max_a, float& sum_a, float* acc_a, float max_b, float sum_b,
                          const float* acc_b, std::int64_t d) {
  // A side with sum 0 saw no key, or only keys of logit -inf (a NaN sum, from a NaN score, is
  // not empty): its accumulator holds their 0 * v terms, 0 or NaN (0 * inf), and the NaNs
  // join the other side's as one pass over all keys would have them (docs/math.md 3.1).
  if (sum_b == 0.f) {
    scale_add_row(acc_a, 1.f, acc_b, 0.f, d);
    return;
  }
  if (sum_a == 0.f) {
    max_a = max_b, sum_a = sum_b;
    scale_add_row(acc_a, 0.f, acc_b, 1.f, d);
    return;
  }
  const float m = max_nan(max_a, max_b);
  const float fa = std::exp(max_a - m), fb = std::exp(max_b - m);
  scale_add_row(acc_a, fa, acc_b, fb, d);
  sum_a = sum_a * fa + sum_b * fb;
  max_a = m;
}

/// out = acc / sum (0 for a fully masked row), out float or bf16 (rounded once, to nearest
/// even); returns the natural-log LSE (-inf if masked). A finite `sink` logit joins the
/// denominator with no value (gpt-oss attention sinks).
template <class O>
requires std::same_as<O, float> || std::same_as<O, bf16>
inline float softmax_finalize(float max, float sum, const float* acc, O* out,
                              std::int64_t out_stride, std::int64_t d, float sink = neg_inf) {
  float factor = 1.f;  // exp(max - max') where the sink raises the max
  if (sink != neg_inf) {
    const float m = max_nan(max, sink);
    factor = max == neg_inf ? 0.f : std::exp(max - m);
    sum = sum * factor + std::exp(sink - m);
    max = m;
  }
  if (sum == 0.f) {
    for (std::int64_t i = 0; i < d; ++i) out[i * out_stride] = O(0.f);
    return neg_inf;
  }
  const float inv = factor / sum;
  if (out_stride == 1)
    scale_row_to(acc, out, d, inv);
  else
    for (std::int64_t i = 0; i < d; ++i) out[i * out_stride] = O(acc[i] * inv);
  return max + std::log(sum);
}
}  // namespace detail

/// Online softmax over `rows` independent rows, each with a `dim`-wide value accumulator:
/// out_r = sum_t softmax(scores_r)_t * values_t, fed block by block. The kernels use the same
/// state and row primitives; this class is the public, self-contained form (tests, custom kernels).
class online_softmax {
 public:
  /// `rows` empty rows with [rows, dim] zero accumulators (allocated now).
  online_softmax(std::int64_t rows, std::int64_t dim) : rows_(rows), dim_(dim) {
    detail::require(rows >= 0 && dim >= 0,
                    "online_softmax: rows and dim must be >= 0, got rows=", rows, ", dim=", dim);
    const std::int64_t acc = detail::checked_mul(rows, dim, "online_softmax: rows * dim");
    max_.assign(static_cast<std::size_t>(rows), detail::neg_inf);
    sum_.assign(static_cast<std::size_t>(rows), 0.f);
    acc_.assign(static_cast<std::size_t>(acc), 0.f);
  }
  std::int64_t rows() const { return rows_; }  ///< independent softmax rows
  std::int64_t dim() const { return dim_; }    ///< width of each row's value accumulator
  /// Row r's running max.
  float max(std::int64_t r) const { return max_[static_cast<std::size_t>(r)]; }
  /// Row r's running sum of exp(score - max).
  float sum(std::int64_t r) const { return sum_[static_cast<std::size_t>(r)]; }

  /// Absorbs n keys for row r: scores[n] (use -inf to mask) and values[n][dim] (row stride
  /// `value_stride`). `scores` is used as scratch.
  void update(std::int64_t r, float* scores, const float* values, std::int64_t n,
              std::int64_t value_stride) {
    const auto i = static_cast<std::size_t>(r);
    float* acc = acc_.data() + r * dim_;
    const float alpha = detail::softmax_absorb_row(max_[i], sum_[i], scores, n);
    if (alpha != 1.f) detail::scale_row(acc, dim_, alpha);
    for (std::int64_t t = 0; t < n; ++t)
      for (std::int64_t c = 0; c < dim_; ++c) acc[c] += scores[t] * values[t * value_stride + c];
  }

  /// Absorbs another softmax over a disjoint key set (same rows and dim).
  void merge(const online_softmax& other) {
    detail::require(other.rows_ == rows_ && other.dim_ == dim_,
                    "online_softmax::merge: shapes differ: [", rows_, ", ", dim_, "] vs [",
                    other.rows_, ", ", other.dim_, "]");
    for (std::size_t r = 0; r < max_.size(); ++r)
      detail::softmax_merge(max_[r], sum_[r], acc_.data() + r * dim_, other.max_[r], other.sum_[r],
                            other.acc_.data() + r * dim_, dim_);
  }

  /// Writes the normalised row outputs (out[rows][dim], row stride out_stride) and, if lse is
  /// non-null, the natural-log log-sum-exp of every row.
  void finalize(float* out, std::int64_t out_stride, float* lse = nullptr) const {
    for (std::size_t r = 0; r < max_.size(); ++r) {
      const float l =
          detail::softmax_finalize(max_[r], sum_[r], acc_.data() + r * dim_,
                                   out + static_cast<std::int64_t>(r) * out_stride, 1, dim_);
      if (lse) lse[r] = l;
    }
  }

 private:
  std::int64_t rows_, dim_;
  std::vector<float> max_, sum_, acc_;
};

/// Merges two attention results over disjoint key sets (cascade attention: a shared prefix and
/// a per-sequence suffix; key splits computed elsewhere): o_a, o_b, out [T, H, d] with their
/// natural-log LSEs lse_a, lse_b, lse_out [T, H]. out = (e^lse_a o_a + e^lse_b o_b) / e^lse_out,
/// lse_out = log(e^lse_a + e^lse_b). A side that saw no key (LSE -inf) contributes nothing; both
/// empty give 0 and -inf. out and lse_out may alias either input. lse_out may be empty.
inline void merge_attention_states(tensor3_view<const float> o_a, matrix_view<const float> lse_a,
                                   tensor3_view<const float> o_b, matrix_view<const float> lse_b,
                                   tensor3_view<float> out, matrix_view<float> lse_out = {}) {
  const std::int64_t t = o_a.extent(0), h = o_a.extent(1), d = o_a.extent(2);
  detail::require_extents(lse_a, {t, h}, "merge_attention_states: lse_a");
  detail::require_extents(o_b, {t, h, d}, "merge_attention_states: o_b");
  detail::require_extents(lse_b, {t, h}, "merge_attention_states: lse_b");
  detail::require_extents(out, {t, h, d}, "merge_attention_states: out");
  if (!lse_out.empty()) detail::require_extents(lse_out, {t, h}, "merge_attention_states: lse_out");
  for (std::int64_t i = 0; i < t; ++i)
    for (std::int64_t j = 0; j < h; ++j) {
      const float la = lse_a(i, j), lb = lse_b(i, j);
      const float m = detail::max_nan(la, lb);
      float wa = 0.f, wb = 0.f, l = detail::neg_inf;
      if (m != detail::neg_inf) {
        const float ea = std::exp(la - m), eb = std::exp(lb - m), s = ea + eb;
        wa = ea / s, wb = eb / s, l = m + std::log(s);
      }
      for (std::int64_t c = 0; c < d; ++c) {
        const float a = wa == 0.f ? 0.f : wa * o_a(i, j, c),
                    b = wb == 0.f ? 0.f : wb * o_b(i, j, c);
        out(i, j, c) = a + b;
      }
      if (!lse_out.empty()) lse_out(i, j) = l;
    }
}

}  // namespace attnkit
