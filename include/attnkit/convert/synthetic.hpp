#pragma once
// Structured synthetic data for demonstrating and testing the conversions (a pretrained layer
// and real activations are what users bring). Random Gaussian weights and inputs have flat
// spectra, so any low-rank step would lose a fixed share of everything; trained layers have
// decaying spectra, which is what makes TransMLA and MHA2MLA work. These generators give both
// decaying spectra:
//   matrix_with_spectrum: A = G1 diag(s) G2 / sqrt(rows cols) with Gaussian G1, G2 and
//     s_k = exp(-k / decay_length); random Gaussian factors are nearly orthogonal, so A's singular
//     values follow s (approximately).
//   activations: X = Z diag(sigma) B + noise, tokens in a `rank`-dimensional subspace with
//     sigma_k = exp(-k / decay_length), plus isotropic noise (a floor on every direction).
#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "../core/view.hpp"
#include "../layers/gqa_layer.hpp"

namespace attnkit::convert::synthetic {

/// [rows, cols] i.i.d. normal entries with standard deviation `scale`.
inline row_matrix<float> gaussian(std::mt19937_64& rng, std::int64_t rows, std::int64_t cols,
                                  float scale = 1.f) {
  std::normal_distribution<float> nd(0.f, scale);
  row_matrix<float> m(rows, cols);
  for (std::int64_t i = 0; i < m.size(); ++i) m.data()[i] = nd(rng);
  return m;
}

/// [rows, cols] with singular values proportional to exp(-k / decay_length), k = 0, 1, ...,
/// normalised so inputs with unit-variance entries give outputs with entries of variance gain^2.
inline row_matrix<float> matrix_with_spectrum(std::mt19937_64& rng, std::int64_t rows,
                                              std::int64_t cols, double decay_length,
                                              float gain = 1.f) {
  const std::int64_t inner = std::min(rows, cols);
  Eigen::VectorXf s(inner);
  for (std::int64_t k = 0; k < inner; ++k)
    s[k] = static_cast<float>(std::exp(-double(k) / decay_length));
  s *= gain * std::sqrt(float(rows)) / s.norm();
  const row_matrix<float> g1 =
      gaussian(rng, rows, inner, 1.f / std::sqrt(float(rows)));  // ~unit columns
  const row_matrix<float> g2 =
      gaussian(rng, inner, cols, 1.f / std::sqrt(float(cols)));  // ~unit rows
  return g1 * s.asDiagonal() * g2;
}

/// Tokens [n, model_dim] in a rank-dimensional subspace with variances ~ exp(-2k / decay_length),
/// entries of variance ~1, plus isotropic noise of standard deviation `noise`.
inline row_matrix<float> activations(std::mt19937_64& rng, std::int64_t n, std::int64_t model_dim,
                                     std::int64_t rank, double decay_length, float noise = 0.05f) {
  Eigen::VectorXf sigma(rank);
  for (std::int64_t k = 0; k < rank; ++k)
    sigma[k] = static_cast<float>(std::exp(-double(k) / decay_length));
  const row_matrix<float> basis = gaussian(rng, rank, model_dim, 1.f / sigma.norm());
  row_matrix<float> x = gaussian(rng, n, rank) * sigma.asDiagonal() * basis;
  return x + gaussian(rng, n, model_dim, noise);
}

/// A GQA layer with decaying weight spectra; unit-variance inputs give unit-variance activations.
struct layer {
  gqa_config config;          ///< the geometry asked for
  row_matrix<float> q;        ///< [H d, D]
  row_matrix<float> k;        ///< [H_kv d, D]
  row_matrix<float> v;        ///< [H_kv d, D]
  row_matrix<float> o;        ///< [D, H d]
  std::vector<float> q_bias;  ///< [H d] or empty
  std::vector<float> k_bias;  ///< [H_kv d] or empty
  std::vector<float> v_bias;  ///< [H_kv d] or empty

  /// Views of the weights in the form gqa_layer and the conversions take.
  gqa_weights weights() const {
    return {view_of(q), view_of(k), view_of(v), view_of(o), q_bias, k_bias, v_bias, {}};
  }
};

/// decay_length: e-folding length of the weights' singular values (in singular-value index).
inline layer make_layer(const gqa_config& cfg, std::uint64_t seed, double decay_length,
                        bool biases = false) {
  std::mt19937_64 rng(seed);
  const std::int64_t dm = cfg.model_dim, d = cfg.head_dim, dv = cfg.v_head_dim ? cfg.v_head_dim : d;
  layer l{cfg, {}, {}, {}, {}, {}, {}, {}};
  l.q = matrix_with_spectrum(rng, cfg.heads * d, dm, decay_length);
  l.k = matrix_with_spectrum(rng, cfg.kv_heads * d, dm, decay_length);
  l.v = matrix_with_spectrum(rng, cfg.kv_heads * dv, dm, decay_length);
  l.o = matrix_with_spectrum(rng, dm, cfg.heads * dv, decay_length);
  if (biases) {
    auto vec = [&](std::int64_t n) {
      const row_matrix<float> b = gaussian(rng, 1, n, 0.1f);
      return std::vector<float>(b.data(), b.data() + n);
    };
    l.q_bias = vec(l.q.rows());
    l.k_bias = vec(l.k.rows());
    l.v_bias = vec(l.v.rows());
  }
  return l;
}

}  // namespace attnkit::convert::synthetic
