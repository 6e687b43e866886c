#pragma once
// Random TPA (T6) layers: float weights for the layer, double copies for the reference.
#include <attnkit/reference/tpa.hpp>

#include "test_util.hpp"

namespace attnkit::test {

struct tpa_data {
  tpa_config cfg;
  fmat w_a_q, w_b_q, q_proj, w_a_k, w_b_k, w_a_v, w_b_v, o_proj, a_q, a_k, a_v;
  static matrix_view<const float> v(const fmat& m) {
    return m.size() ? view_of(m) : matrix_view<const float>{};
  }
  tpa_weights weights() const {
    return {v(w_a_q), v(w_b_q),  v(q_proj), v(w_a_k), v(w_b_k), v(w_a_v),
            v(w_b_v), v(o_proj), v(a_q),    v(a_k),   v(a_v)};
  }
  reference::tpa_weights reference_weights() const {
    auto d = [](const fmat& m) {
      return m.size() ? reference::matrix(to_double(m)) : reference::matrix();
    };
    return {d(w_a_q), d(w_b_q),  d(q_proj), d(w_a_k), d(w_b_k), d(w_a_v),
            d(w_b_v), d(o_proj), d(a_q),    d(a_k),   d(a_v)};
  }
  reference::tpa_shape shape(const tpa_scales& s) const {
    return {cfg.heads,
            cfg.head_dim,
            cfg.v_head_dim ? cfg.v_head_dim : cfg.head_dim,
            cfg.q_rank ? cfg.q_rank : cfg.heads,
            cfg.k_rank,
            cfg.v_rank,
            s.q,
            s.k,
            s.v};
  }
};

/// fixed: non-contextual head factors a_* [R, H] instead of W_A_*.
inline tpa_data make_tpa(std::mt19937_64& rng, const tpa_config& cfg, bool fixed) {
  tpa_data w{cfg, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  const std::int64_t dm = cfg.model_dim, h = cfg.heads, d = cfg.head_dim,
                     dv = cfg.v_head_dim ? cfg.v_head_dim : d;
  const float s = 1.f / std::sqrt(float(dm));
  auto factor = [&](std::int64_t rank, fmat& wa, fmat& a) {
    if (fixed)
      a = random_matrix(rng, rank, h, 1.f);
    else
      wa = random_matrix(rng, h * rank, dm, s);
  };
  if (cfg.q_rank) {
    factor(cfg.q_rank, w.w_a_q, w.a_q);
    w.w_b_q = random_matrix(rng, cfg.q_rank * d, dm, s);
  } else {
    w.q_proj = random_matrix(rng, h * d, dm, s);
  }
  factor(cfg.k_rank, w.w_a_k, w.a_k);
  w.w_b_k = random_matrix(rng, cfg.k_rank * d, dm, s);
  factor(cfg.v_rank, w.w_a_v, w.a_v);
  w.w_b_v = random_matrix(rng, cfg.v_rank * dv, dm, s);
  w.o_proj = random_matrix(rng, dm, h * dv, 1.f / std::sqrt(float(h * dv)));
  return w;
}

inline tpa_config random_tpa_config(std::mt19937_64& rng) {
  tpa_config c;
  c.model_dim = 32 + 16 * static_cast<std::int64_t>(rng() % 3);
  c.heads = 1 + static_cast<std::int64_t>(rng() % 20);
  c.head_dim = rng() % 2 ? 16 : 32;
  c.v_head_dim = rng() % 3 == 0 ? 24 : 0;
  c.q_rank = rng() % 4 == 0 ? 0 : 1 + static_cast<std::int64_t>(rng() % 6);
  c.k_rank = 1 + static_cast<std::int64_t>(rng() % 3);
  c.v_rank = 1 + static_cast<std::int64_t>(rng() % 3);
  c.rope = {.theta = 10000.0,
            .layout = rng() % 2 ? rope_layout::half_split : rope_layout::interleaved};
  if (rng() % 3 == 0) c.rope.rotary_dim = c.head_dim / 2;
  return c;
}

/// A = scale * max |q_h| * max |k_h| over the materialised heads (double).
inline double tpa_a_max(const tpa_data& w, const tpa_layer& layer, const fmat& x) {
  const auto rw = w.reference_weights();
  const auto sh = w.shape(layer.scales());
  const reference::matrix xd = to_double(x);
  const reference::matrix q =
      rw.q_proj.size() ? reference::matrix(xd * rw.q_proj.transpose())
                       : reference::tpa_materialise(
                             reference::tpa_factor_a(xd, rw.w_a_q, rw.a_q, sh.q_rank, sh.heads),
                             xd * rw.w_b_q.transpose(), sh.q_rank, sh.heads, sh.q_scale);
  const reference::matrix k =
      reference::tpa_materialise(reference::tpa_factor_a(xd, rw.w_a_k, rw.a_k, sh.k_rank, sh.heads),
                                 xd * rw.w_b_k.transpose(), sh.k_rank, sh.heads, sh.k_scale);
  double qn = 0, kn = 0;
  for (std::int64_t i = 0; i < x.rows(); ++i)
    for (std::int64_t h = 0; h < sh.heads; ++h) {
      qn = std::max(qn, q.row(i).segment(h * sh.head_dim, sh.head_dim).norm());
      kn = std::max(kn, k.row(i).segment(h * sh.head_dim, sh.head_dim).norm());
    }
  return qn * kn / std::sqrt(double(sh.head_dim));
}

/// Norm-wise tolerance: the GQA layer's (layer_fixture.hpp) plus the rank sums (R terms each);
/// the 16-bit terms doubled, as for MLA (mla_fixture.hpp).
template <storage_type S>
double tpa_rel_tolerance(const tpa_config& c, std::int64_t t, double a_max) {
  const double u = 0x1p-24;
  const std::int64_t dv = c.v_head_dim ? c.v_head_dim : c.head_dim,
                     rq = c.q_rank ? c.q_rank : c.heads;
  const double f = 4 * u *
                   (std::sqrt(double(c.model_dim)) + std::sqrt(double(c.heads * dv)) +
                    2 * std::sqrt(double(c.head_dim)) * a_max + std::sqrt(double(t)) +
                    double(rq + c.k_rank + c.v_rank) + 8);
  return f + unit_roundoff<S>() * (1 + 2 * a_max) * 2 * rounding_terms<S>(c.products);
}

}  // namespace attnkit::test
