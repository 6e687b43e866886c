#pragma once
// Batched attention: one call per layer for many sequences, each with its own queries,
// positions and KV view (contiguous or paged), in the plan/run form of FlashInfer and vLLM's CPU
// backend. plan_batch splits the batch's work once per step (kernels/batch_driver.hpp); every
// layer of the step runs attend_batch with that plan. The queries of all sequences are stacked:
// sequence s owns rows [q_indptr[s], q_indptr[s + 1]) of q, q_positions, out and lse.
//
//   gqa_batch<S>         MHA / GQA / MQA (attend per sequence),
//   latent_batch<S>      absorbed MLA (attend_latent per sequence),
//   factorized_batch<S>  TPA (attend_factorized per sequence).
//
// Options are the single-sequence calls' (scale, causal, window, soft-cap, ALiBi, sinks, LSE
// out, tile strategy) and hold for every sequence; weights out and custom masks are per-call
// features of attend and are not offered here. A sequence's answer is the single-sequence
// call's, to float round-off (its key splits may differ).
#include <cstdint>
#include <span>
#include <vector>

#include "../cache/kv_view.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/options.hpp"
#include "../core/view.hpp"
#include "../core/workspace.hpp"
#include "batch_driver.hpp"
#include "gqa.hpp"
#include "mla.hpp"
#include "tpa.hpp"

namespace attnkit {

/// A batch of GQA-family sequences.
template <storage_type S>
struct gqa_batch {
  tensor3_view<const float> q;                ///< [sum Tq, H, d_qk], roped
  std::span<const std::int64_t> q_positions;  ///< [sum Tq]
  std::span<const std::int64_t> q_indptr;     ///< [n + 1]
  std::span<const kv_view<S>> kv;             ///< [n]
};

/// A batch of absorbed-MLA sequences over latent views (kv_view::latent / paged_latent).
template <storage_type S>
struct latent_batch {
  tensor3_view<const float> q_latent;         ///< [sum Tq, H, d_c]
  tensor3_view<const float> q_rope;           ///< [sum Tq, H, d_R], roped
  std::span<const std::int64_t> q_positions;  ///< [sum Tq]
  std::span<const std::int64_t> q_indptr;     ///< [n + 1]
  std::span<const kv_view<S>> kv;             ///< [n]
};

/// A batch of TPA sequences.
template <storage_type S>
struct factorized_batch {
  tensor3_view<const float> a_q;              ///< [sum Tq, R_Q, H]
  tensor3_view<const float> b_q;              ///< [sum Tq, R_Q, d], roped
  std::span<const std::int64_t> q_positions;  ///< [sum Tq]
  std::span<const std::int64_t> q_indptr;     ///< [n + 1]
  std::span<const factor_view<S>> kv;         ///< [n]
};

namespace detail {

inline batch_rules rules_of(const attention_options& opt) {
  return {opt.causal, opt.window.value_or(0)};
}

/// What the GQA and latent entry points share: sequences of queries qx [sum Tq, H, d_qk]
/// against kv views.
template <storage_type S>
struct gqa_batch_runner {
  const char* who;
  tensor3_view<const float> q;
  std::span<const std::int64_t> q_positions, q_indptr;
  std::span<const kv_view<S>> kv;
  tensor3_view<float> out;
  matrix_view<float> lse;
  const attention_options& opt;
  std::optional<float> default_scale;

  batch_sequence<gqa_products<S>, no_mask> operator()(std::int64_t s) const {
    const batch_rows r = rows_of(q_indptr, s);
    const kv_view<S>& v = kv[static_cast<std::size_t>(s)];
    const auto qs = token_rows(q, r);
    const auto pos = q_positions.subspan(static_cast<std::size_t>(r.begin),
                                         static_cast<std::size_t>(r.size()));
    const auto os = token_rows(out, r);
    attention_options o = opt;
    o.lse = token_rows(lse, r);
    const attention_policy policy =
        validate_call(who, r.size(), q.extent(1), v.v_head_dim(), v.size(), pos, os, o);
    return {gqa_problem_of(who, qs, v, o, default_scale),
            attention_call<no_mask>{pos, policy, no_mask{}, os, o.lse}};
  }
};

template <storage_type S>
std::vector<attention_shape> gqa_shapes(const char* who, std::int64_t heads,
                                        std::span<const std::int64_t> q_indptr,
                                        std::span<const kv_view<S>> kv,
                                        const attention_options& opt) {
  std::vector<attention_shape> shapes;
  shapes.reserve(kv.size());
  for_each_sequence(who, static_cast<std::int64_t>(kv.size()), [&](std::int64_t s) {
    const kv_view<S>& v = kv[static_cast<std::size_t>(s)];
    require(heads > 0 && heads % v.kv_heads() == 0, who, ": heads=", heads,
            " must be a positive multiple of kv_heads=", v.kv_heads());
    const std::int64_t tq = rows_of(q_indptr, s).size();
    shapes.push_back(gqa_products<S>::shape_of(tq, heads, v, streams(opt, heads / v.kv_heads(), tq),
                                               opt.products == product_math::bf16));
  });
  return shapes;
}

template <storage_type S, class Exec>
void run_gqa_batch(const batch_plan& plan, batch_kind kind, const gqa_batch_runner<S>& seq,
                   Exec& exec, attention_workspace& ws) {
  const char* who = seq.who;
  require(plan.sequences() == static_cast<std::int64_t>(seq.kv.size()), who,
          ": the plan was made for ", plan.sequences(), " sequences, the batch has ",
          seq.kv.size());
  require(seq.opt.weights.empty(), who,
          ": weights output is a single-sequence feature (attend); it is not offered for batches");
  for_each_sequence(who, plan.sequences(), [&](std::int64_t s) {
    batch_access::check(plan, who, kind, s, gqa_products<S>::shape(seq(s).pb));
  });
  run_attention_batch<gqa_products<S>, no_mask>(plan, seq, exec, ws);
}

/// Output and LSE checks of every entry point: out [sum Tq, H, d_v], lse [sum Tq, H] or empty.
inline void validate_batch_outputs(const char* who, const tensor3_view<float>& out,
                                   std::int64_t tokens, std::int64_t heads, std::int64_t dv,
                                   const attention_options& opt) {
  require_extents(out, {tokens, heads, dv}, who, "out");
  if (!opt.lse.empty()) {
    require_extents(opt.lse, {tokens, heads}, who, "lse");
    require_disjoint(opt.lse, out, who, "lse", "out");
  }
}

/// Every view of a batch has the first one's geometry (what the stacked outputs assume).
template <storage_type S>
void require_same_geometry(const char* who, std::span<const kv_view<S>> kv) {
  for (std::size_t s = 1; s < kv.size(); ++s)
    require(kv[s].kv_heads() == kv[0].kv_heads() && kv[s].head_dim() == kv[0].head_dim() &&
                kv[s].v_head_dim() == kv[0].v_head_dim(),
            who, ": sequence ", s, "'s view has kv_heads=", kv[s].kv_heads(), ", head_dim=",
            kv[s].head_dim(), ", v_head_dim=", kv[s].v_head_dim(), "; sequence 0's has ",
            kv[0].kv_heads(), ", ", kv[0].head_dim(), ", ", kv[0].v_head_dim());
}

}  // namespace detail

/// Plans a GQA batch for the executor's workers. Shapes only are read; the plan is valid for
/// every layer (and step) whose batch has the same sequences' query-token counts and geometry.
template <storage_type S, class Exec = serial_executor>
batch_plan plan_batch(const gqa_batch<S>& b, const attention_options& opt = {},
                      const Exec& exec = Exec{}) {
  const char* who = "plan_batch";
  detail::validate_batch_rows(who, b.q_indptr, static_cast<std::int64_t>(b.kv.size()),
                              b.q.extent(0), b.q_positions);
  return detail::batch_access::plan(detail::batch_kind::gqa,
                                    detail::gqa_shapes(who, b.q.extent(1), b.q_indptr, b.kv, opt),
                                    detail::rules_of(opt), concurrency_of(exec));
}

/// GQA-family attention of every sequence of the batch: sequence s's queries against b.kv[s],
/// into its rows of out [sum Tq, H, d_v] (and of opt.lse [sum Tq, H]). `plan` from plan_batch
/// for a batch of this shape.
template <storage_type S, class Exec = serial_executor>
void attend_batch(const batch_plan& plan, const gqa_batch<S>& b, tensor3_view<float> out,
                  const attention_options& opt = {}, Exec&& exec = Exec{},
                  attention_workspace* ws = nullptr) {
  const char* who = "attend_batch";
  const auto n = static_cast<std::int64_t>(b.kv.size());
  detail::validate_batch_rows(who, b.q_indptr, n, b.q.extent(0), b.q_positions);
  if (n == 0) return;
  detail::require_same_geometry(who, b.kv);
  detail::validate_batch_outputs(who, out, b.q.extent(0), b.q.extent(1), b.kv[0].v_head_dim(), opt);
  detail::require_outputs_disjoint(who, out, opt, b.q, "q");
  attention_workspace local;
  const detail::gqa_batch_runner<S> seq{who, b.q, b.q_positions, b.q_indptr, b.kv, out,
                                        opt.lse, opt, {}};
  detail::run_gqa_batch(plan, detail::batch_kind::gqa, seq, exec, ws ? *ws : local);
}

/// Plans an absorbed-MLA batch (see the GQA plan_batch).
template <storage_type S, class Exec = serial_executor>
batch_plan plan_batch(const latent_batch<S>& b, const attention_options& opt = {},
                      const Exec& exec = Exec{}) {
  const char* who = "plan_batch";
  detail::validate_batch_rows(who, b.q_indptr, static_cast<std::int64_t>(b.kv.size()),
                              b.q_latent.extent(0), b.q_positions);
  return detail::batch_access::plan(
      detail::batch_kind::latent,
      detail::gqa_shapes(who, b.q_latent.extent(1), b.q_indptr, b.kv, opt),
      detail::rules_of(opt), concurrency_of(exec));
}

/// Absorbed-MLA attention of every sequence of the batch (attend_latent per sequence; opt.scale
/// defaults to 1/sqrt(d_c + d_R)): out [sum Tq, H, d_c].
template <storage_type S, class Exec = serial_executor>
void attend_batch(const batch_plan& plan, const latent_batch<S>& b, tensor3_view<float> out,
                  const attention_options& opt = {}, Exec&& exec = Exec{},
                  attention_workspace* ws = nullptr) {
  const char* who = "attend_batch";
  const auto n = static_cast<std::int64_t>(b.kv.size());
  const std::int64_t tokens = b.q_latent.extent(0);
  detail::validate_batch_rows(who, b.q_indptr, n, tokens, b.q_positions);
  if (n == 0) return;
  detail::require_same_geometry(who, b.kv);
  detail::validate_batch_outputs(who, out, tokens, b.q_latent.extent(1), b.kv[0].v_head_dim(),
                                 opt);
  for (const auto& [in, name] :
       {std::pair{b.q_latent, "q_latent"}, std::pair{b.q_rope, "q_rope"}})
    detail::require_outputs_disjoint(who, out, opt, in, name);
  attention_workspace local;
  attention_workspace& wsr = ws ? *ws : local;
  // Every sequence's kernel query rows, staged once for the batch.
  const auto qx = detail::latent_queries(who, b.q_latent, b.q_rope, b.kv[0], wsr);
  const detail::gqa_batch_runner<S> seq{
      who, qx,      b.q_positions, b.q_indptr, b.kv, out, opt.lse, opt,
      detail::latent_default_scale(b.kv[0].v_head_dim(), b.q_rope.extent(2))};
  detail::run_gqa_batch(plan, detail::batch_kind::latent, seq, exec, wsr);
}

/// Plans a TPA batch (see the GQA plan_batch).
template <storage_type S, class Exec = serial_executor>
batch_plan plan_batch(const factorized_batch<S>& b, const attention_options& opt = {},
                      const Exec& exec = Exec{}) {
  const char* who = "plan_batch";
  const auto n = static_cast<std::int64_t>(b.kv.size());
  detail::validate_batch_rows(who, b.q_indptr, n, b.a_q.extent(0), b.q_positions);
  std::vector<detail::attention_shape> shapes;
  shapes.reserve(b.kv.size());
  detail::for_each_sequence(who, n, [&](std::int64_t s) {
    const factor_view<S>& f = b.kv[static_cast<std::size_t>(s)];
    f.validate(who);
    shapes.push_back({detail::rows_of(b.q_indptr, s).size(), 1, f.heads, f.size(), f.v_head_dim,
                      f.heads, detail::tpa_products<S>::block});
  });
  return detail::batch_access::plan(detail::batch_kind::factorized, std::move(shapes),
                                    detail::rules_of(opt), concurrency_of(exec));
}

/// TPA attention of every sequence of the batch (attend_factorized per sequence):
/// out [sum Tq, H, d_v].
template <storage_type S, class Exec = serial_executor>
void attend_batch(const batch_plan& plan, const factorized_batch<S>& b, tensor3_view<float> out,
                  const attention_options& opt = {}, Exec&& exec = Exec{},
                  attention_workspace* ws = nullptr) {
  using detail::require;
  const char* who = "attend_batch";
  const auto n = static_cast<std::int64_t>(b.kv.size());
  const std::int64_t tokens = b.a_q.extent(0);
  detail::validate_batch_rows(who, b.q_indptr, n, tokens, b.q_positions);
  if (n == 0) return;
  const factor_view<S>& f0 = b.kv[0];
  for (std::size_t s = 1; s < b.kv.size(); ++s)
    require(b.kv[s].heads == f0.heads && b.kv[s].v_head_dim == f0.v_head_dim, who, ": sequence ",
            s, "'s view has heads=", b.kv[s].heads, ", v_head_dim=", b.kv[s].v_head_dim,
            "; sequence 0's has ", f0.heads, ", ", f0.v_head_dim);
  detail::validate_batch_outputs(who, out, tokens, f0.heads, f0.v_head_dim, opt);
  for (const auto& [in, name] : {std::pair{b.a_q, "a_q"}, std::pair{b.b_q, "b_q"}})
    detail::require_outputs_disjoint(who, out, opt, in, name);
  require(opt.weights.empty(), who,
          ": weights output is a single-sequence feature (attend); it is not offered for batches");
  require(plan.sequences() == n, who, ": the plan was made for ", plan.sequences(),
          " sequences, the batch has ", n);
  using V = detail::tpa_products<S>;
  auto seq = [&](std::int64_t s) -> detail::batch_sequence<V, no_mask> {
    const detail::batch_rows r = detail::rows_of(b.q_indptr, s);
    const factor_view<S>& fs = b.kv[static_cast<std::size_t>(s)];
    const auto pos = b.q_positions.subspan(static_cast<std::size_t>(r.begin),
                                           static_cast<std::size_t>(r.size()));
    const auto os = detail::token_rows(out, r);
    attention_options o = opt;
    o.lse = detail::token_rows(opt.lse, r);
    const detail::attention_policy policy =
        detail::validate_call(who, r.size(), fs.heads, fs.v_head_dim, fs.size(), pos, os, o);
    return {detail::tpa_problem_of(who, detail::token_rows(b.a_q, r), detail::token_rows(b.b_q, r),
                                   fs, o),
            detail::attention_call<no_mask>{pos, policy, no_mask{}, os, o.lse}};
  };
  detail::for_each_sequence(who, n, [&](std::int64_t s) {
    detail::batch_access::check(plan, who, detail::batch_kind::factorized, s, V::shape(seq(s).pb));
  });
  attention_workspace local;
  detail::run_attention_batch<V, no_mask>(plan, seq, exec, ws ? *ws : local);
}

}  // namespace attnkit
