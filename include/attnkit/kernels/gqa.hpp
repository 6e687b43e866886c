#pragma once
// The GQA attention kernel family: MHA (one query head per KV head), GQA and MQA (one KV head)
// are one kernel. Flash-style: the Tq x Tk score matrix is never materialised.
//
// Work is cut into items (KV head j, query tile, key split). A query tile holds tq tokens x g
// query heads of KV head j as M = g*tq rows, so every cached K/V row is read once per tile for
// all heads of its group. Key blocks stream through an online softmax; blocks entirely above
// the causal diagonal (or outside the sliding window) are skipped from their position range.
// Two tile strategies share everything but the two block products:
//   streaming: register-blocked micro-kernels reading K/V in their storage type (decode, short
//              chunks); the key range is split across workers and softmax states merged.
//   gemm:      Eigen GEMMs on float tiles of 128 rows x 128 keys (prefill).
// Decode, chunked prefill and full prefill are the same call with different Tq: the causal rule
// is "key position <= query position" on explicit int64 positions.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <vector>

#include "../cache/dense_cache.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/softmax.hpp"
#include "../core/view.hpp"
#include "microkernels.hpp"
#include "tile_gemm.hpp"

namespace attnkit {

enum class tile_strategy { automatic, streaming, gemm };

struct attention_options {
  std::optional<float> scale{};              ///< softmax scale; default 1/sqrt(d_qk)
  bool causal = true;                        ///< key position <= query position
  std::optional<std::int64_t> window{};      ///< sliding window: keep keys with q_pos - k_pos < window
  matrix_view<float> lse{};                  ///< optional [Tq, H] output: natural-log log-sum-exp
  tile_strategy strategy = tile_strategy::automatic;
};

/// Scratch memory reused across calls, so steady-state decode does not allocate. One call at a
/// time per workspace. Without one, each call allocates its own.
class attention_workspace {
 public:
  attention_workspace() = default;
  /// Bytes currently held (grows to the largest call's need, never shrinks).
  std::size_t bytes() const {
    std::size_t n = (partial_.size() + query_.size()) * sizeof(float);
    for (const auto& w : workers_)
      n += w.f.size() * sizeof(float) + w.pos.size() * sizeof(std::int64_t) + w.st.size() * sizeof(softmax_row_state);
    return n;
  }

  // Internal (used by attnkit's kernels); not part of the stable API.
  struct worker {
    std::vector<float> f;
    std::vector<std::int64_t> pos;
    std::vector<softmax_row_state> st;
  };
  worker& worker_at(std::size_t w, std::size_t floats, std::size_t rows) {
    auto& wk = workers_[w];
    if (wk.f.size() < floats) wk.f.resize(floats);
    if (wk.pos.size() < rows) wk.pos.resize(rows);
    if (wk.st.size() < rows) wk.st.resize(rows);
    return wk;
  }
  float* partial(std::size_t floats) {
    if (partial_.size() < floats) partial_.resize(floats);
    return partial_.data();
  }
  /// Per-call query staging (e.g. MLA's [q_latent ; q_rope] rows).
  float* query(std::size_t floats) {
    if (query_.size() < floats) query_.resize(floats);
    return query_.data();
  }
  void reserve_workers(std::size_t n) {
    if (workers_.size() < n) workers_.resize(n);
  }

 private:
  std::vector<worker> workers_;
  std::vector<float> partial_, query_;
};

namespace detail {

/// Rows of the K and V of one attention problem: head j's key row t is at
/// k + j * k_head_stride + t * k_row_stride (likewise V). Values may alias keys (MLA).
template <storage_type S>
struct kv_rows {
  const S* k = nullptr;
  std::int64_t k_head_stride = 0, k_row_stride = 0;
  const S* v = nullptr;
  std::int64_t v_head_stride = 0, v_row_stride = 0;
  const std::int64_t* positions = nullptr;
  std::int64_t tokens = 0, kv_heads = 0, qk_dim = 0, v_dim = 0;
};

template <storage_type S>
struct gqa_problem {
  tensor3_view<const float> q;
  std::span<const std::int64_t> q_pos;
  kv_rows<S> kv;
  tensor3_view<float> out;
  matrix_view<float> lse;
  float scale = 1.f;
  bool causal = true;
  std::int64_t window = 0;  // 0 = none
  bool streaming = true;
};

template <storage_type S>
struct gqa_plan {
  std::int64_t g, tq, rows, qtiles, splits, block, items;
};

template <storage_type S>
gqa_plan<S> plan_gqa(const gqa_problem<S>& pb, int workers) {
  gqa_plan<S> p{};
  const std::int64_t tq_total = pb.q.extent(0), tk = pb.kv.tokens;
  p.g = pb.q.extent(1) / pb.kv.kv_heads;
  const std::int64_t target_rows = pb.streaming ? 32 : 128;
  p.tq = std::clamp<std::int64_t>(target_rows / p.g, 1, std::max<std::int64_t>(tq_total, 1));
  p.rows = p.g * p.tq;
  p.qtiles = (tq_total + p.tq - 1) / p.tq;
  p.block = pb.streaming ? 64 : 128;
  const std::int64_t base = pb.kv.kv_heads * p.qtiles;
  p.splits = 1;
  if (base < 2 * workers || base % workers != 0)
    p.splits = std::clamp<std::int64_t>((4 * workers + base - 1) / base, 1, std::max<std::int64_t>(1, tk / 256));
  p.items = base * p.splits;
  return p;
}

template <storage_type S>
class gqa_tile_runner {
 public:
  gqa_tile_runner(const gqa_problem<S>& pb, const gqa_plan<S>& pl, attention_workspace::worker& w)
      : pb_(pb), pl_(pl) {
    const std::int64_t m = pl.rows, dqk = pb.kv.qk_dim, dv = pb.kv.v_dim, nb = pl.block;
    float* f = w.f.data();
    q_ = f; f += m * dqk;
    o_ = f; f += m * dv;
    s_ = f; f += m * nb;
    kf_ = f; f += nb * dqk;
    vf_ = f; f += nb * dv;
    col_max_ = f; f += m;
    col_sum_ = f; f += m;
    alpha_ = f;
    row_pos_ = w.pos.data();
    state_ = w.st.data();
  }
  static std::size_t floats_needed(const gqa_problem<S>& pb, const gqa_plan<S>& pl) {
    const std::int64_t m = pl.rows, nb = pl.block;
    return static_cast<std::size_t>(m * (pb.kv.qk_dim + pb.kv.v_dim + nb + 3) + nb * (pb.kv.qk_dim + pb.kv.v_dim));
  }

  /// Runs item (query tile qt, KV head j, key split ks). With one split the result goes to
  /// out/lse; otherwise (state, accumulator) go to `partial` for the merge pass.
  void run(std::int64_t qt, std::int64_t j, std::int64_t ks, float* partial) {
    const std::int64_t g = pl_.g, dqk = pb_.kv.qk_dim, dv = pb_.kv.v_dim;
    const std::int64_t t0 = qt * pl_.tq, tn = std::min(pl_.tq, pb_.q.extent(0) - t0), m = tn * g;
    std::int64_t qmin = std::numeric_limits<std::int64_t>::max(), qmax = std::numeric_limits<std::int64_t>::min();
    for (std::int64_t ti = 0; ti < tn; ++ti) {
      const std::int64_t pos = pb_.q_pos[static_cast<std::size_t>(t0 + ti)];
      qmin = std::min(qmin, pos);
      qmax = std::max(qmax, pos);
      for (std::int64_t hh = 0; hh < g; ++hh) {
        const std::int64_t r = ti * g + hh;
        row_pos_[r] = pos;
        const float* src = &pb_.q(t0 + ti, j * g + hh, 0);
        if (transposed()) {  // Q^T [d_qk, m]
          for (std::int64_t c = 0; c < dqk; ++c) q_[c * m + r] = src[c * pb_.q.stride(2)] * pb_.scale;
        } else {
          for (std::int64_t c = 0; c < dqk; ++c) q_[r * dqk + c] = src[c * pb_.q.stride(2)] * pb_.scale;
          if (paired()) permute_pairs(q_ + r * dqk, dqk);
        }
        state_[r] = softmax_row_state{};
      }
    }
    std::fill(o_, o_ + m * dv, 0.f);
    if (transposed()) {
      std::fill(col_max_, col_max_ + m, neg_inf);
      std::fill(col_sum_, col_sum_ + m, 0.f);
    }

    const std::int64_t tk = pb_.kv.tokens;
    const std::int64_t k_begin = tk * ks / pl_.splits, k_end = tk * (ks + 1) / pl_.splits;
    const S* kh = pb_.kv.k + j * pb_.kv.k_head_stride;
    const S* vh = pb_.kv.v + j * pb_.kv.v_head_stride;
    for (std::int64_t b0 = k_begin; b0 < k_end; b0 += pl_.block) {
      const std::int64_t nb = std::min(pl_.block, k_end - b0);
      const std::int64_t* kp = pb_.kv.positions + b0;
      const auto [kmin_it, kmax_it] = std::minmax_element(kp, kp + nb);
      const std::int64_t kmin = *kmin_it, kmax = *kmax_it;
      if (pb_.causal && kmin > qmax) continue;                        // entirely in the future
      if (pb_.window > 0 && kmax <= qmin - pb_.window) continue;       // entirely out of the window
      const bool need_mask = (pb_.causal && kmax > qmin) || (pb_.window > 0 && kmin <= qmax - pb_.window);
      if (transposed()) {
        transposed_block(kh + b0 * pb_.kv.k_row_stride, vh + b0 * pb_.kv.v_row_stride, kp, m, nb, need_mask);
        continue;
      }
      block_scores(kh + b0 * pb_.kv.k_row_stride, m, nb);
      if (need_mask) apply_mask(kp, m, nb);
      for (std::int64_t r = 0; r < m; ++r) {
        const float alpha = softmax_absorb(state_[r], s_ + r * pl_.block, nb);
        if (alpha != 1.f) scale_row(o_ + r * dv, dv, alpha);
      }
      block_pv(vh + b0 * pb_.kv.v_row_stride, m, nb);
    }
    if (transposed())
      for (std::int64_t r = 0; r < m; ++r) state_[r] = softmax_row_state{col_max_[r], col_sum_[r]};

    if (paired())
      for (std::int64_t r = 0; r < m; ++r) unpermute_pairs(o_ + r * dv, dv);
    if (pl_.splits == 1) {
      for (std::int64_t r = 0; r < m; ++r) {
        const std::int64_t t = t0 + r / g, h = j * g + r % g;
        const float l = softmax_finalize(state_[r], o_ + r * dv, &pb_.out(t, h, 0), pb_.out.stride(2), dv);
        if (!pb_.lse.empty()) pb_.lse(t, h) = l;
      }
    } else {
      for (std::int64_t r = 0; r < m; ++r) {
        float* dst = partial + r * (dv + 2);
        dst[0] = state_[r].max;
        dst[1] = state_[r].sum;
        std::copy(o_ + r * dv, o_ + (r + 1) * dv, dst + 2);
      }
    }
  }

 private:
  bool paired() const { return paired_columns<S> && pb_.streaming; }
  /// The AVX-512 gemm strategy: scores transposed (S^T = K Q^T), own register-blocked GEMMs.
  bool transposed() const { return ATTNKIT_HAS_AVX512 && !pb_.streaming; }

  /// One key block of the transposed path: S^T = K Q^T, mask, column softmax, O += P V.
  void transposed_block(const S* k, const S* v, const std::int64_t* kp, std::int64_t m, std::int64_t nb, bool need_mask) {
#if ATTNKIT_HAS_AVX512
    const std::int64_t dqk = pb_.kv.qk_dim, dv = pb_.kv.v_dim;
    const float* kf = reinterpret_cast<const float*>(k);
    const float* vf = reinterpret_cast<const float*>(v);
    std::int64_t ks = pb_.kv.k_row_stride, vs = pb_.kv.v_row_stride;
    if constexpr (!std::same_as<S, float>) {  // widen the block once; the GEMMs reuse it m times
      const bool v_in_k = v == k && vs == ks && dv <= dqk;  // MLA: values are a view of the keys
      for (std::int64_t t = 0; t < nb; ++t) to_float_row(k + t * ks, kf_ + t * dqk, dqk);
      if (!v_in_k)
        for (std::int64_t t = 0; t < nb; ++t) to_float_row(v + t * vs, vf_ + t * dv, dv);
      kf = kf_, ks = dqk;
      vf = v_in_k ? kf_ : vf_, vs = v_in_k ? dqk : dv;
    }
    gemm_bcast<false>(nb, m, dqk, kf, ks, 1, q_, m, s_, m);  // s_ = S^T [nb, m]
    if (need_mask)
      for (std::int64_t t = 0; t < nb; ++t)
        for (std::int64_t r = 0; r < m; ++r)
          if (masked(kp[t], row_pos_[r])) s_[t * m + r] = neg_inf;
    softmax_absorb_columns(s_, m, nb, m, col_max_, col_sum_, alpha_);
    for (std::int64_t r = 0; r < m; ++r)
      if (alpha_[r] != 1.f) scale_row(o_ + r * dv, dv, alpha_[r]);
    gemm_bcast<true>(m, dv, nb, s_, 1, m, vf, vs, o_, dv);  // O += P V, P(r, t) = S^T[t][r]
#else
    (void)k, (void)v, (void)kp, (void)m, (void)nb, (void)need_mask;
#endif
  }

  bool masked(std::int64_t kpos, std::int64_t qpos) const {
    return (pb_.causal && kpos > qpos) || (pb_.window > 0 && qpos - kpos >= pb_.window);
  }

  void apply_mask(const std::int64_t* kp, std::int64_t m, std::int64_t nb) {
    for (std::int64_t r = 0; r < m; ++r) {
      const std::int64_t qp = row_pos_[r];
      float* s = s_ + r * pl_.block;
      for (std::int64_t t = 0; t < nb; ++t)
        if (masked(kp[t], qp)) s[t] = neg_inf;
    }
  }

  void block_scores(const S* k, std::int64_t m, std::int64_t nb) {
    const std::int64_t dqk = pb_.kv.qk_dim, ks = pb_.kv.k_row_stride;
    if (pb_.streaming) {
      scores(q_, dqk, m, k, ks, nb, dqk, s_, pl_.block);
      return;
    }
    using map_c = Eigen::Map<const row_matrix<float>, Eigen::Unaligned, Eigen::OuterStride<>>;
    Eigen::Map<row_matrix<float>, Eigen::Unaligned, Eigen::OuterStride<>> sm(s_, m, nb, Eigen::OuterStride<>(pl_.block));
    const map_c qm(q_, m, dqk, Eigen::OuterStride<>(dqk));
    if constexpr (std::same_as<S, float>) {
      sm.noalias() = qm * map_c(k, nb, dqk, Eigen::OuterStride<>(ks)).transpose();
    } else {
      for (std::int64_t t = 0; t < nb; ++t) to_float_row(k + t * ks, kf_ + t * dqk, dqk);
      sm.noalias() = qm * map_c(kf_, nb, dqk, Eigen::OuterStride<>(dqk)).transpose();
    }
  }

  void block_pv(const S* v, std::int64_t m, std::int64_t nb) {
    const std::int64_t dv = pb_.kv.v_dim, vs = pb_.kv.v_row_stride;
    if (pb_.streaming) {
      accumulate_pv(s_, pl_.block, m, v, vs, nb, dv, o_, dv);
      return;
    }
    using map_c = Eigen::Map<const row_matrix<float>, Eigen::Unaligned, Eigen::OuterStride<>>;
    Eigen::Map<row_matrix<float>, Eigen::Unaligned, Eigen::OuterStride<>> om(o_, m, dv, Eigen::OuterStride<>(dv));
    const map_c pm(s_, m, nb, Eigen::OuterStride<>(pl_.block));
    if constexpr (std::same_as<S, float>) {
      om.noalias() += pm * map_c(v, nb, dv, Eigen::OuterStride<>(vs));
    } else {
      for (std::int64_t t = 0; t < nb; ++t) to_float_row(v + t * vs, vf_ + t * dv, dv);
      om.noalias() += pm * map_c(vf_, nb, dv, Eigen::OuterStride<>(dv));
    }
  }

  const gqa_problem<S>& pb_;
  const gqa_plan<S>& pl_;
  float *q_, *o_, *s_, *kf_, *vf_, *col_max_, *col_sum_, *alpha_;
  softmax_row_state* state_;
  std::int64_t* row_pos_;
};

/// Validates the query-side arguments shared by every GQA entry point.
inline void validate_gqa_call(const tensor3_view<const float>& q, std::span<const std::int64_t> q_pos,
                              const tensor3_view<float>& out, std::int64_t kv_heads, std::int64_t qk_dim,
                              std::int64_t v_dim, const attention_options& opt) {
  const std::int64_t tq = q.extent(0), h = q.extent(1);
  require(kv_heads > 0 && h > 0 && h % kv_heads == 0, "attend: heads=", h, " (q.extent(1)) must be a positive multiple of kv_heads=", kv_heads);
  require(q.extent(2) == qk_dim, "attend: q head dim q.extent(2)=", q.extent(2), " differs from the keys' qk_dim=", qk_dim);
  require(static_cast<std::int64_t>(q_pos.size()) == tq, "attend: q_positions has ", q_pos.size(),
          " entries but q has Tq=", tq, " tokens");
  require_extents(q, {tq, h, qk_dim}, "attend: q");
  require_extents(out, {tq, h, v_dim}, "attend: out");
  if (!opt.lse.empty()) require_extents(opt.lse, {tq, h}, "attend: lse");
  if (opt.window) require(*opt.window >= 1, "attend: window must be >= 1, got ", *opt.window);
  if (opt.scale) require(std::isfinite(*opt.scale), "attend: scale must be finite, got ", *opt.scale);
}

/// Merges `splits` partial states of `rows` rows, each row stored as (max, sum, acc[dv]) and the
/// splits `part_stride` floats apart, into the first; calls done(r, state, acc) for every row.
template <class Done>
void merge_partials(float* base, std::int64_t splits, std::int64_t part_stride, std::int64_t rows, std::int64_t dv,
                    Done&& done) {
  for (std::int64_t r = 0; r < rows; ++r) {
    float* a = base + r * (dv + 2);
    softmax_row_state sa{a[0], a[1]};
    for (std::int64_t ks = 1; ks < splits; ++ks) {
      const float* b = base + ks * part_stride + r * (dv + 2);
      softmax_merge(sa, a + 2, softmax_row_state{b[0], b[1]}, b + 2, dv);
    }
    done(r, sa, a + 2);
  }
}

template <storage_type S, class Exec>
void run_gqa(const tensor3_view<const float>& q, std::span<const std::int64_t> q_pos, const kv_rows<S>& kv,
             const tensor3_view<float>& out, const attention_options& opt, Exec& exec, attention_workspace* ws_in) {
  validate_gqa_call(q, q_pos, out, kv.kv_heads, kv.qk_dim, kv.v_dim, opt);
  attention_workspace local;
  attention_workspace& ws = ws_in ? *ws_in : local;

  gqa_problem<S> pb{q, q_pos, kv, out, opt.lse,
                    opt.scale.value_or(1.f / std::sqrt(static_cast<float>(kv.qk_dim))), opt.causal,
                    opt.window.value_or(0), true};
  const std::int64_t g = q.extent(1) / kv.kv_heads;
  // Streaming micro-kernels for tiles of fewer than 16 query rows. Without AVX-512 the portable
  // streaming loops are slow and Eigen's vectorised GEMM tiles are the fast path for every size.
  pb.streaming = opt.strategy == tile_strategy::streaming ||
                 (opt.strategy == tile_strategy::automatic && ATTNKIT_HAS_AVX512 && g * q.extent(0) < 16);
  if (q.extent(0) == 0) return;
  const int workers_wanted = concurrency_of(exec);
  const gqa_plan<S> pl = plan_gqa(pb, workers_wanted);
  const std::int64_t workers = std::min<std::int64_t>(workers_wanted, pl.items);
  const std::size_t floats = gqa_tile_runner<S>::floats_needed(pb, pl);
  const std::int64_t part_stride = pl.rows * (kv.v_dim + 2);
  float* partial = pl.splits > 1 ? ws.partial(static_cast<std::size_t>(pl.items * part_stride)) : nullptr;
  ws.reserve_workers(static_cast<std::size_t>(workers));
  for (std::int64_t w = 0; w < workers; ++w) ws.worker_at(static_cast<std::size_t>(w), floats, static_cast<std::size_t>(pl.rows));

  // Items in decreasing query-tile order: under a causal mask later tiles carry more keys.
  std::atomic<std::int64_t> next{0};
  const std::int64_t per_tile = kv.kv_heads * pl.splits;
  exec.parallel_for(workers, [&](std::int64_t w) {
    gqa_tile_runner<S> runner(pb, pl, ws.worker_at(static_cast<std::size_t>(w), floats, static_cast<std::size_t>(pl.rows)));
    for (std::int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < pl.items;) {
      const std::int64_t qt = pl.qtiles - 1 - i / per_tile, j = (i % per_tile) / pl.splits, ks = i % pl.splits;
      runner.run(qt, j, ks, partial ? partial + ((qt * kv.kv_heads + j) * pl.splits + ks) * part_stride : nullptr);
    }
  });
  if (pl.splits == 1) return;

  // Merge the key splits of every (query tile, KV head) with log-sum-exp rescaling.
  const std::int64_t dv = kv.v_dim;
  for (std::int64_t qt = 0; qt < pl.qtiles; ++qt) {
    const std::int64_t t0 = qt * pl.tq, tn = std::min(pl.tq, q.extent(0) - t0);
    for (std::int64_t j = 0; j < kv.kv_heads; ++j)
      merge_partials(partial + (qt * kv.kv_heads + j) * pl.splits * part_stride, pl.splits, part_stride, tn * g, dv,
                     [&](std::int64_t r, const softmax_row_state& st, const float* acc) {
                       const std::int64_t t = t0 + r / g, h = j * g + r % g;
                       const float l = softmax_finalize(st, acc, &out(t, h, 0), out.stride(2), dv);
                       if (!opt.lse.empty()) opt.lse(t, h) = l;
                     });
  }
}

}  // namespace detail

/// Attention of roped queries q [Tq, H, d_qk] at positions q_positions against every token of
/// a dense cache; writes out [Tq, H, d_v]. H must be a multiple of the cache's kv_heads; query
/// head h attends KV head h / (H / kv_heads). Thread count is the executor's.
template <storage_type S, class Exec = serial_executor>
void attend(tensor3_view<const float> q, std::span<const std::int64_t> q_positions, const dense_cache<S>& cache,
            tensor3_view<float> out, const attention_options& opt = {}, Exec&& exec = Exec{},
            attention_workspace* ws = nullptr) {
  detail::kv_rows<S> kv{cache.keys(0), cache.capacity() * cache.qk_dim(), cache.qk_dim(),
                        cache.values(0), cache.capacity() * cache.v_dim(), cache.v_dim(),
                        cache.positions().data(), cache.size(), cache.kv_heads(), cache.qk_dim(), cache.v_dim()};
  detail::run_gqa(q, q_positions, kv, out, opt, exec, ws);
}

/// The same kernel on K [Tk, H_kv, d_qk] and V [Tk, H_kv, d_v] the caller owns (any row and head
/// strides; the last dimension must be contiguous), with key positions k_positions.
template <storage_type S, class Exec = serial_executor>
void attend(tensor3_view<const float> q, std::span<const std::int64_t> q_positions, tensor3_view<const S> k,
            tensor3_view<const S> v, std::span<const std::int64_t> k_positions, tensor3_view<float> out,
            const attention_options& opt = {}, Exec&& exec = Exec{}, attention_workspace* ws = nullptr) {
  const std::int64_t tk = k.extent(0), hkv = k.extent(1);
  detail::require(static_cast<std::int64_t>(k_positions.size()) == tk, "attend: k_positions has ",
                  k_positions.size(), " entries but k has Tk=", tk, " tokens");
  detail::require_extents(v, {tk, hkv, v.extent(2)}, "attend: v");
  detail::require(k.stride(2) == 1 && v.stride(2) == 1, "attend: k and v need a contiguous last dimension, got strides ",
                  k.stride(2), " and ", v.stride(2));
  detail::kv_rows<S> kv{k.data_handle(), k.stride(1), k.stride(0), v.data_handle(), v.stride(1), v.stride(0),
                        k_positions.data(), tk, hkv, k.extent(2), v.extent(2)};
  detail::run_gqa(q, q_positions, kv, out, opt, exec, ws);
}

/// MHA and MQA are the same kernel: names for readers, not copies.
template <storage_type S, class Exec = serial_executor>
void attend_mha(tensor3_view<const float> q, std::span<const std::int64_t> q_positions, const dense_cache<S>& cache,
                tensor3_view<float> out, const attention_options& opt = {}, Exec&& exec = Exec{},
                attention_workspace* ws = nullptr) {
  detail::require(q.extent(1) == cache.kv_heads(), "attend_mha: heads=", q.extent(1), " must equal kv_heads=",
                  cache.kv_heads());
  attend(q, q_positions, cache, out, opt, std::forward<Exec>(exec), ws);
}
template <storage_type S, class Exec = serial_executor>
void attend_mqa(tensor3_view<const float> q, std::span<const std::int64_t> q_positions, const dense_cache<S>& cache,
                tensor3_view<float> out, const attention_options& opt = {}, Exec&& exec = Exec{},
                attention_workspace* ws = nullptr) {
  detail::require(cache.kv_heads() == 1, "attend_mqa: kv_heads must be 1, got ", cache.kv_heads());
  attend(q, q_positions, cache, out, opt, std::forward<Exec>(exec), ws);
}

}  // namespace attnkit
