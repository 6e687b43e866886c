#pragma once
// A randomized GQA attention problem, the kernel's answer and the double reference's.
#include "test_util.hpp"

namespace attnkit::test {

struct gqa_case {
  std::int64_t heads = 8, kv_heads = 2, head_dim = 64, v_head_dim = 64, tk = 100, tq = 1;
  bool causal = true;
  std::optional<std::int64_t> window{};
  tile_strategy strategy = tile_strategy::automatic;
  product_math products = product_math::f32;
};

/// Tolerance for the float kernel against the double reference on the same (rounded) K/V, from
/// the error statistics of the computation rather than worst-case products of epsilons. A score
/// s = scale q.k computed in float with blocked FMA accumulation is off by a few u |s|, at most
/// ~u A with A = max scale |q||k| (Cauchy-Schwarz); softmax turns a score error ds into
/// p (ds - sum p ds), moving the output by <= 2 max|v| |ds|. exp, the normalisation and the
/// probability-weighted sum of values (weights summing to 1) add a few u max|v|. Measured over
/// randomized shapes (tests/test_precision.cpp, which also proves that a 10x worse dot product or
/// exp fails it) the error stays below about half of u max|v| (2 + 1.5 A); head_dim and Tk enter
/// through A and the blocked sums, not as sqrt factors.
inline double float_tolerance(std::int64_t /*head_dim*/, std::int64_t /*tk*/, double a_max,
                              double v_max) {
  const double u = 0x1p-24;
  return u * v_max * (2 + 1.5 * a_max);
}

/// Extra error bound from storing K and V in S instead of float (rigorous): |dk| <= u_S |k|
/// moves each score by <= u_S A, the output by <= 2 u_S A max|v|; |dv| <= u_S |v| adds u_S max|v|.
template <storage_type S>
double storage_tolerance(double a_max, double v_max) {
  return unit_roundoff<S>() * v_max * (1 + 2 * a_max);
}

struct gqa_data {
  fmat q, k, v;
  std::vector<std::int64_t> q_pos, k_pos;
  double scale;
  /// A = max over query heads and key heads of scale * |q_h| |k_j| (Cauchy-Schwarz bound of
  /// scale * sum_c |q_c k_c|).
  double a_max(std::int64_t head_dim) const {
    auto max_head_norm = [&](const fmat& m) {
      double n = 0;
      for (std::int64_t i = 0; i < m.rows(); ++i)
        for (std::int64_t h = 0; h < m.cols() / head_dim; ++h)
          n = std::max<double>(n, m.row(i).segment(h * head_dim, head_dim).cast<double>().norm());
      return n;
    };
    return scale * max_head_norm(q) * max_head_norm(k);
  }
};

/// Random data: keys at gapped positions with an offset; queries at positions chosen among and
/// around the keys' positions (so masks and fully masked rows both occur).
inline gqa_data make_gqa_data(std::mt19937_64& rng, const gqa_case& c) {
  gqa_data x;
  x.q = random_matrix(rng, c.tq, c.heads * c.head_dim);
  x.k = random_matrix(rng, c.tk, c.kv_heads * c.head_dim);
  x.v = random_matrix(rng, c.tk, c.kv_heads * c.v_head_dim);
  x.k_pos = gapped_positions(rng, c.tk, static_cast<std::int64_t>(rng() % 1000), 3);
  const std::int64_t last = c.tk ? x.k_pos.back() : 0;
  std::uniform_int_distribution<std::int64_t> pick(-5, last + 3);
  for (std::int64_t i = 0; i < c.tq; ++i) x.q_pos.push_back(i == c.tq - 1 ? last : pick(rng));
  x.scale = 1.0 / std::sqrt(double(c.head_dim));
  return x;
}

/// x's K and V in a dense cache of S.
template <storage_type S>
dense_cache<S> cache_of(const gqa_case& c, const gqa_data& x) {
  dense_cache<S> cache({.kv_heads = c.kv_heads,
                        .head_dim = c.head_dim,
                        .v_head_dim = c.v_head_dim,
                        .capacity = c.tk});
  cache.append(tensor3_view<const float>(x.k.data(), {c.tk, c.kv_heads, c.head_dim}),
               tensor3_view<const float>(x.v.data(), {c.tk, c.kv_heads, c.v_head_dim}), x.k_pos);
  return cache;
}

/// The kernel's output over a dense cache of S.
template <storage_type S, class Exec = serial_executor>
fmat run_kernel(const gqa_case& c, const gqa_data& x, Exec&& exec = Exec{}, fmat* lse = nullptr) {
  const dense_cache<S> cache = cache_of<S>(c, x);
  fmat out(c.tq, c.heads * c.v_head_dim);
  attention_options opt{
      .causal = c.causal, .window = c.window, .strategy = c.strategy, .products = c.products};
  if (lse) {
    lse->resize(c.tq, c.heads);
    opt.lse = matrix_view<float>(lse->data(), {c.tq, c.heads});
  }
  attend(tensor3_view<const float>(x.q.data(), {c.tq, c.heads, c.head_dim}), x.q_pos, cache,
         tensor3_view<float>(out.data(), {c.tq, c.heads, c.v_head_dim}), opt, exec);
  return out;
}

/// The double reference on K/V rounded through S (what the cache holds).
template <storage_type S>
reference::attention_result run_reference(const gqa_case& c, const gqa_data& x) {
  return reference::attention(to_double(x.q), x.q_pos, to_double(round_trip<S>(x.k)),
                              to_double(round_trip<S>(x.v)), x.k_pos, c.heads, c.kv_heads, x.scale,
                              c.causal, c.window);
}

/// The coarse exponential's bound on its relative error (simd/kernels.inl, vexp_coarse).
constexpr double coarse_exp_error = 6e-5;

/// bf16 products (product_math::bf16) against the double reference, for an output `out` of the
/// kernel on bf16 K/V (the cache's). The reference gets the queries rounded as the kernel rounds
/// them (scaled in float, then to bf16) and scale 1. What remains is the rounding of each
/// probability to bf16, p_u (1 + e_u) with |e_u| <= u = 2^-8, which moves output element
/// (t, h, c) by sum_u e_u p_u v_uc (the softmax's sum is taken before the rounding). The e_u are
/// the rounding errors of unrelated values; taken as independent in [-u, u], Hoeffding's bound
/// puts |sum| above 6 u sqrt(sum_u (p_u v_uc)^2) with probability 2 e^-18 per element. A tenfold
/// larger rounding error breaks it by far (the typical sum is about u/sqrt(3) times the root).
/// The probabilities that are rounded come from the coarse exponential (relative error e <
/// 6e-5, docs/math.md), which moves the normalised weights w_u by at most 2e / (1 - e) of
/// themselves: 2.0001 e sum_u w_u |v_uc| more. Float round-off as in float_tolerance on top.
/// Returns the largest error / tolerance ratio.
/// probabilities_rounded false: the streaming path, which rounds only the queries (its value
/// products stay f32), so that only float round-off remains.
inline double bf16_products_error_ratio(const gqa_case& c, const gqa_data& x, const fmat& out,
                                        bool probabilities_rounded = true) {
  const float scale = static_cast<float>(x.scale);
  fmat qr(x.q.rows(), x.q.cols());
  for (std::int64_t i = 0; i < qr.size(); ++i)
    qr.data()[i] = static_cast<float>(bf16(x.q.data()[i] * scale));
  const dmat q = to_double(qr), k = to_double(round_trip<bf16>(x.k)),
             v = to_double(round_trip<bf16>(x.v));
  reference::attention_rules rules;
  rules.causal = c.causal, rules.window = c.window;
  const auto ref = reference::attention(q, x.q_pos, k, v, x.k_pos, c.heads, c.kv_heads, 1.0, rules);
  const dmat p =
      reference::attention_weights(q, x.q_pos, k, x.k_pos, c.heads, c.kv_heads, 1.0, rules);
  auto max_head_norm = [&](const dmat& m) {  // for A of float_tolerance, on the rounded queries
    double n = 0;
    for (std::int64_t r = 0; r < m.rows(); ++r)
      for (std::int64_t h = 0; h < m.cols() / c.head_dim; ++h)
        n = std::max(n, m.row(r).segment(h * c.head_dim, c.head_dim).norm());
    return n;
  };
  const double a = max_head_norm(q) * max_head_norm(k);
  const double float_tol = float_tolerance(c.head_dim, c.tk, a, v.cwiseAbs().maxCoeff());
  const double u = unit_roundoff<bf16>();
  double worst = 0;
  for (std::int64_t t = 0; t < c.tq; ++t)
    for (std::int64_t h = 0; h < c.heads; ++h) {
      const std::int64_t j = h / (c.heads / c.kv_heads);
      for (std::int64_t i = 0; i < c.v_head_dim; ++i) {
        const auto pv =
            p.row(t * c.heads + h).transpose().cwiseProduct(v.col(j * c.v_head_dim + i));
        const double tol =
            float_tol + (probabilities_rounded
                             ? 6 * u * pv.norm() + 2.0001 * coarse_exp_error * pv.cwiseAbs().sum()
                             : 0.0);
        worst = std::max(
            worst, std::abs(out(t, h * c.v_head_dim + i) - ref.out(t, h * c.v_head_dim + i)) / tol);
      }
    }
  return worst;
}

inline std::string describe(const gqa_case& c) {
  std::ostringstream os;
  os << "H=" << c.heads << " H_kv=" << c.kv_heads << " d_qk=" << c.head_dim
     << " d_v=" << c.v_head_dim << " Tk=" << c.tk << " Tq=" << c.tq << " causal=" << c.causal
     << " window=" << (c.window ? *c.window : 0) << " strategy=" << static_cast<int>(c.strategy);
  return os.str();
}

}  // namespace attnkit::test
