#pragma once
// mla_map: an MLA layer described as linear maps of a GQA layer's activations, the form every
// approximate conversion step works in. With k = W_K x + b_K [H_kv d] and v = W_V x + b_V
// [H_kv d_v] the pre-RoPE GQA keys and values:
//   latent c            = latent [k ; v]             (kv_a_proj_with_mqa's first d_c rows)
//   rope keys k_pe      = rope_key k                 (its last rope_heads d_R rows), then RoPE
//   query of head i     = [q_nope_j q_i ; q_rope_j q_i] * q_scale,   j = i / (H / H_kv)
//   per-head up-projections W_UK_i = w_uk_j, W_UV_i = w_uv_j         (kv_b_proj)
// Steps edit the maps (rotate, select, truncate) in double; assemble() multiplies them into the
// GQA weights once and returns DeepSeek-named float tensors.
#include <Eigen/Dense>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "../core/rope.hpp"
#include "gqa_to_mla.hpp"
#include "linalg.hpp"

namespace attnkit::convert {

/// An MLA layer in double precision before it is rounded into an mla_checkpoint: the latent
/// map, the rope keys and the per-KV-head query and up-projection blocks every conversion route
/// (exact, TransMLA, MHA2MLA) edits step by step.
struct mla_map {
  std::int64_t rope_heads = 1;  ///< rope keys per token
  std::int64_t rope_dim = 0;    ///< d_R
  std::int64_t nope_dim = 0;    ///< d_nope
  rope_config rope{};  ///< RoPE of the rope parts (width rope_dim)
  dmatrix latent;      ///< [d_c, H_kv (d + d_v)]
  dmatrix rope_key;    ///< [rope_heads d_R, H_kv d]
  std::vector<dmatrix> q_nope;  ///< per KV head [d_nope, d]: query rows onto the nope keys
  std::vector<dmatrix> q_rope;  ///< per KV head [d_R, d]: query rows onto the rope keys
  std::vector<dmatrix> w_uk;    ///< per KV head [d_nope, d_c]: nope-key up-projection
  std::vector<dmatrix> w_uv;    ///< per KV head [d_v, d_c]: value up-projection
  /// true: the GQA biases pass through `latent` into kv_a_proj's bias (TransMLA: the PCA sees
  /// them as activations). false: the latent sees the weights only and the uncompressed nope-key
  /// and value biases stay on kv_b_proj (MHA2MLA's up-projection biases); kv_b_bias per KV head.
  bool bias_through_latent = true;
  std::vector<dvector> kv_b_bias;  ///< per KV head [d_nope + d_v] (bias_through_latent false)
  double q_scale = 1;            ///< folded into the query rows
  std::optional<float> scale{};  ///< the MLA softmax scale (empty: 1/sqrt(d_nope + d_R))

  std::int64_t latent_dim() const { return latent.rows(); }  ///< d_c
  /// Cache elements per token: d_c + rope_heads d_R.
  std::int64_t kv_elements() const { return latent_dim() + rope_heads * rope_dim; }
};

/// What an approximate conversion returns: the final checkpoint and one report per step.
struct conversion_result {
  mla_checkpoint checkpoint;             ///< the converted layer
  std::vector<conversion_report> steps;  ///< one report per step, in order
};

namespace detail {
/// The RoPE pairs of a GQA head: coordinates and frequency indices as the GQA layer uses them.
struct rope_pairs {
  const gqa_config& cfg;
  std::int64_t rot() const { return cfg.rope.rotary_dim ? cfg.rope.rotary_dim : cfg.head_dim; }
  std::int64_t count() const { return rot() / 2; }
  /// Coordinate, within the head, of half `h` (0 or 1) of pair p.
  std::int64_t coord(std::int64_t p, std::int64_t h) const {
    return cfg.rope.layout == rope_layout::half_split ? p + h * count() : 2 * p + h;
  }
  /// Frequency index of pair p of KV head j (the d in theta^(-2f/d) is frequency_dim()).
  std::int64_t frequency(std::int64_t j, std::int64_t p) const {
    const auto& t = cfg.rope.frequency_index;
    return t.empty()
               ? p
               : t[t.size() == 1 ? 0 : static_cast<std::size_t>(j)][static_cast<std::size_t>(p)];
  }
  std::int64_t frequency_dim() const {
    return cfg.rope.frequency_dim ? cfg.rope.frequency_dim : rot();
  }
};

/// Seconds since `start` (step timings in the reports).
inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

/// Output error of a checkpoint against the GQA layer on held-out tokens at positions 0..T-1
/// (one sequence, fresh caches); NaN without held-out tokens.
inline double held_out_error(gqa_layer& gqa, const mla_checkpoint& c, matrix_view<const float> x) {
  if (x.extent(0) == 0) return std::numeric_limits<double>::quiet_NaN();
  mla_layer mla(c.config, c.weights());
  std::vector<std::int64_t> pos(static_cast<std::size_t>(x.extent(0)));
  std::iota(pos.begin(), pos.end(), std::int64_t{0});
  return output_rel_error(gqa, mla, x, pos);
}

inline dmatrix to_double(const matrix_view<const float>& v) { return as_eigen(v).cast<double>(); }
inline dvector to_double(std::span<const float> b, std::int64_t n) {
  return b.empty() ? dvector::Zero(n)
                   : dvector(Eigen::Map<const Eigen::VectorXf>(b.data(), n).cast<double>());
}
inline std::vector<float> to_float_vector(const dvector& v) {
  std::vector<float> out(static_cast<std::size_t>(v.size()));
  for (Eigen::Index i = 0; i < v.size(); ++i)
    out[static_cast<std::size_t>(i)] = static_cast<float>(v[i]);
  return out;
}
/// [k ; v] weights and biases stacked as the maps' input space.
inline dmatrix kv_weights(const gqa_weights& w) {
  dmatrix out(w.k_proj.extent(0) + w.v_proj.extent(0), w.k_proj.extent(1));
  out << to_double(w.k_proj), to_double(w.v_proj);
  return out;
}
inline dvector kv_bias(const gqa_weights& w) {
  dvector out(w.k_proj.extent(0) + w.v_proj.extent(0));
  out << to_double(w.k_proj_bias, w.k_proj.extent(0)), to_double(w.v_proj_bias, w.v_proj.extent(0));
  return out;
}
}  // namespace detail

/// Multiplies the maps into the GQA weights: an MLA checkpoint in DeepSeek's tensor names.
template <class Exec = serial_executor>
mla_checkpoint assemble(const gqa_config& cfg, const gqa_weights& w, const mla_map& m,
                        Exec&& exec = Exec{}) {
  const std::int64_t h = cfg.heads, hkv = cfg.kv_heads, d = cfg.head_dim,
                     dv = cfg.v_head_dim ? cfg.v_head_dim : d;
  const std::int64_t g = h / hkv, dc = m.latent_dim(), dn = m.nope_dim, dr = m.rope_dim,
                     dqk = dn + dr;
  const bool biases = !w.k_proj_bias.empty() || !w.v_proj_bias.empty();
  mla_checkpoint out;
  out.config = mla_config{.model_dim = cfg.model_dim,
                          .heads = h,
                          .latent_dim = dc,
                          .nope_dim = dn,
                          .rope_dim = dr,
                          .v_head_dim = dv,
                          .rope_heads = m.rope_heads,
                          .rope = m.rope,
                          .scale = m.scale,
                          .window = cfg.window,
                          .products = cfg.products};
  const dmatrix kv = detail::kv_weights(w);
  dmatrix maps(dc + m.rope_heads * dr, kv.rows());  // [latent ; rope_key (on the k part)]
  maps << m.latent, m.rope_key, dmatrix::Zero(m.rope_key.rows(), kv.rows() - hkv * d);
  const dmatrix kv_a = detail::product(maps, kv, exec);
  out.kv_a_proj_with_mqa = kv_a.cast<float>();
  if (biases) {
    const dvector b = detail::kv_bias(w);
    dvector kv_a_b(kv_a.rows());
    kv_a_b << (m.bias_through_latent ? dvector(m.latent * b) : dvector::Zero(dc)),
        m.rope_key * b.head(hkv * d);
    out.kv_a_proj_bias = detail::to_float_vector(kv_a_b);
  }
  // Query rows in float (W_Q is the largest tensor; the maps are small and cast once per head).
  const auto wq = as_eigen(w.q_proj);
  const dvector bq = detail::to_double(w.q_proj_bias, h * d);
  out.q_proj.resize(h * dqk, wq.cols());
  dvector q_b(h * dqk);
  out.kv_b_proj.resize(h * (dn + dv), dc);
  std::vector<float> kv_b_b;
  exec.parallel_for(h, [&](std::int64_t i) {
    const auto j = static_cast<std::size_t>(i / g);
    const auto wqi = wq.middleRows(i * d, d);
    out.q_proj.middleRows(i * dqk, dn).noalias() = (m.q_scale * m.q_nope[j]).cast<float>() * wqi;
    out.q_proj.middleRows(i * dqk + dn, dr).noalias() =
        (m.q_scale * m.q_rope[j]).cast<float>() * wqi;
  });
  for (std::int64_t i = 0; i < h; ++i) {
    const auto j = static_cast<std::size_t>(i / g);
    q_b.segment(i * dqk, dn) = m.q_scale * m.q_nope[j] * bq.segment(i * d, d);
    q_b.segment(i * dqk + dn, dr) = m.q_scale * m.q_rope[j] * bq.segment(i * d, d);
    out.kv_b_proj.middleRows(i * (dn + dv), dn) = m.w_uk[j].cast<float>();
    out.kv_b_proj.middleRows(i * (dn + dv) + dn, dv) = m.w_uv[j].cast<float>();
    if (biases && !m.bias_through_latent) {
      const auto b = detail::to_float_vector(m.kv_b_bias[j]);
      kv_b_b.insert(kv_b_b.end(), b.begin(), b.end());
    }
  }
  if (!w.q_proj_bias.empty()) out.q_proj_bias = detail::to_float_vector(q_b);
  out.kv_b_proj_bias = std::move(kv_b_b);
  out.o_proj = as_eigen(w.o_proj);
  out.o_proj_bias = ::attnkit::convert::detail::to_vector(w.o_proj_bias);
  return out;
}

/// Rows c' = basis^T c of the latent (basis [d_c, r], orthonormal columns): the up-projections
/// become w basis, so the layer changes by the part of c outside span(basis).
inline void project_latent(mla_map& m, const dmatrix& basis) {
  m.latent = basis.transpose() * m.latent;
  for (auto& u : m.w_uk) u = u * basis;
  for (auto& u : m.w_uv) u = u * basis;
}

}  // namespace attnkit::convert
