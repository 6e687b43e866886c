#pragma once
// Random GQA layer weights held in float (for the layer) and double (for the reference).
#include "test_util.hpp"

namespace attnkit::test {

struct gqa_layer_data {
  gqa_config cfg;
  fmat q, k, v, o;
  std::vector<float> qb, kb, vb, ob;
  std::vector<float> qn, kn;  ///< QK-norm weights (empty = none)

  gqa_weights weights() const {
    return {view_of(q), view_of(k), view_of(v), view_of(o), qb, kb, vb, ob, qn, kn};
  }
  reference::gqa_weights reference_weights() const {
    auto vec = [](const std::vector<float>& b) {
      return Eigen::Map<const Eigen::VectorXf>(b.data(), static_cast<Eigen::Index>(b.size()))
          .cast<double>()
          .eval();
    };
    return {to_double(q), to_double(k), to_double(v), to_double(o),       vec(qb), vec(kb), vec(vb),
            vec(ob),      vec(qn),      vec(kn),      double(cfg.rms_eps)};
  }
};

/// Random per-KV-head RoPE frequency tables (MHA2MLA-style: each KV head rotates its pairs with
/// its own frequencies, drawn from the head's full frequency range).
inline void add_random_kv_head_tables(std::mt19937_64& rng, gqa_config& cfg) {
  const std::int64_t pairs = (cfg.rope.rotary_dim ? cfg.rope.rotary_dim : cfg.head_dim) / 2;
  cfg.rope.frequency_dim = cfg.head_dim;
  for (std::int64_t j = 0; j < cfg.kv_heads; ++j) {
    std::vector<std::int64_t> t;
    for (std::int64_t p = 0; p < pairs; ++p)
      t.push_back(static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(cfg.head_dim / 2)));
    cfg.rope.frequency_index.push_back(t);
  }
}

inline gqa_layer_data make_layer_data(std::mt19937_64& rng, const gqa_config& cfg, bool biases,
                                      bool qk_norm = false) {
  gqa_layer_data w{cfg, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  const std::int64_t dv = cfg.v_head_dim ? cfg.v_head_dim : cfg.head_dim;
  const float s_in = 1.f / std::sqrt(float(cfg.model_dim)),
              s_out = 1.f / std::sqrt(float(cfg.heads * dv));
  w.q = random_matrix(rng, cfg.heads * cfg.head_dim, cfg.model_dim, s_in);
  w.k = random_matrix(rng, cfg.kv_heads * cfg.head_dim, cfg.model_dim, s_in);
  w.v = random_matrix(rng, cfg.kv_heads * dv, cfg.model_dim, s_in);
  w.o = random_matrix(rng, cfg.model_dim, cfg.heads * dv, s_out);
  if (biases) {
    auto rv = [&](std::int64_t n) {
      fmat m = random_matrix(rng, 1, n, 0.5f);
      return std::vector<float>(m.data(), m.data() + n);
    };
    w.qb = rv(w.q.rows());
    w.kb = rv(w.k.rows());
    w.vb = rv(w.v.rows());
    w.ob = rv(w.o.rows());
  }
  if (qk_norm) {
    std::normal_distribution<float> nd(1.f, 0.2f);
    w.qn.resize(static_cast<std::size_t>(cfg.head_dim));
    w.kn.resize(static_cast<std::size_t>(cfg.head_dim));
    for (auto& x : w.qn) x = nd(rng);
    for (auto& x : w.kn) x = nd(rng);
  }
  return w;
}

/// Norm-wise tolerance for a layer output against the double reference: float GEMMs of inner
/// length n contribute ~sqrt(n) u relative each (statistical rounding-error growth), attention
/// ~(2 sqrt(d) A + sqrt(T)) u (see gqa_fixture.hpp); safety factor 4. Storage S adds its own
/// rounding of K and V, 2 u_S A + u_S (rigorous, relative to the values' scale), and bf16
/// products as much again (rounding_terms).
template <storage_type S>
double layer_rel_tolerance(const gqa_config& c, std::int64_t t, double a_max) {
  const double u = 0x1p-24;
  const std::int64_t dv = c.v_head_dim ? c.v_head_dim : c.head_dim;
  const double f = 4 * u *
                   (std::sqrt(double(c.model_dim)) + std::sqrt(double(c.heads * dv)) +
                    2 * std::sqrt(double(c.head_dim)) * a_max + std::sqrt(double(t)) + 8);
  return f + unit_roundoff<S>() * (1 + 2 * a_max) * rounding_terms<S>(c.products);
}

/// A for the layer's roped queries and keys, computed in double.
inline double layer_a_max(const gqa_layer_data& w, const fmat& x) {
  const reference::matrix xd = to_double(x);
  reference::matrix q = xd * to_double(w.q).transpose(), k = xd * to_double(w.k).transpose();
  if (!w.qb.empty()) q.rowwise() += w.reference_weights().q_bias.transpose();
  if (!w.kb.empty()) k.rowwise() += w.reference_weights().k_bias.transpose();
  const std::int64_t d = w.cfg.head_dim;
  reference::rms_norm_heads(q, d, w.reference_weights().q_norm, w.cfg.rms_eps);
  reference::rms_norm_heads(k, d, w.reference_weights().k_norm, w.cfg.rms_eps);
  double qn = 0, kn = 0;
  for (std::int64_t i = 0; i < x.rows(); ++i) {
    for (std::int64_t h = 0; h < w.cfg.heads; ++h)
      qn = std::max(qn, q.row(i).segment(h * d, d).norm());
    for (std::int64_t h = 0; h < w.cfg.kv_heads; ++h)
      kn = std::max(kn, k.row(i).segment(h * d, d).norm());
  }
  return qn * kn *
         static_cast<double>(w.cfg.scale.value_or(static_cast<float>(1.0 / std::sqrt(double(d)))));
}

inline double rel_error(const reference::matrix& got, const reference::matrix& want) {
  return (got - want).norm() / std::max(want.norm(), 1e-300);
}

}  // namespace attnkit::test
