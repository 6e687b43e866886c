#pragma once
// Double-precision TPA (T6) from the paper's definitions: Q, K, V materialised per token as
// scaled sums of rank-one tensor products, then plain attention.
#include <optional>
#include <span>
#include <utility>

#include "attention.hpp"

namespace attnkit::reference {

/// X [T, H*d] with X[t, h] = scale * sum_r A[t, (r, h)] B[t, (r, :)]; A [T, R*H], B [T, R*d].
inline matrix tpa_materialise(const matrix& a, const matrix& b, std::int64_t rank,
                              std::int64_t heads, double scale) {
  const std::int64_t t = a.rows(), d = b.cols() / rank;
  matrix x = matrix::Zero(t, heads * d);
  for (std::int64_t i = 0; i < t; ++i)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t r = 0; r < rank; ++r)
        x.row(i).segment(h * d, d) += scale * a(i, r * heads + h) * b.row(i).segment(r * d, d);
  return x;
}

/// T6 weights in double (nn.Linear layout). W_A_* output index is h * R + r (T6's view(H, R));
/// fixed factors a_* are [R, H]. Empty = absent; q_proj replaces the query factors (KV-only).
struct tpa_weights {
  matrix w_a_q;   ///< [H R_Q, D]
  matrix w_b_q;   ///< [R_Q d, D]
  matrix q_proj;  ///< [H d, D] (KV-only) or empty
  matrix w_a_k;   ///< [H R_K, D]
  matrix w_b_k;   ///< [R_K d, D]
  matrix w_a_v;   ///< [H R_V, D]
  matrix w_b_v;   ///< [R_V d_v, D]
  matrix o_proj;  ///< [D, H d_v]
  matrix a_q;     ///< [R_Q, H] fixed factors or empty
  matrix a_k;     ///< [R_K, H] fixed factors or empty
  matrix a_v;     ///< [R_V, H] fixed factors or empty
};

/// The TPA geometry and 1/R scales the reference needs.
struct tpa_shape {
  std::int64_t heads;       ///< H
  std::int64_t head_dim;    ///< d
  std::int64_t v_head_dim;  ///< d_v
  std::int64_t q_rank;      ///< R_Q
  std::int64_t k_rank;      ///< R_K
  std::int64_t v_rank;      ///< R_V
  double q_scale;           ///< on the query factors
  double k_scale;           ///< on the key factors
  double v_scale;           ///< on the value factors
};

/// The factor matrix A [T, R*H] (index r*H + h) of tokens x: from W_A (T6 layout) or fixed.
inline matrix tpa_factor_a(const matrix& x, const matrix& w_a, const matrix& fixed,
                           std::int64_t rank, std::int64_t heads) {
  matrix a(x.rows(), rank * heads);
  const matrix raw = w_a.size() ? matrix(x * w_a.transpose()) : matrix();
  for (std::int64_t i = 0; i < x.rows(); ++i)
    for (std::int64_t r = 0; r < rank; ++r)
      for (std::int64_t h = 0; h < heads; ++h)
        a(i, r * heads + h) = w_a.size() ? raw(i, h * rank + r) : fixed(r, h);
  return a;
}

/// Rows of m [T, blocks * d] rotated block by block at the tokens' positions: TPA's B rows (or
/// materialised heads) all take the first KV head's frequency table.
inline matrix rope_blocks(matrix m, std::int64_t blocks, std::int64_t d,
                          std::span<const std::int64_t> positions, const rope_config& rope) {
  rope_config r = rope;
  r.frequency_index.clear();
  if (!rope.frequency_index.empty()) r.frequency_index = {rope.frequency_index[0]};
  for (std::int64_t i = 0; i < m.rows(); ++i)
    for (std::int64_t b = 0; b < blocks; ++b)
      rope_rotate(m.row(i).data() + b * d, d, positions[static_cast<std::size_t>(i)], r);
  return m;
}

/// What a factorized cache holds for T tokens (A's index r H + h).
struct tpa_kv_factors {
  matrix a_k;  ///< [T, R_K H]
  matrix b_k;  ///< [T, R_K d], roped
  matrix a_v;  ///< [T, R_V H]
  matrix b_v;  ///< [T, R_V d_v]
};

/// The factors a factorized cache holds for tokens x at positions.
inline tpa_kv_factors tpa_cache_factors(const matrix& x, std::span<const std::int64_t> positions,
                                        const tpa_weights& w, const tpa_shape& s,
                                        const rope_config& rope) {
  return {tpa_factor_a(x, w.w_a_k, w.a_k, s.k_rank, s.heads),
          rope_blocks(x * w.w_b_k.transpose(), s.k_rank, s.head_dim, positions, rope),
          tpa_factor_a(x, w.w_a_v, w.a_v, s.v_rank, s.heads), x * w.w_b_v.transpose()};
}

/// The materialised per-head Q, K (roped) and V [T, H d] of tokens x. rope_on_b: rotate the
/// rows of B_Q and B_K (as attnkit does) or, if false, the materialised Q and K heads (the
/// paper's Theorem: the same).
inline attention_heads tpa_heads(const matrix& x, std::span<const std::int64_t> positions,
                                 const tpa_weights& w, const tpa_shape& s, const rope_config& rope,
                                 bool rope_on_b = true) {
  const std::int64_t h = s.heads, d = s.head_dim;
  auto rope_rows_of = [&](matrix m, std::int64_t blocks) {
    return rope_blocks(std::move(m), blocks, d, positions, rope);
  };
  matrix q;
  if (w.q_proj.size()) {
    q = rope_rows_of(x * w.q_proj.transpose(), h);
  } else {
    const matrix bq = x * w.w_b_q.transpose();
    q = tpa_materialise(tpa_factor_a(x, w.w_a_q, w.a_q, s.q_rank, h),
                        rope_on_b ? rope_rows_of(bq, s.q_rank) : bq, s.q_rank, h, s.q_scale);
    if (!rope_on_b) q = rope_rows_of(q, h);
  }
  const matrix bk = x * w.w_b_k.transpose();
  matrix k = tpa_materialise(tpa_factor_a(x, w.w_a_k, w.a_k, s.k_rank, h),
                             rope_on_b ? rope_rows_of(bk, s.k_rank) : bk, s.k_rank, h, s.k_scale);
  if (!rope_on_b) k = rope_rows_of(k, h);
  const matrix v = tpa_materialise(tpa_factor_a(x, w.w_a_v, w.a_v, s.v_rank, h),
                                   x * w.w_b_v.transpose(), s.v_rank, h, s.v_scale);
  return {q, k, v};
}

/// y for tokens x [T, D] (causal on positions).
inline matrix tpa_forward(const matrix& x, std::span<const std::int64_t> positions,
                          const tpa_weights& w, const tpa_shape& s, const rope_config& rope,
                          double softmax_scale, bool rope_on_b = true,
                          std::optional<std::int64_t> window = {}) {
  const attention_heads a = tpa_heads(x, positions, w, s, rope, rope_on_b);
  const auto att = attention(a.q, positions, a.k, a.v, positions, s.heads, s.heads, softmax_scale,
                             true, window);
  return att.out * w.o_proj.transpose();
}

}  // namespace attnkit::reference
