#pragma once
// Plain double-precision implementations of attnkit's math, written for clarity, not speed.
// They are the oracle of attnkit's tests and are public so that users can write their own
// equivalence proofs. Layout conventions follow the kernels: activations token-major,
// weights in nn.Linear layout [out, in]; a [T, H, d] tensor is a [T, H*d] row-major matrix.
#include <Eigen/Core>
#include <cmath>
#include <functional>
#include <complex>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <vector>

#include "../core/rope.hpp"

namespace attnkit::reference {

using matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic,
                             Eigen::RowMajor>;  ///< Row-major double matrix of the references.
using vector = Eigen::VectorXd;                 ///< Double vector of the references.

/// RoPE from its definition as a complex rotation: pair p is the complex number
/// z_p = x_i + i x_j, multiplied by exp(i * pos * theta^(-2 f_p / frequency_dim)).
inline void rope_rotate(double* x, std::int64_t head_dim, std::int64_t pos, const rope_config& cfg,
                        std::int64_t head = 0) {
  const std::int64_t rot = cfg.rotary_dim == 0 ? head_dim : cfg.rotary_dim;
  const std::int64_t fdim = cfg.frequency_dim == 0 ? rot : cfg.frequency_dim;
  const std::int64_t pairs = rot / 2;
  for (std::int64_t p = 0; p < pairs; ++p) {
    std::int64_t f = p;
    if (!cfg.frequency_index.empty()) {
      const auto& tab = cfg.frequency_index.size() == 1
                            ? cfg.frequency_index[0]
                            : cfg.frequency_index[static_cast<std::size_t>(head)];
      f = tab[static_cast<std::size_t>(p)];
    }
    const double angle =
        static_cast<double>(pos) * std::pow(cfg.theta, -2.0 * f / static_cast<double>(fdim));
    const std::int64_t i = cfg.layout == rope_layout::half_split ? p : 2 * p;
    const std::int64_t j = cfg.layout == rope_layout::half_split ? p + pairs : 2 * p + 1;
    const std::complex<double> z = std::complex<double>(x[i], x[j]) * std::polar(1.0, angle);
    x[i] = z.real();
    x[j] = z.imag();
  }
}

/// Applies rope_rotate to every head of X [T, heads*head_dim] (row t at positions[t]).
inline void rope_rows(matrix& x, std::int64_t heads, std::int64_t head_dim,
                      std::span<const std::int64_t> positions, const rope_config& cfg) {
  for (std::int64_t t = 0; t < x.rows(); ++t)
    for (std::int64_t h = 0; h < heads; ++h)
      rope_rotate(x.row(t).data() + h * head_dim, head_dim, positions[static_cast<std::size_t>(t)],
                  cfg, h);
}

/// What attention() returns.
struct attention_result {
  matrix out;  ///< [Tq, H*d_v]
  matrix lse;  ///< [Tq, H], natural log; -inf for fully masked rows
};

/// The reference's mask and logit rules, written independently of the kernels' policy code.
struct attention_rules {
  bool causal = true;                    ///< keys after the query are hidden
  std::optional<std::int64_t> window{};  ///< keep keys with q_pos - k_pos < window
  std::optional<double> softcap{};     ///< s <- cap tanh(s / cap)
  std::vector<double> alibi_slopes{};  ///< s <- s - slope_h (q_pos - k_pos)
  std::vector<double> sinks{};         ///< per-head logit in the denominator
  /// Extra mask (q_index, q_pos, k_index, k_pos, head) -> visible; empty = none.
  std::function<bool(std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t)> mask{};

  /// Query qi at qp sees key ki at kp in head h.
  bool visible(std::int64_t qi, std::int64_t qp, std::int64_t ki, std::int64_t kp,
               std::int64_t h) const {
    if (causal && kp > qp) return false;
    // q - k for k <= q, exact in uint64 for any int64 pair.
    if (window && kp <= qp &&
        static_cast<std::uint64_t>(qp) - static_cast<std::uint64_t>(kp) >=
            static_cast<std::uint64_t>(*window))
      return false;
    return !mask || mask(qi, qp, ki, kp, h);
  }
  /// The scaled score s after ALiBi and soft-capping.
  double logit(double s, std::int64_t qp, std::int64_t kp, std::int64_t h) const {
    if (!alibi_slopes.empty())
      s -= alibi_slopes[static_cast<std::size_t>(h)] * (double(qp) - double(kp));
    if (softcap) s = *softcap * std::tanh(s / *softcap);
    return s;
  }
};

/// The normalised weights of one attention row: p[u] for every key (0 where masked), whether
/// each key is visible, and the row's LSE.
struct row_weights {
  vector p;                ///< [Tk] weights, 0 where masked
  std::vector<char> seen;  ///< [Tk] 1 where visible
  double lse = 0;          ///< natural-log log-sum-exp of the visible logits (and the sink)
};

/// Row (t, h) of softmax(rules(q k^T * scale)): query head h reads KV head h / (H / H_kv).
/// A NaN or +inf logit among the visible keys makes the row (p and LSE) NaN; -inf logits weigh
/// 0; a row that sees no key has p = 0 and LSE -inf (or the sink's logit).
inline row_weights attention_row(const matrix& q, std::span<const std::int64_t> q_pos,
                                 const matrix& k, std::span<const std::int64_t> k_pos,
                                 std::int64_t heads, std::int64_t kv_heads, double scale,
                                 const attention_rules& rules, std::int64_t t, std::int64_t h) {
  const std::int64_t tk = k.rows(), dqk = q.cols() / heads, j = h / (heads / kv_heads);
  const std::int64_t qp = q_pos[static_cast<std::size_t>(t)];
  constexpr double ninf = -std::numeric_limits<double>::infinity();
  row_weights r{vector::Zero(tk), std::vector<char>(static_cast<std::size_t>(tk)), ninf};
  vector& s = r.p;
  // Plain dot products of every key with the query, then the rules key by key.
  // (No blocks of an empty k are formed: Eigen offsets their null data.)
  if (tk > 0) s.noalias() = k.middleCols(j * dqk, dqk) * q.row(t).segment(h * dqk, dqk).transpose();
  double mx = rules.sinks.empty() ? ninf : rules.sinks[static_cast<std::size_t>(h)];
  for (std::int64_t u = 0; u < tk; ++u) {
    const std::int64_t kp = k_pos[static_cast<std::size_t>(u)];
    const bool vis = rules.visible(t, qp, u, kp, h);
    r.seen[static_cast<std::size_t>(u)] = vis;
    s[u] = vis ? rules.logit(s[u] * scale, qp, kp, h) : ninf;
    if (std::isnan(s[u]) || s[u] > mx) mx = s[u];
  }
  if (std::isnan(mx)) {
    s.setConstant(mx);
    r.lse = mx;
    return r;
  }
  if (mx == ninf) {
    s.setZero();
    return r;
  }
  double sum = rules.sinks.empty() ? 0.0 : std::exp(rules.sinks[static_cast<std::size_t>(h)] - mx);
  for (std::int64_t u = 0; u < tk; ++u) sum += (s[u] = std::exp(s[u] - mx));
  s /= sum;
  r.lse = mx + std::log(sum);
  return r;
}

/// softmax(rules(q k^T * scale)) v per query head, query head h using KV head h / (H / H_kv).
/// q [Tq, H*d_qk], k [Tk, H_kv*d_qk], v [Tk, H_kv*d_v]. Fully masked rows, and rows whose
/// visible logits are all -inf, give 0 (LSE -inf, or the sink's logit when there is one). Special values: a masked key contributes nothing,
/// whatever its k and v hold; a NaN or +inf logit among a row's visible keys makes its output
/// and LSE NaN; -inf logits weigh 0.
inline attention_result attention(const matrix& q, std::span<const std::int64_t> q_pos,
                                  const matrix& k, const matrix& v,
                                  std::span<const std::int64_t> k_pos, std::int64_t heads,
                                  std::int64_t kv_heads, double scale,
                                  const attention_rules& rules) {
  const std::int64_t tq = q.rows(), tk = k.rows(), dv = v.cols() / kv_heads;
  const std::int64_t g = heads / kv_heads;
  attention_result r{matrix::Zero(tq, heads * dv), matrix::Zero(tq, heads)};
  // With non-finite values, masked keys' values are skipped one by one (0 * inf is NaN).
  const bool v_finite = v.allFinite();
  for (std::int64_t t = 0; t < tq; ++t)
    for (std::int64_t h = 0; h < heads; ++h) {
      const std::int64_t j = h / g;
      const row_weights w = attention_row(q, q_pos, k, k_pos, heads, kv_heads, scale, rules, t, h);
      r.lse(t, h) = w.lse;
      auto out = r.out.row(t).segment(h * dv, dv);
      if (std::isnan(w.lse)) {
        out.setConstant(w.lse);
      } else if (w.lse == -std::numeric_limits<double>::infinity()) {
        // No finite logit (no key seen, or only -inf logits): 0, as for an empty row.
      } else if (v_finite && tk > 0) {
        out.noalias() = w.p.transpose() * v.middleCols(j * dv, dv);
      } else {
        for (std::int64_t u = 0; u < tk; ++u)
          if (w.seen[static_cast<std::size_t>(u)]) out += w.p[u] * v.row(u).segment(j * dv, dv);
      }
    }
  return r;
}

/// The normalised weights of every row: P [Tq * H, Tk], row t * H + h (see attention_row).
inline matrix attention_weights(const matrix& q, std::span<const std::int64_t> q_pos,
                                const matrix& k, std::span<const std::int64_t> k_pos,
                                std::int64_t heads, std::int64_t kv_heads, double scale,
                                const attention_rules& rules) {
  matrix p(q.rows() * heads, k.rows());
  for (std::int64_t t = 0; t < q.rows(); ++t)
    for (std::int64_t h = 0; h < heads; ++h)
      p.row(t * heads + h) =
          attention_row(q, q_pos, k, k_pos, heads, kv_heads, scale, rules, t, h).p.transpose();
  return p;
}

/// Shared attention's follower: out [Tq, H*d_v] = P V per query head, P [Tq * H, Tk] a donor's
/// weights (attention_weights), v [Tk, H_kv*d_v]; query head h reads KV head h / (H / H_kv).
/// Keys of weight 0 contribute nothing, whatever their values hold.
inline matrix weighted_values(const matrix& p, const matrix& v, std::int64_t heads,
                              std::int64_t kv_heads) {
  const std::int64_t tq = p.rows() / heads, dv = v.cols() / kv_heads, g = heads / kv_heads;
  matrix out = matrix::Zero(tq, heads * dv);
  for (std::int64_t t = 0; t < tq; ++t)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t u = 0; u < v.rows(); ++u)
        if (p(t * heads + h, u) != 0.0)
          out.row(t).segment(h * dv, dv) += p(t * heads + h, u) * v.row(u).segment(h / g * dv, dv);
  return out;
}

/// attention with the causal rule and an optional window only.
inline attention_result attention(const matrix& q, std::span<const std::int64_t> q_pos,
                                  const matrix& k, const matrix& v,
                                  std::span<const std::int64_t> k_pos, std::int64_t heads,
                                  std::int64_t kv_heads, double scale, bool causal = true,
                                  std::optional<std::int64_t> window = std::nullopt) {
  attention_rules rules;
  rules.causal = causal, rules.window = window;
  return attention(q, q_pos, k, v, k_pos, heads, kv_heads, scale, rules);
}

/// A GQA layer's weights in double, nn.Linear layout. Empty bias vectors mean no bias.
struct gqa_weights {
  matrix q;       ///< [H d, D]
  matrix k;       ///< [H_kv d, D]
  matrix v;       ///< [H_kv d_v, D]
  matrix o;       ///< [D, H d_v]
  vector q_bias;  ///< [H d] or empty
  vector k_bias;  ///< [H_kv d] or empty
  vector v_bias;  ///< [H_kv d_v] or empty
  vector o_bias;  ///< [D] or empty
  vector q_norm;  ///< QK-norm weights [head_dim], RMSNorm per head before RoPE; empty = none
  vector k_norm;  ///< QK-norm weights [head_dim], RMSNorm per head before RoPE; empty = none
  double rms_eps = 1e-6;  ///< the QK-norm's epsilon
};

/// RMSNorm of every head_dim-wide head of every row of x, with weight w.
inline void rms_norm_heads(matrix& x, std::int64_t head_dim, const vector& w, double eps) {
  if (!w.size()) return;
  for (std::int64_t t = 0; t < x.rows(); ++t)
    for (std::int64_t h = 0; h < x.cols() / head_dim; ++h) {
      auto seg = x.row(t).segment(h * head_dim, head_dim);
      seg =
          (seg / std::sqrt(seg.squaredNorm() / double(head_dim) + eps)).cwiseProduct(w.transpose());
    }
}

/// Per-head queries, keys (both roped) and values of a layer's tokens: [T, H d_qk],
/// [T, H_kv d_qk], [T, H_kv d_v].
struct attention_heads {
  matrix q;  ///< [T, H d_qk], roped
  matrix k;  ///< [T, H_kv d_qk], roped
  matrix v;  ///< [T, H_kv d_v]
};

/// The GQA layer's heads: RoPE(norm(W_q x)), RoPE(norm(W_k x)), W_v x.
inline attention_heads gqa_heads(const matrix& x, std::span<const std::int64_t> positions,
                                 const gqa_weights& w, std::int64_t heads, std::int64_t kv_heads,
                                 std::int64_t head_dim, const rope_config& rope) {
  auto project = [&](const matrix& wt, const vector& b) {
    matrix y = x * wt.transpose();
    if (b.size()) y.rowwise() += b.transpose();
    return y;
  };
  attention_heads a{project(w.q, w.q_bias), project(w.k, w.k_bias), project(w.v, w.v_bias)};
  rms_norm_heads(a.q, head_dim, w.q_norm, w.rms_eps);
  rms_norm_heads(a.k, head_dim, w.k_norm, w.rms_eps);
  rope_rows(a.q, heads, head_dim, positions, rope);
  rope_rows(a.k, kv_heads, head_dim, positions, rope);
  return a;
}

/// The layer's function on a whole sequence: y = W_o attention(RoPE(W_q x), RoPE(W_k x), W_v x).
/// Tokens attend to each other by their positions (causal on positions).
inline matrix gqa_layer_forward(const matrix& x, std::span<const std::int64_t> positions,
                                const gqa_weights& w, std::int64_t heads, std::int64_t kv_heads,
                                std::int64_t head_dim, const rope_config& rope, double scale,
                                std::optional<std::int64_t> window = {}) {
  const attention_heads a = gqa_heads(x, positions, w, heads, kv_heads, head_dim, rope);
  const auto r = attention(a.q, positions, a.k, a.v, positions, heads, kv_heads, scale, true, window);
  matrix y = r.out * w.o.transpose();
  if (w.o_bias.size()) y.rowwise() += w.o_bias.transpose();
  return y;
}

}  // namespace attnkit::reference
