#pragma once
// Absorbed MLA attention over a latent cache: an MQA whose keys are the cached rows
// [c ; k_rope] (width d_c + rope_heads * d_R) and whose values are a view of the same rows' c
// (width d_c): the latent is read once per step for all H heads, never copied.
//
// Query head i brings q_latent_i = W_UK_i^T q_nope_i (d_c) and its roped q_rope_i (d_R); its
// score against token s is  scale * (q_latent_i . c_s + q_rope_i . k_rope_{r(i), s}),  with
// rope group r(i) = i / (H / rope_heads). With several rope groups the kernel's query is
// [q_latent_i ; 0 ... q_rope_i (at slot r(i)) ... 0], which is exact. The output is the latent
// o_i = sum_s p_s c_s; the caller applies W_UV_i (or W_O folded with W_UV).
#include <algorithm>
#include <cstdint>
#include <span>

#include "../cache/latent_cache.hpp"
#include "gqa.hpp"

namespace attnkit {

/// out [Tq, H, d_c] from q_latent [Tq, H, d_c] and roped q_rope [Tq, H, d_R]. opt.scale must be
/// set: MLA's scale is 1/sqrt(d_nope + d_R) (times YaRN's mscale^2), not 1/sqrt(d_c + d_R).
template <storage_type S, class Exec = serial_executor>
void attend_latent(tensor3_view<const float> q_latent, tensor3_view<const float> q_rope,
                   std::span<const std::int64_t> q_positions, const latent_cache<S>& cache, tensor3_view<float> out,
                   const attention_options& opt, Exec&& exec = Exec{}, attention_workspace* ws = nullptr) {
  using detail::require;
  const std::int64_t tq = q_latent.extent(0), h = q_latent.extent(1), dc = cache.latent_dim(), dr = cache.rope_dim();
  const std::int64_t nr = cache.rope_heads(), w = cache.row_width();
  require(opt.scale.has_value(), "attend_latent: options.scale must be set (MLA uses 1/sqrt(d_nope + d_rope))");
  detail::require_extents(q_latent, {tq, h, dc}, "attend_latent: q_latent");
  detail::require_extents(q_rope, {tq, h, dr}, "attend_latent: q_rope");
  require(h % nr == 0, "attend_latent: heads=", h, " must be a multiple of the cache's rope_heads=", nr);
  attention_workspace local;
  attention_workspace& wsr = ws ? *ws : local;
  // The kernel's query rows [q_latent ; rope slots]: built once per call (H rows per token).
  float* qx = wsr.query(static_cast<std::size_t>(tq * h * w));
  const std::int64_t per_group = h / nr;
  for (std::int64_t t = 0; t < tq; ++t)
    for (std::int64_t i = 0; i < h; ++i) {
      float* row = qx + (t * h + i) * w;
      for (std::int64_t c = 0; c < dc; ++c) row[c] = q_latent(t, i, c);
      std::fill(row + dc, row + w, 0.f);
      float* slot = row + dc + (i / per_group) * dr;
      for (std::int64_t c = 0; c < dr; ++c) slot[c] = q_rope(t, i, c);
    }
  const detail::kv_rows<S> kv{cache.rows(), 0, w, cache.rows(), 0, w, cache.positions().data(), cache.size(), 1, w, dc};
  detail::run_gqa(tensor3_view<const float>(qx, {tq, h, w}), q_positions, kv, out, opt, exec, &wsr);
}

}  // namespace attnkit
