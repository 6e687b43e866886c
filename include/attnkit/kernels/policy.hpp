#pragma once
// Attention policies: what decides which keys a query sees and how a score becomes a logit.
// The driver (kernels/driver.hpp) applies them to every variant at one seam, between a key
// block's scores and its softmax step:
//   position_mask   causal rule and sliding window on explicit int64 positions, with a
//                   block classification (none / partial / full visible) for block skipping;
//   mask predicate  a caller's mask_predicate (prefix-LM, packed documents, tree attention),
//                   evaluated per (query, key, head) on blocks the position rule does not skip;
//   logit_transform ALiBi slopes and Gemma 2's soft-cap on the scaled score;
//   sinks           a per-head logit in the softmax denominator (softmax_finalize).
// Position arithmetic never overflows: distances are taken as uint64 of the ordered pair.
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <span>

#include "../core/options.hpp"

namespace attnkit {

/// What a mask predicate is asked: query token q_index (its row in the call's queries) at
/// q_pos, key k_index (its token in the view) at k_pos, query head `head`.
struct mask_args {
  std::int64_t q_index;  ///< the query's row in the call
  std::int64_t q_pos;    ///< the query's position
  std::int64_t k_index;  ///< the key's token in the view
  std::int64_t k_pos;    ///< the key's position
  std::int64_t head;     ///< query head
};

/// A caller-supplied mask: true where the key is visible. It narrows the position rule (causal,
/// window), never widens it.
template <class M>
concept mask_predicate = std::copy_constructible<M> && requires(const M& m, const mask_args& a) {
  { m(a) } -> std::convertible_to<bool>;
};

/// The default predicate: every key the position rule allows.
struct no_mask {
  constexpr bool operator()(const mask_args&) const { return true; }  ///< always visible
};

/// How many keys of a block a block of queries sees: none (skip), some (mask per key) or all.
enum class block_visibility { none, partial, full };

/// Causal rule and sliding window. With q >= k the distance q - k is exact in uint64, so no
/// pair of int64 positions overflows.
struct position_mask {
  bool causal = true;       ///< keys after the query are hidden
  std::int64_t window = 0;  ///< 0: none

  /// q - k for k <= q, exact for any int64 pair.
  static std::uint64_t distance(std::int64_t q, std::int64_t k) {
    return static_cast<std::uint64_t>(q) - static_cast<std::uint64_t>(k);
  }
  /// The window keeps key k for query q (future keys are the causal rule's business).
  bool in_window(std::int64_t q, std::int64_t k) const {
    return window == 0 || k > q || distance(q, k) < static_cast<std::uint64_t>(window);
  }
  /// Query at q sees the key at k.
  bool visible(std::int64_t q, std::int64_t k) const {
    return (!causal || k <= q) && in_window(q, k);
  }

  /// Visibility of every key with position in [kmin, kmax] from every query in [qmin, qmax].
  block_visibility block(std::int64_t qmin, std::int64_t qmax, std::int64_t kmin,
                         std::int64_t kmax) const {
    // Some pair visible: causal needs kmin <= qmax; the closest pair (k <= q) is then
    // k* = min(kmax, qmax), q* = max(qmin, k*). Without causal, a future key is always visible.
    bool any;
    if (causal) {
      if (kmin > qmax) return block_visibility::none;
      const std::int64_t ks = kmax < qmax ? kmax : qmax, qs = qmin > ks ? qmin : ks;
      any = in_window(qs, ks);
    } else {
      any = kmax > qmin || in_window(qmin, kmax);
    }
    if (!any) return block_visibility::none;
    // Every pair visible: causal needs kmax <= qmin; the window needs the farthest past pair
    // (qmax, kmin) inside it.
    const bool all = (!causal || kmax <= qmin) && (kmin > qmax || in_window(qmax, kmin));
    return all ? block_visibility::full : block_visibility::partial;
  }
};

/// ALiBi and soft-capping, applied to the scaled score before the mask.
struct logit_transform {
  float softcap = 0.f;                    ///< 0: none
  std::span<const float> alibi_slopes{};  ///< per query head; empty: none
  bool active() const { return softcap != 0.f || !alibi_slopes.empty(); }  ///< changes any score
  /// The transformed score of query head `head` at q_pos against the key at k_pos.
  float operator()(float s, std::int64_t q_pos, std::int64_t k_pos, std::int64_t head) const {
    if (!alibi_slopes.empty())
      s -= alibi_slopes[static_cast<std::size_t>(head)] *
           static_cast<float>(static_cast<double>(q_pos) - static_cast<double>(k_pos));
    if (softcap != 0.f) s = softcap * std::tanh(s / softcap);
    return s;
  }
};

namespace detail {
/// The runtime policy of one call, validated from attention_options for `heads` query heads.
struct attention_policy {
  position_mask positions;
  logit_transform logits;
  std::span<const float> sinks;
};

inline attention_policy make_policy(const attention_options& opt, std::int64_t heads,
                                    const char* who) {
  using detail::require;
  if (opt.window) require(*opt.window >= 1, who, ": window must be >= 1, got ", *opt.window);
  if (opt.logit_softcap)
    require(std::isfinite(*opt.logit_softcap) && *opt.logit_softcap > 0, who,
            ": logit_softcap must be finite and > 0, got ", *opt.logit_softcap);
  require(opt.alibi_slopes.empty() || static_cast<std::int64_t>(opt.alibi_slopes.size()) == heads,
          who, ": alibi_slopes has ", opt.alibi_slopes.size(), " entries but there are ", heads,
          " query heads");
  require(opt.sinks.empty() || static_cast<std::int64_t>(opt.sinks.size()) == heads, who,
          ": sinks has ", opt.sinks.size(), " entries but there are ", heads, " query heads");
  return {{opt.causal, opt.window.value_or(0)},
          {opt.logit_softcap.value_or(0.f), opt.alibi_slopes},
          opt.sinks};
}
}  // namespace detail

}  // namespace attnkit
