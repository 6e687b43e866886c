#pragma once
// mla_layer: DeepSeek-V2/V3 multi-head latent attention with DeepSeek's tensors (nn.Linear
// layout) over a latent cache, with two public execution paths:
//   naive:    K_i = [W_UK_i c ; k_rope], V_i = W_UV_i c materialised for the cached tokens, then
//             the GQA kernel as MHA (compute-friendly: long prefill);
//   absorbed: q_latent_i = W_UK_i^T q_nope_i, attend_latent over [c ; k_rope] with the values a
//             view of c, then W_UV_i (or W_O with W_UV folded in) (data-movement friendly: decode).
// The automatic rule takes the path with fewer FLOPs for the call: absorbed when
//   Tq <= d_c (d_nope + d_v) / (2 d_c + rope_heads d_R - (d_nope + d_R) - d_v)
// (materialising K/V costs 2 Tk H d_c (d_nope + d_v) once per call; absorption costs
// 2 Tq Tk H ((2 d_c + rope_heads d_R) - (d_qk + d_v)) more attention FLOPs); 170 tokens for
// DeepSeek-V2/V3 shapes. Biases: a key bias on kv_b_proj adds q . b_k to every score of a row,
// which softmax ignores, so the absorbed path drops it exactly; a value bias leaves the
// probability-weighted sum (the weights sum to 1) and is added after W_UV.
#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <span>
#include <tuple>
#include <vector>

#include "../cache/latent_cache.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/linear.hpp"
#include "../core/rmsnorm.hpp"
#include "../core/rope.hpp"
#include "../core/view.hpp"
#include "../kernels/batch.hpp"
#include "../kernels/gqa.hpp"
#include "../kernels/mla.hpp"
#include "../kernels/shared.hpp"
#include "batch_step.hpp"

namespace attnkit {

/// Geometry of an mla_layer (DeepSeek-V2/V3 names in parentheses); validated at construction.
struct mla_config {
  std::int64_t model_dim = 0;    ///< D (hidden_size)
  std::int64_t heads = 0;        ///< H (num_attention_heads)
  std::int64_t q_lora_rank = 0;  ///< 0: plain q_proj; else q_a_proj -> RMSNorm -> q_b_proj
  std::int64_t latent_dim = 0;   ///< d_c (kv_lora_rank)
  std::int64_t nope_dim = 0;     ///< d_nope (qk_nope_head_dim)
  std::int64_t rope_dim = 0;     ///< d_R (qk_rope_head_dim), even
  std::int64_t v_head_dim = 0;   ///< d_v (v_head_dim)
  std::int64_t rope_heads = 1;   ///< decoupled rope keys: 1 (DeepSeek) or one per head group
  /// RoPE of the rope parts; DeepSeek checkpoints store them as interleaved pairs. rotary_dim:
  /// 0 (= rope_dim) or less (a converted partial-RoPE model); tables may be one per rope head.
  rope_config rope{.theta = 10000.0, .layout = rope_layout::interleaved};
  float rms_eps = 1e-6f;         ///< epsilon of the q-LoRA and latent RMSNorms
  std::optional<float> scale{};  ///< default 1/sqrt(nope_dim + rope_dim) * mscale^2
  float mscale = 1.f;            ///< YaRN attention factor: scale *= mscale^2
  std::optional<std::int64_t> window{};  ///< sliding window (keys with q_pos - k_pos < window)
  bool fold_uv_into_o = false;  ///< absorbed path: precompute W_O W_UV (more memory, fewer steps)
  /// The products' arithmetic over bf16 caches (core/options.hpp): f32, or bf16 on AMX tiles or
  /// vdpbf16ps where the CPU has them.
  product_math products = product_math::f32;
};

/// DeepSeek's tensors, nn.Linear layout, as views (kept alive by the caller). Empty = absent.
struct mla_weights {
  matrix_view<const float> q_proj{};              ///< [H (d_nope + d_R), D] (no q-LoRA)
  matrix_view<const float> q_a_proj{};            ///< [q_lora_rank, D]
  std::span<const float> q_a_layernorm{};         ///< [q_lora_rank]
  matrix_view<const float> q_b_proj{};            ///< [H (d_nope + d_R), q_lora_rank]
  matrix_view<const float> kv_a_proj_with_mqa{};  ///< [d_c + rope_heads d_R, D]: [c_raw | k_pe_raw]
  std::span<const float> kv_a_layernorm{};        ///< [d_c]; empty: no latent norm
  matrix_view<const float> kv_b_proj{};  ///< [H (d_nope + d_v), d_c]: per head [W_UK ; W_UV]
  matrix_view<const float> o_proj{};     ///< [D, H d_v]
  std::span<const float> q_proj_bias{};  ///< [H (d_nope + d_R)] or empty
  std::span<const float> q_a_proj_bias{};   ///< [q_lora_rank] or empty
  std::span<const float> q_b_proj_bias{};   ///< [H (d_nope + d_R)] or empty
  std::span<const float> kv_a_proj_bias{};  ///< [d_c + rope_heads d_R] or empty
  std::span<const float> kv_b_proj_bias{};  ///< [H (d_nope + d_v)] or empty
  std::span<const float> o_proj_bias{};     ///< [D] or empty
  /// RMSNorm weights [d_R] applied to every head's q_pe and every rope key's k_pe before RoPE
  /// (what a converted QK-norm model needs; DeepSeek checkpoints have none). Empty = none.
  std::span<const float> q_rope_norm{};
  std::span<const float> k_rope_norm{};  ///< [d_R] or empty (see q_rope_norm)
};

/// Which MLA path a call takes: by the FLOP rule (automatic), naive or absorbed (see the file
/// comment).
enum class mla_path { automatic, naive, absorbed };

/// A full MLA attention layer (see the file comment): projections, latent cache append and
/// either the naive path (K/V up-projected per head) or the absorbed one (attention in the
/// latent space), chosen per call.
class mla_layer {
 public:
  /// Checks the weights' shapes against cfg (attnkit::invalid_argument); keeps views of them
  /// (fold_uv_into_o: computes and owns W_O W_UV now).
  mla_layer(const mla_config& cfg, const mla_weights& w) : cfg_(validated(cfg)), w_(w) {
    validate_weights();
    const std::int64_t h = cfg_.heads, dr = cfg_.rope_dim;
    if (cfg_.fold_uv_into_o) fold_uv();
    if (dr == 0) return;  // no decoupled rope part
    rope_config rc = cfg_.rope;
    k_rope_ = rope(rc, dr, cfg_.rope_heads);
    if (rc.frequency_index.size() > 1) {  // query head i uses its rope group's table
      std::vector<std::vector<std::int64_t>> per_head;
      for (std::int64_t i = 0; i < h; ++i)
        per_head.push_back(rc.frequency_index[static_cast<std::size_t>(i / group())]);
      rc.frequency_index = std::move(per_head);
    }
    q_rope_ = rope(rc, dr, h);
  }

  const mla_config& config() const { return cfg_; }  ///< the geometry
  const mla_weights& weights() const { return w_; }  ///< the weight views
  /// The softmax scale: config's scale or 1/sqrt(d_nope + d_R), times mscale^2.
  float scale() const {
    return cfg_.scale.value_or(1.f / std::sqrt(static_cast<float>(cfg_.nope_dim + cfg_.rope_dim))) *
           cfg_.mscale * cfg_.mscale;
  }
  /// Largest Tq for which the automatic rule takes the absorbed path.
  std::int64_t absorbed_max_tokens() const {
    const std::int64_t dc = cfg_.latent_dim, extra = 2 * dc + cfg_.rope_heads * cfg_.rope_dim -
                                                     (cfg_.nope_dim + cfg_.rope_dim) -
                                                     cfg_.v_head_dim;
    return extra <= 0 ? std::numeric_limits<std::int64_t>::max()
                      : dc * (cfg_.nope_dim + cfg_.v_head_dim) / extra;
  }
  /// The attention options of this layer's kernel calls (scale, window, products).
  attention_options options() const {
    return {.scale = scale(), .window = cfg_.window, .products = cfg_.products};
  }
  /// A latent cache of `capacity` tokens that fits this layer.
  template <storage_type S>
  latent_cache<S> make_cache(std::int64_t capacity) const {
    return latent_cache<S>({cfg_.latent_dim, cfg_.rope_dim, cfg_.rope_heads, capacity});
  }

  /// Calls f(score source) with the queries of the last forward call over `cache` (which that
  /// call appended to), on the path it took: absorbed, latent_scores over the latent rows; naive,
  /// gqa_scores over the K it materialised. What a shared-attention follower's flash form
  /// recomputes this layer's scores from (kernels/shared.hpp), with this layer's options().
  template <class Cache, class F>
  void last_scores(const Cache& cache, F&& f) const {
    const std::int64_t t = q_.rows(), h = cfg_.heads, dn = cfg_.nope_dim, dr = cfg_.rope_dim,
                       dqk = dn + dr;
    const auto kv = cache.view();
    if (last_path_ == mla_path::absorbed) {
      f(latent_scores<typename decltype(kv)::storage_type>{
          tensor3_view<const float>(qlat_.data(), {t, h, cfg_.latent_dim}),
          tensor3_view<const float>(q_.data() + dn, {t, h, dr}, {h * dqk, dqk, 1}), kv});
    } else {
      const std::int64_t tk = kv.size();
      f(gqa_scores<float>{tensor3_view<const float>(q_.data(), {t, h, dqk}),
                          kv_view<float>(tensor3_view<const float>(k_.data(), {tk, h, dqk}),
                                         tensor3_view<const float>(v_.data(), {tk, h, cfg_.v_head_dim}),
                                         kv.positions())});
    }
  }

  /// x [T, D] at positions -> y [T, D]; appends T tokens to the latent cache.
  /// Any cache taking latent_append payloads whose view is a latent kv_view. `outputs`: the
  /// attention weights or LSE of the call as well (a shared-attention donor). A call that throws
  /// changes nothing.
  template <class Cache, class Exec = serial_executor>
  requires cache_for<Cache, latent_append> && kv_source<Cache>
  void forward(matrix_view<const float> x, std::span<const std::int64_t> positions, Cache& cache,
               matrix_view<float> y, Exec&& exec = Exec{}, mla_path path = mla_path::automatic,
               const attention_outputs& outputs = {}) {
    using detail::require;
    const std::int64_t t = x.extent(0), d = cfg_.model_dim, dc = cfg_.latent_dim;
    const std::int64_t dr = cfg_.rope_dim, nr = cfg_.rope_heads;
    detail::require_extents(x, {t, d}, "mla_layer::forward: x");
    detail::require_extents(y, {t, d}, "mla_layer::forward: y");
    require(static_cast<std::int64_t>(positions.size()) == t, "mla_layer::forward: positions has ",
            positions.size(), " entries but x has T=", t, " tokens");
    {
      const auto kv = cache.view();
      require(kv.kv_heads() == 1 && kv.v_head_dim() == dc && kv.head_dim() == dc + nr * dr,
              "mla_layer::forward: cache rows have latent width ", kv.v_head_dim(),
              " and key width ", kv.head_dim(), " but the layer needs ", dc, " and ", dc + nr * dr,
              " (latent_dim + rope_heads * rope_dim)");
    }
    require(t <= cache.capacity() - cache.size(), "mla_layer::forward: appending ", t,
            " tokens to size=", cache.size(), " exceeds capacity=", cache.capacity());
    auto ym = as_eigen(y, "mla_layer::forward: y");  // checked before the cache changes
    project(x, positions, exec);
    cache.append(latent_append{
        matrix_view<const float>(kva_.data(), {t, dc}, {dc + nr * dr, 1}),
        tensor3_view<const float>(kva_.data() + dc, {t, nr, dr}, {dc + nr * dr, dr, 1}), positions});

    if (path == mla_path::automatic)
      path = t <= absorbed_max_tokens() ? mla_path::absorbed : mla_path::naive;
    const std::int64_t before = cache.size() - t;
    last_path_ = path;
    detail::undo_on_throw(cache, before, [&] {
      const attention_options opt = outputs.added_to(options());
      if (path == mla_path::absorbed)
        forward_absorbed(t, exec, [&](auto ql, auto qr, auto o) {
          attend_latent(ql, qr, positions, cache.view(), o, opt, exec, &ws_);
        });
      else
        forward_naive(t, positions, cache.view(), exec, opt);
    });
    project_out(path, ym, exec);
  }

  /// One step of a batch of sequences on the absorbed path (see gqa_layer::forward_batch):
  /// sequence s's rows [q_indptr[s], q_indptr[s + 1]) of x [sum Tq, D] are appended to
  /// *caches[s]; y [sum Tq, D]; `plan` empty at the step's first layer, reused by the later
  /// ones. A call that throws changes no cache.
  template <class Cache, class Exec = serial_executor>
  requires cache_for<Cache, latent_append> && kv_source<Cache>
  void forward_batch(matrix_view<const float> x, std::span<const std::int64_t> positions,
                     std::span<const std::int64_t> q_indptr, std::span<Cache*> caches,
                     matrix_view<float> y, batch_plan& plan, Exec&& exec = Exec{}) {
    using detail::require;
    const char* who = "mla_layer::forward_batch";
    const std::int64_t t = x.extent(0), d = cfg_.model_dim, dc = cfg_.latent_dim;
    const std::int64_t dr = cfg_.rope_dim, nr = cfg_.rope_heads, w = dc + nr * dr;
    detail::require_extents(x, {t, d}, who, "x");
    detail::require_extents(y, {t, d}, who, "y");
    detail::validate_batch_rows(who, q_indptr, static_cast<std::int64_t>(caches.size()), t,
                                positions);
    detail::validate_batch_caches(who, caches, q_indptr, [&](const auto& kv) {
      require(kv.kv_heads() == 1 && kv.v_head_dim() == dc && kv.head_dim() == w,
              "cache rows have latent width ", kv.v_head_dim(), " and key width ", kv.head_dim(),
              " but the layer needs ", dc, " and ", w);
    });
    auto ym = as_eigen(y, who);
    project(x, positions, exec);
    detail::append_batch(caches, q_indptr, [&](Cache& c, const detail::batch_rows& r) {
      const float* row = kva_.data() + r.begin * w;
      c.append(latent_append{
          matrix_view<const float>(row, {r.size(), dc}, {w, 1}),
          tensor3_view<const float>(row + dc, {r.size(), nr, dr}, {w, dr, 1}),
          positions.subspan(static_cast<std::size_t>(r.begin), static_cast<std::size_t>(r.size()))});
    }, [&] {
      using S = typename Cache::storage_type;
      const auto views = detail::views_of(caches, std::get<std::vector<kv_view<S>>>(views_));
      forward_absorbed(t, exec, [&](auto ql, auto qr, auto o) {
        const latent_batch<S> b{ql, qr, positions, q_indptr, views};
        if (plan.sequences() == 0) plan = plan_batch(b, options(), exec);
        attend_batch(plan, b, o, options(), exec, &ws_);
      });
    });
    last_path_ = mla_path::absorbed;
    project_out(mla_path::absorbed, ym, exec);
  }

 private:
  using rmat = row_matrix<float>;
  using cmap = detail::row_map<const float>;
  std::int64_t group() const { return cfg_.heads / cfg_.rope_heads; }
  static detail::row_map<float> as_map(rmat& m) {
    return {m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols())};
  }
  static cmap const_map(const rmat& m) {
    return {m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols())};
  }
  static cmap map(const matrix_view<const float>& v) { return as_eigen(v, "mla weight"); }
  /// W_UK_i [d_nope, d_c] and W_UV_i [d_v, d_c]: row blocks of kv_b_proj.
  cmap w_uk(std::int64_t i) const {
    const std::int64_t stride = w_.kv_b_proj.stride(0);
    return {w_.kv_b_proj.data_handle() + i * (cfg_.nope_dim + cfg_.v_head_dim) * stride,
            cfg_.nope_dim, cfg_.latent_dim, Eigen::OuterStride<>(stride)};
  }
  cmap w_uv(std::int64_t i) const {
    const std::int64_t stride = w_.kv_b_proj.stride(0);
    return {w_.kv_b_proj.data_handle() +
                (i * (cfg_.nope_dim + cfg_.v_head_dim) + cfg_.nope_dim) * stride,
            cfg_.v_head_dim, cfg_.latent_dim, Eigen::OuterStride<>(stride)};
  }
  /// The value bias of head i (d_v entries), or empty.
  std::span<const float> value_bias(std::int64_t i) const {
    if (w_.kv_b_proj_bias.empty()) return {};
    return w_.kv_b_proj_bias.subspan(
        static_cast<std::size_t>(i * (cfg_.nope_dim + cfg_.v_head_dim) + cfg_.nope_dim),
        static_cast<std::size_t>(cfg_.v_head_dim));
  }

  /// q_ [T, H (d_nope + d_R)] and kva_ [T, d_c + rope_heads d_R] of x [T, D] at positions:
  /// projected, normed, the rope parts roped.
  template <class Exec>
  void project(matrix_view<const float> x, std::span<const std::int64_t> positions, Exec& exec) {
    const std::int64_t t = x.extent(0), h = cfg_.heads, dc = cfg_.latent_dim;
    const std::int64_t dn = cfg_.nope_dim, dr = cfg_.rope_dim, dqk = dn + dr, nr = cfg_.rope_heads;
    const auto xm = as_eigen(x, "mla_layer::forward: x");

    // Queries [T, H, d_nope + d_R], rope part roped.
    q_.resize(t, h * dqk);
    if (cfg_.q_lora_rank > 0) {
      cq_.resize(t, cfg_.q_lora_rank);
      detail::linear(xm, map(w_.q_a_proj), w_.q_a_proj_bias, as_map(cq_), exec);
      for (std::int64_t i = 0; i < t; ++i)
        rms_norm(cq_.row(i).data(), cfg_.q_lora_rank, w_.q_a_layernorm, cfg_.rms_eps);
      detail::linear(const_map(cq_), map(w_.q_b_proj), w_.q_b_proj_bias, as_map(q_), exec);
    } else {
      detail::linear(xm, map(w_.q_proj), w_.q_proj_bias, as_map(q_), exec);
    }
    // Latent and rope key: [c_raw | k_pe_raw] -> c = RMSNorm(c_raw), k_rope = RoPE(k_pe_raw).
    kva_.resize(t, dc + nr * dr);
    detail::linear(xm, map(w_.kv_a_proj_with_mqa), w_.kv_a_proj_bias, as_map(kva_), exec);
    q_rope_.fit_positions(positions);
    k_rope_.fit_positions(positions);
    for (std::int64_t i = 0; i < t; ++i) {
      const std::int64_t pos = positions[static_cast<std::size_t>(i)];
      if (!w_.kv_a_layernorm.empty())
        rms_norm(kva_.row(i).data(), dc, w_.kv_a_layernorm, cfg_.rms_eps);
      if (dr == 0) continue;
      for (std::int64_t g = 0; g < nr; ++g) {
        float* k = kva_.row(i).data() + dc + g * dr;
        if (!w_.k_rope_norm.empty()) rms_norm(k, dr, w_.k_rope_norm, cfg_.rms_eps);
        k_rope_.apply(k, pos, g);
      }
      for (std::int64_t hh = 0; hh < h; ++hh) {
        float* q = q_.row(i).data() + hh * dqk + dn;
        if (!w_.q_rope_norm.empty()) rms_norm(q, dr, w_.q_rope_norm, cfg_.rms_eps);
        q_rope_.apply(q, pos, hh);
      }
    }
  }

  /// y = O W_O^T + b_o, O = o_ [T, H d_v] (or the latent [T, H d_c] with W_O W_UV folded).
  template <class Y, class Exec>
  void project_out(mla_path path, Y& ym, Exec& exec) {
    if (path == mla_path::absorbed && cfg_.fold_uv_into_o) {
      detail::linear(const_map(olat_), const_map(w_ouv_), std::span<const float>(b_ouv_), ym, exec);
    } else {
      detail::linear(const_map(o_), map(w_.o_proj), w_.o_proj_bias, ym, exec);
    }
  }

  /// The absorbed path from q_: q_latent, then attend(q_latent [T, H, d_c], q_rope [T, H, d_R],
  /// o_latent [T, H, d_c]) (one sequence or a batch), then o_ unless W_UV is folded into W_O.
  template <class Exec, class Attend>
  void forward_absorbed(std::int64_t t, Exec& exec, Attend&& attend) {
    const std::int64_t h = cfg_.heads, dc = cfg_.latent_dim, dn = cfg_.nope_dim, dr = cfg_.rope_dim,
                       dqk = dn + dr;
    const std::int64_t dv = cfg_.v_head_dim;
    qlat_.resize(t, h * dc);
    exec.parallel_for(h, [&](std::int64_t i) {  // q_latent_i = W_UK_i^T q_nope_i
      const cmap qn(q_.data() + i * dqk, t, dn, Eigen::OuterStride<>(h * dqk));
      detail::row_map<float>(qlat_.data() + i * dc, t, dc, Eigen::OuterStride<>(h * dc)).noalias() =
          qn * w_uk(i);
    });
    olat_.resize(t, h * dc);
    attend(tensor3_view<const float>(qlat_.data(), {t, h, dc}),
           tensor3_view<const float>(q_.data() + dn, {t, h, dr}, {h * dqk, dqk, 1}),
           tensor3_view<float>(olat_.data(), {t, h, dc}));
    if (cfg_.fold_uv_into_o) return;
    o_.resize(t, h * dv);
    exec.parallel_for(h, [&](std::int64_t i) {  // o_i = W_UV_i o_latent_i + b_v_i
      const cmap ol(olat_.data() + i * dc, t, dc, Eigen::OuterStride<>(h * dc));
      auto oi = detail::row_map<float>(o_.data() + i * dv, t, dv, Eigen::OuterStride<>(h * dv));
      oi.noalias() = ol * w_uv(i).transpose();
      if (const auto b = value_bias(i); !b.empty())
        oi.rowwise() += Eigen::Map<const Eigen::RowVectorXf>(b.data(), dv);
    });
  }

  template <storage_type S, class Exec>
  void forward_naive(std::int64_t t, std::span<const std::int64_t> positions,
                     const kv_view<S>& cache, Exec& exec, const attention_options& opt) {
    const std::int64_t h = cfg_.heads, dc = cfg_.latent_dim, dn = cfg_.nope_dim, dr = cfg_.rope_dim,
                       dqk = dn + dr;
    const std::int64_t dv = cfg_.v_head_dim, tk = cache.size(), w = cache.head_dim();
    // Widen the cached rows, then K_i = [W_UK_i c + b_k ; k_rope_r(i)], V_i = W_UV_i c + b_v.
    lat_.resize(tk, w);
    for (std::int64_t s = 0; s < tk; ++s)
      detail::to_float_row(cache.keys().row(0, s), lat_.row(s).data(), w);
    k_.resize(tk, h * dqk);
    v_.resize(tk, h * dv);
    exec.parallel_for(h, [&](std::int64_t i) {
      const cmap c(lat_.data(), tk, dc, Eigen::OuterStride<>(w));
      auto ki = detail::row_map<float>(k_.data() + i * dqk, tk, dn, Eigen::OuterStride<>(h * dqk));
      auto vi = detail::row_map<float>(v_.data() + i * dv, tk, dv, Eigen::OuterStride<>(h * dv));
      ki.noalias() = c * w_uk(i).transpose();
      vi.noalias() = c * w_uv(i).transpose();
      if (!w_.kv_b_proj_bias.empty()) {
        ki.rowwise() +=
            Eigen::Map<const Eigen::RowVectorXf>(w_.kv_b_proj_bias.data() + i * (dn + dv), dn);
        vi.rowwise() += Eigen::Map<const Eigen::RowVectorXf>(value_bias(i).data(), dv);
      }
      const std::int64_t g = i / group();
      for (std::int64_t s = 0; s < tk; ++s)
        std::copy(lat_.row(s).data() + dc + g * dr, lat_.row(s).data() + dc + (g + 1) * dr,
                  k_.row(s).data() + i * dqk + dn);
    });
    o_.resize(t, h * dv);
    const kv_view<float> kv(tensor3_view<const float>(k_.data(), {tk, h, dqk}),
                            tensor3_view<const float>(v_.data(), {tk, h, dv}), cache.positions());
    attend(tensor3_view<const float>(q_.data(), {t, h, dqk}), positions, kv,
           tensor3_view<float>(o_.data(), {t, h, dv}), opt, exec, &ws_);
  }

  /// W_OUV [D, H d_c] = [W_O,i W_UV_i]_i and the folded value bias b = b_o + sum_i W_O,i b_v,i.
  void fold_uv() {
    const std::int64_t d = cfg_.model_dim, h = cfg_.heads, dc = cfg_.latent_dim,
                       dv = cfg_.v_head_dim;
    const cmap wo = map(w_.o_proj);
    w_ouv_.resize(d, h * dc);
    Eigen::VectorXf b = Eigen::VectorXf::Zero(d);
    if (!w_.o_proj_bias.empty()) b = Eigen::Map<const Eigen::VectorXf>(w_.o_proj_bias.data(), d);
    for (std::int64_t i = 0; i < h; ++i) {
      w_ouv_.middleCols(i * dc, dc).noalias() = wo.middleCols(i * dv, dv) * w_uv(i);
      if (const auto bv = value_bias(i); !bv.empty())
        b.noalias() += wo.middleCols(i * dv, dv) * Eigen::Map<const Eigen::VectorXf>(bv.data(), dv);
    }
    b_ouv_.assign(b.data(), b.data() + d);
  }

  static mla_config validated(mla_config c) {
    using detail::require;
    require(c.model_dim > 0, "mla_config: model_dim must be > 0, got ", c.model_dim);
    require(c.heads > 0, "mla_config: heads must be > 0, got ", c.heads);
    require(c.q_lora_rank >= 0, "mla_config: q_lora_rank must be >= 0, got ", c.q_lora_rank);
    require(c.latent_dim > 0, "mla_config: latent_dim must be > 0, got ", c.latent_dim);
    require(c.nope_dim >= 0 && c.v_head_dim > 0,
            "mla_config: nope_dim must be >= 0 and v_head_dim > 0, got ", c.nope_dim, ", ",
            c.v_head_dim);
    require(c.rope_dim >= 0 && c.rope_dim % 2 == 0,
            "mla_config: rope_dim must be even and >= 0, got ", c.rope_dim);
    require(c.nope_dim + c.rope_dim > 0, "mla_config: nope_dim + rope_dim must be > 0");
    require(c.rope_heads >= 1 && c.heads % c.rope_heads == 0, "mla_config: heads=", c.heads,
            " must be a multiple of rope_heads=", c.rope_heads);
    require(c.rope.rotary_dim >= 0 && c.rope.rotary_dim <= c.rope_dim,
            "mla_config: rope.rotary_dim=", c.rope.rotary_dim,
            " must be in [0, rope_dim=", c.rope_dim, "] (it rotates the rope part only)");
    require(c.rms_eps > 0, "mla_config: rms_eps must be > 0, got ", c.rms_eps);
    require(c.mscale > 0, "mla_config: mscale must be > 0, got ", c.mscale);
    if (c.window) require(*c.window >= 1, "mla_config: window must be >= 1, got ", *c.window);
    if (c.scale)
      require(std::isfinite(*c.scale), "mla_config: scale must be finite, got ", *c.scale);
    require(std::isfinite(c.mscale), "mla_config: mscale must be finite, got ", c.mscale);
    return c;
  }

  void validate_weights() const {
    using detail::require;
    const std::int64_t d = cfg_.model_dim, h = cfg_.heads, dqk = cfg_.nope_dim + cfg_.rope_dim,
                       dc = cfg_.latent_dim;
    const std::int64_t ql = cfg_.q_lora_rank, dv = cfg_.v_head_dim, nr = cfg_.rope_heads,
                       dr = cfg_.rope_dim;
    auto present = [](const matrix_view<const float>& m) { return m.data_handle() != nullptr; };
    auto need = [&](const matrix_view<const float>& m, std::int64_t rows, std::int64_t cols,
                    const char* name) {
      require(present(m), "mla_layer: tensor ", name, " is missing (expected shape [", rows, ", ",
              cols, "])");
      detail::require_extents(m, {rows, cols}, (std::string("mla_layer: tensor ") + name).c_str());
      (void)as_eigen(m, name);
    };
    auto bias = [&](std::span<const float> b, std::int64_t n, const char* name) {
      require(b.empty() || static_cast<std::int64_t>(b.size()) == n, "mla_layer: ", name, " has ",
              b.size(), " entries but ", n, " were expected");
    };
    if (ql > 0) {
      require(!present(w_.q_proj), "mla_layer: q_lora_rank=", ql,
              " uses q_a_proj/q_b_proj, but q_proj was also given");
      need(w_.q_a_proj, ql, d, "q_a_proj");
      need(w_.q_b_proj, h * dqk, ql, "q_b_proj");
      require(static_cast<std::int64_t>(w_.q_a_layernorm.size()) == ql,
              "mla_layer: tensor q_a_layernorm has ", w_.q_a_layernorm.size(),
              " entries but q_lora_rank=", ql, " were expected");
      bias(w_.q_a_proj_bias, ql, "q_a_proj_bias");
      bias(w_.q_b_proj_bias, h * dqk, "q_b_proj_bias");
    } else {
      require(
          !present(w_.q_a_proj) && !present(w_.q_b_proj),
          "mla_layer: q_a_proj/q_b_proj given but q_lora_rank=0 (set q_lora_rank to use q-LoRA)");
      need(w_.q_proj, h * dqk, d, "q_proj");
      bias(w_.q_proj_bias, h * dqk, "q_proj_bias");
    }
    need(w_.kv_a_proj_with_mqa, dc + nr * dr, d, "kv_a_proj_with_mqa");
    need(w_.kv_b_proj, h * (cfg_.nope_dim + dv), dc, "kv_b_proj");
    need(w_.o_proj, d, h * dv, "o_proj");
    require(w_.kv_a_layernorm.empty() || static_cast<std::int64_t>(w_.kv_a_layernorm.size()) == dc,
            "mla_layer: tensor kv_a_layernorm has ", w_.kv_a_layernorm.size(),
            " entries but latent_dim=", dc, " were expected");
    bias(w_.kv_a_proj_bias, dc + nr * dr, "kv_a_proj_bias");
    bias(w_.kv_b_proj_bias, h * (cfg_.nope_dim + dv), "kv_b_proj_bias");
    bias(w_.o_proj_bias, d, "o_proj_bias");
    bias(w_.q_rope_norm, dr, "q_rope_norm");
    bias(w_.k_rope_norm, dr, "k_rope_norm");
  }

  mla_config cfg_;
  mla_weights w_;
  rope q_rope_, k_rope_;
  mla_path last_path_ = mla_path::absorbed;
  rmat q_, cq_, kva_, qlat_, olat_, o_, lat_, k_, v_, w_ouv_;
  std::vector<float> b_ouv_;
  attention_workspace ws_;
  // The batch's views, kept so that steps after the first allocate nothing.
  std::tuple<std::vector<kv_view<float>>, std::vector<kv_view<bf16>>, std::vector<kv_view<half>>>
      views_;
};

}  // namespace attnkit
