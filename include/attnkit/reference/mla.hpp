#pragma once
// Double-precision MLA written straight from DeepSeek-V2's equations (naive form: per-head keys
// and values materialised from the latent, biases applied where the tensors put them).
#include <cmath>
#include <optional>
#include <span>

#include "attention.hpp"

namespace attnkit::reference {

/// DeepSeek's MLA tensors in double, nn.Linear layout (shapes as in attnkit::mla_weights).
struct mla_weights {
  matrix q_proj;              ///< [H (d_nope + d_R), D]; empty with q-LoRA
  matrix q_a_proj;            ///< [q_lora_rank, D]; empty without q-LoRA
  matrix q_b_proj;            ///< [H (d_nope + d_R), q_lora_rank]; empty without q-LoRA
  matrix kv_a_proj_with_mqa;  ///< [d_c + rope_heads d_R, D]
  matrix kv_b_proj;           ///< [H (d_nope + d_v), d_c]
  matrix o_proj;              ///< [D, H d_v]
  vector q_a_layernorm;       ///< [q_lora_rank] or empty
  vector kv_a_layernorm;      ///< [d_c] or empty
  vector q_proj_bias;         ///< or empty
  vector q_a_proj_bias;       ///< or empty
  vector q_b_proj_bias;       ///< or empty
  vector kv_a_proj_bias;      ///< or empty
  vector kv_b_proj_bias;      ///< or empty
  vector o_proj_bias;         ///< or empty
  vector q_rope_norm;         ///< [d_R] RMSNorm of q_pe before RoPE; empty = none
  vector k_rope_norm;         ///< [d_R] RMSNorm of k_pe before RoPE; empty = none
};

/// The MLA geometry the reference needs.
struct mla_shape {
  std::int64_t heads;           ///< H
  std::int64_t latent_dim;      ///< d_c
  std::int64_t nope_dim;        ///< d_nope
  std::int64_t rope_dim;        ///< d_R
  std::int64_t v_head_dim;      ///< d_v
  std::int64_t rope_heads = 1;  ///< rope keys per token
  double rms_eps = 1e-6;        ///< the RMSNorms' epsilon
};

/// RMSNorm of every row of x [T, n] with weight w [n] (empty: 1).
inline matrix rms_norm_rows(matrix x, const vector& w, double eps) {
  for (std::int64_t i = 0; i < x.rows(); ++i) {
    const double inv = 1.0 / std::sqrt(x.row(i).squaredNorm() / double(x.cols()) + eps);
    x.row(i) *= inv;
    if (w.size()) x.row(i) = x.row(i).cwiseProduct(w.transpose());
  }
  return x;
}

/// The materialised per-head queries, keys and values of tokens x [T, D] at positions.
/// rope: the rope part's RoPE (rotary_dim = rope_dim), tables per rope group when given.
inline attention_heads mla_materialise(const matrix& x, std::span<const std::int64_t> positions,
                                 const mla_weights& w, const mla_shape& s,
                                 const rope_config& rope) {
  auto linear = [](const matrix& in, const matrix& wt, const vector& b) {
    matrix y = in * wt.transpose();
    if (b.size()) y.rowwise() += b.transpose();
    return y;
  };
  const std::int64_t t = x.rows(), h = s.heads, dc = s.latent_dim, dn = s.nope_dim, dr = s.rope_dim,
                     dv = s.v_head_dim;
  const std::int64_t dqk = dn + dr, g = h / s.rope_heads;
  // Queries: q_proj, or q_b_proj(RMSNorm(q_a_proj x)).
  const matrix q = w.q_a_proj.size() ? linear(rms_norm_rows(linear(x, w.q_a_proj, w.q_a_proj_bias),
                                                            w.q_a_layernorm, s.rms_eps),
                                              w.q_b_proj, w.q_b_proj_bias)
                                     : linear(x, w.q_proj, w.q_proj_bias);
  const matrix kva = linear(x, w.kv_a_proj_with_mqa, w.kv_a_proj_bias);
  matrix c = kva.leftCols(dc);
  if (w.kv_a_layernorm.size()) c = rms_norm_rows(c, w.kv_a_layernorm, s.rms_eps);
  const matrix kv = linear(c, w.kv_b_proj, w.kv_b_proj_bias);  // per head [k_nope (dn) ; v (dv)]
  // Per-head Q, K (dqk) and V (dv), rope parts rotated with the group's table.
  matrix qf(t, h * dqk), kf(t, h * dqk), vf(t, h * dv);
  for (std::int64_t i = 0; i < t; ++i) {
    for (std::int64_t hh = 0; hh < h; ++hh) {
      const std::int64_t grp = hh / g;
      qf.row(i).segment(hh * dqk, dqk) = q.row(i).segment(hh * dqk, dqk);
      kf.row(i).segment(hh * dqk, dn) = kv.row(i).segment(hh * (dn + dv), dn);
      kf.row(i).segment(hh * dqk + dn, dr) = kva.row(i).segment(dc + grp * dr, dr);
      vf.row(i).segment(hh * dv, dv) = kv.row(i).segment(hh * (dn + dv) + dn, dv);
      if (dr > 0) {
        for (auto [m, w_norm] :
             {std::pair<matrix*, const vector*>{&qf, &w.q_rope_norm}, {&kf, &w.k_rope_norm}}) {
          auto seg = m->row(i).segment(hh * dqk + dn, dr);
          if (w_norm->size())
            seg = (seg / std::sqrt(seg.squaredNorm() / double(dr) + s.rms_eps))
                      .cwiseProduct(w_norm->transpose());
          rope_rotate(m->row(i).data() + hh * dqk + dn, dr, positions[static_cast<std::size_t>(i)],
                      rope, grp);
        }
      }
    }
  }
  return {qf, kf, vf};
}

/// y for tokens x [T, D] at positions; every token attends causally to all of them.
inline matrix mla_forward(const matrix& x, std::span<const std::int64_t> positions,
                          const mla_weights& w, const mla_shape& s, const rope_config& rope,
                          double scale, std::optional<std::int64_t> window = {}) {
  const attention_heads m = mla_materialise(x, positions, w, s, rope);
  const auto a =
      attention(m.q, positions, m.k, m.v, positions, s.heads, s.heads, scale, true, window);
  matrix y = a.out * w.o_proj.transpose();
  if (w.o_proj_bias.size()) y.rowwise() += w.o_proj_bias.transpose();
  return y;
}

}  // namespace attnkit::reference
