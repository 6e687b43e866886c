#pragma once
// gqa_layer: a full GQA/MHA/MQA attention layer. Weights are non-owning views in nn.Linear
// layout (the caller keeps them alive); forward(x, positions, cache, y) projects, ropes,
// appends K/V to the cache, attends over everything the cache holds and projects out.
#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <tuple>
#include <vector>

#include "../cache/dense_cache.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/linear.hpp"
#include "../core/rmsnorm.hpp"
#include "../core/rope.hpp"
#include "../core/view.hpp"
#include "../kernels/batch.hpp"
#include "batch_step.hpp"
#include "../kernels/gqa.hpp"
#include "../kernels/shared.hpp"

namespace attnkit {

/// Geometry of a gqa_layer (MHA: kv_heads = heads; MQA: kv_heads = 1); validated at
/// construction.
struct gqa_config {
  std::int64_t model_dim = 0;   ///< D
  std::int64_t heads = 0;       ///< query heads H
  std::int64_t kv_heads = 0;    ///< KV heads H_kv, dividing H
  std::int64_t head_dim = 0;    ///< d_qk
  std::int64_t v_head_dim = 0;  ///< d_v; 0 = head_dim
  rope_config rope{};           ///< RoPE of q and k
  std::optional<float> scale{};          ///< default 1/sqrt(head_dim)
  std::optional<std::int64_t> window{};  ///< sliding window (keys with q_pos - k_pos < window)
  float rms_eps = 1e-6f;                 ///< epsilon of the optional q/k RMSNorm (QK-norm)
  /// The products' arithmetic over bf16 caches (core/options.hpp): f32, or bf16 on AMX tiles or
  /// vdpbf16ps where the CPU has them.
  product_math products = product_math::f32;
};

/// nn.Linear-layout weights with transformers' names: q_proj [H*d, D], k_proj [H_kv*d, D],
/// v_proj [H_kv*d_v, D], o_proj [D, H*d_v]; biases optional (empty span = none).
struct gqa_weights {
  matrix_view<const float> q_proj;       ///< [H d, D]
  matrix_view<const float> k_proj;       ///< [H_kv d, D]
  matrix_view<const float> v_proj;       ///< [H_kv d_v, D]
  matrix_view<const float> o_proj;       ///< [D, H d_v]
  std::span<const float> q_proj_bias{};  ///< [H d] or empty
  std::span<const float> k_proj_bias{};  ///< [H_kv d] or empty
  std::span<const float> v_proj_bias{};  ///< [H_kv d_v] or empty
  std::span<const float> o_proj_bias{};  ///< [D] or empty
  /// QK-norm (Qwen3 style): per-head RMSNorm weights [head_dim] applied to every query / key
  /// head after the projection and before RoPE. Empty = none.
  std::span<const float> q_norm{};
  std::span<const float> k_norm{};  ///< [head_dim] or empty (see q_norm)
};

/// A full GQA/MHA/MQA attention layer (see the file comment) over any dense cache.
class gqa_layer {
 public:
  /// Checks the weights' shapes against cfg (attnkit::invalid_argument); keeps views of them.
  gqa_layer(const gqa_config& cfg, const gqa_weights& w) : cfg_(validated(cfg)), w_(w) {
    using detail::require;
    const std::int64_t d = cfg_.model_dim, h = cfg_.heads, hkv = cfg_.kv_heads, dq = cfg_.head_dim,
                       dv = cfg_.v_head_dim;
    detail::require_extents(w.q_proj, {h * dq, d}, "gqa_layer: weight q_proj");
    detail::require_extents(w.k_proj, {hkv * dq, d}, "gqa_layer: weight k_proj");
    detail::require_extents(w.v_proj, {hkv * dv, d}, "gqa_layer: weight v_proj");
    detail::require_extents(w.o_proj, {d, h * dv}, "gqa_layer: weight o_proj");
    auto check_bias = [](std::span<const float> b, std::int64_t n, const char* name) {
      require(b.empty() || static_cast<std::int64_t>(b.size()) == n, "gqa_layer: ", name, " has ",
              b.size(), " entries but ", n, " were expected");
    };
    check_bias(w.q_proj_bias, h * dq, "q_proj_bias");
    check_bias(w.k_proj_bias, hkv * dq, "k_proj_bias");
    check_bias(w.v_proj_bias, hkv * dv, "v_proj_bias");
    check_bias(w.o_proj_bias, d, "o_proj_bias");
    check_bias(w.q_norm, dq, "q_norm");
    check_bias(w.k_norm, dq, "k_norm");
    for (auto [v, name] : {std::pair{w.q_proj, "q_proj"},
                           {w.k_proj, "k_proj"},
                           {w.v_proj, "v_proj"},
                           {w.o_proj, "o_proj"}})
      (void)as_eigen(v, name);
    k_rope_ = rope(cfg_.rope, dq, hkv);
    q_rope_ = rope(query_tables(cfg_.rope, h / hkv), dq, h);
  }

  const gqa_config& config() const { return cfg_; }  ///< the geometry, defaults resolved
  const gqa_weights& weights() const { return w_; }  ///< the weight views
  /// A dense cache that fits this layer.
  template <storage_type S>
  dense_cache<S> make_cache(std::int64_t capacity) const {
    return dense_cache<S>({cfg_.kv_heads, cfg_.head_dim, cfg_.v_head_dim, capacity});
  }
  /// The attention options of this layer's kernel call (scale, window, products).
  attention_options options() const {
    return {.scale = cfg_.scale, .window = cfg_.window, .products = cfg_.products};
  }

  /// Calls f(score source) with the roped queries of the last forward call over `cache` (which
  /// that call appended to): what a shared-attention follower's flash form recomputes this
  /// layer's scores from (kernels/shared.hpp), with this layer's options().
  template <class Cache, class F>
  void last_scores(const Cache& cache, F&& f) const {
    const auto kv = cache.view();
    f(gqa_scores<typename decltype(kv)::storage_type>{
        tensor3_view<const float>(q_.data(), {q_.rows(), cfg_.heads, cfg_.head_dim}), kv});
  }

  /// x [T, D] at positions (one per token) -> y [T, D]. Appends T tokens to `cache` (any cache
  /// taking dense_append payloads whose view is a kv_view). `outputs`: the attention weights or
  /// LSE of the call as well (a shared-attention donor). A call that throws changes nothing.
  template <class Cache, class Exec = serial_executor>
  requires cache_for<Cache, dense_append> && kv_source<Cache>
  void forward(matrix_view<const float> x, std::span<const std::int64_t> positions, Cache& cache,
               matrix_view<float> y, Exec&& exec = Exec{}, const attention_outputs& outputs = {}) {
    using detail::require;
    const std::int64_t t = x.extent(0), d = cfg_.model_dim, h = cfg_.heads, hkv = cfg_.kv_heads;
    const std::int64_t dq = cfg_.head_dim, dv = cfg_.v_head_dim;
    detail::require_extents(x, {t, d}, "gqa_layer::forward: x");
    detail::require_extents(y, {t, d}, "gqa_layer::forward: y");
    require(static_cast<std::int64_t>(positions.size()) == t, "gqa_layer::forward: positions has ",
            positions.size(), " entries but x has T=", t, " tokens");
    const auto kv = cache.view();
    require(kv.kv_heads() == hkv && kv.head_dim() == dq && kv.v_head_dim() == dv,
            "gqa_layer::forward: cache has kv_heads=", kv.kv_heads(), ", head_dim=", kv.head_dim(),
            ", v_head_dim=", kv.v_head_dim(), " but the layer needs ", hkv, ", ", dq, ", ", dv);
    require(t <= cache.capacity() - cache.size(), "gqa_layer::forward: appending ", t,
            " tokens to size=", cache.size(), " exceeds capacity=", cache.capacity());

    project(x, positions, exec);
    const std::int64_t before = cache.size();
    cache.append(dense_append{tensor3_view<const float>(k_.data(), {t, hkv, dq}),
                              tensor3_view<const float>(v_.data(), {t, hkv, dv}), positions});
    detail::undo_on_throw(cache, before, [&] {
      attend(tensor3_view<const float>(q_.data(), {t, h, dq}), positions, cache.view(),
             tensor3_view<float>(o_.data(), {t, h, dv}), outputs.added_to(options()), exec, &ws_);
    });
    project_out(y, exec);
  }

  /// One step of a batch of sequences: sequence s's tokens are rows [q_indptr[s],
  /// q_indptr[s + 1]) of x [sum Tq, D] (positions likewise, non-decreasing within a sequence)
  /// and are appended to *caches[s]; y [sum Tq, D]. `plan`: empty at the step's first layer,
  /// which plans the step's batch into it (kernels/batch.hpp); every later layer of the step
  /// reuses it. A call that throws changes no cache.
  template <class Cache, class Exec = serial_executor>
  requires cache_for<Cache, dense_append> && kv_source<Cache>
  void forward_batch(matrix_view<const float> x, std::span<const std::int64_t> positions,
                     std::span<const std::int64_t> q_indptr, std::span<Cache*> caches,
                     matrix_view<float> y, batch_plan& plan, Exec&& exec = Exec{}) {
    using detail::require;
    const char* who = "gqa_layer::forward_batch";
    const std::int64_t t = x.extent(0), d = cfg_.model_dim, h = cfg_.heads, hkv = cfg_.kv_heads;
    const std::int64_t dq = cfg_.head_dim, dv = cfg_.v_head_dim;
    detail::require_extents(x, {t, d}, who, "x");
    detail::require_extents(y, {t, d}, who, "y");
    detail::validate_batch_rows(who, q_indptr, static_cast<std::int64_t>(caches.size()), t,
                                positions);
    detail::validate_batch_caches(who, caches, q_indptr, [&](const auto& kv) {
      require(kv.kv_heads() == hkv && kv.head_dim() == dq && kv.v_head_dim() == dv,
              "cache has kv_heads=", kv.kv_heads(), ", head_dim=", kv.head_dim(), ", v_head_dim=",
              kv.v_head_dim(), " but the layer needs ", hkv, ", ", dq, ", ", dv);
    });
    project(x, positions, exec);
    detail::append_batch(caches, q_indptr, [&](Cache& c, const detail::batch_rows& r) {
      c.append(dense_append{
          tensor3_view<const float>(k_.data() + r.begin * hkv * dq, {r.size(), hkv, dq}),
          tensor3_view<const float>(v_.data() + r.begin * hkv * dv, {r.size(), hkv, dv}),
          positions.subspan(static_cast<std::size_t>(r.begin), static_cast<std::size_t>(r.size()))});
    }, [&] {
      using S = typename Cache::storage_type;
      const auto views = detail::views_of(caches, std::get<std::vector<kv_view<S>>>(views_));
      const gqa_batch<S> b{tensor3_view<const float>(q_.data(), {t, h, dq}), positions, q_indptr,
                           views};
      if (plan.sequences() == 0) plan = plan_batch(b, options(), exec);
      attend_batch(plan, b, tensor3_view<float>(o_.data(), {t, h, dv}), options(), exec, &ws_);
    });
    project_out(y, exec);
  }

 private:
  /// q_, k_, v_ of x [T, D] at positions: projected, QK-normed, roped.
  template <class Exec>
  void project(matrix_view<const float> x, std::span<const std::int64_t> positions, Exec& exec) {
    const std::int64_t t = x.extent(0), h = cfg_.heads, hkv = cfg_.kv_heads;
    const std::int64_t dq = cfg_.head_dim, dv = cfg_.v_head_dim;
    q_.resize(t, h * dq);
    k_.resize(t, hkv * dq);
    v_.resize(t, hkv * dv);
    o_.resize(t, h * dv);
    const auto xm = as_eigen(x, "gqa_layer::forward: x");
    auto map = [](row_matrix<float>& m) {
      return detail::row_map<float>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols()));
    };
    detail::linear(xm, as_eigen(w_.q_proj, "q_proj"), w_.q_proj_bias, map(q_), exec);
    detail::linear(xm, as_eigen(w_.k_proj, "k_proj"), w_.k_proj_bias, map(k_), exec);
    detail::linear(xm, as_eigen(w_.v_proj, "v_proj"), w_.v_proj_bias, map(v_), exec);
    q_rope_.fit_positions(positions);
    k_rope_.fit_positions(positions);
    for (std::int64_t i = 0; i < t; ++i) {
      const std::int64_t pos = positions[static_cast<std::size_t>(i)];
      for (std::int64_t hh = 0; hh < h; ++hh) {
        if (!w_.q_norm.empty()) rms_norm(q_.row(i).data() + hh * dq, dq, w_.q_norm, cfg_.rms_eps);
        q_rope_.apply(q_.row(i).data() + hh * dq, pos, hh);
      }
      for (std::int64_t j = 0; j < hkv; ++j) {
        if (!w_.k_norm.empty()) rms_norm(k_.row(i).data() + j * dq, dq, w_.k_norm, cfg_.rms_eps);
        k_rope_.apply(k_.row(i).data() + j * dq, pos, j);
      }
    }
  }
  /// y = o_ W_O^T + b_O.
  template <class Exec>
  void project_out(matrix_view<float> y, Exec& exec) {
    const std::int64_t t = o_.rows(), hv = o_.cols();
    const auto om = detail::row_map<const float>(o_.data(), t, hv, Eigen::OuterStride<>(hv));
    auto ym = as_eigen(y, "gqa_layer::forward: y");
    detail::linear(om, as_eigen(w_.o_proj, "o_proj"), w_.o_proj_bias, ym, exec);
  }

  static gqa_config validated(gqa_config c) {
    using detail::require;
    if (c.v_head_dim == 0) c.v_head_dim = c.head_dim;
    require(c.model_dim > 0, "gqa_config: model_dim must be > 0, got ", c.model_dim);
    require(c.heads > 0 && c.kv_heads > 0,
            "gqa_config: heads and kv_heads must be > 0, got heads=", c.heads,
            ", kv_heads=", c.kv_heads);
    require(c.heads % c.kv_heads == 0, "gqa_config: heads=", c.heads,
            " must be a multiple of kv_heads=", c.kv_heads);
    require(c.head_dim > 0 && c.v_head_dim > 0,
            "gqa_config: head_dim and v_head_dim must be > 0, got ", c.head_dim, ", ",
            c.v_head_dim);
    if (c.window) require(*c.window >= 1, "gqa_config: window must be >= 1, got ", *c.window);
    if (c.scale)
      require(std::isfinite(*c.scale), "gqa_config: scale must be finite, got ", *c.scale);
    require(c.rms_eps > 0, "gqa_config: rms_eps must be > 0, got ", c.rms_eps);
    return c;
  }
  /// With one frequency table per KV head (MHA2MLA), query head h uses its KV head's table.
  static rope_config query_tables(rope_config r, std::int64_t g) {
    if (r.frequency_index.size() > 1) {
      std::vector<std::vector<std::int64_t>> per_query;
      for (const auto& tab : r.frequency_index)
        for (std::int64_t i = 0; i < g; ++i) per_query.push_back(tab);
      r.frequency_index = std::move(per_query);
    }
    return r;
  }

  gqa_config cfg_;
  gqa_weights w_;
  rope q_rope_, k_rope_;
  row_matrix<float> q_, k_, v_, o_;
  attention_workspace ws_;
  // The batch's views, kept so that steps after the first allocate nothing.
  std::tuple<std::vector<kv_view<float>>, std::vector<kv_view<bf16>>, std::vector<kv_view<half>>>
      views_;
};

}  // namespace attnkit
