#pragma once
// The attention driver: the one implementation of planning, the work loop, masking and block
// skipping, the online softmax, key-split states, their merge, and finalisation with LSE output,
// shared by every attention variant. A variant supplies only its block products:
//
//   load_queries(t0, tn, j)       stage query tokens [t0, t0 + tn) of head group j;
//   scores(j, b0, nb, k_end)      scaled scores of the staged rows against keys [b0, b0 + nb),
//                                 returned as a score_tile (row or column layout);
//   accumulate(j, b0, nb, p, acc) acc[rows][v_head_dim] += P V for the block's probabilities p;
//   finish(acc, rows)             any last transform of the accumulators (layout, scale);
//   value_weights()               optional, column layout: where the softmax writes the
//                                 probabilities times the variant's value factors (instead of
//                                 storing them back into the tile): TPA's value weights;
//   value_row(j, head, t, buf)    key t's value vector for query head `head` as float, in the
//                                 accumulators' layout (buf: v_head_dim floats of scratch); the
//                                 driver's exact path for blocks where a masked key's value is not
//                                 finite (see repair_masked_rows);
//   positions(), run_end(t)       the key positions and run ends of its KV view;
//   given_weights                 optional static constexpr bool: scores() returns
//                                 probabilities already normalised (a shared-attention
//                                 follower reading a donor's weights), so the driver runs no
//                                 mask, no softmax and no normalisation.
//
// A work item is (query tile, head group j, key split). Its rows are the tile's tokens times the
// group's query heads: row r is token t0 + r / g and query head j * g + r % g. Head groups are the
// KV heads (GQA family, MLA: one group) or all heads at once (TPA). Blocks of keys stream through
// the policy (kernels/policy.hpp) and the online softmax (core/softmax.hpp); with one key split
// the item finalises its rows into out/lse, otherwise its (max, sum, acc) rows go to a partial
// buffer, merged in split order by the worker that finishes the (tile, group)'s last split (or,
// for large merges, by all workers after the loop). Per row of a partial: max, sum,
// acc[v_head_dim].
//
// Normalisation has three modes. Online (every attention call): the running max and sum of the
// online softmax. Given LSE (a shared-attention follower recomputing its donor's scores): each
// row's log-sum-exp is known, p = exp(s - lse) needs no running state, the rows are the plain
// sums of p V and key splits add. Given weights (variant given_weights): the same with p read,
// not computed. A call can also hand its normalised weights out (call.weights, a donor's
// materialised form): the masked logits are stored during the run and become exp(s - lse) once
// every row's LSE is known.
#include <algorithm>
#include <cmath>
#include <atomic>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <tuple>

#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/options.hpp"
#include "../core/softmax.hpp"
#include "../core/view.hpp"
#include "../core/workspace.hpp"
#include "policy.hpp"

namespace attnkit::detail {

#ifdef ATTNKIT_TEST_PRECISION_LOSS
/// Test-only fault injection (tests/test_precision.cpp proves the tolerances catch it): with
/// ATTNKIT_TEST_PRECISION_LOSS 1 every score loses its low 5 mantissa bits; with 2 every
/// probability is off by 2^-20 relative, its sign taken from its lowest bit. Each is about ten
/// times the error of the float dot product or exp it stands for.
inline float test_degrade(float x) {
  std::uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  if (ATTNKIT_TEST_PRECISION_LOSS == 2) return x * (b & 1u ? 1.f + 0x1p-20f : 1.f - 0x1p-20f);
  b &= ~std::uint32_t{0x1F};
  std::memcpy(&x, &b, sizeof b);
  return x;
}
#endif

/// One key block's scores: element (row r, key t) at data[r * row_stride + t * key_stride].
/// Row layout has key_stride == 1, column layout row_stride == 1. block_max (optional, column
/// layout): each row's max over the block, when the variant's score pass has it for free.
struct score_tile {
  float* data;
  std::int64_t row_stride, key_stride;
  const float* block_max = nullptr;
};

/// What a variant tells the planner about one call.
struct attention_shape {
  std::int64_t q_tokens;     ///< Tq
  std::int64_t groups;       ///< head groups that each read the keys once per item
  std::int64_t group_heads;  ///< query heads per group (g)
  std::int64_t keys;         ///< Tk
  std::int64_t v_head_dim;   ///< accumulator width of a row
  std::int64_t tile_rows;    ///< target rows (tokens x g) per query tile
  std::int64_t block;        ///< keys per block
};

struct attention_plan {
  std::int64_t q_tokens, groups, g, keys, v_head_dim, block;
  std::int64_t tq, rows, qtiles, splits, items;
  std::int64_t partial_stride() const { return rows * (v_head_dim + 2); }
  /// Item i: head group by head group, so that a worker's consecutive items read the same keys
  /// (its caches, and the variants' packed blocks, serve the next query tile); within a group
  /// later query tiles first (under a causal mask they carry more keys), then the key splits.
  void item(std::int64_t i, std::int64_t& qt, std::int64_t& j, std::int64_t& ks) const {
    const std::int64_t per_group = qtiles * splits;
    j = i / per_group, qt = qtiles - 1 - i % per_group / splits, ks = i % splits;
  }
  float* partial_of(float* partial, std::int64_t qt, std::int64_t j, std::int64_t ks) const {
    return partial + ((qt * groups + j) * splits + ks) * partial_stride();
  }
};

/// The query tiles of a shape, without key splits.
inline attention_plan tile_attention(const attention_shape& s) {
  attention_plan p{s.q_tokens, s.groups, s.group_heads, s.keys, s.v_head_dim, s.block, 0, 0, 0,
                   1,          0};
  p.tq = std::clamp<std::int64_t>(s.tile_rows / s.group_heads, 1,
                                  std::max<std::int64_t>(s.q_tokens, 1));
  p.rows = p.g * p.tq;
  p.qtiles = (s.q_tokens + p.tq - 1) / p.tq;
  p.items = p.groups * p.qtiles;
  return p;
}

/// The fewest keys a key split of a plan's items takes: 256, or 128 for tall items (64 rows or
/// more: absorbed MLA with many heads), whose work per key is so large that the split's merge
/// stays small beside it, and which are so few that 256 keys would leave workers idle (a 128-head
/// decode step over 4096 keys would feed at most 16 workers; late vCPUs then set the time).
inline std::int64_t min_split_keys(const attention_plan& p) { return p.rows >= 64 ? 128 : 256; }

/// Key splits only when the items without them would leave workers idle: about four items per
/// worker, each split at least min_split_keys. (Tq > 0.)
inline attention_plan plan_attention(const attention_shape& s, int workers) {
  attention_plan p = tile_attention(s);
  const std::int64_t base = p.items;
  if (base < 2 * workers || base % workers != 0)
    p.splits = std::clamp<std::int64_t>((4 * workers + base - 1) / base, 1,
                                        std::max<std::int64_t>(1, s.keys / min_split_keys(p)));
  p.items = base * p.splits;
  return p;
}

/// A variant's block products (see the header comment).
template <class V>
concept block_products = requires(V& v, const V& cv, std::int64_t i, float* acc,
                                  const score_tile& tile) {
  typename V::problem;
  { cv.positions() } -> std::convertible_to<std::span<const std::int64_t>>;
  { cv.run_end(i) } -> std::convertible_to<std::int64_t>;
  v.load_queries(i, i, i);
  { v.scores(i, i, i, i) } -> std::same_as<score_tile>;
  v.accumulate(i, i, i, tile, acc);
  { v.value_row(i, i, i, acc) } -> std::convertible_to<const float*>;
  v.finish(acc, i);
};

/// True when some x[i] is inf or NaN (all exponent bits set) and differs from before[i]: it
/// turned non-finite, or from one infinity to NaN or the other. Integer ops, so it vectorises
/// without -ffast-math.
inline bool turned_non_finite(const float* x, const float* before, std::int64_t n) {
  std::uint32_t any = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    std::uint32_t a, b;
    std::memcpy(&a, x + i, sizeof a);
    std::memcpy(&b, before + i, sizeof b);
    any |= static_cast<std::uint32_t>((a & 0x7f800000u) == 0x7f800000u && a != b);
  }
  return any != 0;
}

template <class V>
constexpr bool given_weights_v = requires { requires V::given_weights; };

/// A call's output rows [Tq, H, v_head_dim]: float, or bf16 (an engine's bf16 activations;
/// each row finalised in float and rounded once).
struct output_rows {
  tensor3_view<float> f32{};
  tensor3_view<bf16> b16{};
  bool bf16_out = false;
  output_rows(tensor3_view<float> o) : f32(o) {}
  output_rows(tensor3_view<bf16> o) : b16(o), bf16_out(true) {}
  index_t extent(std::size_t i) const { return bf16_out ? b16.extent(i) : f32.extent(i); }
  /// f(view) with the view of the output's element type.
  template <class F>
  decltype(auto) visit(F&& f) const {
    return bf16_out ? f(b16) : f(f32);
  }
};

/// True when some of the n bf16 at x is inf or NaN (all exponent bits set): four at a time as
/// one 64-bit word, a lane whose exponent bits are all set found as a zero lane of w ^ mask.
inline bool any_non_finite(const bf16* x, std::int64_t n) {
  constexpr std::uint64_t exponent = 0x7F807F807F807F80u, ones = 0x0001000100010001u,
                          tops = 0x8000800080008000u;
  std::int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    std::uint64_t w;
    std::memcpy(&w, x + i, sizeof w);
    const std::uint64_t v = (w & exponent) ^ exponent;  // a lane 0: all exponent bits set
    if ((v - ones) & ~v & tops) return true;
  }
  for (; i < n; ++i)
    if (!std::isfinite(static_cast<float>(x[i]))) return true;
  return false;
}

/// Everything of one call that is not the variant's.
template <class Mask>
struct attention_call {
  std::span<const std::int64_t> q_pos;
  attention_policy policy;
  Mask mask;
  output_rows out;                       // [Tq, H, v_head_dim]
  matrix_view<float> lse;                // [Tq, H] or empty
  tensor3_view<float> weights{};         // [Tq, H, Tk] or empty: the normalised weights out
  matrix_view<const float> given_lse{};  // [Tq, H] or empty: the given-LSE mode
  float sink(std::int64_t head) const {
    return policy.sinks.empty() ? neg_inf : policy.sinks[static_cast<std::size_t>(head)];
  }
  /// Writes row (t, head) of the output from its final state; with a given normalisation
  /// (`fixed`) the accumulator is the output.
  void finalize(std::int64_t t, std::int64_t head, float max, float sum, const float* acc,
                std::int64_t dv, bool fixed) const {
    out.visit([&](const auto& o) {
      using O = std::remove_cvref_t<decltype(o(0, 0, 0))>;
      if (fixed) {
        for (std::int64_t c = 0; c < dv; ++c) o(t, head, c) = O(acc[c]);
        return;
      }
      const float l = softmax_finalize(max, sum, acc, &o(t, head, 0), o.stride(2), dv, sink(head));
      if (!lse.empty()) lse(t, head) = l;
    });
  }
};

/// One worker: its variant instance and the per-row state of the item it runs.
template <block_products Variant, class Mask>
class attention_worker {
 public:
  static std::size_t floats(const typename Variant::problem& pb, const attention_plan& pl) {
    return Variant::scratch_floats(pb, pl) +
           static_cast<std::size_t>(pl.rows * (3 + 2 * pl.v_head_dim) + pl.v_head_dim);
  }
  attention_worker(const typename Variant::problem& pb, const attention_plan& pl,
                   const attention_call<Mask>& call, float* f, std::int64_t* ints)
      : pl_(pl), call_(call), var_(pb, pl, f), row_pos_(ints) {
    f += Variant::scratch_floats(pb, pl);
    state_ = {f, f + pl.rows};
    alpha_ = f + 2 * pl.rows;
    acc_ = f + 3 * pl.rows;
    saved_ = acc_ + pl.rows * pl.v_head_dim;
    value_ = saved_ + pl.rows * pl.v_head_dim;
  }

  void run(std::int64_t qt, std::int64_t j, std::int64_t ks, float* partial) {
    constexpr bool given_p = given_weights_v<Variant>;
    const bool fixed = given_p || !call_.given_lse.empty();
    const std::int64_t g = pl_.g, dv = pl_.v_head_dim;
    const std::int64_t t0 = qt * pl_.tq, tn = std::min(pl_.tq, pl_.q_tokens - t0), m = tn * g;
    std::int64_t qmin = std::numeric_limits<std::int64_t>::max(),
                 qmax = std::numeric_limits<std::int64_t>::min();
    for (std::int64_t ti = 0; ti < tn && !given_p; ++ti) {  // given weights: no positions
      const std::int64_t pos = call_.q_pos[static_cast<std::size_t>(t0 + ti)];
      qmin = std::min(qmin, pos), qmax = std::max(qmax, pos);
      std::fill(row_pos_ + ti * g, row_pos_ + (ti + 1) * g, pos);
    }
    var_.load_queries(t0, tn, j);
    state_.reset(m);
    if (fixed)  // the row's normalisation is known: max holds its LSE, the sum stays 1
      for (std::int64_t r = 0; r < m; ++r)
        state_.max[r] = given_p ? 0.f : call_.given_lse(t0 + r / g, j * g + r % g),
        state_.sum[r] = 1.f;
    std::fill(acc_, acc_ + m * dv, 0.f);

    const std::int64_t* kp = var_.positions().data();
    const std::int64_t k_begin = pl_.keys * ks / pl_.splits,
                       k_end = pl_.keys * (ks + 1) / pl_.splits;
    for (std::int64_t b0 = k_begin, nb; b0 < k_end; b0 += nb) {
      nb = std::min({pl_.block, k_end - b0, var_.run_end(b0) - b0});
      auto [lo, hi] = std::minmax_element(kp + b0, kp + b0 + nb);
      if (call_.policy.positions.causal && !given_p && *hi > qmax && *lo <= qmax) {
        // The block ends at its first key (after the first) that follows every query of the
        // tile: the causal rule hides it, and in a prefill's diagonal block all keys after it,
        // from every row, so no row computes them here; the next block starts there. Any block
        // boundary is correct (the online softmax takes blocks of any length).
        nb = std::find_if(kp + b0 + 1, kp + b0 + nb, [&](std::int64_t p) { return p > qmax; }) -
             (kp + b0);
        std::tie(lo, hi) = std::minmax_element(kp + b0, kp + b0 + nb);
      }
      const block_visibility vis = call_.policy.positions.block(qmin, qmax, *lo, *hi);
      if (vis == block_visibility::none) {
        if (!call_.weights.empty()) fill_weights(t0, j, b0, nb, m);
        continue;
      }
      const score_tile s = var_.scores(j, b0, nb, k_end);
#if ATTNKIT_TEST_PRECISION_LOSS == 1
      for_each_score(s, t0, j, b0, nb, m, [](float& x, const mask_args&) { x = test_degrade(x); });
#endif
      if (call_.policy.logits.active()) transform_logits(s, t0, j, b0, nb, m);
      // Given weights carry their own zeros: any block may hold a masked key.
      const bool some_masked =
          given_p || vis == block_visibility::partial || !std::same_as<Mask, no_mask>;
      if (some_masked && !given_p) apply_mask(s, t0, j, b0, nb, m);
      if (!call_.weights.empty()) store_weights(s, t0, j, b0, nb, m);
      if (given_p) {
      } else if (fixed) {
        if (s.key_stride == 1)
          for (std::int64_t r = 0; r < m; ++r)
            exp_given_row(s.data + r * s.row_stride, nb, state_.max[r]);
        else
          exp_given_columns(s.data, s.key_stride, nb, m, state_.max);
      } else {
        // The variant's block max holds when the scores reach the softmax unchanged.
        const bool unchanged = vis == block_visibility::full && !call_.policy.logits.active() &&
                               std::same_as<Mask, no_mask>;
        if (s.key_stride == 1) {
          softmax_rows(s.data, s.row_stride, m, nb, state_.max, state_.sum, alpha_);
        } else if constexpr (requires { var_.value_weights(); }) {
          const auto w = var_.value_weights();
          softmax_columns(s.data, s.key_stride, nb, m, state_.max, state_.sum, alpha_,
                          unchanged ? s.block_max : nullptr, &w);
        } else {
          bool coarse_exp = false;  // the probabilities are rounded to bf16 next
          if constexpr (requires { var_.rounds_probabilities(); })
            coarse_exp = var_.rounds_probabilities();
          softmax_columns<float>(s.data, s.key_stride, nb, m, state_.max, state_.sum, alpha_,
                                 nullptr, nullptr, coarse_exp);
        }
        for (std::int64_t r = 0; r < m; ++r)
          if (alpha_[r] != 1.f) scale_row(acc_ + r * dv, dv, alpha_[r]);
      }
#if ATTNKIT_TEST_PRECISION_LOSS == 2
      for_each_score(s, t0, j, b0, nb, m, [](float& x, const mask_args&) { x = test_degrade(x); });
#endif
      if (some_masked) std::copy(acc_, acc_ + m * dv, saved_);
      var_.accumulate(j, b0, nb, s, acc_);
      if (some_masked) repair_masked_rows(s, t0, j, b0, nb, m, fixed);
    }
    var_.finish(acc_, m);

    for (std::int64_t r = 0; r < m; ++r) {
      if (pl_.splits == 1) {
        call_.finalize(t0 + r / g, j * g + r % g, state_.max[r], state_.sum[r], acc_ + r * dv, dv,
                       fixed);
      } else {
        float* dst = partial + r * (dv + 2);
        dst[0] = state_.max[r], dst[1] = state_.sum[r];
        std::copy(acc_ + r * dv, acc_ + (r + 1) * dv, dst + 2);
      }
    }
  }

 private:
  template <class F>
  void for_each_score(const score_tile& s, std::int64_t t0, std::int64_t j, std::int64_t b0,
                      std::int64_t nb, std::int64_t m, F&& f) const {
    const std::int64_t* kp = var_.positions().data() + b0;
    for (std::int64_t r = 0; r < m; ++r) {
      const mask_args base{t0 + r / pl_.g, row_pos_[r], 0, 0, j * pl_.g + r % pl_.g};
      float* row = s.data + r * s.row_stride;
      for (std::int64_t t = 0; t < nb; ++t) {
        mask_args a = base;
        a.k_index = b0 + t, a.k_pos = kp[t];
        f(row[t * s.key_stride], a);
      }
    }
  }
  void transform_logits(const score_tile& s, std::int64_t t0, std::int64_t j, std::int64_t b0,
                        std::int64_t nb, std::int64_t m) const {
    const logit_transform& lt = call_.policy.logits;
    for_each_score(s, t0, j, b0, nb, m,
                   [&](float& x, const mask_args& a) { x = lt(x, a.q_pos, a.k_pos, a.head); });
  }
  void apply_mask(const score_tile& s, std::int64_t t0, std::int64_t j, std::int64_t b0,
                  std::int64_t nb, std::int64_t m) const {
    const std::int64_t* kp = var_.positions().data() + b0;
    if (std::same_as<Mask, no_mask> && std::is_sorted(row_pos_, row_pos_ + m) &&
        std::is_sorted(kp, kp + nb)) {
      // The position rule alone over positions in order (a prefill's diagonal blocks): a row's
      // visible keys, and a key's visible rows, are one interval (in_window and the causal rule
      // are monotone in either position), so the rest is filled rather than tested pair by pair.
      const position_mask& pm = call_.policy.positions;
      if (s.key_stride == 1) {
        for (std::int64_t r = 0; r < m; ++r) {
          const std::int64_t q = row_pos_[r];
          const std::int64_t* lo = std::partition_point(
              kp, kp + nb, [&](std::int64_t k) { return !pm.in_window(q, k); });
          const std::int64_t* hi =
              pm.causal ? std::partition_point(lo, kp + nb, [&](std::int64_t k) { return k <= q; })
                        : kp + nb;
          float* row = s.data + r * s.row_stride;
          fill_row(row, lo - kp, neg_inf);
          fill_row(row + (hi - kp), kp + nb - hi, neg_inf);
        }
      } else {  // column layout: row_stride 1
        const std::int64_t* rp = row_pos_;
        for (std::int64_t t = 0; t < nb; ++t) {
          const std::int64_t k = kp[t];
          const std::int64_t* lo =
              pm.causal ? std::partition_point(rp, rp + m, [&](std::int64_t q) { return q < k; })
                        : rp;
          const std::int64_t* hi =
              std::partition_point(lo, rp + m, [&](std::int64_t q) { return pm.in_window(q, k); });
          float* col = s.data + t * s.key_stride;
          fill_row(col, lo - rp, neg_inf);
          fill_row(col + (hi - rp), rp + m - hi, neg_inf);
        }
      }
      return;
    }
    for_each_score(s, t0, j, b0, nb, m, [&](float& x, const mask_args& a) {
      if (!visible(a)) x = neg_inf;
    });
  }

  /// The block's masked logits into call.weights (made probabilities after the run).
  void store_weights(const score_tile& s, std::int64_t t0, std::int64_t j, std::int64_t b0,
                     std::int64_t nb, std::int64_t m) const {
    for (std::int64_t r = 0; r < m; ++r) {
      const float* row = s.data + r * s.row_stride;
      float* w = &call_.weights(t0 + r / pl_.g, j * pl_.g + r % pl_.g, b0);
      const std::int64_t ws = call_.weights.stride(2);
      for (std::int64_t t = 0; t < nb; ++t) w[t * ws] = row[t * s.key_stride];
    }
  }
  /// A block no row sees: weight 0 (logit -inf).
  void fill_weights(std::int64_t t0, std::int64_t j, std::int64_t b0, std::int64_t nb,
                    std::int64_t m) const {
    for (std::int64_t r = 0; r < m; ++r)
      for (std::int64_t t = 0; t < nb; ++t)
        call_.weights(t0 + r / pl_.g, j * pl_.g + r % pl_.g, b0 + t) = neg_inf;
  }

  bool visible(const mask_args& a) const {
    return call_.policy.positions.visible(a.q_pos, a.k_pos) && call_.mask(a);
  }
  /// A masked key must contribute nothing, whatever its value holds; but the block products
  /// multiply its zero probability by its value, and 0 * inf or 0 * NaN is NaN. A row with an
  /// accumulator element that turned non-finite in a block with masked keys is therefore
  /// recomputed from its state before the block, key by key over its visible keys only. Rare
  /// (non-finite values in the cache); the common cost is one copy and one scan of the block's
  /// accumulators.
  void repair_masked_rows(const score_tile& s, std::int64_t t0, std::int64_t j, std::int64_t b0,
                          std::int64_t nb, std::int64_t m, bool fixed) {
    const std::int64_t dv = pl_.v_head_dim, g = pl_.g;
    if (!any_non_finite(acc_, m * dv)) return;  // the common case: one vector scan
    const std::int64_t* kp = var_.positions().data() + b0;
    constexpr bool sink = requires { var_.value_weights(); };
    for (std::int64_t r = 0; r < m; ++r) {
      float* acc = acc_ + r * dv;
      const float* before = saved_ + r * dv;
      if (!turned_non_finite(acc, before, dv)) continue;
      std::copy(before, before + dv, acc);
      const mask_args base{t0 + r / g, row_pos_[r], 0, 0, j * g + r % g};
      for (std::int64_t t = 0; t < nb; ++t) {
        mask_args a = base;
        a.k_index = b0 + t, a.k_pos = kp[t];
        const float x = s.data[r * s.row_stride + t * s.key_stride];
        // Given weights are masked where they are 0.
        if (given_weights_v<Variant> ? x == 0.f : !visible(a)) continue;
        // With value weights the tile still holds the scores.
        const float p = sink && !fixed && s.key_stride != 1 ? std::exp(x - state_.max[r]) : x;
        const float* v = var_.value_row(j, a.head, b0 + t, value_);
        for (std::int64_t c = 0; c < dv; ++c) acc[c] += p * v[c];
      }
    }
  }

  const attention_plan& pl_;
  const attention_call<Mask>& call_;
  Variant var_;
  std::int64_t* row_pos_;  // [rows]
  softmax_state state_;    // [rows] each
  float* alpha_;           // [rows]
  float* acc_;             // [rows][v_head_dim]
  float* saved_;           // [rows][v_head_dim]: acc_ before the current block's products
  float* value_;           // [v_head_dim]: one value row for repair_masked_rows
};

/// Merges the key splits of the rows [begin, end) of all (query tile, head group) pairs, counted
/// tile by tile, group by group, pl.rows per pair (rows past a last tile's tokens are skipped),
/// and finalises them: by log-sum-exp, or as plain sums with a given normalisation.
template <class Mask>
void merge_split_rows(const attention_plan& pl, const attention_call<Mask>& call, float* partial,
                      bool fixed, std::int64_t begin, std::int64_t end) {
  const std::int64_t dv = pl.v_head_dim, stride = pl.partial_stride();
  for (std::int64_t i = begin; i < end; ++i) {
    const std::int64_t qt = i / (pl.groups * pl.rows), j = i / pl.rows % pl.groups, r = i % pl.rows,
                       t0 = qt * pl.tq;
    if (r >= std::min(pl.tq, pl.q_tokens - t0) * pl.g) continue;
    float* a = pl.partial_of(partial, qt, j, 0) + r * (dv + 2);
    for (std::int64_t ks = 1; ks < pl.splits; ++ks) {
      const float* b = a + ks * stride;
      if (fixed)
        for (std::int64_t c = 0; c < dv; ++c) a[2 + c] += b[2 + c];
      else
        softmax_merge(a[0], a[1], a + 2, b[0], b[1], b + 2, dv);
    }
    call.finalize(t0 + r / pl.g, j * pl.g + r % pl.g, a[0], a[1], a + 2, dv, fixed);
  }
}

/// Counts one finished key split of (query tile, head group) pair `pair`; the worker that finishes
/// the pair's last split merges it (the acquire makes the other splits' states visible).
template <class Mask>
void finish_split(std::int64_t& finished, const attention_plan& pl,
                  const attention_call<Mask>& call, float* partial, bool fixed, std::int64_t pair) {
  if (std::atomic_ref(finished).fetch_add(1, std::memory_order_acq_rel) == pl.splits - 1)
    merge_split_rows(pl, call, partial, fixed, pair * pl.rows, (pair + 1) * pl.rows);
}

/// call.weights holds every row's masked logits: weights = exp(logit - lse), which sum to 1
/// over the row (less the sink's share); 0 for masked keys and for rows that saw no key.
template <class Mask, class Exec>
void normalise_weights(const attention_call<Mask>& call, Exec& exec) {
  const std::int64_t tq = call.weights.extent(0), h = call.weights.extent(1),
                     tk = call.weights.extent(2), ws = call.weights.stride(2);
  exec.parallel_for(tq * h, [&](std::int64_t i) {
    const std::int64_t t = i / h, head = i % h;
    float* w = &call.weights(t, head, 0);
    if (ws == 1)
      exp_given_row(w, tk, call.lse(t, head));
    else
      for (std::int64_t k = 0; k < tk; ++k) w[k * ws] = exp_given(w[k * ws], call.lse(t, head));
  });
}

/// Whether a call of the variant computes f32 products as bf16 parts (split_parts > 1: AMX
/// tiles). Exact for finite values, they give NaN where an infinite cached element meets a zero
/// or opposite-signed part and float products give +-inf, so such a call's outputs are checked
/// and, where not finite, computed again on FMAs (run_attention, run_attention_batch).
template <class Variant>
bool splits_products(const typename Variant::problem& pb) {
  if constexpr (requires {
                  Variant::split_parts(pb);
                  pb.split_products;
                })
    return pb.split_products && Variant::split_parts(pb) > 1;
  else
    return false;
}
/// The call's problem with f32 products on FMAs (a follower's: its donor's score products too).
template <class Problem>
Problem on_fmas(Problem pb) {
  pb.split_products = false;
  if constexpr (requires { pb.donor.split_products; }) pb.donor.split_products = false;
  return pb;
}
/// Whether an output element of the call is NaN or infinite, or an LSE element NaN or +inf. An
/// LSE of -inf is a row that saw no key (its output row 0): bf16 parts reach it only where every
/// score is masked or -inf with no NaN among its products, and then FMAs do too.
template <class Mask>
bool outputs_non_finite(const attention_call<Mask>& call) {
  return call.out.visit([&](const auto& o) {
    const bool rows = o.stride(2) == 1;  // a vector scan per output row
    for (std::int64_t t = 0; t < o.extent(0); ++t)
      for (std::int64_t h = 0; h < o.extent(1); ++h) {
        if (!call.lse.empty() && !(call.lse(t, h) < std::numeric_limits<float>::infinity()))
          return true;
        if (rows) {
          if (any_non_finite(&o(t, h, 0), o.extent(2))) return true;
          continue;
        }
        for (std::int64_t c = 0; c < o.extent(2); ++c)
          if (!std::isfinite(static_cast<float>(o(t, h, c)))) return true;
      }
    return false;
  });
}

template <block_products Variant, class Mask, class Exec>
void run_attention_pass(const typename Variant::problem& pb, const attention_call<Mask>& call_in,
                        Exec& exec, attention_workspace* ws_in);

/// Plans and runs one attention call of a variant over the executor; the caller has validated
/// the arguments. A call on bf16 parts whose outputs are not all finite runs again on FMAs
/// (splits_products).
template <block_products Variant, class Mask, class Exec>
void run_attention(const typename Variant::problem& pb, const attention_call<Mask>& call,
                   Exec& exec, attention_workspace* ws) {
  run_attention_pass<Variant>(pb, call, exec, ws);
  if constexpr (requires { pb.split_products; })
    if (splits_products<Variant>(pb) && outputs_non_finite(call))
      run_attention_pass<Variant>(on_fmas(pb), call, exec, ws);
}

/// One pass of run_attention.
template <block_products Variant, class Mask, class Exec>
void run_attention_pass(const typename Variant::problem& pb, const attention_call<Mask>& call_in,
                        Exec& exec, attention_workspace* ws_in) {
  const attention_shape shape = Variant::shape(pb);
  if (shape.q_tokens == 0) return;
  attention_workspace local;
  attention_workspace& ws = ws_in ? *ws_in : local;
  const bool fixed = given_weights_v<Variant> || !call_in.given_lse.empty();
  attention_call<Mask> call = call_in;
  if (!call.weights.empty() && call.lse.empty())  // the weights' normalisation needs the LSE
    call.lse = matrix_view<float>(
        workspace_access::lse(ws, static_cast<std::size_t>(call.out.extent(0) * call.out.extent(1))),
        {call.out.extent(0), call.out.extent(1)});
  const int want = concurrency_of(exec);
  const attention_plan pl = plan_attention(shape, want);
  const std::int64_t workers = std::min<std::int64_t>(want, pl.items);
  using worker_t = attention_worker<Variant, Mask>;
  const std::size_t floats = worker_t::floats(pb, pl);
  // The workspace is sized for the most key splits any context length gives this query shape,
  // and for every worker, so that a decode loop whose cache grows never allocates after its
  // first step (the split count rises with the context).
  attention_shape longest = shape;
  longest.keys = std::numeric_limits<std::int64_t>::max() / 2;
  const attention_plan most = plan_attention(longest, want);
  float* partial = pl.splits > 1 || most.splits > 1
                       ? workspace_access::partial(
                             ws, static_cast<std::size_t>(most.items * most.partial_stride()))
                       : nullptr;
  workspace_access::reserve_workers(ws, static_cast<std::size_t>(want), floats,
                                    static_cast<std::size_t>(pl.rows));

  // Key splits are merged on the workers. As a rule the worker that finishes a (query tile, head
  // group) pair's last split merges that pair (finish_split), so merges overlap the remaining items
  // and need no second hand-off. A pair whose merge is large (absorbed MLA with many heads: every
  // split holds full accumulator rows) is instead merged by all workers, a few rows each, after the
  // items.
  const bool merge_after = pl.splits > 1 && workers > 1 &&
                           pl.rows * (pl.splits - 1) * pl.v_head_dim >= (std::int64_t{1} << 15);
  // Sized like `partial`, for the most splits, so that a growing decode loop never allocates.
  std::int64_t* counts = most.splits > 1 ? workspace_access::split_counts(
                                               ws, static_cast<std::size_t>(pl.qtiles * pl.groups))
                                         : nullptr;
  std::int64_t* finished = pl.splits > 1 && !merge_after ? counts : nullptr;
  std::atomic<std::int64_t> next{0};
  exec.parallel_for(workers, [&](std::int64_t w) {
    const auto wi = static_cast<std::size_t>(w);
    worker_t worker(pb, pl, call, workspace_access::worker_floats(ws, wi),
                    workspace_access::worker_ints(ws, wi));
    for (std::int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < pl.items;) {
      std::int64_t qt, j, ks;
      pl.item(i, qt, j, ks);
      worker.run(qt, j, ks, partial ? pl.partial_of(partial, qt, j, ks) : nullptr);
      if (finished) {
        const std::int64_t pair = qt * pl.groups + j;
        finish_split(finished[pair], pl, call, partial, fixed, pair);
      }
    }
  });
  if (merge_after) {
    const std::int64_t rows = pl.qtiles * pl.groups * pl.rows;
    const std::int64_t chunk = (rows + workers - 1) / workers;
    exec.parallel_for((rows + chunk - 1) / chunk, [&](std::int64_t c) {
      merge_split_rows(pl, call, partial, fixed, c * chunk, std::min(rows, (c + 1) * chunk));
    });
  }
  if (!call.weights.empty()) normalise_weights(call, exec);
}

/// Outputs (out, and the options' lse and weights) must not share memory with the input `in`.
template <class O, class In>
void require_outputs_disjoint(const char* who, const tensor3_view<O>& out,
                              const attention_options& opt, const In& in, const char* name) {
  require_disjoint(out, in, who, "out", name);
  require_disjoint(opt.lse, in, who, "lse", name);
  require_disjoint(opt.weights, in, who, "weights", name);
}

/// Checks the arguments every entry point shares: q_positions and out for Tq tokens and
/// `heads` query heads of v_head_dim, the LSE and weights outputs (the latter over `keys`
/// keys), the scale and the policy.
template <class O>
attention_policy validate_call(const char* who, std::int64_t tq, std::int64_t heads,
                               std::int64_t v_head_dim, std::int64_t keys,
                               std::span<const std::int64_t> q_pos, const tensor3_view<O>& out,
                               const attention_options& opt) {
  require(static_cast<std::int64_t>(q_pos.size()) == tq, who, ": q_positions has ", q_pos.size(),
          " entries but the queries have Tq=", tq, " tokens");
  require_extents(out, {tq, heads, v_head_dim}, who, "out");
  if (!opt.lse.empty()) {
    require_extents(opt.lse, {tq, heads}, who, "lse");
    require_disjoint(opt.lse, out, who, "lse", "out");
  }
  if (!opt.weights.empty()) {
    require_extents(opt.weights, {tq, heads, keys}, who, "weights");
    require_disjoint(opt.weights, out, who, "weights", "out");
    require_disjoint(opt.weights, opt.lse, who, "weights", "lse");
  }
  if (opt.scale)
    require(std::isfinite(*opt.scale), who, ": scale must be finite, got ", *opt.scale);
  return make_policy(opt, heads, who);
}

}  // namespace attnkit::detail
