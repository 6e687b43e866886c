#pragma once
// Absorbed MLA attention over latent rows: an MQA whose keys are the cached rows
// [c ; k_rope] (width d_c + rope_heads * d_R) and whose values are the same rows' c (width d_c,
// a kv_view whose values lie in its keys): the latent is read once per step for all H heads,
// never copied. It runs on the GQA kernel's block products (kernels/gqa.hpp), so the paths are
// the GQA family's: streaming micro-kernels for decode tiles, GEMM tiles for longer chunks.
//
// Query head i brings q_latent_i = W_UK_i^T q_nope_i (d_c) and its roped q_rope_i (d_R); its
// score against token s is  scale * (q_latent_i . c_s + q_rope_i . k_rope_{r(i), s}),  with
// rope group r(i) = i / (H / rope_heads). With several rope groups the kernel's query is
// [q_latent_i ; 0 ... q_rope_i (at slot r(i)) ... 0], which is exact. The output is the latent
// o_i = sum_s p_s c_s; the caller applies W_UV_i (or W_O folded with W_UV).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>

#include "gqa.hpp"

namespace attnkit {

namespace detail {

/// The kernel's query rows [q_latent ; rope slots] of q_latent [Tq, H, d_c] and q_rope
/// [Tq, H, d_R] against the latent view v (checked), staged in the workspace: [Tq, H, key width].
template <storage_type S>
tensor3_view<const float> latent_queries(const char* who, tensor3_view<const float> q_latent,
                                         tensor3_view<const float> q_rope, const kv_view<S>& v,
                                         attention_workspace& ws) {
  const std::int64_t tq = q_latent.extent(0), h = q_latent.extent(1), dc = v.v_head_dim(),
                     w = v.head_dim();
  const std::int64_t dr = q_rope.extent(2), nr = dr > 0 ? (w - dc) / dr : 1;
  require(v.kv_heads() == 1, who, ": the latent view must have one KV head, got ", v.kv_heads());
  require_extents(q_latent, {tq, h, dc}, who, "q_latent");
  require(dr > 0 ? (w - dc) % dr == 0 && nr >= 1 : w == dc, who, ": q_rope width ", dr,
          " does not divide the key rows' rope part (key width ", w, " - latent ", dc, ")");
  require_extents(q_rope, {tq, h, dr}, who, "q_rope");
  require(h % nr == 0, who, ": heads=", h, " must be a multiple of rope_heads=", nr);
  float* qx = workspace_access::query(ws, static_cast<std::size_t>(tq * h * w));
  const std::int64_t per_group = h / nr;
  for (std::int64_t t = 0; t < tq; ++t)
    for (std::int64_t i = 0; i < h; ++i) {
      float* row = qx + (t * h + i) * w;
      copy_strided(&q_latent(t, i, 0), q_latent.stride(2), dc, row);
      std::fill(row + dc, row + w, 0.f);
      if (dr > 0)
        copy_strided(&q_rope(t, i, 0), q_rope.stride(2), dr, row + dc + (i / per_group) * dr);
    }
  return tensor3_view<const float>(qx, {tq, h, w});
}

/// attend_latent's default scale: 1/sqrt(d_c + d_R).
inline float latent_default_scale(std::int64_t latent_dim, std::int64_t rope_dim) {
  return 1.f / std::sqrt(static_cast<float>(latent_dim + rope_dim));
}

}  // namespace detail

/// out [Tq, H, d_c] from q_latent [Tq, H, d_c] and roped q_rope [Tq, H, d_R] against `kv`: a
/// latent cache, or a kv_view with one KV head whose key rows are [c ; k_rope_0 ... ] and whose
/// values are their first d_c columns (kv_view::latent). The number of rope groups is
/// (key width - d_c) / d_R. opt.scale defaults to 1/sqrt(d_c + d_R); MLA's own scale is
/// 1/sqrt(d_nope + d_R) (times YaRN's mscale^2), which mla_layer passes.
template <kv_source KV, class Exec = serial_executor, mask_predicate Mask = no_mask>
void attend_latent(tensor3_view<const float> q_latent, tensor3_view<const float> q_rope,
                   std::span<const std::int64_t> q_positions, const KV& kv, tensor3_view<float> out,
                   const attention_options& opt = {}, Exec&& exec = Exec{},
                   attention_workspace* ws = nullptr, const Mask& mask = {}) {
  const auto v = detail::kv_view_of(kv);
  for (const auto& [in, name] : {std::pair{q_latent, "q_latent"}, std::pair{q_rope, "q_rope"}})
    detail::require_outputs_disjoint("attend_latent", out, opt, in, name);
  attention_workspace local;
  attention_workspace& wsr = ws ? *ws : local;
  // The kernel's query rows: built once per call (H rows per token).
  const auto qx = detail::latent_queries("attend_latent", q_latent, q_rope, v, wsr);
  detail::run_gqa("attend_latent", qx, q_positions, v, out, opt, exec, &wsr, mask,
                  detail::latent_default_scale(v.v_head_dim(), q_rope.extent(2)));
}

}  // namespace attnkit
