#pragma once
// TPA attention in the FlashTPA contraction order, over a factorized cache: K and V are never
// materialised. For query token t (factors A_Q [R_Q, H], B_Q [R_Q, d], roped) and cached token s:
//   D[r, u]   = B_Q[r] . B_K(s)[u]                          (R_Q x R_K dots, shared by all heads)
//   score[h]  = c * sum_u A_K(s)[u, h] * sum_r A_Q[r, h] D[r, u],   c = scale * q_scale * k_scale
//   out[h]    = v_scale * sum_s p[h, s] sum_v A_V(s)[v, h] B_V(s)[v]
// Per key block: D by the streaming score micro-kernel, the head combination vectorised over
// heads, an online softmax down the heads (the block's scores are stored [key][head]), and the
// values as one GEMM O[H, d_v] += W[H, keys * R_V] B_V[keys * R_V, d_v] with
// W[h, (s, v)] = p[h, s] A_V(s)[v, h]. Work items are (query token, key split); splits are merged
// by log-sum-exp (decode).
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
  void step() {
    if (next_ < end_) {
      __builtin_prefetch(next_, 0, 2);  // into L2 (T1)
      next_ += 64;
    } else if (range_ < 3) {
      ++range_;
      next_ = begin_[range_], end_ = end_of_[range_];
    }
  }
  void finish() {
    for (; range_ < 4; ++range_, next_ = range_ < 4 ? begin_[range_] : nullptr, end_ = range_ < 4 ? end_of_[range_] : nullptr)
      for (; next_ < end_; next_ += 64) __builtin_prefetch(next_, 0, 2);
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
    return static_cast<std::size_t>(rq * hp + rq * d + rq * nb * rk + nb * rk * hp + nb * hp + 3 * hp + nb * rv * hp +
                                    h * dv + nb * rv * dv);
  }
  tpa_runner(const tpa_problem<S>& p, attention_workspace::worker& w) : p_(p), pf_(*p.cache) {
    const std::int64_t rq = p.a_q.extent(1), d = p.cache->qk_dim(), dv = p.cache->v_dim(), nb = p.block;
    const std::int64_t rk = p.cache->k_rank(), rv = p.cache->v_rank(), hp = p.hp, h = p.cache->heads();
    float* f = w.f.data();
    aq_ = f, f += rq * hp;
    bq_ = f, f += rq * d;
    dots_ = f, f += rq * nb * rk;
    comb_ = f, f += nb * rk * hp;
    st_ = f, f += nb * hp;
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
      // T[(s, u)][h] = sum_r aq[r, h] D[r][(s, u)]: one small GEMM for the block (independent
      // accumulators; a per-key loop over r would be one long FMA dependency chain).
      gemm_bcast<false>(nb * rk, hp, rq, dots_, 1, dots_stride(), aq_, hp, comb_, hp);
      for (std::int64_t s = 0; s < nb; ++s) {
        pf_.step();
        const std::int64_t kp = kpos[b0 + s];
        float* row = st_ + s * hp;
        if ((p_.causal && kp > qpos) || (p_.window > 0 && qpos - kp >= p_.window)) {
          std::fill(row, row + hp, neg_inf);
          continue;
        }
        combine_heads(c.a_k() + (b0 + s) * rk * h, comb_ + s * rk * hp, rk, h, row);
      }
      softmax_absorb_columns(st_, hp, nb, h, max_, sum_, alpha_);
      for (std::int64_t i = 0; i < h; ++i)
        if (alpha_[i] != 1.f) scale_row(o_ + i * dv, dv, alpha_[i]);
      // W^T[(s, v)][h] = p[s][h] * A_V(s)[v, h]; O += W B_V.
      const S* av = c.a_v() + b0 * rv * h;
      for (std::int64_t s = 0; s < nb; ++s)
        for (std::int64_t v = 0; v < rv; ++v) {
          const S* a = av + (s * rv + v) * h;
          float* w = wt_ + (s * rv + v) * hp;
#if ATTNKIT_HAS_AVX512
          for (std::int64_t i0 = 0; i0 < hp; i0 += 16)
            _mm512_storeu_ps(w + i0, _mm512_mul_ps(_mm512_loadu_ps(st_ + s * hp + i0), load16(a + i0, lane_mask(h - i0))));
#else
          for (std::int64_t i = 0; i < h; ++i) w[i] = st_[s * hp + i] * to_float(a[i]);
#endif
        }
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

  /// row[h] = sum_u A_K[u, h] * t[u][h] (t: the block's T rows of this key), vectorised over heads.
  void combine_heads(const S* ak, const float* t, std::int64_t rk, std::int64_t h, float* row) const {
#if ATTNKIT_HAS_AVX512
    for (std::int64_t i0 = 0; i0 < p_.hp; i0 += 16) {
      const __mmask16 m = lane_mask(h - i0);
      __m512 acc = _mm512_setzero_ps();
      for (std::int64_t u = 0; u < rk; ++u)
        acc = _mm512_fmadd_ps(load16(ak + u * h + i0, m), _mm512_loadu_ps(t + u * p_.hp + i0), acc);
      _mm512_storeu_ps(row + i0, acc);
    }
#else
    for (std::int64_t i = 0; i < p_.hp; ++i) {
      float acc = 0.f;
      for (std::int64_t u = 0; u < rk && i < h; ++u) acc += to_float(ak[u * h + i]) * t[u * p_.hp + i];
      row[i] = acc;
    }
#endif
  }

  const tpa_problem<S>& p_;
  factor_prefetcher<S> pf_;
  float *aq_, *bq_, *dots_, *comb_, *st_, *max_, *sum_, *alpha_, *wt_, *o_, *bv_;
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
