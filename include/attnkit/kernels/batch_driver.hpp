#pragma once
// The attention driver over a batch of sequences: one plan for the whole batch, one parallel
// loop over every sequence's work items, each (query tile, head group)'s key splits merged by the
// worker that finishes its last one. The per-item work is the single-sequence driver's
// (attention_worker in kernels/driver.hpp); only the planning and the item list are the batch's.
//
// Planning (plan_batch_shapes) sees every sequence's shape: its query tiles x head groups are
// its base items, each with an estimated cost (rows plus a fixed memory term, times the keys
// it sees under the causal rule and window, assuming the queries are the sequence's newest
// tokens). A base item larger than a quarter of a worker's fair share of the batch is cut into
// key splits (each at least min_split_keys), so one long sequence does not leave workers idle
// beside many short ones; items then run from one atomic counter, the sequences with the largest
// items first, each sequence's items together (they share its keys in cache) and largest first. For
// one sequence the rule gives the single-sequence planner's split counts.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "../core/error.hpp"
#include "../core/workspace.hpp"
#include "driver.hpp"

namespace attnkit {

namespace detail {
struct batch_access;
/// Which entry point a plan is for.
enum class batch_kind { none, gqa, latent, factorized };
inline const char* name_of(batch_kind k) {
  return k == batch_kind::gqa          ? "gqa_batch"
         : k == batch_kind::latent     ? "latent_batch"
         : k == batch_kind::factorized ? "factorized_batch"
                                       : "nothing (an empty plan)";
}
}  // namespace detail

/// The work split of one batch step, made once by plan_batch and reused by every layer of the
/// step (and by later steps while the batch keeps its shape: its sequences' query-token counts
/// and the layer geometry; key counts may grow, the balance then being the planned one).
class batch_plan {
 public:
  batch_plan() = default;
  std::int64_t sequences() const { return static_cast<std::int64_t>(seq_.size()); }  ///< batch size
  /// Work items of the whole batch (sequence x query tile x head group x key split).
  std::int64_t items() const { return static_cast<std::int64_t>(items_.size()); }
  /// Key splits planned for sequence s.
  std::int64_t splits(std::int64_t s) const { return seq_.at(static_cast<std::size_t>(s)).splits; }
  int workers() const { return workers_; }  ///< the executor concurrency it was planned for

 private:
  friend struct detail::batch_access;
  struct item {
    std::int32_t seq, qt, j, ks;
  };
  detail::batch_kind kind_ = detail::batch_kind::none;  // the entry point it was made for
  std::vector<detail::attention_shape> shape_;  // [n]: as planned (keys as seen then)
  std::vector<detail::attention_plan> seq_;     // [n]
  std::vector<std::int64_t> partial_at_;        // [n]: floats into the partial buffer
  std::vector<std::int64_t> pairs_at_;          // [n]: its first split counter
  std::vector<item> items_;                     // largest estimated cost first
  std::int64_t partial_floats_ = 0;
  std::int64_t split_pairs_ = 0;  // (query tile, head group) pairs with key splits, all sequences
  int workers_ = 1;
};

namespace detail {

/// What planning needs of a batch besides the shapes: the position rules that bound the keys a
/// query tile sees.
struct batch_rules {
  bool causal = false;
  std::int64_t window = 0;  // 0: none
};

struct batch_access {
  /// Plans sequences of the given shapes for `workers` workers.
  static batch_plan plan(batch_kind kind, std::vector<attention_shape> shapes,
                         const batch_rules& rules, int workers) {
    batch_plan bp;
    bp.kind_ = kind;
    bp.workers_ = std::max(workers, 1);
    const std::size_t n = shapes.size();
    bp.seq_.reserve(n);
    // Estimated cost of query tile qt of a sequence: (rows + a memory term) x keys it sees.
    constexpr std::int64_t memory_rows = 16;
    auto tile_cost = [&](const attention_shape& s, const attention_plan& pl, std::int64_t qt) {
      const std::int64_t t0 = qt * pl.tq, t1 = std::min(pl.q_tokens, t0 + pl.tq);
      std::int64_t keys = s.keys;
      if (rules.causal) keys = std::max<std::int64_t>(0, keys - (pl.q_tokens - t1));
      if (rules.window > 0) keys = std::min(keys, rules.window + (t1 - t0));
      return static_cast<double>((t1 - t0) * pl.g + memory_rows) * static_cast<double>(keys);
    };
    double total = 0;
    std::vector<double> largest(n, 0.0);  // [n]: the sequence's largest tile cost
    for (std::size_t s = 0; s < n; ++s) {
      const attention_plan pl = tile_attention(shapes[s]);
      for (std::int64_t qt = 0; qt < pl.qtiles; ++qt) {
        const double c = tile_cost(shapes[s], pl, qt);
        total += c * static_cast<double>(pl.groups);
        largest[s] = std::max(largest[s], c);
      }
      bp.seq_.push_back(pl);
    }
    // Split a sequence's items when its largest is above a quarter of a worker's share.
    const double target = total / (4.0 * bp.workers_);
    std::int64_t partial = 0, pairs = 0;
    bp.partial_at_.assign(n, 0);
    bp.pairs_at_.assign(n, 0);
    for (std::size_t s = 0; s < n; ++s) {
      attention_plan& pl = bp.seq_[s];
      if (target > 0 && largest[s] > target) {
        const auto want = static_cast<std::int64_t>(std::ceil(largest[s] / target));
        pl.splits = std::clamp<std::int64_t>(
            want, 1, std::max<std::int64_t>(1, pl.keys / min_split_keys(pl)));
      }
      pl.items = pl.qtiles * pl.groups * pl.splits;
      if (pl.splits > 1) {
        bp.partial_at_[s] = partial;
        partial += pl.items * pl.partial_stride();
        bp.pairs_at_[s] = pairs;
        pairs += pl.qtiles * pl.groups;
      }
    }
    bp.partial_floats_ = partial;
    bp.split_pairs_ = pairs;
    // Largest items first, but a sequence's items together (they read the same keys): the
    // sequences by their largest item, within one its items by cost.
    struct ranked {
      double seq_cost, cost;
      batch_plan::item it;
    };
    std::vector<ranked> order;
    for (std::size_t s = 0; s < n; ++s) {
      const attention_plan& pl = bp.seq_[s];
      const double seq_cost = largest[s] / static_cast<double>(pl.splits);
      for (std::int64_t qt = 0; qt < pl.qtiles; ++qt) {
        const double c = tile_cost(shapes[s], pl, qt) / static_cast<double>(pl.splits);
        for (std::int64_t j = 0; j < pl.groups; ++j)
          for (std::int64_t ks = 0; ks < pl.splits; ++ks)
            order.push_back({seq_cost, c,
                             {static_cast<std::int32_t>(s), static_cast<std::int32_t>(qt),
                              static_cast<std::int32_t>(j), static_cast<std::int32_t>(ks)}});
      }
    }
    std::stable_sort(order.begin(), order.end(), [](const ranked& a, const ranked& b) {
      if (a.seq_cost != b.seq_cost) return a.seq_cost > b.seq_cost;
      if (a.it.seq != b.it.seq) return a.it.seq < b.it.seq;
      return a.cost > b.cost;
    });
    bp.items_.reserve(order.size());
    for (const auto& o : order) bp.items_.push_back(o.it);
    bp.shape_ = std::move(shapes);
    return bp;
  }

  /// The plan's checks against the batch a run was given: the entry point, the sequence count
  /// and each sequence's shape (all but its key count).
  static void check(const batch_plan& bp, const char* who, batch_kind kind, std::int64_t s,
                    const attention_shape& got) {
    require(bp.kind_ == kind, who, ": the plan was made by plan_batch for ", name_of(bp.kind_),
            ", not for ", name_of(kind));
    const attention_shape& p = bp.shape_[static_cast<std::size_t>(s)];
    require(p.q_tokens == got.q_tokens && p.groups == got.groups &&
                p.group_heads == got.group_heads && p.v_head_dim == got.v_head_dim &&
                p.tile_rows == got.tile_rows && p.block == got.block,
            who, ": the plan was made for a batch of another shape: sequence ", s, " has Tq=",
            got.q_tokens, ", ", got.groups, " head groups of ", got.group_heads, ", d_v=",
            got.v_head_dim, ", tiles of ", got.tile_rows, " rows; the plan has Tq=", p.q_tokens,
            ", ", p.groups, " groups of ", p.group_heads, ", d_v=", p.v_head_dim, ", tiles of ",
            p.tile_rows, " rows");
  }
  static const std::vector<attention_shape>& shapes(const batch_plan& bp) { return bp.shape_; }
  static const attention_plan& seq(const batch_plan& bp, std::int64_t s) {
    return bp.seq_[static_cast<std::size_t>(s)];
  }
  static std::span<const batch_plan::item> items(const batch_plan& bp) { return bp.items_; }
  static std::int64_t partial_floats(const batch_plan& bp) { return bp.partial_floats_; }
  static std::int64_t partial_at(const batch_plan& bp, std::int64_t s) {
    return bp.partial_at_[static_cast<std::size_t>(s)];
  }
  static std::int64_t split_pairs(const batch_plan& bp) { return bp.split_pairs_; }
  static std::int64_t pairs_at(const batch_plan& bp, std::int64_t s) {
    return bp.pairs_at_[static_cast<std::size_t>(s)];
  }
};

/// One sequence of a batch as the driver runs it.
template <class Variant, class Mask>
struct batch_sequence {
  typename Variant::problem pb;
  attention_call<Mask> call;
};

/// Runs a planned batch: `sequence(s)` returns sequence s's batch_sequence (already validated,
/// and checked against the plan by the caller). Allocation-free once the workspace has grown to
/// the batch.
template <block_products Variant, class Mask, class Exec, class SequenceOf>
void run_attention_batch(const batch_plan& bp, SequenceOf&& sequence, Exec& exec,
                         attention_workspace& ws) {
  using worker_t = attention_worker<Variant, Mask>;
  using access = batch_access;
  const std::int64_t n = bp.sequences(), n_items = bp.items();
  if (n_items == 0) return;
  if (n == 1) {  // the single-sequence driver: the same split rule without the batch's bookkeeping
    const batch_sequence<Variant, Mask> e = sequence(0);
    run_attention<Variant>(e.pb, e.call, exec, &ws);
    return;
  }
  std::size_t floats = 0;
  std::int64_t rows = 0;
  for (std::int64_t s = 0; s < n; ++s) {
    const batch_sequence<Variant, Mask> e = sequence(s);
    floats = std::max(floats, worker_t::floats(e.pb, access::seq(bp, s)));
    rows = std::max(rows, access::seq(bp, s).rows);
  }
  const int want = concurrency_of(exec);
  const std::int64_t workers = std::min<std::int64_t>(want, n_items);
  float* partial = access::partial_floats(bp) > 0
                       ? workspace_access::partial(
                             ws, static_cast<std::size_t>(access::partial_floats(bp)))
                       : nullptr;
  workspace_access::reserve_workers(ws, static_cast<std::size_t>(want), floats,
                                    static_cast<std::size_t>(rows));
  // As in run_attention, the worker that finishes a pair's last key split merges it.
  std::int64_t* finished = partial ? workspace_access::split_counts(
                                         ws, static_cast<std::size_t>(access::split_pairs(bp)))
                                   : nullptr;
  const auto items = access::items(bp);
  std::atomic<std::int64_t> next{0};
  exec.parallel_for(workers, [&](std::int64_t w) {
    const auto wi = static_cast<std::size_t>(w);
    std::int64_t current = -1;
    std::optional<batch_sequence<Variant, Mask>> e;
    attention_plan pl{};
    std::optional<worker_t> worker;
    for (std::int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n_items;) {
      const auto& it = items[static_cast<std::size_t>(i)];
      if (it.seq != current) {  // a worker built for this sequence's problem and plan
        current = it.seq;
        worker.reset();
        e.emplace(sequence(current));
        pl = access::seq(bp, current);
        pl.keys = Variant::shape(e->pb).keys;  // the run's key count, which may have grown
        worker.emplace(e->pb, pl, e->call, workspace_access::worker_floats(ws, wi),
                       workspace_access::worker_ints(ws, wi));
      }
      if (pl.splits == 1) {
        worker->run(it.qt, it.j, it.ks, nullptr);
        continue;
      }
      float* seq_partial = partial + access::partial_at(bp, current);
      worker->run(it.qt, it.j, it.ks, pl.partial_of(seq_partial, it.qt, it.j, it.ks));
      const std::int64_t pair = it.qt * pl.groups + it.j;
      finish_split(finished[access::pairs_at(bp, current) + pair], pl, e->call, seq_partial, false,
                   pair);
    }
  });
  // A sequence on bf16 parts whose outputs are not all finite runs again on FMAs, alone.
  if constexpr (requires(const typename Variant::problem& pb) { pb.split_products; })
    for (std::int64_t s = 0; s < n; ++s) {
      const batch_sequence<Variant, Mask> e = sequence(s);
      if (splits_products<Variant>(e.pb) && outputs_non_finite(e.call))
        run_attention<Variant>(on_fmas(e.pb), e.call, exec, &ws);
    }
}

/// Sequence s of a batch: its query rows [q_indptr[s], q_indptr[s + 1]).
struct batch_rows {
  std::int64_t begin, end;
  std::int64_t size() const { return end - begin; }
};

/// Checks q_indptr [n + 1] (starting at 0, non-decreasing, ending at the stacked queries'
/// `tokens`) and q_positions [tokens] (non-decreasing within each sequence).
inline void validate_batch_rows(const char* who, std::span<const std::int64_t> q_indptr,
                                std::int64_t sequences, std::int64_t tokens,
                                std::span<const std::int64_t> q_positions) {
  require(static_cast<std::int64_t>(q_indptr.size()) == sequences + 1, who, ": q_indptr has ",
          q_indptr.size(), " entries for ", sequences, " sequences (needs ", sequences + 1, ")");
  require(q_indptr[0] == 0, who, ": q_indptr[0] must be 0, got ", q_indptr[0]);
  for (std::int64_t s = 0; s < sequences; ++s) {
    const std::int64_t b = q_indptr[static_cast<std::size_t>(s)],
                       e = q_indptr[static_cast<std::size_t>(s + 1)];
    require(e >= b && e <= tokens, who, ": sequence ", s, " has query rows [", b, ", ", e,
            ") outside the ", tokens, " stacked query tokens or reversed");
  }
  require(q_indptr[static_cast<std::size_t>(sequences)] == tokens, who, ": q_indptr ends at ",
          q_indptr[static_cast<std::size_t>(sequences)], " but the queries have ", tokens,
          " tokens");
  require(static_cast<std::int64_t>(q_positions.size()) == tokens, who, ": q_positions has ",
          q_positions.size(), " entries but the queries have ", tokens, " tokens");
  for (std::int64_t s = 0; s < sequences; ++s)
    for (std::int64_t t = q_indptr[static_cast<std::size_t>(s)] + 1;
         t < q_indptr[static_cast<std::size_t>(s + 1)]; ++t)
      require(q_positions[static_cast<std::size_t>(t)] >=
                  q_positions[static_cast<std::size_t>(t - 1)],
              who, ": sequence ", s, " has query positions out of order: ",
              q_positions[static_cast<std::size_t>(t - 1)], " then ",
              q_positions[static_cast<std::size_t>(t)]);
}

inline batch_rows rows_of(std::span<const std::int64_t> q_indptr, std::int64_t s) {
  return {q_indptr[static_cast<std::size_t>(s)], q_indptr[static_cast<std::size_t>(s + 1)]};
}

/// Rows [r.begin, r.end) of a view whose first extent is tokens.
template <class T, std::size_t Rank>
strided_view<T, Rank> token_rows(const strided_view<T, Rank>& v, const batch_rows& r) {
  if (v.empty()) return v;
  auto e = v.extents();
  e[0] = r.size();
  return strided_view<T, Rank>(v.slice_ptr(r.begin), e, v.strides());
}

/// Runs f(s) for every sequence; an attnkit::invalid_argument it throws is re-thrown naming
/// the sequence (the message is built only on that path).
template <class F>
void for_each_sequence(const char* who, std::int64_t n, F&& f) {
  for (std::int64_t s = 0; s < n; ++s) {
    try {
      f(s);
    } catch (const invalid_argument& e) {
      const std::string lead = std::string("attnkit: ") + who + ": ", what = e.what();
      const std::size_t skip = what.starts_with(lead)           ? lead.size()
                               : what.starts_with("attnkit: ") ? 9
                                                                : 0;
      throw invalid_argument(lead + "sequence " + std::to_string(s) + ": " + what.substr(skip));
    }
  }
}

}  // namespace detail

}  // namespace attnkit
