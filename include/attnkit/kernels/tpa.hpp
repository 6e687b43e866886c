#pragma once
// TPA attention in the FlashTPA contraction order, over a factor_view: K and V are never
// materialised. For query token t (factors A_Q [R_Q, H], B_Q [R_Q, d], roped) and cached token s:
//   D[r, u]   = B_Q[r] . B_K(s)[u]                          (R_Q x R_K dots, shared by all heads)
//   score[h]  = c * sum_u A_K(s)[u, h] * sum_r A_Q[r, h] D[r, u],   c = scale * k_scale
//   out[h]    = v_scale * sum_s p[h, s] sum_v A_V(s)[v, h] B_V(s)[v]
// This file holds the variant's block products; the driver (kernels/driver.hpp) plans, masks,
// runs the softmax (column form: the block's scores are stored [key][head]) and merges. A work
// item is one query token with all H heads as its rows (one head group), and a key split.
// Per key block, three passes: D by the streaming score micro-kernel; one pass per key for the
// head combination, vectorised over heads, with the block's column max; the driver's softmax
// down the heads, whose probabilities go straight into the value weights
// W[h, (s, v)] = p[h, s] A_V(s)[v, h] (value_weights); then the values as one GEMM
// O[H, d_v] += W[H, keys * R_V] B_V[keys * R_V, d_v]. The next block's factor rows are
// prefetched a line per inner-loop step. One path on every target (simd/targets.hpp); with
// product_math::bf16 the value GEMM runs on bf16 pairs, on AMX tiles or vdpbf16ps
// (tpa_products::engine_of), and on AMX the D dots too (dots_on_tiles).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>

#include "../cache/kv_cache.hpp"
#include "../cache/kv_view.hpp"
#include "../core/options.hpp"
#include "../core/workspace.hpp"
#include "../simd/targets.hpp"
#include "driver.hpp"
#include "policy.hpp"

namespace attnkit {

template <class T>
struct is_factor_view : std::false_type {};
template <storage_type S>
struct is_factor_view<factor_view<S>> : std::true_type {};

/// What attend_factorized accepts: a factor_view, or a cache whose view() is one.
template <class X>
concept factor_source = is_factor_view<X>::value ||
    (kv_cache<X>&& requires(const X& x) { requires is_factor_view<decltype(x.view())>::value; });

namespace detail {

/// The factor rows of tokens [begin, begin + n), prefetched one cache line per inner-loop step
/// of the kernels (range_prefetcher): the four factor arrays of a block of tokens are four
/// contiguous byte ranges, walked in the order the block reads them. Spread this way the DRAM
/// reads overlap all of a block's work; issued in one burst per block they stall the core and
/// leave the memory idle during the value GEMM (docs/benchmarks.md, TPA).
template <storage_type S>
struct factor_ranges {
  const factor_view<S>* c = nullptr;
  std::int64_t begin = 0, n = 0;
  int next_array = 0;
  bool next(const char*& b, const char*& e) {
    if (n <= 0 || next_array == 4) return false;  // (no row looked up past the view's last page)
    const int a = next_array++;
    const S* p = a == 0   ? c->b_k_row(begin)
                 : a == 1 ? c->a_k_row(begin)
                 : a == 2 ? c->a_v_row(begin)
                          : c->b_v_row(begin);
    const std::int64_t per_token[4] = {c->k_rank * c->head_dim, c->k_rank * c->heads,
                                       c->v_rank * c->heads, c->v_rank * c->v_head_dim};
    b = reinterpret_cast<const char*>(p), e = reinterpret_cast<const char*>(p + n * per_token[a]);
    return true;
  }
};

template <storage_type S>
struct tpa_problem {
  tensor3_view<const float> a_q, b_q;  // [Tq, R_Q, H], [Tq, R_Q, d]
  factor_view<S> kv;
  float score_scale = 1.f;     // softmax scale x k_scale
  std::int64_t hp = 0;         // heads rounded up to 16
  bool bf16_products = false;  // product_math::bf16 asked for
  bool split_products = true;  // f32 products may run as bf16 parts (on_amx); false: FMAs
};

template <storage_type S>
class tpa_products {
 public:
  using problem = tpa_problem<S>;
  static constexpr std::int64_t block = 64;
  static attention_shape shape(const problem& p) {
    const std::int64_t h = p.kv.heads;
    return {p.a_q.extent(0), 1, h, p.kv.size(), p.kv.v_head_dim, h, block};
  }
  /// What runs the value GEMM on a bf16 cache: the value weights rounded to bf16 (bf16
  /// products) and B_V's rows as stored, both as bf16 pairs along the depth (s, v), on AMX tiles
  /// (d_v whole 16-column tiles) or vdpbf16ps; with f32 products on AMX, over at least
  /// split_min_keys tokens and for heads in whole 16-row tiles, the weights as three exact bf16
  /// parts (split_parts, as gqa_products); else (none) the f32 GEMM.
  enum class pair_engine { none, dot, amx };
  static constexpr std::int64_t split_min_keys = 32;
  static pair_engine engine_of(const problem& p) {
    if (!std::same_as<S, bf16>) return pair_engine::none;
    // Three parts of a partial 16-row tile of heads cost three whole tiles: f32 products take the
    // value GEMM to AMX where the heads fill whole tiles (T6-small's 34 were slower there).
    if (on_amx(p) && p.kv.v_head_dim % 16 == 0 && (p.bf16_products || p.kv.heads % 16 == 0))
      return pair_engine::amx;
    if (!p.bf16_products) return pair_engine::none;
    if (detail::bf16_dot_available()) return pair_engine::dot;
    return pair_engine::none;
  }
  /// On AMX with d whole 32-column tiles: D on tiles too, D^T = B_K B_Q^T with B_Q as bf16 pairs
  /// [d / 2][R_Q rounded up to 16] (rounded, or per part) and B_K's rows as stored.
  static bool dots_on_tiles(const problem& p) {
    return std::same_as<S, bf16> && on_amx(p) && p.kv.head_dim % 32 == 0;
  }
  /// bf16 parts per float operand of the tile products: 3 for f32 products on AMX, else 1.
  static int split_parts(const problem& p) { return !p.bf16_products && on_amx(p) ? 3 : 1; }
  /// The tile products run on AMX: bf16 products, or f32 ones over at least split_min_keys
  /// tokens (fewer: packing three parts costs more than the FMAs they save).
  static bool on_amx(const problem& p) {
    return detail::bf16_amx_available() &&
           (p.bf16_products || (p.split_products && p.kv.size() >= split_min_keys));
  }
  static std::size_t scratch_floats(const problem& p, const attention_plan& pl) {
    const std::int64_t rq = p.a_q.extent(1), d = p.kv.head_dim, dv = p.kv.v_head_dim, nb = pl.block;
    const std::int64_t rk = p.kv.k_rank, rv = p.kv.v_rank, hp = p.hp;
    // The pairs' depth padded to whole 32s (AMX tiles).
    const std::int64_t depth = (nb * rv + 31) / 32 * 32;
    const std::int64_t parts = split_parts(p);
    const std::int64_t pairs = engine_of(p) == pair_engine::none
                                   ? 0
                                   : 2 * nb * rv * pointer_floats + depth / 2 * (parts * hp + dv);
    const std::int64_t dots =
        dots_on_tiles(p) ? nb * rk * round16(rq) + parts * d / 2 * round16(rq) : rq * nb * rk;
    return static_cast<std::size_t>(rq * hp + rq * d + dots + nb * hp + hp + nb * rv * hp +
                                    nb * rv * dv + pairs);
  }
  tpa_products(const problem& p, const attention_plan& pl, float* f) : p_(p), pl_(pl) {
    const std::int64_t rq = p.a_q.extent(1), d = p.kv.head_dim, nb = pl.block, rk = p.kv.k_rank,
                       rv = p.kv.v_rank;
    const std::int64_t hp = p.hp, dv = p.kv.v_head_dim;
    if (pairs_ != pair_engine::none) {  // first: the worker's scratch is aligned for pointers
      w_rows_ = reinterpret_cast<const float**>(f);  // [nb R_V]
      f += nb * rv * pointer_floats;
      bv_rows_ = reinterpret_cast<const S**>(f);  // [nb R_V]
      f += nb * rv * pointer_floats;
    }
    aq_ = f, f += rq * hp;  // [R_Q][hp], scaled
    bq_ = f, f += rq * d;   // [R_Q][d]
    dots_ = f;              // D [R_Q][(s, u)], or on tiles D^T [(s, u)][round16(R_Q)]
    f += dots_tiles_ ? nb * rk * round16(rq) : rq * nb * rk;
    if (dots_tiles_) {
      bq_pairs_ = reinterpret_cast<std::uint32_t*>(f);  // B_Q^T's pairs [d / 2][round16(R_Q)]
      f += parts_ * d / 2 * round16(rq);                // per part
    }
    st_ = f, f += nb * hp;         // scores [s][hp]
    bmax_ = f, f += hp;            // the block's max per head
    wt_ = f, f += nb * rv * hp;    // value weights [(s, v)][hp]
    bv_ = f, f += nb * rv * dv;    // a block of B_V widened to float [(s, v)][d_v]
    if (pairs_ != pair_engine::none) {
      const std::int64_t depth_pairs = (nb * rv + 31) / 32 * 16;
      // dot: [depth pairs][hp]; amx: the A rows [hp][depth pairs] per part
      w_pairs_ = reinterpret_cast<std::uint32_t*>(f);
      bv_pairs_ = w_pairs_ + parts_ * depth_pairs * hp;  // [depth pairs][d_v]
    }
  }

  std::span<const std::int64_t> positions() const { return p_.kv.positions; }
  std::int64_t run_end(std::int64_t t) const { return p_.kv.run_end(t); }

  void load_queries(std::int64_t t, std::int64_t /*tn*/, std::int64_t /*j*/) {
    const std::int64_t rq = p_.a_q.extent(1), h = p_.kv.heads, d = p_.kv.head_dim, hp = p_.hp;
    for (std::int64_t r = 0; r < rq; ++r) {
      for (std::int64_t i = 0; i < hp; ++i)
        aq_[r * hp + i] = i < h ? p_.a_q(t, r, i) * p_.score_scale : 0.f;
      for (std::int64_t e = 0; e < d; ++e) bq_[r * d + e] = p_.b_q(t, r, e);
      if (!dots_tiles_) permute_pairs(bq_ + r * d, d, pair_group_);
    }
    if (dots_tiles_)  // rows past R_Q are zeros
      for (std::int64_t r0 = 0; r0 < rq; r0 += 16) {
        const float* rows[16];
        const std::int64_t n = std::min<std::int64_t>(16, rq - r0);
        for (std::int64_t i = 0; i < n; ++i) rows[i] = bq_ + (r0 + i) * d;
        for (int part = 0; part < parts_; ++part)
          pack_query_pairs(rows, n, d / 2, 1.f, 16, bq_pairs_ + part * (d / 2 * round16(rq)) + r0,
                           round16(rq), part);
      }
  }

  score_tile scores(std::int64_t /*j*/, std::int64_t b0, std::int64_t nb, std::int64_t k_end) {
    // The next block streams in while this one computes: each of its lines is issued about one
    // block's time before it is read; two blocks ahead crowd L2 (docs/benchmarks.md, TPA).
    // (Within the next block's run: the factor rows beyond it are on another page.)
    const std::int64_t next = b0 + nb;
    const std::int64_t end =
        next < k_end ? std::min({next + pl_.block, k_end, run_end(next)}) : next;
    pf_.start(ranges_, factor_ranges<S>{&p_.kv, next, end - next});
    const std::int64_t rq = p_.a_q.extent(1), d = p_.kv.head_dim, rk = p_.kv.k_rank;
    // D[r][(s, u)] = B_Q[r] . B_K(s)[u]
    if (dots_tiles_)
      tile_dots(p_.kv.b_k_row(b0), nb * rk);
    else
      detail::scores(bq_, d, rq, p_.kv.b_k_row(b0), d, nb * rk, d, dots_, dots_stride(), false,
                     pf_);
    score_rows(p_.kv.a_k_row(b0), nb);
    av_ = p_.kv.a_v_row(b0);
    return {st_, 1, p_.hp, bmax_};
  }

  /// The softmax's probabilities become the value weights wt_[(s, v)][h] = p[s][h] A_V(s)[v, h].
  tpa_weights<S> value_weights() const { return {av_, p_.kv.heads, p_.kv.v_rank, wt_, p_.hp}; }

  void accumulate(std::int64_t /*j*/, std::int64_t b0, std::int64_t nb, const score_tile& /*p*/,
                  float* acc) {
    const std::int64_t h = p_.kv.heads, dv = p_.kv.v_head_dim, rv = p_.kv.v_rank;
    // O += W B_V with W^T[(s, v)][h] = p[s][h] A_V(s)[v, h].
    const S* bv = p_.kv.b_v_row(b0);
    if constexpr (std::same_as<S, bf16>)
      if (pairs_ != pair_engine::none) return pair_accumulate(bv, nb, acc);
    const float* bvf = reinterpret_cast<const float*>(bv);
    if constexpr (!std::same_as<S, float>) {
      for (std::int64_t k = 0; k < nb * rv; ++k) to_float_row(bv + k * dv, bv_ + k * dv, dv);
      bvf = bv_;
    }
    gemm_bcast<true, 1>(h, dv, nb * rv, wt_, 1, p_.hp, bvf, dv, acc, dv, pf_);
  }

  /// sum_v A_V(t)[v, head] B_V(t)[v] (v_scale is applied in finish).
  const float* value_row(std::int64_t /*j*/, std::int64_t head, std::int64_t t, float* buf) const {
    const std::int64_t dv = p_.kv.v_head_dim, rv = p_.kv.v_rank, h = p_.kv.heads;
    std::fill(buf, buf + dv, 0.f);
    for (std::int64_t v = 0; v < rv; ++v) {
      const float a = static_cast<float>(p_.kv.a_v_row(t)[v * h + head]);
      const auto* b = p_.kv.b_v_row(t) + v * dv;
      for (std::int64_t c = 0; c < dv; ++c) buf[c] += a * static_cast<float>(b[c]);
    }
    return buf;
  }

  void finish(float* acc, std::int64_t rows) {
    scale_row(acc, rows * p_.kv.v_head_dim, p_.kv.v_scale);
  }

 private:
  /// dots_tiles_: D^T [keys][round16(R_Q)] = B_K B_Q^T for the block's `keys` B_K rows.
  void tile_dots(const S* bk, std::int64_t keys) {
    if constexpr (std::same_as<S, bf16>) {
      const std::int64_t qc = round16(p_.a_q.extent(1));
      amx_gemm<false>(keys, qc, p_.kv.head_dim, bk, p_.kv.head_dim, bq_pairs_, qc, dots_, qc,
                      {parts_, 0, p_.kv.head_dim / 2 * qc});
    }
  }
  /// O += W B_V on bf16 pairs (W rounded; B_V's rows as stored), natural column order.
  void pair_accumulate(const S* bv, std::int64_t nb, float* acc) {
    const std::int64_t h = p_.kv.heads, dv = p_.kv.v_head_dim, depth = nb * p_.kv.v_rank,
                       hp = p_.hp;
    for (std::int64_t k = 0; k < depth; ++k) bv_rows_[k] = bv + k * dv;
    pack_row_pairs(bv_rows_, depth, dv, bv_pairs_, dv);
    if (pairs_ == pair_engine::amx) {
      // A = W's rows [hp][padded depth] as pairs, from its column form; B's pairs past the depth
      // are zeros (0 x whatever lies there could be a NaN).
      const std::int64_t padded = (depth + 31) / 32 * 32, stored = (depth + 1) / 2;
      pack_pairs_transposed(wt_, hp, depth, hp, padded / 2, w_pairs_, padded / 2, parts_,
                            hp * padded / 2);
      std::fill(bv_pairs_ + stored * dv, bv_pairs_ + padded / 2 * dv, 0u);
      return amx_gemm<true>(h, dv, padded, reinterpret_cast<const bf16*>(w_pairs_), padded,
                            bv_pairs_, dv, acc, dv, {parts_, hp * padded, 0});
    }
    for (std::int64_t k = 0; k < depth; ++k) w_rows_[k] = wt_ + k * hp;
    pack_row_pairs(w_rows_, depth, h, w_pairs_, hp);  // rows past h are not read
    gemm_pairs<true>(h, dv, (depth + 1) / 2, reinterpret_cast<const bf16*>(w_pairs_), 2, 2 * hp,
                     bv_pairs_, dv, acc, dv);
  }
  std::int64_t dots_stride() const { return pl_.block * p_.kv.k_rank; }

  /// st_[s][h] = score of the block's key s for head h and bmax_[h] = the block's max
  /// (simd/kernels.inl, tpa_score_rows).
  void score_rows(const S* ak, std::int64_t nb) {
    const std::int64_t rq = p_.a_q.extent(1);
    tpa_score_rows(
        tpa_scores<S>{aq_, dots_, dots_tiles_ ? 1 : dots_stride(), dots_tiles_ ? round16(rq) : 1,
                      ak, nb, p_.kv.heads, p_.hp, p_.kv.k_rank, rq, st_, bmax_},
        pf_);
  }

  const problem& p_;
  const attention_plan& pl_;
  range_prefetcher pf_;
  factor_ranges<S> ranges_;  // pf_'s ranges
  static constexpr std::int64_t pointer_floats = sizeof(const S*) / sizeof(float);
  const pair_engine pairs_ = engine_of(p_);
  const bool dots_tiles_ = dots_on_tiles(p_);
  const int parts_ = split_parts(p_);
  float *aq_, *bq_, *dots_, *st_, *bmax_, *wt_, *bv_;
  const float** w_rows_ = nullptr;  // pairs_: the value weights' rows, B_V's rows
  const S** bv_rows_ = nullptr;
  std::uint32_t *w_pairs_ = nullptr, *bv_pairs_ = nullptr;
  std::uint32_t* bq_pairs_ = nullptr;  // dots_tiles_
  const S* av_ = nullptr;  // the current block's A_V rows
  const std::int64_t pair_group_ = std::same_as<S, bf16> ? bf16_pair_group() : 0;
};

template <class KV>
auto factor_view_of(const KV& kv) {
  if constexpr (is_factor_view<KV>::value)
    return kv;
  else
    return kv.view();
}

/// The TPA problem of query factors a_q [Tq, R_Q, H], b_q [Tq, R_Q, d] against f (checked).
template <storage_type S>
tpa_problem<S> tpa_problem_of(const char* who, tensor3_view<const float> a_q,
                              tensor3_view<const float> b_q, const factor_view<S>& f,
                              const attention_options& opt) {
  f.validate(who);
  const std::int64_t tq = a_q.extent(0), rq = a_q.extent(1), h = f.heads, d = f.head_dim;
  require(rq >= 1, who, ": a_q.extent(1) (R_Q) must be >= 1, got ", rq);
  require_extents(a_q, {tq, rq, h}, who, "a_q");
  require_extents(b_q, {tq, rq, d}, who, "b_q");
  require(opt.strategy != tile_strategy::gemm, who,
          ": strategy gemm is not available (the TPA kernel has one path: automatic or "
          "streaming)");
  const float scale = opt.scale.value_or(1.f / std::sqrt(static_cast<float>(d))) * f.k_scale;
  return {a_q, b_q, f, scale, (h + 15) / 16 * 16, opt.products == product_math::bf16};
}

}  // namespace detail

/// TPA attention of query factors a_q [Tq, R_Q, H] and b_q [Tq, R_Q, d] (roped; the query is
/// Q = A_Q^T B_Q, so T6's 1/R_Q belongs in a_q) at q_positions against every token of `kv` (a
/// factor_view, or a cache exporting one: it carries k_scale and v_scale); writes out [Tq, H, d_v].
/// Options as for attend; scale defaults to 1/sqrt(d). K and V are never materialised.
template <factor_source KV, class Exec = serial_executor, mask_predicate Mask = no_mask>
void attend_factorized(tensor3_view<const float> a_q, tensor3_view<const float> b_q,
                       std::span<const std::int64_t> q_positions, const KV& kv,
                       tensor3_view<float> out, const attention_options& opt = {},
                       Exec&& exec = Exec{}, attention_workspace* ws = nullptr,
                       const Mask& mask = {}) {
  using S = typename KV::storage_type;
  const char* who = "attend_factorized";
  const factor_view<S> f = detail::factor_view_of(kv);
  const detail::tpa_problem<S> p = detail::tpa_problem_of(who, a_q, b_q, f, opt);
  for (const auto& [in, name] : {std::pair{a_q, "a_q"}, std::pair{b_q, "b_q"}})
    detail::require_outputs_disjoint(who, out, opt, in, name);
  const detail::attention_policy policy = detail::validate_call(
      who, a_q.extent(0), f.heads, f.v_head_dim, f.size(), q_positions, out, opt);
  detail::run_attention<detail::tpa_products<S>>(
      p, detail::attention_call<Mask>{q_positions, policy, mask, out, opt.lse, opt.weights}, exec,
      ws);
}

}  // namespace attnkit
