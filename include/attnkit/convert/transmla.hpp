#pragma once
// The TransMLA route (Meng et al., arXiv 2502.07864; methods.md section 4): GQA -> a
// DeepSeek-shaped MLA (one rope key, rope_heads = 1) in three steps on calibration activations.
//   1. RoRoPE + FreqFold: for every group of F adjacent RoPE frequencies, a PCA across the KV
//      heads x F frequencies of the pre-RoPE keys (both coordinates of a pair are samples;
//      uncentered second moment in double, damped) gives an orthogonal U_i applied identically to
//      both pair coordinates of k and of the absorbed queries. With F = 1 this commutes with RoPE
//      (identity I2): the model with RoPE on every rotated dim is exact. F > 1 treats F adjacent
//      frequencies as one (the approximation FreqFold makes).
//   2. Partial RoPE: only the top F/C components of every group keep RoPE, C = rotary dims /
//      qk_mqa_dim, pair p = i F/C + m using the frequency of original pair i F + m C; with the
//      standard table that is the native table of a qk_mqa_dim-wide head, so the result loads as
//      plain DeepSeek RoPE. All other latent dims lose RoPE.
//   3. Balanced K/V + joint PCA: the nope-key latent rows are divided by
//      mean column norm(K_nope) / (mean column norm(V) * balance_kv_ratio) (and W_UK multiplied,
//      function-preserving) so the keys do not dominate, then a joint PCA of [K_nope ; V]
//      activations keeps kv_lora_rank dims.
// Queries are scaled by sqrt(d_nope + d_R) * (GQA scale) so the MLA scale 1/sqrt(d_nope + d_R)
// reproduces the GQA logits (TransMLA's sqrt((d + d_R)/d) fold). Biases pass through the
// latent (TransMLA's homogeneous-coordinate trick, since activations include them).
// Refused: QK-norm models (the rotation mixes heads, the norm does not commute with it) and
// per-KV-head RoPE tables (the rotation mixes heads at one frequency).
#include <chrono>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "mla_map.hpp"

namespace attnkit::convert {

/// TransMLA's steps, in order: RoRoPE + FreqFold, partial RoPE, low-rank joint PCA.
enum class transmla_step { rorope, partial_rope, low_rank };

/// TransMLA's knobs: RoRoPE + FreqFold to qk_mqa_dim rope dims, then the balanced joint PCA.
struct transmla_options {
  std::int64_t qk_mqa_dim = 64;     ///< d_R of the result (TransMLA default 64)
  std::int64_t kv_lora_rank = 512;  ///< d_c of the result (TransMLA default 512)
  /// F: frequencies folded per PCA group, a multiple of C = rotary dims / qk_mqa_dim dividing the
  /// rotary pairs. 0 = auto (TransMLA's default): start at C and double while the output error of
  /// the partial-RoPE model on the first `auto_tokens` calibration tokens improves. TransMLA ships
  /// F = 4 for Llama-3-8B and F = 8 for Llama-2-7B.
  std::int64_t freqfold = 0;
  std::int64_t auto_tokens = 256;  ///< calibration tokens the freqfold = 0 search scores on
  double balance_kv_ratio = 1;  ///< K/V balance target (TransMLA default 1)
  double damping = 0.01;        ///< PCA damping, fraction of the mean eigenvalue (TransMLA: 0.01)
  transmla_step stop_after = transmla_step::low_rank;  ///< return an intermediate model
};

namespace detail {

/// RoRoPE rotation of the KV-head keys [H_kv d]: rows ordered as the new key, the `keep` leading
/// components of every frequency group first (interleaved pairs, rope part), then the other
/// components and the non-rotary coordinates. `frequency` receives each rope pair's frequency.
/// gram_k: the keys' Gram [H_kv d, H_kv d], any Eigen expression (a template: see principal_axes).
template <class Derived>
dmatrix rorope_rotation(const gqa_config& cfg, const Eigen::MatrixBase<Derived>& gram_k,
                        std::int64_t freqfold, std::int64_t keep, double damping,
                        std::vector<std::int64_t>& frequency) {
  const rope_pairs rp{cfg};
  const std::int64_t hkv = cfg.kv_heads, d = cfg.head_dim, f = freqfold, groups = rp.count() / f,
                     nf = hkv * f;
  dmatrix rot = dmatrix::Zero(hkv * d, hkv * d);
  std::int64_t nope_row = 2 * groups * keep;
  frequency.clear();
  for (std::int64_t i = 0; i < groups; ++i) {
    auto coord = [&](std::int64_t u, std::int64_t h) {
      return (u / f) * d + rp.coord(i * f + u % f, h);
    };
    dmatrix gi = dmatrix::Zero(nf, nf);
    for (std::int64_t h = 0; h < 2; ++h)
      for (std::int64_t u = 0; u < nf; ++u)
        for (std::int64_t v = 0; v < nf; ++v) gi(u, v) += gram_k(coord(u, h), coord(v, h));
    const dmatrix axes = principal_axes(gi, nf, damping);
    for (std::int64_t m = 0; m < nf; ++m) {
      if (m < keep) frequency.push_back(rp.frequency(0, i * f + m * f / keep));
      for (std::int64_t h = 0; h < 2; ++h) {
        const std::int64_t row = m < keep ? 2 * (i * keep + m) + h : nope_row++;
        for (std::int64_t u = 0; u < nf; ++u) rot(row, coord(u, h)) = axes(u, m);
      }
    }
  }
  for (std::int64_t j = 0; j < hkv; ++j)
    for (std::int64_t c = rp.rot(); c < d; ++c) rot(nope_row++, j * d + c) = 1;
  return rot;
}

/// The MLA map of a rotated key: the first rope_dim rows keep RoPE (one rope key), the rest and
/// the values form the latent; queries absorb the rotation.
inline mla_map transmla_map(const gqa_config& cfg, const dmatrix& rot,
                            const std::vector<std::int64_t>& frequency) {
  const rope_pairs rp{cfg};
  const std::int64_t hkv = cfg.kv_heads, d = cfg.head_dim, dv = cfg.v_head_dim ? cfg.v_head_dim : d;
  const std::int64_t dr = 2 * static_cast<std::int64_t>(frequency.size()), lk = hkv * d - dr,
                     lv = hkv * dv;
  mla_map m;
  m.rope_heads = 1;
  m.rope_dim = dr;
  m.nope_dim = lk > 0 ? d : 0;
  m.rope = {.theta = cfg.rope.theta,
            .layout = rope_layout::interleaved,
            .rotary_dim = dr,
            .frequency_dim = rp.frequency_dim(),
            .frequency_index = {frequency},
            .scaling = cfg.rope.scaling};
  bool native =
      true;  // frequency f / frequency_dim == p / d_R for every pair: DeepSeek's own table
  for (std::int64_t p = 0; p < dr / 2; ++p)
    native = native && frequency[static_cast<std::size_t>(p)] * dr == p * rp.frequency_dim();
  if (native) m.rope.frequency_dim = 0, m.rope.frequency_index.clear();
  m.latent = dmatrix::Zero(lk + lv, hkv * d + lv);
  m.latent.topLeftCorner(lk, hkv * d) = rot.bottomRows(lk);
  m.latent.bottomRightCorner(lv, lv).setIdentity();
  m.rope_key = rot.topRows(dr);
  for (std::int64_t j = 0; j < hkv; ++j) {
    m.q_rope.push_back(rot.topRows(dr).middleCols(j * d, d));
    m.q_nope.push_back(dmatrix::Identity(m.nope_dim, d));
    m.w_uk.push_back(dmatrix::Zero(m.nope_dim, lk + lv));
    if (m.nope_dim)
      m.w_uk.back().leftCols(lk) = rot.bottomRows(lk).middleCols(j * d, d).transpose();
    m.w_uv.push_back(dmatrix::Zero(dv, lk + lv));
    m.w_uv.back().block(0, lk + j * dv, dv, dv).setIdentity();
  }
  const double gqa_scale = cfg.scale.value_or(1.f / std::sqrt(static_cast<float>(d)));
  m.q_scale = gqa_scale * std::sqrt(static_cast<double>(m.nope_dim + dr));
  return m;
}

}  // namespace detail

/// TransMLA: RoRoPE + FreqFold, partial RoPE, balanced joint PCA (see the header comment).
/// `calibration` [N, D] drives every PCA; `heldout` tokens (one sequence, may be empty) measure
/// each step's output error (intermediate steps are only built when they are measured).
template <class Exec = serial_executor>
conversion_result gqa_to_mla_transmla(const gqa_config& cfg_in, const gqa_weights& w,
                                      matrix_view<const float> calibration,
                                      matrix_view<const float> heldout,
                                      const transmla_options& opt = {}, Exec&& exec = Exec{}) {
  using ::attnkit::detail::require;
  gqa_layer gqa(cfg_in, w);  // validates
  const gqa_config& cfg = gqa.config();
  const detail::rope_pairs rp{cfg};
  const std::int64_t hkv = cfg.kv_heads, d = cfg.head_dim, dv = cfg.v_head_dim, rot = rp.rot(),
                     qk = opt.qk_mqa_dim;
  require(
      w.q_norm.empty() && w.k_norm.empty(),
      "transmla: the model has QK-norm (per-head RMSNorm on q/k before RoPE), which does not "
      "commute with the "
      "RoRoPE rotation across KV heads (U RMSNorm(k) != RMSNorm(U k)); use the exact conversion "
      "(gqa_to_mla_exact, grouped layout)");
  require(cfg.rope.frequency_index.size() <= 1,
          "transmla: per-KV-head RoPE tables are not supported: RoRoPE mixes KV heads at one "
          "frequency, so every head "
          "needs the same table");
  require(calibration.extent(1) == cfg.model_dim, "transmla: calibration has width ",
          calibration.extent(1), " but the model dimension is ", cfg.model_dim);
  require(calibration.extent(0) > 0, "transmla: calibration needs at least one token");
  detail::require_finite(calibration, "transmla", "calibration");
  detail::require_finite(heldout, "transmla", "heldout");
  require(heldout.extent(0) == 0 || heldout.extent(1) == cfg.model_dim,
          "transmla: heldout has width ", heldout.extent(1), " but the model dimension is ",
          cfg.model_dim);
  require(qk >= 2 && qk % 2 == 0 && qk <= d, "transmla: qk_mqa_dim must be even and in [2, d=", d,
          "], got ", qk);
  require(rot % qk == 0, "transmla: qk_mqa_dim=", qk, " must divide the ", rot,
          " rotary dims of a head");
  const std::int64_t collapse = rot / qk, pairs = rot / 2, lmax = hkv * d - qk + hkv * dv;
  require(opt.freqfold >= 0, "transmla: freqfold must be >= 0 (0 = automatic), got ", opt.freqfold);
  require(opt.freqfold != 0 || opt.auto_tokens >= 1,
          "transmla: auto_tokens must be >= 1 when freqfold is automatic (0), got ",
          opt.auto_tokens);
  require(opt.freqfold == 0 || (opt.freqfold % collapse == 0 && pairs % opt.freqfold == 0),
          "transmla: freqfold F=", opt.freqfold,
          " must be a multiple of the collapse factor C=", collapse,
          " (rotary dims / qk_mqa_dim) and divide the ", pairs, " rotary pairs");
  require(opt.stop_after != transmla_step::low_rank ||
              (opt.kv_lora_rank >= 1 && opt.kv_lora_rank <= lmax),
          "transmla: kv_lora_rank must be in [1, ", lmax, "] (= H_kv (d + d_v) - qk_mqa_dim), got ",
          opt.kv_lora_rank);
  require(opt.balance_kv_ratio > 0 && opt.damping >= 0,
          "transmla: balance_kv_ratio must be > 0 and damping >= 0, got ", opt.balance_kv_ratio,
          " and ", opt.damping);

  conversion_result res;
  const bool measure = heldout.extent(0) > 0;
  const std::int64_t before = hkv * (d + dv);
  auto t0 = std::chrono::steady_clock::now();
  row_matrix<float> wkv(hkv * (d + dv), cfg.model_dim);
  wkv << as_eigen(w.k_proj), as_eigen(w.v_proj);
  const std::vector<float> bkv = w.k_proj_bias.empty() && w.v_proj_bias.empty()
                                     ? std::vector<float>{}
                                     : detail::to_float_vector(detail::kv_bias(w));
  const dmatrix gram = detail::activation_gram(calibration, wkv, bkv, exec);
  std::vector<std::int64_t> freq;
  auto partial_map = [&](std::int64_t f, std::int64_t keep) {
    return detail::transmla_map(cfg,
                                detail::rorope_rotation(cfg, gram.topLeftCorner(hkv * d, hkv * d),
                                                        f, keep, opt.damping, freq),
                                freq);
  };
  std::int64_t f = opt.freqfold;
  if (f == 0) {  // auto: double F from C while the partial-RoPE error on calibration tokens falls
    const auto probe =
        calibration.extent(0) < opt.auto_tokens
            ? calibration
            : matrix_view<const float>(calibration.data_handle(), {opt.auto_tokens, cfg.model_dim},
                                       {calibration.stride(0), calibration.stride(1)});
    double best = std::numeric_limits<double>::infinity();
    for (std::int64_t c = collapse; c <= pairs && pairs % c == 0; c *= 2) {
      const double e =
          detail::held_out_error(gqa, assemble(cfg, w, partial_map(c, c / collapse), exec), probe);
      if (!(e < best)) break;
      best = e, f = c;
    }
  }
  const std::string ff = "F=" + std::to_string(f);
  const double t_gram = detail::seconds_since(t0);
  if (opt.stop_after == transmla_step::rorope) {
    t0 = std::chrono::steady_clock::now();
    const mla_map m = partial_map(f, hkv * f);
    res.checkpoint = assemble(cfg, w, m, exec);
    res.steps.push_back({"TransMLA RoRoPE + FreqFold " + ff + ", RoPE on every rotated dim", before,
                         m.kv_elements(), detail::held_out_error(gqa, res.checkpoint, heldout),
                         t_gram + detail::seconds_since(t0)});
    return res;
  }
  t0 = std::chrono::steady_clock::now();
  mla_map m = partial_map(f, f / collapse);
  conversion_report partial{"TransMLA RoRoPE + FreqFold " + ff +
                                ", RoPE on the first qk_mqa_dim=" + std::to_string(qk) + " dims",
                            before, m.kv_elements(), std::numeric_limits<double>::quiet_NaN(),
                            t_gram + detail::seconds_since(t0)};
  if (measure || opt.stop_after == transmla_step::partial_rope) {
    res.checkpoint = assemble(cfg, w, m, exec);
    partial.rel_error = detail::held_out_error(gqa, res.checkpoint, heldout);
  }
  res.steps.push_back(partial);
  if (opt.stop_after == transmla_step::partial_rope) return res;

  t0 = std::chrono::steady_clock::now();
  const std::int64_t lk = hkv * d - qk, lv = hkv * dv;
  // Gram of the latent activations: the latent is [R 0 ; 0 I] (R: the nope rows of the rotation),
  // so only R's blocks need products.
  const dmatrix r_nope = m.latent.topLeftCorner(lk, hkv * d);
  const dmatrix rg = detail::product(r_nope, gram.topRows(hkv * d), exec);  // [lk, H_kv (d + d_v)]
  dmatrix lat_gram(lk + lv, lk + lv);
  lat_gram.topLeftCorner(lk, lk) = detail::product(rg.leftCols(hkv * d), r_nope.transpose(), exec);
  lat_gram.topRightCorner(lk, lv) = rg.rightCols(lv);
  lat_gram.bottomLeftCorner(lv, lk) = rg.rightCols(lv).transpose();
  lat_gram.bottomRightCorner(lv, lv) = gram.bottomRightCorner(lv, lv);
  const double k_norm = lat_gram.diagonal().head(lk).cwiseMax(0).cwiseSqrt().mean();
  const double v_norm = lat_gram.diagonal().tail(lv).cwiseMax(0).cwiseSqrt().mean();
  const double ratio = k_norm > 0 && v_norm > 0 ? k_norm / (v_norm * opt.balance_kv_ratio) : 1.0;
  m.latent.topRows(lk) /= ratio;  // function-preserving: W_UK takes the factor back
  for (auto& u : m.w_uk) u *= ratio;
  lat_gram.topRows(lk) /= ratio;
  lat_gram.leftCols(lk) /= ratio;
  project_latent(m, principal_axes(lat_gram, opt.kv_lora_rank, opt.damping));
  res.checkpoint = assemble(cfg, w, m, exec);
  res.steps.push_back({"TransMLA balanced K/V (ratio " + std::to_string(ratio) +
                           ") + joint PCA to kv_lora_rank=" + std::to_string(opt.kv_lora_rank),
                       before, m.kv_elements(), std::numeric_limits<double>::quiet_NaN(),
                       detail::seconds_since(t0)});
  res.steps.back().rel_error = detail::held_out_error(gqa, res.checkpoint, heldout);
  return res;
}

}  // namespace attnkit::convert
