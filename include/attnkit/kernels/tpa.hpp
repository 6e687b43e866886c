#pragma once
// TPA attention in the FlashTPA contraction order, over a factorized cache: K and V are never
// materialised. For query token t (factors A_Q [R_Q, H], B_Q [R_Q, d], roped) and cached token s:
//   D[r, u]   = B_Q[r] . B_K(s)[u]                          (R_Q x R_K dots, shared by all heads)
//   score[h]  = c * sum_u A_K(s)[u, h] * sum_r A_Q[r, h] D[r, u],   c = scale * q_scale * k_scale
//   out[h]    = v_scale * sum_s p[h, s] sum_v A_V(s)[v, h] B_V(s)[v]
// Per key block, three passes: D by the streaming score micro-kernel; one pass per key for the
// head combination (vectorised over heads, scores stored [key][head]) and the block's column max;
// one pass down the heads for the online softmax and the value weights
// W[h, (s, v)] = p[h, s] A_V(s)[v, h]; then the values as one GEMM
// O[H, d_v] += W[H, keys * R_V] B_V[keys * R_V, d_v]. The next block's factor rows are
// prefetched a line per inner-loop step. Work items are (query token, key split); splits are
// merged by log-sum-exp (decode).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>

#include "../cache/factorized_cache.hpp"
#include "gqa.hpp"
#include "tile_gemm.hpp"

namespace attnkit {

/// The explicit 1/R factors of TPA (T6 uses 1/R_Q, 1/R_K, 1/R_V); any values may be given.
struct tpa_scales {
  float q = 1.f, k = 1.f, v = 1.f;
};

namespace detail {

template <storage_type S>
struct tpa_problem {
  tensor3_view<const float> a_q, b_q;  // [Tq, R_Q, H], [Tq, R_Q, d]
  std::span<const std::int64_t> q_pos;
  const factorized_cache<S>* cache;
  tensor3_view<float> out;
  matrix_view<float> lse;
  float score_scale, v_scale;
  bool causal;
  std::int64_t window, splits, block, hp;  // hp: heads rounded up to 16
};

/// The factor rows of the next key block, prefetched one cache line per inner-loop step of the
/// kernels (see no_prefetch): the four factor arrays of a block of tokens are four contiguous
/// byte ranges, walked in the order the block reads them. Spread this way the DRAM reads overlap
/// all of a block's work; issued in one burst per block they stall the core and leave the memory
/// idle during the value GEMM (Llama R2, T = 16k, in one run: 2.9 ms -> 1.3 ms).
template <storage_type S>
class factor_prefetcher {
 public:
  explicit factor_prefetcher(const factorized_cache<S>& c) : c_(c) {}

  /// Starts on tokens [begin, end) (possibly empty), issuing what is left of the previous range.
  void start(std::int64_t begin, std::int64_t end) {
    finish();
    const std::int64_t n = std::max<std::int64_t>(end - begin, 0), h = c_.heads(), rk = c_.k_rank(), rv = c_.v_rank();
    const std::int64_t bk = rk * c_.qk_dim(), ak = rk * h, av = rv * h, bv = rv * c_.v_dim();
    set(0, c_.b_k() + begin * bk, n * bk);
    set(1, c_.a_k() + begin * ak, n * ak);
    set(2, c_.a_v() + begin * av, n * av);
    set(3, c_.b_v() + begin * bv, n * bv);
    range_ = 0;
    next_ = begin_[0], end_ = end_of_[0];
  }
  /// One line, or (once per range) the move to the next range.
  void step() {
    if (next_ < end_) {
      prefetch_line(next_);
      next_ += 64;
    } else if (range_ < 3) {
      ++range_;
      next_ = begin_[range_], end_ = end_of_[range_];
    }
  }
  /// Every line not yet issued.
  void finish() {
    while (range_ < 4) {
      for (; next_ < end_; next_ += 64) prefetch_line(next_);
      if (++range_ < 4) next_ = begin_[range_], end_ = end_of_[range_];
    }
  }

 private:
  void set(int i, const S* p, std::int64_t elems) {
    begin_[i] = reinterpret_cast<const char*>(p);
    end_of_[i] = begin_[i] + elems * static_cast<std::int64_t>(sizeof(S));
  }
  const factorized_cache<S>& c_;
  const char *begin_[4] = {}, *end_of_[4] = {};
  const char *next_ = nullptr, *end_ = nullptr;
  int range_ = 4;
};

template <storage_type S>
class tpa_runner {
 public:
  static std::size_t floats_needed(const tpa_problem<S>& p) {
    const std::int64_t rq = p.a_q.extent(1), d = p.cache->qk_dim(), dv = p.cache->v_dim(), nb = p.block;
    const std::int64_t rk = p.cache->k_rank(), rv = p.cache->v_rank(), hp = p.hp, h = p.cache->heads();
    return static_cast<std::size_t>(rq * hp + rq * d + rq * nb * rk + nb * hp + 4 * hp + nb * rv * hp + h * dv +
                                    nb * rv * dv);
  }
  tpa_runner(const tpa_problem<S>& p, attention_workspace::worker& w) : p_(p), pf_(*p.cache) {
    const std::int64_t rq = p.a_q.extent(1), d = p.cache->qk_dim(), dv = p.cache->v_dim(), nb = p.block;
    const std::int64_t rk = p.cache->k_rank(), rv = p.cache->v_rank(), hp = p.hp, h = p.cache->heads();
    float* f = w.f.data();
    aq_ = f, f += rq * hp;
    bq_ = f, f += rq * d;
    dots_ = f, f += rq * nb * rk;
    st_ = f, f += nb * hp;
    bmax_ = f, f += hp;
    max_ = f, f += hp;
    sum_ = f, f += hp;
    alpha_ = f, f += hp;
    wt_ = f, f += nb * rv * hp;
    o_ = f, f += h * dv;
    bv_ = f;
  }

  void run(std::int64_t t, std::int64_t ks, float* partial) {
    const auto& c = *p_.cache;
    const std::int64_t rq = p_.a_q.extent(1), h = c.heads(), d = c.qk_dim(), dv = c.v_dim(), hp = p_.hp;
    const std::int64_t rk = c.k_rank(), rv = c.v_rank();
    const std::int64_t qpos = p_.q_pos[static_cast<std::size_t>(t)];
    for (std::int64_t r = 0; r < rq; ++r) {
      for (std::int64_t i = 0; i < hp; ++i) aq_[r * hp + i] = i < h ? p_.a_q(t, r, i) * p_.score_scale : 0.f;
      for (std::int64_t e = 0; e < d; ++e) bq_[r * d + e] = p_.b_q(t, r, e);
      if (paired_columns<S>) permute_pairs(bq_ + r * d, d);
    }
    std::fill(max_, max_ + hp, neg_inf);
    std::fill(sum_, sum_ + hp, 0.f);
    std::fill(o_, o_ + h * dv, 0.f);
    const std::int64_t tk = c.size(), k_begin = tk * ks / p_.splits, k_end = tk * (ks + 1) / p_.splits;
    const std::int64_t* kpos = c.positions().data();
    for (std::int64_t b0 = k_begin; b0 < k_end; b0 += p_.block) {
      const std::int64_t nb = std::min(p_.block, k_end - b0);
      // The next block streams in while this one computes: each of its lines is issued about
      // one block's time before it is read. Two blocks ahead measured slower (10-25% at
      // T = 16k): the larger footprint crowds L2, which the two threads may share.
      pf_.start(b0 + nb, std::min(b0 + nb + p_.block, k_end));
      const auto [lo, hi] = std::minmax_element(kpos + b0, kpos + b0 + nb);
      if (p_.causal && *lo > qpos) continue;
      if (p_.window > 0 && *hi <= qpos - p_.window) continue;
      // D[r][(s, u)] = B_Q[r] . B_K(s)[u]
      scores(bq_, d, rq, c.b_k() + b0 * rk * d, d, nb * rk, d, dots_, dots_stride(), false, pf_);
      score_rows(c.a_k() + b0 * rk * h, nb, kpos + b0, qpos);
      softmax_value_weights(c.a_v() + b0 * rv * h, nb);
      for (std::int64_t i = 0; i < h; ++i)
        if (alpha_[i] != 1.f) scale_row(o_ + i * dv, dv, alpha_[i]);
      // O += W B_V with W^T[(s, v)][h] = p[s][h] A_V(s)[v, h].
      const S* bv = c.b_v() + b0 * rv * dv;
      const float* bvf = reinterpret_cast<const float*>(bv);
      if constexpr (!std::same_as<S, float>) {
        for (std::int64_t k = 0; k < nb * rv; ++k) to_float_row(bv + k * dv, bv_ + k * dv, dv);
        bvf = bv_;
      }
      gemm_bcast<true>(h, dv, nb * rv, wt_, 1, hp, bvf, dv, o_, dv, pf_);
    }
    scale_row(o_, h * dv, p_.v_scale);
    for (std::int64_t i = 0; i < h; ++i) {
      if (p_.splits == 1) {
        const float l = softmax_finalize({max_[i], sum_[i]}, o_ + i * dv, &p_.out(t, i, 0), p_.out.stride(2), dv);
        if (!p_.lse.empty()) p_.lse(t, i) = l;
      } else {
        float* dst = partial + i * (dv + 2);
        dst[0] = max_[i];
        dst[1] = sum_[i];
        std::copy(o_ + i * dv, o_ + (i + 1) * dv, dst + 2);
      }
    }
  }

 private:
  std::int64_t dots_stride() const { return p_.block * p_.cache->k_rank(); }

  bool masked(std::int64_t kp, std::int64_t qpos) const {
    return (p_.causal && kp > qpos) || (p_.window > 0 && qpos - kp >= p_.window);
  }

  /// st_[s][h] = score of the block's key s for head h (-inf where masked), vectorised over heads,
  /// and bmax_[h] = the block's column max, in one pass over the D products:
  ///   score[h] = sum_u A_K(s)[u, h] * sum_r aq[r, h] D[r][(s, u)].
  /// G keys at a time, so the sums over r are G independent FMA chains (one key's chain alone
  /// waits on the FMA latency at every step: this pass took 22% of T6-small's time).
  static constexpr int G = 8;
  void score_rows(const S* ak, std::int64_t nb, const std::int64_t* kpos, std::int64_t qpos) {
    const std::int64_t hp = p_.hp, h = p_.cache->heads(), rk = p_.cache->k_rank(), rq = p_.a_q.extent(1);
    const std::int64_t ds = dots_stride();
    std::fill(bmax_, bmax_ + hp, neg_inf);
    for (std::int64_t s0 = 0; s0 < nb; s0 += G) {
      std::int64_t sk[G];  // keys past the block repeat the last one (computed, never stored)
      bool live[G];
      for (int j = 0; j < G; ++j) {
        pf_.step();
        sk[j] = std::min(s0 + j, nb - 1);
        live[j] = s0 + j < nb && !masked(kpos[s0 + j], qpos);
        if (s0 + j < nb && !live[j]) std::fill(st_ + (s0 + j) * hp, st_ + (s0 + j + 1) * hp, neg_inf);
      }
#if ATTNKIT_HAS_AVX512
      for (std::int64_t i0 = 0; i0 < hp; i0 += 16) {
        const __mmask16 m = lane_mask(h - i0);
        __m512 acc[G];
        ATTNKIT_UNROLL
        for (int j = 0; j < G; ++j) acc[j] = _mm512_setzero_ps();
        for (std::int64_t u = 0; u < rk; ++u) {
          __m512 t[G];
          ATTNKIT_UNROLL
          for (int j = 0; j < G; ++j) t[j] = _mm512_setzero_ps();
          for (std::int64_t r = 0; r < rq; ++r) {
            const __m512 a = _mm512_loadu_ps(aq_ + r * hp + i0);
            const float* dr = dots_ + r * ds + u;
            ATTNKIT_UNROLL
            for (int j = 0; j < G; ++j) t[j] = _mm512_fmadd_ps(a, _mm512_set1_ps(dr[sk[j] * rk]), t[j]);
          }
          ATTNKIT_UNROLL
          for (int j = 0; j < G; ++j) acc[j] = _mm512_fmadd_ps(load16(ak + (sk[j] * rk + u) * h + i0, m), t[j], acc[j]);
        }
        __m512 mx = _mm512_loadu_ps(bmax_ + i0);
        ATTNKIT_UNROLL
        for (int j = 0; j < G; ++j)
          if (live[j]) {
            _mm512_storeu_ps(st_ + (s0 + j) * hp + i0, acc[j]);
            mx = _mm512_max_ps(mx, acc[j]);
          }
        _mm512_storeu_ps(bmax_ + i0, mx);
      }
#else
      for (int j = 0; j < G; ++j) {
        if (!live[j]) continue;
        float* row = st_ + (s0 + j) * hp;
        for (std::int64_t i = 0; i < h; ++i) {
          float acc = 0.f;
          for (std::int64_t u = 0; u < rk; ++u) {
            float t = 0.f;
            for (std::int64_t r = 0; r < rq; ++r) t += aq_[r * hp + i] * dots_[r * ds + sk[j] * rk + u];
            acc += to_float(ak[(sk[j] * rk + u) * h + i]) * t;
          }
          row[i] = acc;
          bmax_[i] = std::max(bmax_[i], acc);
        }
      }
#endif
    }
  }

  /// The block's online-softmax step down the heads (max_, sum_, alpha_ as softmax_columns) with
  /// the value weights wt_[(s, v)][h] = p[s][h] A_V(s)[v, h] written as the probabilities come.
  void softmax_value_weights(const S* av, std::int64_t nb) {
    const std::int64_t hp = p_.hp, h = p_.cache->heads(), rv = p_.cache->v_rank();
#if ATTNKIT_HAS_AVX512
    softmax_columns(st_, hp, nb, h, bmax_, max_, sum_, alpha_, [&](std::int64_t s, std::int64_t i0, __m512 p, __mmask16 m) {
      for (std::int64_t v = 0; v < rv; ++v)
        _mm512_mask_storeu_ps(wt_ + (s * rv + v) * hp + i0, m, _mm512_mul_ps(p, load16(av + (s * rv + v) * h + i0, m)));
    });
#else
    softmax_columns(st_, hp, nb, h, bmax_, max_, sum_, alpha_, [&](std::int64_t s, std::int64_t i, float p) {
      for (std::int64_t v = 0; v < rv; ++v) wt_[(s * rv + v) * hp + i] = p * to_float(av[(s * rv + v) * h + i]);
    });
#endif
  }

  const tpa_problem<S>& p_;
  factor_prefetcher<S> pf_;
  float *aq_, *bq_, *dots_, *st_, *bmax_, *max_, *sum_, *alpha_, *wt_, *o_, *bv_;
};

}  // namespace detail

/// TPA attention of query factors a_q [Tq, R_Q, H], b_q [Tq, R_Q, d] (roped) at q_positions
/// against every token of a factorized cache; writes out [Tq, H, d_v]. opt.scale defaults to
/// 1/sqrt(d); the 1/R factors are `scales`. K and V are never materialised.
template <storage_type S, class Exec = serial_executor>
void attend_factorized(tensor3_view<const float> a_q, tensor3_view<const float> b_q,
                       std::span<const std::int64_t> q_positions, const factorized_cache<S>& cache,
                       tensor3_view<float> out, const tpa_scales& scales, const attention_options& opt = {},
                       Exec&& exec = Exec{}, attention_workspace* ws = nullptr) {
  using detail::require;
  const std::int64_t tq = a_q.extent(0), rq = a_q.extent(1), h = cache.heads(), d = cache.qk_dim(), dv = cache.v_dim();
  require(rq >= 1, "attend_factorized: a_q.extent(1) (R_Q) must be >= 1, got ", rq);
  detail::require_extents(a_q, {tq, rq, h}, "attend_factorized: a_q");
  detail::require_extents(b_q, {tq, rq, d}, "attend_factorized: b_q");
  detail::require_extents(out, {tq, h, dv}, "attend_factorized: out");
  require(static_cast<std::int64_t>(q_positions.size()) == tq, "attend_factorized: q_positions has ", q_positions.size(),
          " entries but a_q has Tq=", tq, " tokens");
  if (!opt.lse.empty()) detail::require_extents(opt.lse, {tq, h}, "attend_factorized: lse");
  if (opt.window) require(*opt.window >= 1, "attend_factorized: window must be >= 1, got ", *opt.window);
  require(std::isfinite(scales.q) && std::isfinite(scales.k) && std::isfinite(scales.v),
          "attend_factorized: scales must be finite, got q=", scales.q, ", k=", scales.k, ", v=", scales.v);
  if (tq == 0) return;
  attention_workspace local;
  attention_workspace& wsr = ws ? *ws : local;
  const int want = concurrency_of(exec);
  detail::tpa_problem<S> p{a_q, b_q, q_positions, &cache, out, opt.lse,
                           opt.scale.value_or(1.f / std::sqrt(static_cast<float>(d))) * scales.q * scales.k, scales.v,
                           opt.causal, opt.window.value_or(0), 1, 64, (h + 15) / 16 * 16};
  if (tq < 2 * want) p.splits = std::clamp<std::int64_t>((4 * want + tq - 1) / tq, 1, std::max<std::int64_t>(1, cache.size() / 256));
  const std::int64_t items = tq * p.splits, workers = std::min<std::int64_t>(want, items);
  const std::size_t floats = detail::tpa_runner<S>::floats_needed(p);
  const std::int64_t part_stride = h * (dv + 2);
  float* partial = p.splits > 1 ? wsr.partial(static_cast<std::size_t>(items * part_stride)) : nullptr;
  wsr.reserve_workers(static_cast<std::size_t>(workers));
  for (std::int64_t w = 0; w < workers; ++w) wsr.worker_at(static_cast<std::size_t>(w), floats, 0);
  std::atomic<std::int64_t> next{0};
  exec.parallel_for(workers, [&](std::int64_t w) {
    detail::tpa_runner<S> runner(p, wsr.worker_at(static_cast<std::size_t>(w), floats, 0));
    for (std::int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const std::int64_t t = tq - 1 - i / p.splits, ks = i % p.splits;  // later tokens (more keys) first
      runner.run(t, ks, partial ? partial + (t * p.splits + ks) * part_stride : nullptr);
    }
  });
  if (p.splits == 1) return;
  for (std::int64_t t = 0; t < tq; ++t)
    detail::merge_partials(partial + t * p.splits * part_stride, p.splits, part_stride, h, dv,
                           [&](std::int64_t i, const softmax_row_state& st, const float* acc) {
                             const float l = detail::softmax_finalize(st, acc, &out(t, i, 0), out.stride(2), dv);
                             if (!opt.lse.empty()) opt.lse(t, i) = l;
                           });
}

}  // namespace attnkit
