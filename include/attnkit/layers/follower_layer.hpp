#pragma once
// follower_layer: a shared-attention follower (Liao & Vargas, arXiv 2407.12866). It reuses the
// attention weights of a donor layer earlier in the stack, so it holds only v_proj and o_proj
// (no q_proj, no k_proj, no RoPE) and a value-only cache:
//   V = x W_v^T + b_v (appended to the cache),  out[t, h] = sum_s P_donor[t, h, s] V[s, h / g],
//   y = out W_o^T + b_o.
// The donor's weights come in either form of kernels/shared.hpp: materialised P [T, H, Tk], or
// a callable that attends over the values with the donor's recomputed scores (the flash form;
// layers/shared_stack.hpp builds it from the donor layer's last_scores).
#include <cstdint>
#include <span>

#include "../cache/value_cache.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/linear.hpp"
#include "../core/view.hpp"
#include "../core/workspace.hpp"
#include "../kernels/shared.hpp"

namespace attnkit {

/// Geometry of a follower_layer; validated at construction.
struct follower_config {
  std::int64_t model_dim = 0;  ///< D
  std::int64_t heads = 0;     ///< H: the donor's query-head count
  std::int64_t kv_heads = 0;  ///< value heads; query head h reads value head h / (H / kv_heads)
  std::int64_t v_head_dim = 0;  ///< d_v
};

/// nn.Linear-layout weights: v_proj [H_kv d_v, D], o_proj [D, H d_v]; biases optional.
struct follower_weights {
  matrix_view<const float> v_proj;       ///< [H_kv d_v, D]
  matrix_view<const float> o_proj;       ///< [D, H d_v]
  std::span<const float> v_proj_bias{};  ///< [H_kv d_v] or empty
  std::span<const float> o_proj_bias{};  ///< [D] or empty
};

/// A shared-attention follower layer (see the file comment): v_proj and o_proj over a
/// value-only cache, attending with a donor layer's attention weights.
class follower_layer {
 public:
  /// Checks the weights' shapes against cfg (attnkit::invalid_argument); keeps views of them.
  follower_layer(const follower_config& cfg, const follower_weights& w) : cfg_(validated(cfg)), w_(w) {
    using detail::require;
    const std::int64_t d = cfg_.model_dim, h = cfg_.heads, hkv = cfg_.kv_heads, dv = cfg_.v_head_dim;
    detail::require_extents(w.v_proj, {hkv * dv, d}, "follower_layer: weight v_proj");
    detail::require_extents(w.o_proj, {d, h * dv}, "follower_layer: weight o_proj");
    require(w.v_proj_bias.empty() || static_cast<std::int64_t>(w.v_proj_bias.size()) == hkv * dv,
            "follower_layer: v_proj_bias has ", w.v_proj_bias.size(), " entries but ", hkv * dv,
            " were expected");
    require(w.o_proj_bias.empty() || static_cast<std::int64_t>(w.o_proj_bias.size()) == d,
            "follower_layer: o_proj_bias has ", w.o_proj_bias.size(), " entries but ", d,
            " were expected");
    (void)as_eigen(w.v_proj, "v_proj"), (void)as_eigen(w.o_proj, "o_proj");
  }

  const follower_config& config() const { return cfg_; }  ///< the geometry
  const follower_weights& weights() const { return w_; }  ///< the weight views
  /// A value cache of `capacity` tokens that fits this layer.
  template <storage_type S>
  value_cache<S> make_cache(std::int64_t capacity) const {
    return value_cache<S>({cfg_.kv_heads, cfg_.v_head_dim, capacity});
  }

  /// Materialised form: x [T, D] at positions -> y [T, D] with the donor's weights
  /// [T, H, cache size + T] of this block; products: P V's arithmetic (attend_shared; the donor's
  /// products, as the flash form takes them). A call that throws changes nothing.
  template <class Cache, class Exec = serial_executor>
  requires cache_for<Cache, value_append> && value_source<Cache>
  void forward(matrix_view<const float> x, std::span<const std::int64_t> positions, Cache& cache,
               tensor3_view<const float> weights, matrix_view<float> y, Exec&& exec = Exec{},
               product_math products = product_math::f32) {
    forward(x, positions, cache, y, exec, [&](const auto& values, tensor3_view<float> out) {
      attend_shared(weights, values, out, exec, &ws_, tile_strategy::automatic, products);
    });
  }

  /// Any form: attend(values, out [T, H, d_v]) writes the attention of this block's tokens over
  /// `values` (the cache's view after this block is appended). A call that throws changes
  /// nothing.
  template <class Cache, class Exec, class Attend>
  requires cache_for<Cache, value_append> && value_source<Cache>
  void forward(matrix_view<const float> x, std::span<const std::int64_t> positions, Cache& cache,
               matrix_view<float> y, Exec&& exec, Attend&& attend) {
    using detail::require;
    const std::int64_t t = x.extent(0), d = cfg_.model_dim, h = cfg_.heads, hkv = cfg_.kv_heads,
                       dv = cfg_.v_head_dim;
    detail::require_extents(x, {t, d}, "follower_layer::forward: x");
    detail::require_extents(y, {t, d}, "follower_layer::forward: y");
    require(static_cast<std::int64_t>(positions.size()) == t,
            "follower_layer::forward: positions has ", positions.size(), " entries but x has T=", t,
            " tokens");
    {
      const auto v = cache.view();
      require(v.kv_heads() == hkv && v.v_head_dim() == dv, "follower_layer::forward: cache has kv_heads=",
              v.kv_heads(), ", v_head_dim=", v.v_head_dim(), " but the layer needs ", hkv, ", ", dv);
    }
    require(t <= cache.capacity() - cache.size(), "follower_layer::forward: appending ", t,
            " tokens to size=", cache.size(), " exceeds capacity=", cache.capacity());
    const auto xm = as_eigen(x, "follower_layer::forward: x");
    auto ym = as_eigen(y, "follower_layer::forward: y");
    v_.resize(t, hkv * dv);
    o_.resize(t, h * dv);
    detail::linear(xm, as_eigen(w_.v_proj, "v_proj"), w_.v_proj_bias, map(v_), exec);
    const std::int64_t before = cache.size();
    cache.append(value_append{tensor3_view<const float>(v_.data(), {t, hkv, dv}), positions});
    detail::undo_on_throw(cache, before, [&] {
      attend(cache.view(), tensor3_view<float>(o_.data(), {t, h, dv}));
    });
    detail::linear(detail::row_map<const float>(o_.data(), t, h * dv, Eigen::OuterStride<>(h * dv)),
                   as_eigen(w_.o_proj, "o_proj"), w_.o_proj_bias, ym, exec);
  }

  /// This layer's workspace, for the attention calls of the flash form.
  attention_workspace& workspace() { return ws_; }

 private:
  static detail::row_map<float> map(row_matrix<float>& m) {
    return {m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols())};
  }
  static follower_config validated(const follower_config& c) {
    using detail::require;
    require(c.model_dim > 0 && c.heads > 0 && c.kv_heads > 0 && c.v_head_dim > 0,
            "follower_config: model_dim, heads, kv_heads and v_head_dim must be > 0, got ",
            c.model_dim, ", ", c.heads, ", ", c.kv_heads, ", ", c.v_head_dim);
    require(c.heads % c.kv_heads == 0, "follower_config: heads=", c.heads,
            " must be a multiple of kv_heads=", c.kv_heads);
    return c;
  }

  follower_config cfg_;
  follower_weights w_;
  row_matrix<float> v_, o_;  // [T, H_kv d_v], [T, H d_v]
  attention_workspace ws_;
};

}  // namespace attnkit
