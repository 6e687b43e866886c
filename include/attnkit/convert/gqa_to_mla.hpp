#pragma once
// Exact GQA -> MLA conversion (identity I1 of methods.md): the latent is the GQA cache itself.
//   grouped_rope layout: one rope key per KV head (rope_heads = H_kv, d_R = d, d_nope = 0); the
//     latent c holds the V heads (d_c = H_kv d_v); W_UV_i selects KV head j(i) = i / g; q_proj is
//     W_Q unchanged (each head's rope part is its whole query). Cache: H_kv (d + d_v) elements per
//     token -- exactly GQA's -- and the absorbed decode reads exactly the GQA cache bytes.
//   deepseek layout: DeepSeek's strict tensor shapes with one rope key (rope_heads = 1): the
//     rope part is all K heads concatenated (d_R = H_kv d) with a tiled per-head frequency table
//     in interleaved pairs (half-split heads are permuted to interleaved order, the same
//     permutation on q and k), q_pe_i = W_Q^i placed at KV head j(i)'s slot and zero elsewhere,
//     qk_nope = 0, and the factor sqrt(d_R / d) folded into W_Q (MLA scales by 1/sqrt(d_R)).
// RoPE stays in the cache because the up-projections are selectors, which commute with it.
// QK-norm models (Qwen3: per-head RMSNorm on q and k before RoPE) convert exactly in the grouped
// layout: the normalised, roped K is what is cached, and the norms become the MLA layer's
// q_rope_norm / k_rope_norm. The DeepSeek layout refuses them (see the error it throws).
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "../core/error.hpp"
#include "../core/view.hpp"
#include "../layers/gqa_layer.hpp"
#include "../layers/mla_layer.hpp"
#include "report.hpp"

namespace attnkit::convert {

/// Rope-key layout of an exact conversion: one rope key per KV head (grouped_rope, any GQA model)
/// or DeepSeek's single shared rope key (deepseek, exact for MQA models only).
enum class mla_layout { grouped_rope, deepseek };

/// An MLA layer's configuration with weights it owns (float, nn.Linear layout).
struct mla_checkpoint {
  mla_config config;         ///< the layer's geometry (no q-LoRA), RoPE and softmax scale
  row_matrix<float> q_proj;  ///< [H (d_nope + d_R), D]
  row_matrix<float> kv_a_proj_with_mqa;  ///< [d_c + rope_heads d_R, D]
  row_matrix<float> kv_b_proj;           ///< [H (d_nope + d_v), d_c]
  row_matrix<float> o_proj;              ///< [D, H d_v]
  std::vector<float> q_proj_bias;        ///< [H (d_nope + d_R)] or empty
  std::vector<float> kv_a_proj_bias;     ///< [d_c + rope_heads d_R] or empty
  std::vector<float> kv_b_proj_bias;     ///< [H (d_nope + d_v)] or empty
  std::vector<float> o_proj_bias;        ///< [D] or empty
  std::vector<float> q_rope_norm;  ///< converted query QK-norm weights (grouped layout) or empty
  std::vector<float> k_rope_norm;  ///< converted key QK-norm weights (grouped layout) or empty
  /// Latent RMSNorm weights [d_c]: empty (the conversions' latent is unnormalised); a stock
  /// DeepSeek checkpoint always has one, so writing that format fits it (attnkit-convert).
  std::vector<float> kv_a_layernorm;

  /// Views for mla_layer (valid while this object lives).
  mla_weights weights() const {
    mla_weights w;
    w.q_proj = view_of(q_proj);
    w.kv_a_proj_with_mqa = view_of(kv_a_proj_with_mqa);
    w.kv_b_proj = view_of(kv_b_proj);
    w.o_proj = view_of(o_proj);
    w.q_proj_bias = q_proj_bias;
    w.kv_a_proj_bias = kv_a_proj_bias;
    w.kv_b_proj_bias = kv_b_proj_bias;
    w.o_proj_bias = o_proj_bias;
    w.q_rope_norm = q_rope_norm;
    w.k_rope_norm = k_rope_norm;
    w.kv_a_layernorm = kv_a_layernorm;
    return w;
  }
};

namespace detail {
/// Copies rows [r0, r0 + n) of a weight view into dst starting at row d0, scaled.
inline void copy_rows(const matrix_view<const float>& src, std::int64_t r0, std::int64_t n,
                      row_matrix<float>& dst, std::int64_t d0, float scale = 1.f) {
  for (std::int64_t r = 0; r < n; ++r)
    for (std::int64_t c = 0; c < src.extent(1); ++c) dst(d0 + r, c) = src(r0 + r, c) * scale;
}
inline std::vector<float> to_vector(std::span<const float> s) { return {s.begin(), s.end()}; }

/// Position, within one head's rotary part, of half-split coordinate c in interleaved order.
inline std::int64_t interleaved_slot(std::int64_t c, std::int64_t rot) {
  const std::int64_t half = rot / 2;
  return c < half ? 2 * c : c < rot ? 2 * (c - half) + 1 : c;
}
}  // namespace detail

/// The exact conversion. Throws attnkit::invalid_argument for what it cannot express.
inline std::pair<mla_checkpoint, conversion_report> gqa_to_mla_exact(
    const gqa_config& cfg_in, const gqa_weights& w, mla_layout layout = mla_layout::grouped_rope) {
  gqa_layer check(cfg_in, w);  // validates shapes
  const gqa_config& cfg = check.config();
  const std::int64_t dm = cfg.model_dim, h = cfg.heads, hkv = cfg.kv_heads, d = cfg.head_dim,
                     dv = cfg.v_head_dim;
  const std::int64_t g = h / hkv, rot = cfg.rope.rotary_dim ? cfg.rope.rotary_dim : d;
  mla_checkpoint m;
  m.config.model_dim = dm;
  m.config.heads = h;
  m.config.latent_dim = hkv * dv;
  m.config.nope_dim = 0;
  m.config.v_head_dim = dv;
  m.config.window = cfg.window;
  m.config.products = cfg.products;
  const float gqa_scale = cfg.scale.value_or(1.f / std::sqrt(static_cast<float>(d)));
  // kv_b_proj: per head i, rows [W_UK (none) ; W_UV_i = select KV head j(i) of the latent].
  m.kv_b_proj = row_matrix<float>::Zero(h * dv, hkv * dv);
  for (std::int64_t i = 0; i < h; ++i)
    for (std::int64_t c = 0; c < dv; ++c) m.kv_b_proj(i * dv + c, (i / g) * dv + c) = 1.f;
  m.o_proj = as_eigen(w.o_proj);
  m.o_proj_bias = detail::to_vector(w.o_proj_bias);
  const std::int64_t w_in = dm;
  auto kv_bias = [&](auto&& k_part) {
    if (w.k_proj_bias.empty() && w.v_proj_bias.empty()) return;
    m.kv_a_proj_bias.assign(static_cast<std::size_t>(hkv * dv + hkv * d), 0.f);
    for (std::int64_t i = 0; i < static_cast<std::int64_t>(w.v_proj_bias.size()); ++i)
      m.kv_a_proj_bias[static_cast<std::size_t>(i)] = w.v_proj_bias[static_cast<std::size_t>(i)];
    k_part();
  };

  const bool qk_norm = !w.q_norm.empty() || !w.k_norm.empty();
  if (qk_norm) {
    ::attnkit::detail::require(
        layout == mla_layout::grouped_rope,
        "gqa_to_mla_exact: the model has QK-norm (per-head RMSNorm on q/k before RoPE), which the "
        "DeepSeek layout cannot express: it concatenates all K heads into one rope key whose norm "
        "would mix heads; use mla_layout::grouped_rope (one rope key per KV head)");
    m.q_rope_norm = detail::to_vector(w.q_norm);
    m.k_rope_norm = detail::to_vector(w.k_norm);
    m.config.rms_eps = cfg.rms_eps;
  }
  if (layout == mla_layout::grouped_rope) {
    m.config.rope_dim = d;
    m.config.rope_heads = hkv;
    m.config.rope = cfg.rope;
    m.config.scale = gqa_scale;  // 1/sqrt(d_nope + d_R) = 1/sqrt(d) unless the GQA overrides it
    m.q_proj = as_eigen(w.q_proj);
    m.q_proj_bias = detail::to_vector(w.q_proj_bias);
    m.kv_a_proj_with_mqa.resize(hkv * dv + hkv * d, w_in);
    detail::copy_rows(w.v_proj, 0, hkv * dv, m.kv_a_proj_with_mqa, 0);
    detail::copy_rows(w.k_proj, 0, hkv * d, m.kv_a_proj_with_mqa, hkv * dv);
    kv_bias([&] {
      for (std::int64_t i = 0; i < static_cast<std::int64_t>(w.k_proj_bias.size()); ++i)
        m.kv_a_proj_bias[static_cast<std::size_t>(hkv * dv + i)] =
            w.k_proj_bias[static_cast<std::size_t>(i)];
    });
  } else {
    // One rope key of width H_kv d: head j's rotary coordinates (interleaved) at [j rot, (j+1)
    // rot), all non-rotary coordinates after H_kv rot; the tiled table gives head j's pairs its own
    // frequencies.
    const auto& tabs = cfg.rope.frequency_index;
    const std::int64_t pairs = rot / 2, dr = hkv * d;
    m.config.rope_dim = dr;
    m.config.rope_heads = 1;
    m.config.rope = {.theta = cfg.rope.theta,
                     .layout = rope_layout::interleaved,
                     .rotary_dim = hkv * rot,
                     .frequency_dim = cfg.rope.frequency_dim ? cfg.rope.frequency_dim : rot,
                     .frequency_index = {{}},
                     .scaling = cfg.rope.scaling};
    for (std::int64_t j = 0; j < hkv; ++j)
      for (std::int64_t p = 0; p < pairs; ++p)
        m.config.rope.frequency_index[0].push_back(
            tabs.empty() ? p
                         : tabs[tabs.size() == 1 ? 0 : static_cast<std::size_t>(j)]
                               [static_cast<std::size_t>(p)]);
    // Slot of coordinate c of KV head j in the rope key.
    auto slot = [&](std::int64_t j, std::int64_t c) {
      const std::int64_t s =
          cfg.rope.layout == rope_layout::half_split ? detail::interleaved_slot(c, rot) : c;
      return s < rot ? j * rot + s : hkv * rot + j * (d - rot) + (s - rot);
    };
    m.config.scale.reset();  // 1/sqrt(d_R); the change of width is folded into W_Q below
    const float fold = gqa_scale * std::sqrt(static_cast<float>(dr));
    m.q_proj = row_matrix<float>::Zero(h * dr, w_in);
    if (!w.q_proj_bias.empty()) m.q_proj_bias.assign(static_cast<std::size_t>(h * dr), 0.f);
    for (std::int64_t i = 0; i < h; ++i)
      for (std::int64_t c = 0; c < d; ++c) {
        const std::int64_t row = i * dr + slot(i / g, c);
        for (std::int64_t e = 0; e < w_in; ++e) m.q_proj(row, e) = w.q_proj(i * d + c, e) * fold;
        if (!w.q_proj_bias.empty())
          m.q_proj_bias[static_cast<std::size_t>(row)] =
              w.q_proj_bias[static_cast<std::size_t>(i * d + c)] * fold;
      }
    m.kv_a_proj_with_mqa.resize(hkv * dv + dr, w_in);
    detail::copy_rows(w.v_proj, 0, hkv * dv, m.kv_a_proj_with_mqa, 0);
    for (std::int64_t j = 0; j < hkv; ++j)
      for (std::int64_t c = 0; c < d; ++c)
        detail::copy_rows(w.k_proj, j * d + c, 1, m.kv_a_proj_with_mqa, hkv * dv + slot(j, c));
    kv_bias([&] {
      for (std::int64_t j = 0; j < hkv && !w.k_proj_bias.empty(); ++j)
        for (std::int64_t c = 0; c < d; ++c)
          m.kv_a_proj_bias[static_cast<std::size_t>(hkv * dv + slot(j, c))] =
              w.k_proj_bias[static_cast<std::size_t>(j * d + c)];
    });
  }
  conversion_report rep{
      layout == mla_layout::grouped_rope ? "exact GQA -> MLA (grouped rope keys)"
                                         : "exact GQA -> MLA (DeepSeek layout, one rope key)",
      hkv * (d + dv), m.config.latent_dim + m.config.rope_heads * m.config.rope_dim};
  return {std::move(m), rep};
}

/// ||y_mla - y_gqa||_F / ||y_gqa||_F on held-out tokens x [T, D] at positions (fresh caches).
inline double output_rel_error(gqa_layer& gqa, mla_layer& mla, matrix_view<const float> x,
                               std::span<const std::int64_t> positions,
                               mla_path path = mla_path::automatic) {
  const std::int64_t t = x.extent(0), dm = gqa.config().model_dim;
  row_matrix<float> y0(t, dm), y1(t, dm);
  auto c0 = gqa.make_cache<float>(t);
  auto c1 = mla.make_cache<float>(t);
  gqa.forward(x, positions, c0, view_of(y0));
  mla.forward(x, positions, c1, view_of(y1), serial_executor{}, path);
  return (y1.cast<double>() - y0.cast<double>()).norm() /
         std::max(y0.cast<double>().norm(), 1e-300);
}

}  // namespace attnkit::convert
