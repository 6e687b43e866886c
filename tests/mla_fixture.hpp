#pragma once
// Random MLA layers: config, float weights for the layer, double copies for the reference.
#include <attnkit/reference/mla.hpp>

#include "test_util.hpp"

namespace attnkit::test {

struct mla_data {
  mla_config cfg;
  fmat q_proj, q_a_proj, q_b_proj, kv_a, kv_b, o_proj;
  std::vector<float> q_a_norm, kv_a_norm, q_bias, q_a_bias, q_b_bias, kv_a_bias, kv_b_bias, o_bias;

  static matrix_view<const float> v(const fmat& m) {
    return m.size() ? view_of(m) : matrix_view<const float>{};
  }
  mla_weights weights() const {
    return {v(q_proj), v(q_a_proj), q_a_norm, v(q_b_proj), v(kv_a),   kv_a_norm, v(kv_b),
            v(o_proj), q_bias,      q_a_bias, q_b_bias,    kv_a_bias, kv_b_bias, o_bias};
  }
  reference::mla_weights reference_weights() const {
    auto m = [](const fmat& x) { return to_double(x); };
    auto b = [](const std::vector<float>& x) {
      return Eigen::Map<const Eigen::VectorXf>(x.data(), static_cast<Eigen::Index>(x.size()))
          .cast<double>()
          .eval();
    };
    return {m(q_proj),    m(q_a_proj),  m(q_b_proj), m(kv_a),     m(kv_b),     m(o_proj),
            b(q_a_norm),  b(kv_a_norm), b(q_bias),   b(q_a_bias), b(q_b_bias), b(kv_a_bias),
            b(kv_b_bias), b(o_bias),    {},          {}};
  }
  reference::mla_shape shape() const {
    return {cfg.heads,      cfg.latent_dim, cfg.nope_dim, cfg.rope_dim,
            cfg.v_head_dim, cfg.rope_heads, cfg.rms_eps};
  }
  double scale() const {
    return cfg.scale.value_or(1.f / std::sqrt(float(cfg.nope_dim + cfg.rope_dim))) *
           double(cfg.mscale) * cfg.mscale;
  }
};

inline std::vector<float> random_vector(std::mt19937_64& rng, std::int64_t n, float sigma,
                                        float mean = 0.f) {
  std::normal_distribution<float> nd(mean, sigma);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = nd(rng);
  return v;
}

inline mla_data make_mla(std::mt19937_64& rng, const mla_config& cfg, bool biases,
                         bool latent_norm) {
  mla_data w{cfg, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  const std::int64_t d = cfg.model_dim, h = cfg.heads, dqk = cfg.nope_dim + cfg.rope_dim;
  const float sd = 1.f / std::sqrt(float(d));
  if (cfg.q_lora_rank > 0) {
    w.q_a_proj = random_matrix(rng, cfg.q_lora_rank, d, sd);
    w.q_a_norm = random_vector(rng, cfg.q_lora_rank, 0.1f, 1.f);
    w.q_b_proj =
        random_matrix(rng, h * dqk, cfg.q_lora_rank, 1.f / std::sqrt(float(cfg.q_lora_rank)));
  } else {
    w.q_proj = random_matrix(rng, h * dqk, d, sd);
  }
  w.kv_a = random_matrix(rng, cfg.latent_dim + cfg.rope_heads * cfg.rope_dim, d, sd);
  if (latent_norm) w.kv_a_norm = random_vector(rng, cfg.latent_dim, 0.1f, 1.f);
  w.kv_b = random_matrix(rng, h * (cfg.nope_dim + cfg.v_head_dim), cfg.latent_dim,
                         1.f / std::sqrt(float(cfg.latent_dim)));
  w.o_proj = random_matrix(rng, d, h * cfg.v_head_dim, 1.f / std::sqrt(float(h * cfg.v_head_dim)));
  if (biases) {
    if (cfg.q_lora_rank > 0) {
      w.q_a_bias = random_vector(rng, cfg.q_lora_rank, 0.3f);
      w.q_b_bias = random_vector(rng, h * dqk, 0.3f);
    } else {
      w.q_bias = random_vector(rng, h * dqk, 0.3f);
    }
    w.kv_a_bias = random_vector(rng, cfg.latent_dim + cfg.rope_heads * cfg.rope_dim, 0.3f);
    w.kv_b_bias = random_vector(rng, h * (cfg.nope_dim + cfg.v_head_dim), 0.3f);
    w.o_bias = random_vector(rng, d, 0.3f);
  }
  return w;
}

/// Random small DeepSeek-shaped config (both RoPE layouts, q-LoRA or not, rope_heads 1 or > 1).
inline mla_config random_mla_config(std::mt19937_64& rng) {
  mla_config c;
  c.rope_heads = rng() % 2 ? 1 : 2;
  c.heads = c.rope_heads * (1 + static_cast<std::int64_t>(rng() % 4));
  c.model_dim = 32 + 16 * static_cast<std::int64_t>(rng() % 3);
  c.q_lora_rank = rng() % 2 ? 0 : 24;
  c.latent_dim = rng() % 2 ? 32 : 48;
  c.nope_dim = rng() % 2 ? 16 : 24;
  c.rope_dim = rng() % 3 == 0 ? 16 : 8;
  c.v_head_dim = rng() % 2 ? 16 : 20;
  c.rope = {.theta = 10000.0,
            .layout = rng() % 2 ? rope_layout::interleaved : rope_layout::half_split};
  if (rng() % 3 == 0) c.mscale = 1.3f;
  return c;
}

/// Norm-wise relative tolerance of an MLA layer output vs the double reference: as for the GQA
/// layer (layer_fixture.hpp), with the extra float GEMMs of inner length d_c (up/absorb) and
/// q_lora_rank, and A bounding scale |q||k| of the materialised heads; u_S (1 + 2 A) for storage
/// (rounding_terms: twice with bf16 products).
template <storage_type S>
double mla_rel_tolerance(const mla_config& c, std::int64_t t, double a_max) {
  const double u = 0x1p-24;
  const double f =
      4 * u *
      (std::sqrt(double(c.model_dim)) + std::sqrt(double(c.latent_dim)) * 2 +
       std::sqrt(double(std::max<std::int64_t>(c.q_lora_rank, 1))) +
       std::sqrt(double(c.heads * c.v_head_dim)) +
       2 * std::sqrt(double(c.nope_dim + c.rope_dim)) * a_max + std::sqrt(double(t)) + 8);
  return f + unit_roundoff<S>() * (1 + 2 * a_max) * 2 * rounding_terms<S>(c.products);
}

}  // namespace attnkit::test

namespace attnkit::test {
/// A = scale * max_h |q_h| * max_h |k_h| over the materialised heads (double).
inline double mla_a_max(const mla_data& w, const fmat& x, std::span<const std::int64_t> pos) {
  const auto m =
      reference::mla_materialise(to_double(x), pos, w.reference_weights(), w.shape(), w.cfg.rope);
  const std::int64_t dqk = w.cfg.nope_dim + w.cfg.rope_dim;
  double qn = 0, kn = 0;
  for (std::int64_t i = 0; i < x.rows(); ++i)
    for (std::int64_t h = 0; h < w.cfg.heads; ++h) {
      qn = std::max(qn, m.q.row(i).segment(h * dqk, dqk).norm());
      kn = std::max(kn, m.k.row(i).segment(h * dqk, dqk).norm());
    }
  return w.scale() * qn * kn;
}
}  // namespace attnkit::test
