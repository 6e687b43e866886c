#pragma once
// tpa_layer: a Tensor Product Attention (T6) layer over a factorized cache. Per token:
//   A_Q = W_A_q x as [H, R_Q] (T6's view), B_Q = W_B_q x as [R_Q, d]; Q = q_scale A_Q^T B_Q,
// likewise K (rank R_K) and V (rank R_V); RoPE rotates the rows of B_Q and B_K, which equals
// rotating Q and K (RoPE is linear and acts on the head dimension). Variants: full TPA;
// TPA-KVonly (a plain q_proj); non-contextual head factors (fixed A parameters [R, H] instead
// of W_A) -- with those, MHA, MQA and GQA are special cases (tests/equivalence).
// Paths: factorized (FlashTPA order, K/V never materialised) and materialized (Q/K/V formed,
// then the GQA kernel as MHA). The automatic rule is factorized for every call: measured
// through this layer, causal prefill runs within noise of the materialised path, while a
// materialised decode step re-forms K and V of every cached token (docs/benchmarks.md, TPA).
// The layer's scales (T6: 1/R) override the cache view's k_scale and v_scale.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <tuple>
#include <vector>

#include "../cache/factorized_cache.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/linear.hpp"
#include "../core/rope.hpp"
#include "../core/view.hpp"
#include "../kernels/gqa.hpp"
#include "../kernels/tpa.hpp"
#include "../kernels/batch.hpp"
#include "../kernels/shared.hpp"
#include "batch_step.hpp"

namespace attnkit {

/// The explicit 1/R factors of TPA (T6 uses 1/R_Q, 1/R_K, 1/R_V); any values may be given.
struct tpa_scales {
  float q = 1.f;  ///< on the query factors
  float k = 1.f;  ///< on the key factors
  float v = 1.f;  ///< on the value factors
};

/// Geometry of a tpa_layer (TPA, T6); validated at construction.
struct tpa_config {
  std::int64_t model_dim = 0;   ///< D
  std::int64_t heads = 0;       ///< H
  std::int64_t head_dim = 0;    ///< d (q and k)
  std::int64_t v_head_dim = 0;  ///< 0 = head_dim
  std::int64_t q_rank = 0;      ///< R_Q; 0 = TPA-KVonly (plain q_proj)
  std::int64_t k_rank = 0;      ///< R_K
  std::int64_t v_rank = 0;      ///< R_V
  rope_config rope{};                  ///< one table (B rows are shared by all heads)
  std::optional<tpa_scales> scales{};  ///< default {1/R_Q, 1/R_K, 1/R_V} (q: 1 for KV-only)
  std::optional<float> scale{};        ///< softmax scale, default 1/sqrt(head_dim)
  std::optional<std::int64_t> window{};  ///< sliding window (keys with q_pos - k_pos < window)
  /// The products' arithmetic over bf16 caches (core/options.hpp): f32, or bf16 on AMX tiles or
  /// vdpbf16ps where the CPU has them.
  product_math products = product_math::f32;
};

/// nn.Linear-layout weights (views; the caller keeps them alive). W_A_* [H R, D] with output
/// index h R + r; W_B_* [R d, D]. Fixed head factors a_* [R, H] replace W_A_* when given.
struct tpa_weights {
  matrix_view<const float> w_a_q{};   ///< [H R_Q, D] (or a_q, or q_proj for KV-only)
  matrix_view<const float> w_b_q{};   ///< [R_Q d, D]
  matrix_view<const float> q_proj{};  ///< [H d, D]: TPA-KVonly's plain query projection
  matrix_view<const float> w_a_k{};   ///< [H R_K, D] (or a_k)
  matrix_view<const float> w_b_k{};   ///< [R_K d, D]
  matrix_view<const float> w_a_v{};   ///< [H R_V, D] (or a_v)
  matrix_view<const float> w_b_v{};   ///< [R_V d_v, D]
  matrix_view<const float> o_proj{};  ///< [D, H d_v]
  matrix_view<const float> a_q{};     ///< [R_Q, H] fixed query head factors, or empty
  matrix_view<const float> a_k{};     ///< [R_K, H] fixed key head factors, or empty
  matrix_view<const float> a_v{};     ///< [R_V, H] fixed value head factors, or empty
};

/// Which TPA path a call takes: attention on the cached factors (factorized), on K and V
/// materialised from them (materialized), or by the automatic rule.
enum class tpa_path { automatic, factorized, materialized };

/// A full TPA attention layer (see the file comment): factor projections, RoPE on the B
/// factors, factorized cache append and attention on the factors or on materialised K/V.
class tpa_layer {
 public:
  /// Checks the weights' shapes against cfg (attnkit::invalid_argument); keeps views of them.
  tpa_layer(const tpa_config& cfg, const tpa_weights& w) : cfg_(validated(cfg)), w_(w) {
    validate_weights();
    rope_config rc = cfg_.rope;
    rope_ = rope(rc, cfg_.head_dim, 1);
  }
  const tpa_config& config() const { return cfg_; }  ///< the geometry
  /// The 1/R factors in use: config's, or {1/R_Q, 1/R_K, 1/R_V}.
  tpa_scales scales() const {
    return cfg_.scales.value_or(tpa_scales{cfg_.q_rank ? 1.f / float(cfg_.q_rank) : 1.f,
                                           1.f / float(cfg_.k_rank), 1.f / float(cfg_.v_rank)});
  }
  /// A factorized cache of `capacity` tokens that fits this layer.
  template <storage_type S>
  factorized_cache<S> make_cache(std::int64_t capacity) const {
    const tpa_scales sc = scales();
    return factorized_cache<S>({cfg_.heads, cfg_.head_dim, cfg_.v_head_dim, cfg_.k_rank,
                                cfg_.v_rank, capacity, sc.k, sc.v});
  }

  /// Calls f(score source) with the query factors of the last forward call over `cache` (which
  /// that call appended to), on the path it took: factorized, factor_scores with this layer's
  /// scales; materialized, gqa_scores over the Q and K it formed. What a shared-attention
  /// follower's flash form recomputes this layer's scores from (kernels/shared.hpp), with this
  /// layer's options().
  template <class Cache, class F>
  void last_scores(const Cache& cache, F&& f) const {
    const std::int64_t t = aq_.rows(), h = cfg_.heads, d = cfg_.head_dim;
    const std::int64_t rq = cfg_.q_rank ? cfg_.q_rank : h;
    const auto fv = scaled_view(cache);
    if (last_path_ == tpa_path::materialized) {
      const std::int64_t tk = fv.size();
      f(gqa_scores<float>{tensor3_view<const float>(qm_.data(), {t, h, d}),
                          kv_view<float>(tensor3_view<const float>(km_.data(), {tk, h, d}),
                                         tensor3_view<const float>(vm_.data(), {tk, h, cfg_.v_head_dim}),
                                         fv.positions)});
    } else {
      f(factor_scores<typename decltype(fv)::storage_type>{
          tensor3_view<const float>(aq_.data(), {t, rq, h}),
          tensor3_view<const float>(bq_.data(), {t, rq, d}), fv});
    }
  }

  /// The attention options of this layer's kernel calls (scale, window, products).
  attention_options options() const {
    return {.scale = cfg_.scale, .window = cfg_.window, .products = cfg_.products};
  }

  /// Any cache taking factorized_append payloads whose view is a factor_view. `outputs`: the
  /// attention weights or LSE of the call as well (a shared-attention donor). A call that throws
  /// changes nothing.
  template <class Cache, class Exec = serial_executor>
  requires cache_for<Cache, factorized_append> && factor_source<Cache>
  void forward(matrix_view<const float> x, std::span<const std::int64_t> positions, Cache& cache,
               matrix_view<float> y, Exec&& exec = Exec{}, tpa_path path = tpa_path::automatic,
               const attention_outputs& outputs = {}) {
    using detail::require;
    const std::int64_t t = x.extent(0), dm = cfg_.model_dim, h = cfg_.heads, d = cfg_.head_dim,
                       dv = cfg_.v_head_dim;
    const std::int64_t rk = cfg_.k_rank, rv = cfg_.v_rank, rq = cfg_.q_rank ? cfg_.q_rank : h;
    detail::require_extents(x, {t, dm}, "tpa_layer::forward: x");
    detail::require_extents(y, {t, dm}, "tpa_layer::forward: y");
    require(static_cast<std::int64_t>(positions.size()) == t, "tpa_layer::forward: positions has ",
            positions.size(), " entries but x has T=", t, " tokens");
    {
      const auto f = cache.view();
      require(
          f.heads == h && f.head_dim == d && f.v_head_dim == dv && f.k_rank == rk && f.v_rank == rv,
          "tpa_layer::forward: cache has heads=", f.heads, ", head_dim=", f.head_dim,
          ", v_head_dim=", f.v_head_dim, ", k_rank=", f.k_rank, ", v_rank=", f.v_rank,
          " but the layer needs ", h, ", ", d, ", ", dv, ", ", rk, ", ", rv);
    }
    require(t <= cache.capacity() - cache.size(), "tpa_layer::forward: appending ", t,
            " tokens to size=", cache.size(), " exceeds capacity=", cache.capacity());
    const auto ym = as_eigen(y, "tpa_layer::forward: y");  // checked before the cache changes
    project(x, positions, exec);
    const std::int64_t before = cache.size();
    cache.append({tensor3_view<const float>(ak_.data(), {t, rk, h}),
                  tensor3_view<const float>(bk_.data(), {t, rk, d}),
                  tensor3_view<const float>(av_.data(), {t, rv, h}),
                  tensor3_view<const float>(bv_.data(), {t, rv, dv}), positions});
    o_.resize(t, h * dv);
    const auto f = scaled_view(cache);
    last_path_ = path;
    detail::undo_on_throw(cache, before, [&] {
      if (path == tpa_path::materialized) {
        materialized(t, positions, f, exec, outputs.added_to(options()));
      } else {
        attend_factorized(tensor3_view<const float>(aq_.data(), {t, rq, h}),
                          tensor3_view<const float>(bq_.data(), {t, rq, d}), positions, f,
                          tensor3_view<float>(o_.data(), {t, h, dv}), outputs.added_to(options()),
                          exec, &ws_);
      }
    });
    detail::linear(const_map(o_), map(w_.o_proj), {}, ym, exec);
  }

  /// One step of a batch of sequences on the factorized path (see gqa_layer::forward_batch):
  /// sequence s's rows [q_indptr[s], q_indptr[s + 1]) of x [sum Tq, D] are appended to
  /// *caches[s]; y [sum Tq, D]; `plan` empty at the step's first layer, reused by the later
  /// ones. A call that throws changes no cache.
  template <class Cache, class Exec = serial_executor>
  requires cache_for<Cache, factorized_append> && factor_source<Cache>
  void forward_batch(matrix_view<const float> x, std::span<const std::int64_t> positions,
                     std::span<const std::int64_t> q_indptr, std::span<Cache*> caches,
                     matrix_view<float> y, batch_plan& plan, Exec&& exec = Exec{}) {
    using detail::require;
    const char* who = "tpa_layer::forward_batch";
    const std::int64_t t = x.extent(0), dm = cfg_.model_dim, h = cfg_.heads, d = cfg_.head_dim,
                       dv = cfg_.v_head_dim;
    const std::int64_t rk = cfg_.k_rank, rv = cfg_.v_rank, rq = cfg_.q_rank ? cfg_.q_rank : h;
    detail::require_extents(x, {t, dm}, who, "x");
    detail::require_extents(y, {t, dm}, who, "y");
    detail::validate_batch_rows(who, q_indptr, static_cast<std::int64_t>(caches.size()), t,
                                positions);
    detail::validate_batch_caches(who, caches, q_indptr, [&](const auto& f) {
      require(
          f.heads == h && f.head_dim == d && f.v_head_dim == dv && f.k_rank == rk && f.v_rank == rv,
          "cache has heads=", f.heads, ", head_dim=", f.head_dim, ", v_head_dim=", f.v_head_dim,
          ", k_rank=", f.k_rank, ", v_rank=", f.v_rank, " but the layer needs ", h, ", ", d, ", ",
          dv, ", ", rk, ", ", rv);
    });
    const auto ym = as_eigen(y, who);
    project(x, positions, exec);
    o_.resize(t, h * dv);
    detail::append_batch(caches, q_indptr, [&](Cache& c, const detail::batch_rows& r) {
      const std::int64_t b = r.begin, n = r.size();
      c.append({tensor3_view<const float>(ak_.data() + b * rk * h, {n, rk, h}),
                tensor3_view<const float>(bk_.data() + b * rk * d, {n, rk, d}),
                tensor3_view<const float>(av_.data() + b * rv * h, {n, rv, h}),
                tensor3_view<const float>(bv_.data() + b * rv * dv, {n, rv, dv}),
                positions.subspan(static_cast<std::size_t>(b), static_cast<std::size_t>(n))});
    }, [&] {
      using S = typename Cache::storage_type;
      const auto views = detail::views_of(caches, std::get<std::vector<factor_view<S>>>(views_),
                                          [&](const Cache& c) { return scaled_view(c); });
      const factorized_batch<S> b{tensor3_view<const float>(aq_.data(), {t, rq, h}),
                                  tensor3_view<const float>(bq_.data(), {t, rq, d}), positions,
                                  q_indptr, views};
      if (plan.sequences() == 0) plan = plan_batch(b, options(), exec);
      attend_batch(plan, b, tensor3_view<float>(o_.data(), {t, h, dv}), options(), exec, &ws_);
    });
    last_path_ = tpa_path::factorized;
    detail::linear(const_map(o_), map(w_.o_proj), {}, ym, exec);
  }

 private:
  using rmat = row_matrix<float>;
  static detail::row_map<float> as_map(rmat& m) {
    return {m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols())};
  }
  static detail::row_map<const float> const_map(const rmat& m) {
    return {m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols())};
  }
  static detail::row_map<const float> map(const matrix_view<const float>& v) {
    return as_eigen(v, "tpa weight");
  }

  /// The query and key/value factors of x [T, D] at positions (B_Q and B_K roped): aq_, bq_,
  /// ak_, bk_, av_, bv_.
  template <class Exec>
  void project(matrix_view<const float> x, std::span<const std::int64_t> positions, Exec& exec) {
    const std::int64_t t = x.extent(0), h = cfg_.heads, d = cfg_.head_dim, dv = cfg_.v_head_dim;
    const std::int64_t rk = cfg_.k_rank, rv = cfg_.v_rank, rq = cfg_.q_rank ? cfg_.q_rank : h;
    const tpa_scales sc = scales();
    const auto xm = as_eigen(x, "tpa_layer::forward: x");

    // Query factors [T, R_Q, H] and [T, R_Q, d]; KV-only: A_Q = I (R_Q = H), B_Q = the roped q
    // heads.
    aq_.resize(t, rq * h);
    bq_.resize(t, rq * d);
    if (cfg_.q_rank) {
      factor_a(xm, w_.w_a_q, w_.a_q, rq, aq_, exec);
      aq_ *= sc.q;  // Q = q_scale A_Q^T B_Q: the kernel takes the scale in A_Q
      detail::linear(xm, map(w_.w_b_q), {}, as_map(bq_), exec);
    } else {
      aq_.setZero();
      for (std::int64_t i = 0; i < t; ++i)
        for (std::int64_t hh = 0; hh < h; ++hh) aq_(i, hh * h + hh) = 1.f;
      detail::linear(xm, map(w_.q_proj), {}, as_map(bq_), exec);
    }
    ak_.resize(t, rk * h);
    bk_.resize(t, rk * d);
    av_.resize(t, rv * h);
    bv_.resize(t, rv * dv);
    factor_a(xm, w_.w_a_k, w_.a_k, rk, ak_, exec);
    detail::linear(xm, map(w_.w_b_k), {}, as_map(bk_), exec);
    factor_a(xm, w_.w_a_v, w_.a_v, rv, av_, exec);
    detail::linear(xm, map(w_.w_b_v), {}, as_map(bv_), exec);
    rope_.fit_positions(positions);
    for (std::int64_t i = 0; i < t; ++i) {
      const std::int64_t pos = positions[static_cast<std::size_t>(i)];
      for (std::int64_t r = 0; r < rq; ++r) rope_.apply(bq_.row(i).data() + r * d, pos);
      for (std::int64_t r = 0; r < rk; ++r) rope_.apply(bk_.row(i).data() + r * d, pos);
    }
  }

  /// A [T, R, H] (rank-major, as cached) from W_A x (output index h R + r) or the fixed [R, H].
  template <class Exec>
  void factor_a(const detail::row_map<const float>& xm, const matrix_view<const float>& w_a,
                const matrix_view<const float>& fixed, std::int64_t rank, rmat& out, Exec& exec) {
    const std::int64_t t = xm.rows(), h = cfg_.heads;
    if (w_a.data_handle()) {
      // W_A x [T, H R] in the leading columns of one buffer shared by the three factors (sized
      // for the largest rank, so that steady-state steps do not reallocate it).
      const std::int64_t width = h * std::max({cfg_.q_rank, cfg_.k_rank, cfg_.v_rank});
      if (raw_.rows() != t || raw_.cols() != width) raw_.resize(t, width);
      detail::linear(xm, map(w_a), {},
                     detail::row_map<float>(raw_.data(), t, h * rank, Eigen::OuterStride<>(width)),
                     exec);
      for (std::int64_t i = 0; i < t; ++i)
        for (std::int64_t r = 0; r < rank; ++r)
          for (std::int64_t hh = 0; hh < h; ++hh) out(i, r * h + hh) = raw_(i, hh * rank + r);
    } else {
      for (std::int64_t i = 0; i < t; ++i)
        for (std::int64_t r = 0; r < rank; ++r)
          for (std::int64_t hh = 0; hh < h; ++hh) out(i, r * h + hh) = fixed(r, hh);
    }
  }

  /// Q, K, V materialised (K and V for every cached token), then the GQA kernel as MHA.
  template <storage_type S, class Exec>
  void materialized(std::int64_t t, std::span<const std::int64_t> positions,
                    const factor_view<S>& cache, Exec& exec, const attention_options& opt) {
    const std::int64_t h = cfg_.heads, d = cfg_.head_dim, dv = cfg_.v_head_dim, tk = cache.size();
    const std::int64_t rq = cfg_.q_rank ? cfg_.q_rank : h, rk = cfg_.k_rank, rv = cfg_.v_rank;
    auto form = [&](std::int64_t n, std::int64_t rank, std::int64_t width, float scale, auto a_at,
                    auto b_row, rmat& out) {
      out.setZero(n, h * width);
      exec.parallel_for(n, [&](std::int64_t i) {
        std::vector<float> b(static_cast<std::size_t>(width));
        for (std::int64_t r = 0; r < rank; ++r) {
          b_row(i, r, b.data());
          for (std::int64_t hh = 0; hh < h; ++hh) {
            const float a = scale * a_at(i, r, hh);
            float* o = out.row(i).data() + hh * width;
            for (std::int64_t c = 0; c < width; ++c) o[c] += a * b[static_cast<std::size_t>(c)];
          }
        }
      });
    };
    form(
        t, rq, d, 1.f,
        [&](std::int64_t i, std::int64_t r, std::int64_t hh) { return aq_(i, r * h + hh); },
        [&](std::int64_t i, std::int64_t r, float* b) {
          std::copy_n(bq_.row(i).data() + r * d, d, b);
        },
        qm_);
    form(
        tk, rk, d, cache.k_scale,
        [&](std::int64_t i, std::int64_t r, std::int64_t hh) {
          return static_cast<float>(cache.a_k_row(i)[r * h + hh]);
        },
        [&](std::int64_t i, std::int64_t r, float* b) {
          detail::to_float_row(cache.b_k_row(i) + r * d, b, d);
        },
        km_);
    form(
        tk, rv, dv, cache.v_scale,
        [&](std::int64_t i, std::int64_t r, std::int64_t hh) {
          return static_cast<float>(cache.a_v_row(i)[r * h + hh]);
        },
        [&](std::int64_t i, std::int64_t r, float* b) {
          detail::to_float_row(cache.b_v_row(i) + r * dv, b, dv);
        },
        vm_);
    const kv_view<float> kv(tensor3_view<const float>(km_.data(), {tk, h, d}),
                            tensor3_view<const float>(vm_.data(), {tk, h, dv}), cache.positions);
    attend(tensor3_view<const float>(qm_.data(), {t, h, d}), positions, kv,
           tensor3_view<float>(o_.data(), {t, h, dv}), opt, exec, &ws_);
  }

  /// The cache's view with this layer's scales (T6: 1/R), which override the view's.
  template <class Cache>
  auto scaled_view(const Cache& cache) const {
    auto f = cache.view();
    const tpa_scales sc = scales();
    f.k_scale = sc.k, f.v_scale = sc.v;
    return f;
  }

  static tpa_config validated(tpa_config c) {
    using detail::require;
    if (c.v_head_dim == 0) c.v_head_dim = c.head_dim;
    require(c.model_dim > 0 && c.heads > 0, "tpa_config: model_dim and heads must be > 0, got ",
            c.model_dim, ", ", c.heads);
    require(c.head_dim > 0 && c.v_head_dim > 0,
            "tpa_config: head_dim and v_head_dim must be > 0, got ", c.head_dim, ", ",
            c.v_head_dim);
    require(c.q_rank >= 0, "tpa_config: q_rank must be >= 0 (0: KV-only), got ", c.q_rank);
    require(c.k_rank >= 1, "tpa_config: k_rank must be >= 1, got ", c.k_rank);
    require(c.v_rank >= 1, "tpa_config: v_rank must be >= 1, got ", c.v_rank);
    require(c.rope.frequency_index.size() <= 1,
            "tpa_config: rope.frequency_index must hold 0 or 1 tables (B rows are "
            "shared by all heads), got ",
            c.rope.frequency_index.size());
    if (c.window) require(*c.window >= 1, "tpa_config: window must be >= 1, got ", *c.window);
    if (c.scale)
      require(std::isfinite(*c.scale), "tpa_config: scale must be finite, got ", *c.scale);
    if (c.scales)
      require(
          std::isfinite(c.scales->q) && std::isfinite(c.scales->k) && std::isfinite(c.scales->v),
          "tpa_config: scales must be finite, got q=", c.scales->q, ", k=", c.scales->k,
          ", v=", c.scales->v);
    return c;
  }

  void validate_weights() const {
    using detail::require;
    const std::int64_t dm = cfg_.model_dim, h = cfg_.heads, d = cfg_.head_dim, dv = cfg_.v_head_dim;
    auto need = [&](const matrix_view<const float>& m, std::int64_t rows, std::int64_t cols,
                    const char* name) {
      require(m.data_handle() != nullptr, "tpa_layer: tensor ", name,
              " is missing (expected shape [", rows, ", ", cols, "])");
      detail::require_extents(m, {rows, cols}, (std::string("tpa_layer: tensor ") + name).c_str());
      (void)as_eigen(m, name);
    };
    auto factor = [&](const matrix_view<const float>& w_a, const matrix_view<const float>& fixed,
                      std::int64_t rank, const char* wname, const char* fname) {
      require((w_a.data_handle() != nullptr) != (fixed.data_handle() != nullptr),
              "tpa_layer: give exactly one of ", wname, " (contextual) and ", fname,
              " (fixed head factors)");
      if (w_a.data_handle())
        need(w_a, h * rank, dm, wname);
      else
        detail::require_extents(fixed, {rank, h},
                                (std::string("tpa_layer: tensor ") + fname).c_str());
    };
    if (cfg_.q_rank) {
      require(w_.q_proj.data_handle() == nullptr, "tpa_layer: q_rank=", cfg_.q_rank,
              " factorizes the queries, but q_proj was also given");
      factor(w_.w_a_q, w_.a_q, cfg_.q_rank, "w_a_q", "a_q");
      need(w_.w_b_q, cfg_.q_rank * d, dm, "w_b_q");
    } else {
      need(w_.q_proj, h * d, dm, "q_proj");
    }
    factor(w_.w_a_k, w_.a_k, cfg_.k_rank, "w_a_k", "a_k");
    need(w_.w_b_k, cfg_.k_rank * d, dm, "w_b_k");
    factor(w_.w_a_v, w_.a_v, cfg_.v_rank, "w_a_v", "a_v");
    need(w_.w_b_v, cfg_.v_rank * dv, dm, "w_b_v");
    need(w_.o_proj, dm, h * dv, "o_proj");
  }

  tpa_config cfg_;
  tpa_weights w_;
  rope rope_;
  rmat aq_, bq_, ak_, bk_, av_, bv_, raw_, o_, qm_, km_, vm_;
  tpa_path last_path_ = tpa_path::automatic;
  attention_workspace ws_;
  // The batch's views, kept so that steps after the first allocate nothing.
  std::tuple<std::vector<factor_view<float>>, std::vector<factor_view<bf16>>,
             std::vector<factor_view<half>>>
      views_;
};

}  // namespace attnkit
