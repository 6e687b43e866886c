#pragma once
// The MHA2MLA route (Ji et al., arXiv 2502.14837; methods.md section 5): GQA -> MLA by
//   1. partial RoPE: per KV head keep r/2 of the rotary frequencies (r dims) as a rope key of
//      that head (rope_heads = H_kv, each with its own frequency table, interleaved pairs);
//      every other coordinate of q and k loses RoPE and becomes a "nope" dimension. Dims are only
//      permuted, so the softmax scale 1/sqrt(d) is kept. Exact iff every pair is kept (I8).
//      Selections: high (fastest frequencies, pairs [0, r/2)), low (slowest), uniform (every
//      (2P/r)-th pair from `uniform_start`, P pairs per head), two_norm (per KV head j the r/2
//      pairs with the largest sum over its query heads i of mean_t |q_i,p| * mean_t |k_j,p|,
//      pair norms of pre-RoPE calibration activations).
//   2. low rank: a weights-only SVD of the nope keys and values M = [W_K,nope ; W_V] to the chosen
//      latent width, joint (one latent: MLA) or split (separate K and V latents of half the width
//      each). The latent is c = U_r^T (M x), the coordinates of the nope keys and values in their
//      leading r left singular vectors; MHA2MLA stores c = V_r^T x instead, the same rank-r
//      product U_r S_r V_r^T and so the same function, but ours keeps the latent at the scale of K
//      and V (kinder to bf16 caches). Exact when the width reaches rank(M). The K/V biases stay on
//      the up-projections (kv_b_proj), as MHA2MLA keeps them.
// QK-norm models are refused: the norm of a whole head cannot be formed from a partial head.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "mla_map.hpp"

namespace attnkit::convert {

/// Which RoPE frequency pairs MHA2MLA keeps per KV head: the highest or lowest frequencies, every
/// k-th pair (uniform), or the pairs with the largest query-key 2-norm product on calibration data
/// (two_norm).
enum class rope_selection { high, low, uniform, two_norm };
/// One SVD over the stacked nope keys and values (joint) or one each (split).
enum class svd_mode { joint, split };

/// The selection's name as attnkit-convert spells it.
inline const char* to_string(rope_selection s) {
  switch (s) {
    case rope_selection::high:
      return "high";
    case rope_selection::low:
      return "low";
    case rope_selection::uniform:
      return "uniform";
    case rope_selection::two_norm:
      return "2-norm";
  }
  return "?";
}

/// MHA2MLA's knobs: the partial-RoPE selection, then an optional SVD of the rest.
struct mha2mla_options {
  std::int64_t rope_dim =
      16;  ///< r: RoPE dims kept per KV head (r/2 frequencies); even, <= rotary dims
  rope_selection selection = rope_selection::two_norm;  ///< two_norm needs calibration tokens
  std::int64_t uniform_start = 0;                       ///< first pair of the uniform selection
  svd_mode svd = svd_mode::joint;  ///< one SVD over [K_nope V] (joint) or one each (split)
  std::int64_t latent_dim =
      0;  ///< d_c after the SVD (split: half to K, half to V); 0 = no SVD step
  /// two_norm rates the pairs on at most this many leading calibration tokens: means of pair
  /// norms settle long before 32k tokens, and the query activations cost 2 N D H d FLOPs.
  std::int64_t two_norm_max_tokens = 8192;
};

/// Pairs kept per KV head (ascending pair indices), by the chosen strategy.
template <class Exec = serial_executor>
std::vector<std::vector<std::int64_t>> select_rope_pairs(const gqa_config& cfg,
                                                         const gqa_weights& w,
                                                         matrix_view<const float> calibration,
                                                         const mha2mla_options& opt,
                                                         Exec&& exec = Exec{}) {
  using ::attnkit::detail::require;
  const detail::rope_pairs rp{cfg};
  const std::int64_t pairs = rp.count(), keep = opt.rope_dim / 2, hkv = cfg.kv_heads,
                     d = cfg.head_dim;
  require(opt.rope_dim >= 2 && opt.rope_dim % 2 == 0 && keep <= pairs,
          "mha2mla: rope_dim must be even and in [2, ", 2 * pairs,
          "] (the rotary dims of a head), got ", opt.rope_dim);
  std::vector<std::int64_t> order(static_cast<std::size_t>(pairs));
  std::iota(order.begin(), order.end(), std::int64_t{0});
  std::vector<std::vector<std::int64_t>> out(static_cast<std::size_t>(hkv));
  switch (opt.selection) {
    case rope_selection::high:
      out.assign(out.size(), {order.begin(), order.begin() + keep});
      return out;
    case rope_selection::low:
      out.assign(out.size(), {order.end() - keep, order.end()});
      return out;
    case rope_selection::uniform: {
      const std::int64_t step = pairs / keep;
      require(pairs % keep == 0, "mha2mla: uniform selection needs rope_dim/2=", keep,
              " to divide the ", pairs, " rotary pairs");
      require(opt.uniform_start >= 0 && opt.uniform_start < step,
              "mha2mla: uniform_start must be in [0, ", step, "), got ", opt.uniform_start);
      std::vector<std::int64_t> sel;
      for (std::int64_t k = 0; k < keep; ++k) sel.push_back(opt.uniform_start + k * step);
      out.assign(out.size(), sel);
      return out;
    }
    case rope_selection::two_norm:
      break;
  }
  require(calibration.extent(0) > 0,
          "mha2mla: the two_norm selection needs calibration tokens (got none)");
  require(calibration.extent(1) == cfg.model_dim, "mha2mla: calibration has width ",
          calibration.extent(1), " but the model dimension is ", cfg.model_dim);
  // Mean pair norms of the pre-RoPE q (every head) and k (every KV head) activations.
  const std::int64_t h = cfg.heads, g = h / hkv;
  row_matrix<float> wqk(h * d + hkv * d, cfg.model_dim);
  wqk << as_eigen(w.q_proj), as_eigen(w.k_proj);
  std::vector<float> bqk;
  if (!w.q_proj_bias.empty() || !w.k_proj_bias.empty()) {
    bqk.assign(static_cast<std::size_t>(h * d + hkv * d), 0.f);
    std::copy(w.q_proj_bias.begin(), w.q_proj_bias.end(), bqk.begin());
    std::copy(w.k_proj_bias.begin(), w.k_proj_bias.end(), bqk.begin() + h * d);
  }
  dmatrix norm_sum = dmatrix::Zero(h + hkv, pairs);  // rows: query heads, then KV heads
  const matrix_view<const float> used(
      calibration.data_handle(),
      {std::min(calibration.extent(0), std::max<std::int64_t>(opt.two_norm_max_tokens, 1)),
       calibration.extent(1)},
      {calibration.stride(0), calibration.stride(1)});
  detail::for_each_activation_chunk(used, wqk, bqk, exec, [&](const auto& a) {
    for (std::int64_t t = 0; t < a.rows(); ++t)
      for (std::int64_t head = 0; head < h + hkv; ++head)
        for (std::int64_t p = 0; p < pairs; ++p) {
          const float x0 = a(t, head * d + rp.coord(p, 0)), x1 = a(t, head * d + rp.coord(p, 1));
          norm_sum(head, p) += std::sqrt(double(x0) * x0 + double(x1) * x1);
        }
  });
  for (std::int64_t j = 0; j < hkv; ++j) {
    std::vector<double> score(static_cast<std::size_t>(pairs));
    for (std::int64_t p = 0; p < pairs; ++p)
      score[static_cast<std::size_t>(p)] =
          norm_sum.block(j * g, p, g, 1).sum() * norm_sum(h + j, p);
    std::vector<std::int64_t> by_score = order;
    std::stable_sort(by_score.begin(), by_score.end(), [&](std::int64_t a, std::int64_t b) {
      return score[static_cast<std::size_t>(a)] > score[static_cast<std::size_t>(b)];
    });
    by_score.resize(static_cast<std::size_t>(keep));
    std::sort(by_score.begin(), by_score.end());
    out[static_cast<std::size_t>(j)] = by_score;
  }
  return out;
}

/// The partial-RoPE map (step 1) for the given kept pairs per KV head; the latent holds the nope
/// keys and the values uncompressed.
inline mla_map mha2mla_partial_rope_map(const gqa_config& cfg, const gqa_weights& w,
                                        const std::vector<std::vector<std::int64_t>>& kept) {
  const detail::rope_pairs rp{cfg};
  const std::int64_t hkv = cfg.kv_heads, d = cfg.head_dim, dv = cfg.v_head_dim ? cfg.v_head_dim : d;
  const std::int64_t r = 2 * static_cast<std::int64_t>(kept[0].size()), dn = d - r, lk = hkv * dn;
  mla_map m;
  m.rope_heads = hkv;
  m.rope_dim = r;
  m.nope_dim = dn;
  m.rope = {.theta = cfg.rope.theta,
            .layout = rope_layout::interleaved,
            .rotary_dim = r,
            .frequency_dim = rp.frequency_dim(),
            .frequency_index = {},
            .scaling = cfg.rope.scaling};
  m.latent = dmatrix::Zero(lk + hkv * dv, hkv * (d + dv));
  m.rope_key = dmatrix::Zero(hkv * r, hkv * d);
  m.bias_through_latent = false;
  m.q_scale = 1;
  m.scale = cfg.scale.value_or(1.f / std::sqrt(static_cast<float>(d)));
  const dvector bias = detail::kv_bias(w);
  for (std::int64_t j = 0; j < hkv; ++j) {
    const auto& sel = kept[static_cast<std::size_t>(j)];
    std::vector<bool> roped(static_cast<std::size_t>(d), false);
    std::vector<std::int64_t> table;
    dmatrix q_rope = dmatrix::Zero(r, d), q_nope = dmatrix::Zero(dn, d);
    for (std::size_t q = 0; q < sel.size(); ++q) {
      table.push_back(rp.frequency(j, sel[q]));
      for (std::int64_t hh = 0; hh < 2; ++hh) {
        const std::int64_t c = rp.coord(sel[q], hh), row = 2 * static_cast<std::int64_t>(q) + hh;
        roped[static_cast<std::size_t>(c)] = true;
        q_rope(row, c) = 1;
        m.rope_key(j * r + row, j * d + c) = 1;
      }
    }
    m.rope.frequency_index.push_back(table);
    dvector b(dn + dv);
    std::int64_t n = 0;
    for (std::int64_t c = 0; c < d; ++c) {
      if (roped[static_cast<std::size_t>(c)]) continue;
      q_nope(n, c) = 1;
      m.latent(j * dn + n, j * d + c) = 1;
      b[n++] = bias[j * d + c];
    }
    b.tail(dv) = bias.segment(hkv * d + j * dv, dv);
    m.latent.block(lk + j * dv, hkv * d + j * dv, dv, dv).setIdentity();
    m.q_rope.push_back(q_rope);
    m.q_nope.push_back(q_nope);
    m.w_uk.push_back(dmatrix::Zero(dn, m.latent.rows()));
    m.w_uk.back().block(0, j * dn, dn, dn).setIdentity();
    m.w_uv.push_back(dmatrix::Zero(dv, m.latent.rows()));
    m.w_uv.back().block(0, lk + j * dv, dv, dv).setIdentity();
    m.kv_b_bias.push_back(b);
  }
  return m;
}

/// MHA2MLA: partial RoPE, then (latent_dim > 0) the weights-only SVD. `calibration` feeds the
/// two_norm selection; `heldout` tokens (one sequence) measure each step's output error.
template <class Exec = serial_executor>
conversion_result gqa_to_mla_mha2mla(const gqa_config& cfg_in, const gqa_weights& w,
                                     matrix_view<const float> calibration,
                                     matrix_view<const float> heldout, const mha2mla_options& opt,
                                     Exec&& exec = Exec{}) {
  using ::attnkit::detail::require;
  gqa_layer gqa(cfg_in, w);  // validates
  const gqa_config& cfg = gqa.config();
  require(w.q_norm.empty() && w.k_norm.empty(),
          "mha2mla: the model has QK-norm (per-head RMSNorm on q/k before RoPE); partial RoPE and "
          "the low-rank "
          "latent split a head, and the norm of the whole head cannot be formed from its parts; "
          "use the exact "
          "conversion (gqa_to_mla_exact, grouped layout)");
  require(heldout.extent(0) == 0 || heldout.extent(1) == cfg.model_dim,
          "mha2mla: heldout has width ", heldout.extent(1), " but the model dimension is ",
          cfg.model_dim);
  detail::require_finite(calibration, "mha2mla", "calibration");
  detail::require_finite(heldout, "mha2mla", "heldout");
  const std::int64_t hkv = cfg.kv_heads, d = cfg.head_dim, dv = cfg.v_head_dim;
  conversion_result res;
  auto t0 = std::chrono::steady_clock::now();
  mla_map m = mha2mla_partial_rope_map(cfg, w, select_rope_pairs(cfg, w, calibration, opt, exec));
  res.checkpoint = assemble(cfg, w, m, exec);
  res.steps.push_back({"MHA2MLA partial RoPE (" + std::string(to_string(opt.selection)) + ", " +
                           std::to_string(opt.rope_dim) + " of " +
                           std::to_string(detail::rope_pairs{cfg}.rot()) +
                           " rotary dims per KV head)",
                       hkv * (d + dv), m.kv_elements(), 0, detail::seconds_since(t0)});
  res.steps.back().rel_error = detail::held_out_error(gqa, res.checkpoint, heldout);
  if (opt.latent_dim == 0) return res;

  t0 = std::chrono::steady_clock::now();
  const std::int64_t lk = hkv * (d - opt.rope_dim), lv = hkv * dv;
  const dmatrix mk =
      detail::product(m.latent, detail::kv_weights(w), exec);  // [latent, D]: nope-K and V weights
  if (opt.svd == svd_mode::joint) {
    require(opt.latent_dim <= lk + lv, "mha2mla: latent_dim (joint SVD rank) must be <= ", lk + lv,
            " (= H_kv (d - rope_dim + d_v)), got ", opt.latent_dim);
    project_latent(m,
                   principal_axes(detail::product(mk, mk.transpose(), exec), opt.latent_dim, 0.0));
  } else {
    const std::int64_t rk = opt.latent_dim / 2, rv = opt.latent_dim - rk;
    require(rk <= lk && rv <= lv, "mha2mla: latent_dim=", opt.latent_dim, " splits into ", rk,
            " key and ", rv, " value dims, above their maxima ", lk, " (H_kv (d - rope_dim)) and ",
            lv, " (H_kv d_v)");
    dmatrix basis = dmatrix::Zero(lk + lv, rk + rv);
    basis.topLeftCorner(lk, rk) =
        principal_axes(mk.topRows(lk) * mk.topRows(lk).transpose(), rk, 0.0);
    basis.bottomRightCorner(lv, rv) =
        principal_axes(mk.bottomRows(lv) * mk.bottomRows(lv).transpose(), rv, 0.0);
    project_latent(m, basis);
  }
  res.checkpoint = assemble(cfg, w, m, exec);
  res.steps.push_back({std::string("MHA2MLA SVD ") +
                           (opt.svd == svd_mode::joint ? "joint" : "split") +
                           " to d_c=" + std::to_string(opt.latent_dim),
                       hkv * (d + dv), m.kv_elements(), 0, detail::seconds_since(t0)});
  res.steps.back().rel_error = detail::held_out_error(gqa, res.checkpoint, heldout);
  return res;
}

}  // namespace attnkit::convert
