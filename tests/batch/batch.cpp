// Batched attention (plan/run): a batch is the single-sequence calls of its sequences, for
// GQA-family, absorbed-MLA and TPA layers, over paged and contiguous views mixed in one batch,
// decodes, multi-token steps and prefill chunks mixed, one plan reused by several layers and by
// the next step; bad batches rejected naming the sequence.
#include <attnkit/reference/tpa.hpp>

#include <algorithm>
#include <numeric>

#include "gqa_fixture.hpp"

using namespace attnkit;
using namespace attnkit::test;

namespace {

/// Largest LSE difference, equal infinities (rows that saw no key) counting as 0.
double lse_diff(const fmat& got, const dmat& ref) {
  double m = 0;
  for (std::int64_t i = 0; i < got.size(); ++i)
    if (got.data()[i] != ref.data()[i]) m = std::max(m, std::abs(got.data()[i] - ref.data()[i]));
  return m;
}

/// One sequence of a test batch: its cache (paged or contiguous) and its new query tokens.
struct sequence_spec {
  std::int64_t keys, queries;
  bool paged;
};

/// A GQA batch over caches of S: K/V rows, the caches, the stacked queries.
template <storage_type S>
struct gqa_batch_data {
  std::int64_t h = 8, hkv = 2, d = 64;
  std::vector<sequence_spec> spec;
  std::vector<fmat> k, v;
  std::vector<std::vector<std::int64_t>> kpos;
  page_pool<S> pool;
  std::vector<paged_cache<S, paged_dense>> paged;
  std::vector<dense_cache<S>> flat;
  std::vector<kv_view<S>> views;
  fmat q;  // [sum Tq, H d]
  std::vector<std::int64_t> qpos, indptr;

  gqa_batch_data(std::mt19937_64& rng, std::vector<sequence_spec> s, std::int64_t page_size)
      : spec(std::move(s)), pool({.num_pages = pages_for(spec, page_size), .page_size = page_size,
                                  .token_elements = 2 * 2 * 64}) {
    indptr.push_back(0);
    std::int64_t tokens = 0;
    for (const auto& x : spec) tokens += x.queries;
    q = random_matrix(rng, tokens, h * d);
    for (const auto& x : spec) {
      k.push_back(random_matrix(rng, x.keys, hkv * d));
      v.push_back(random_matrix(rng, x.keys, hkv * d));
      kpos.push_back(gapped_positions(rng, x.keys, static_cast<std::int64_t>(rng() % 50), 2));
      // The new tokens are the last `queries` keys (a step appends them before attending).
      for (std::int64_t i = 0; i < x.queries; ++i)
        qpos.push_back(kpos.back()[static_cast<std::size_t>(x.keys - x.queries + i)]);
      indptr.push_back(indptr.back() + x.queries);
    }
    rebuild();
  }
  static std::int64_t pages_for(const std::vector<sequence_spec>& s, std::int64_t ps) {
    std::int64_t n = 0;
    for (const auto& x : s) n += (x.keys + ps - 1) / ps;
    return n;
  }
  /// Caches holding every sequence's keys; views of them in batch order.
  void rebuild() {
    paged.clear(), flat.clear(), views.clear();
    for (std::size_t i = 0; i < spec.size(); ++i) {
      const std::int64_t t = spec[i].keys;
      const dense_append a{tensor3_view<const float>(k[i].data(), {t, hkv, d}),
                           tensor3_view<const float>(v[i].data(), {t, hkv, d}), kpos[i]};
      if (spec[i].paged) {
        paged.emplace_back(pool, paged_dense{hkv, d, d});
        paged.back().append(a);
      } else {
        flat.emplace_back(dense_cache_config{hkv, d, d, t});
        flat.back().append(a);
      }
    }
    std::size_t ip = 0, ifl = 0;
    for (const auto& x : spec) views.push_back(x.paged ? paged[ip++].view() : flat[ifl++].view());
  }
  gqa_batch<S> batch() const {
    return {tensor3_view<const float>(q.data(), {q.rows(), h, d}), qpos, indptr, views};
  }
  /// Sequence i's queries against its view, one attend call: out rows and LSE.
  std::pair<fmat, fmat> single(std::size_t i, const attention_options& base) const {
    const std::int64_t b = indptr[i], n = indptr[i + 1] - b;
    fmat out(n, h * d), lse(n, h);
    attention_options opt = base;
    opt.lse = matrix_view<float>(lse.data(), {n, h});
    attend(tensor3_view<const float>(q.data() + b * q.cols(), {n, h, d}),
           std::span(qpos).subspan(static_cast<std::size_t>(b), static_cast<std::size_t>(n)),
           views[i], tensor3_view<float>(out.data(), {n, h, d}), opt);
    return {out, lse};
  }
  /// The double reference of sequence i.
  reference::attention_result reference_of(std::size_t i, const attention_options& opt) const {
    const std::int64_t b = indptr[i], n = indptr[i + 1] - b;
    return reference::attention(to_double(q.middleRows(b, n)),
                                std::span(qpos).subspan(static_cast<std::size_t>(b),
                                                        static_cast<std::size_t>(n)),
                                to_double(round_trip<S>(k[i])), to_double(round_trip<S>(v[i])),
                                kpos[i], h, hkv, 1 / std::sqrt(double(d)), opt.causal, opt.window);
  }
  double a_max(std::size_t i) const {
    return max_segment_norm(to_double(q), d) * max_segment_norm(to_double(k[i]), d) /
           std::sqrt(double(d));
  }
};

/// Every sequence of the batch output equals its single call (float tolerance: the key splits
/// may differ) and the double reference; the LSE too.
template <storage_type S>
void check_against_singles(const gqa_batch_data<S>& x, const fmat& out, const fmat& lse,
                           const attention_options& opt) {
  for (std::size_t i = 0; i < x.spec.size(); ++i) {
    const std::int64_t b = x.indptr[i], n = x.indptr[i + 1] - b;
    if (n == 0) continue;  // a sequence with no new token this step
    const auto [single, single_lse] = x.single(i, opt);
    const auto ref = x.reference_of(i, opt);
    const double v_max = x.v[i].cwiseAbs().maxCoeff(), a = x.a_max(i);
    const double tol = float_tolerance(x.d, x.spec[i].keys, a, v_max) +
                       (std::same_as<S, float> ? 0 : storage_tolerance<S>(a, v_max));
    INFO("sequence " << i << " keys " << x.spec[i].keys << " queries " << n << " paged "
                     << x.spec[i].paged << " tolerance " << tol);
    CHECK(max_abs_diff(to_double(out.middleRows(b, n)), ref.out) <= tol);
    CHECK(max_abs_diff(to_double(out.middleRows(b, n)), to_double(single)) <= 2 * tol);
    CHECK(lse_diff(lse.middleRows(b, n), ref.lse) <= u * (16 + 4 * a));
  }
}

template <storage_type S, class Exec>
void run_mixed_batch(std::mt19937_64& rng, Exec&& exec, std::int64_t page_size) {
  // Decodes of spread lengths, a multi-token (speculative) step, prefill chunks, a long decode
  // the plan must split, an empty sequence, one prefill from scratch; paged and contiguous.
  std::vector<sequence_spec> spec = {{300, 1, true},   {1200, 1, false}, {57, 4, true},
                                     {700, 96, true},  {5000, 1, true},  {0, 0, true},
                                     {130, 130, false}, {33, 1, true},   {1, 1, true}};
  gqa_batch_data<S> x(rng, spec, page_size);
  for (const bool causal : {true, false}) {
    attention_options opt{.causal = causal};
    if (!causal) opt.window = 100;
    const batch_plan plan = plan_batch(x.batch(), opt, exec);
    fmat out(x.q.rows(), x.h * x.d), lse(x.q.rows(), x.h);
    opt.lse = matrix_view<float>(lse.data(), {lse.rows(), x.h});
    attend_batch(plan, x.batch(), tensor3_view<float>(out.data(), {out.rows(), x.h, x.d}), opt,
                 exec);
    opt.lse = {};
    INFO("page_size " << page_size << " causal " << causal << " workers "
                      << concurrency_of(exec));
    check_against_singles(x, out, lse, opt);
  }
}

}  // namespace

TEST_CASE("GQA batch: each sequence's rows equal its single attend call and the double reference") {
  std::mt19937_64 rng(201);
  thread_pool pool(3);
  for (const std::int64_t ps : {1, 16, 64}) {
    run_mixed_batch<float>(rng, serial_executor{}, ps);
    run_mixed_batch<float>(rng, pool, ps);
  }
  run_mixed_batch<bf16>(rng, pool, 16);
  run_mixed_batch<half>(rng, pool, 16);
}

TEST_CASE("GQA batch of one sequence: bitwise its single attend call") {
  // A batch of one runs the single-sequence driver: the same blocks and splits.
  std::mt19937_64 rng(205);
  for (const sequence_spec& one :
       {sequence_spec{5000, 1, true}, sequence_spec{700, 96, false}, sequence_spec{300, 3, true}}) {
    gqa_batch_data<float> x(rng, {one}, 16);
    const attention_options opt{.causal = true};
    fmat out(x.q.rows(), x.h * x.d), lse(x.q.rows(), x.h);
    attention_options with_lse = opt;
    with_lse.lse = matrix_view<float>(lse.data(), {lse.rows(), x.h});
    attend_batch(plan_batch(x.batch(), opt), x.batch(),
                 tensor3_view<float>(out.data(), {out.rows(), x.h, x.d}), with_lse);
    const auto [single, single_lse] = x.single(0, opt);
    INFO("keys " << one.keys << " queries " << one.queries << " paged " << one.paged);
    CHECK((out.array() == single.array()).all());
    CHECK((lse.array() == single_lse.array()).all());
  }
}

TEST_CASE("GQA batch: the plan splits a long sequence beside short ones and is balanced") {
  std::mt19937_64 rng(202);
  std::vector<sequence_spec> spec(40, {200, 1, true});
  spec[7] = {20000, 1, true};
  gqa_batch_data<float> x(rng, spec, 16);
  thread_pool pool(4);
  const batch_plan plan = plan_batch(x.batch(), {.causal = true}, pool);
  CHECK(plan.sequences() == 40);
  CHECK(plan.workers() == 4);
  CHECK(plan.splits(7) > 1);  // the long one is cut into key splits
  CHECK(plan.splits(0) == 1);
  fmat out(x.q.rows(), x.h * x.d), lse(x.q.rows(), x.h);
  attention_options opt{.causal = true};
  opt.lse = matrix_view<float>(lse.data(), {lse.rows(), x.h});
  attend_batch(plan, x.batch(), tensor3_view<float>(out.data(), {out.rows(), x.h, x.d}), opt, pool);
  opt.lse = {};
  check_against_singles(x, out, lse, opt);
  // One sequence alone: the single-sequence planner's split count (2 KV heads, 4 workers: 8).
  gqa_batch_data<float> one(rng, {{20000, 1, false}}, 16);
  CHECK(plan_batch(one.batch(), {.causal = true}, pool).splits(0) == 8);
}

TEST_CASE("GQA batch: one plan serves every layer of a step and the next decode step") {
  std::mt19937_64 rng(203);
  std::vector<sequence_spec> spec = {{100, 1, true}, {900, 1, true}, {40, 3, false}};
  gqa_batch_data<float> layer0(rng, spec, 16), layer1(rng, spec, 16);
  thread_pool pool(2);
  attention_workspace ws;
  const attention_options opt{.causal = true};
  const batch_plan plan = plan_batch(layer0.batch(), opt, pool);
  for (auto* x : {&layer0, &layer1}) {
    fmat out(x->q.rows(), x->h * x->d), lse(x->q.rows(), x->h);
    attention_options o = opt;
    o.lse = matrix_view<float>(lse.data(), {lse.rows(), x->h});
    attend_batch(plan, x->batch(), tensor3_view<float>(out.data(), {out.rows(), x->h, x->d}), o,
                 pool, &ws);
    check_against_singles(*x, out, lse, opt);
  }
  // The next step: every sequence one key longer, the same query counts: the plan still serves.
  for (auto& s : layer0.spec) s.keys += 1;
  gqa_batch_data<float> next(rng, layer0.spec, 16);
  fmat out(next.q.rows(), next.h * next.d), lse(next.q.rows(), next.h);
  attention_options o = opt;
  o.lse = matrix_view<float>(lse.data(), {lse.rows(), next.h});
  attend_batch(plan, next.batch(), tensor3_view<float>(out.data(), {out.rows(), next.h, next.d}),
               o, pool, &ws);
  check_against_singles(next, out, lse, opt);
}

TEST_CASE("MLA and TPA batches: each sequence's rows equal its single call") {
  std::mt19937_64 rng(204);
  const std::vector<sequence_spec> spec = {{400, 1, true}, {90, 5, false}, {3000, 1, true},
                                           {64, 64, true}};
  std::int64_t tokens = 0;
  std::vector<std::int64_t> indptr = {0}, qpos;
  std::vector<std::vector<std::int64_t>> kpos;
  for (const auto& s : spec) {
    kpos.emplace_back(static_cast<std::size_t>(s.keys));
    std::iota(kpos.back().begin(), kpos.back().end(), 0);
    for (std::int64_t i = 0; i < s.queries; ++i) qpos.push_back(s.keys - s.queries + i);
    indptr.push_back(tokens += s.queries);
  }
  thread_pool pool(3);
  const attention_options opt{.causal = true};
  {  // absorbed MLA: latent caches
    const std::int64_t h = 16, dc = 64, dr = 16;
    page_pool<float> pages({.num_pages = 2048, .page_size = 16, .token_elements = dc + dr});
    std::vector<paged_cache<float, paged_latent>> paged;
    std::vector<latent_cache<float>> flat;
    std::vector<kv_view<float>> views;
    std::vector<fmat> c, kr;
    for (std::size_t i = 0; i < spec.size(); ++i) {
      c.push_back(random_matrix(rng, spec[i].keys, dc));
      kr.push_back(random_matrix(rng, spec[i].keys, dr));
      const latent_append a{view_of(c.back()),
                            tensor3_view<const float>(kr.back().data(), {spec[i].keys, 1, dr}),
                            kpos[i]};
      if (spec[i].paged) paged.emplace_back(pages, paged_latent{dc, dr, 1}), paged.back().append(a);
      else flat.emplace_back(latent_cache_config{dc, dr, 1, spec[i].keys}), flat.back().append(a);
    }
    for (std::size_t i = 0, ip = 0, ifl = 0; i < spec.size(); ++i)
      views.push_back(spec[i].paged ? paged[ip++].view() : flat[ifl++].view());
    const fmat ql = random_matrix(rng, tokens, h * dc, 0.3f), qr = random_matrix(rng, tokens, h * dr);
    const latent_batch<float> b{tensor3_view<const float>(ql.data(), {tokens, h, dc}),
                                tensor3_view<const float>(qr.data(), {tokens, h, dr}), qpos,
                                indptr, views};
    fmat out(tokens, h * dc);
    attend_batch(plan_batch(b, opt, pool), b, tensor3_view<float>(out.data(), {tokens, h, dc}),
                 opt, pool);
    for (std::size_t i = 0; i < spec.size(); ++i) {
      const std::int64_t s0 = indptr[i], n = indptr[i + 1] - s0;
      fmat single(n, h * dc);
      attend_latent(tensor3_view<const float>(ql.data() + s0 * h * dc, {n, h, dc}),
                    tensor3_view<const float>(qr.data() + s0 * h * dr, {n, h, dr}),
                    std::span(qpos).subspan(static_cast<std::size_t>(s0), static_cast<std::size_t>(n)),
                    views[i], tensor3_view<float>(single.data(), {n, h, dc}), opt);
      dmat q(n, h * (dc + dr)), k(spec[i].keys, dc + dr);
      for (std::int64_t t = 0; t < n; ++t)
        for (std::int64_t hh = 0; hh < h; ++hh)
          q.row(t).segment(hh * (dc + dr), dc + dr)
              << ql.row(s0 + t).segment(hh * dc, dc).cast<double>(),
              qr.row(s0 + t).segment(hh * dr, dr).cast<double>();
      k << to_double(c[i]), to_double(kr[i]);
      const double scale = 1 / std::sqrt(double(dc + dr));
      const auto ref = reference::attention(
          q, std::span(qpos).subspan(static_cast<std::size_t>(s0), static_cast<std::size_t>(n)), k,
          k.leftCols(dc), kpos[i], h, 1, scale, true, std::nullopt);
      const double tol = u * c[i].cwiseAbs().maxCoeff() *
                         (4 + 3 * scale * max_segment_norm(q, dc + dr) * max_segment_norm(k, dc + dr));
      INFO("MLA sequence " << i << " tolerance " << tol);
      CHECK(max_abs_diff(to_double(out.middleRows(s0, n)), ref.out) <= tol);
      CHECK(max_abs_diff(to_double(out.middleRows(s0, n)), to_double(single)) <= 2 * tol);
    }
  }
  {  // TPA: factorized caches
    const std::int64_t h = 8, d = 32, rq = 2, rk = 2, rv = 2;
    page_pool<float> pages(
        {.num_pages = 2048, .page_size = 16, .token_elements = rk * (h + d) + rv * (h + d)});
    const paged_factors layout{.heads = h, .head_dim = d, .k_rank = rk, .v_rank = rv};
    std::vector<paged_cache<float, paged_factors>> paged;
    std::vector<factorized_cache<float>> flat;
    std::vector<factor_view<float>> views;
    std::vector<fmat> f;
    for (std::size_t i = 0; i < spec.size(); ++i) {
      const std::int64_t t = spec[i].keys;
      for (const std::int64_t w : {rk * h, rk * d, rv * h, rv * d}) f.push_back(random_matrix(rng, t, w));
      const fmat* x = &f[f.size() - 4];
      const factorized_append a{tensor3_view<const float>(x[0].data(), {t, rk, h}),
                                tensor3_view<const float>(x[1].data(), {t, rk, d}),
                                tensor3_view<const float>(x[2].data(), {t, rv, h}),
                                tensor3_view<const float>(x[3].data(), {t, rv, d}), kpos[i]};
      if (spec[i].paged) paged.emplace_back(pages, layout), paged.back().append(a);
      else flat.emplace_back(factorized_cache_config{.heads = h, .head_dim = d, .k_rank = rk, .v_rank = rv, .capacity = t}), flat.back().append(a);
    }
    for (std::size_t i = 0, ip = 0, ifl = 0; i < spec.size(); ++i)
      views.push_back(spec[i].paged ? paged[ip++].view() : flat[ifl++].view());
    const fmat aq = random_matrix(rng, tokens, rq * h), bq = random_matrix(rng, tokens, rq * d);
    const factorized_batch<float> b{tensor3_view<const float>(aq.data(), {tokens, rq, h}),
                                    tensor3_view<const float>(bq.data(), {tokens, rq, d}), qpos,
                                    indptr, views};
    fmat out(tokens, h * d);
    attend_batch(plan_batch(b, opt, pool), b, tensor3_view<float>(out.data(), {tokens, h, d}),
                 opt, pool);
    for (std::size_t i = 0; i < spec.size(); ++i) {
      const std::int64_t s0 = indptr[i], n = indptr[i + 1] - s0;
      fmat single(n, h * d);
      attend_factorized(tensor3_view<const float>(aq.data() + s0 * rq * h, {n, rq, h}),
                        tensor3_view<const float>(bq.data() + s0 * rq * d, {n, rq, d}),
                        std::span(qpos).subspan(static_cast<std::size_t>(s0), static_cast<std::size_t>(n)),
                        views[i], tensor3_view<float>(single.data(), {n, h, d}), opt);
      const dmat q = reference::tpa_materialise(to_double(aq.middleRows(s0, n)),
                                                to_double(bq.middleRows(s0, n)), rq, h, 1.0);
      const dmat k = reference::tpa_materialise(to_double(f[4 * i]), to_double(f[4 * i + 1]), rk,
                                                h, 1.0 / rk);
      const dmat v = reference::tpa_materialise(to_double(f[4 * i + 2]), to_double(f[4 * i + 3]),
                                                rv, h, 1.0 / rv);
      const double scale = 1 / std::sqrt(double(d));
      const double tol = u * v.cwiseAbs().maxCoeff() *
                         (4 + 3 * scale * max_segment_norm(q, d) * max_segment_norm(k, d));
      const auto ref = reference::attention(q, std::span(qpos).subspan(static_cast<std::size_t>(s0), static_cast<std::size_t>(n)),
                                            k, v, kpos[i], h, h, scale, true, std::nullopt);
      INFO("TPA sequence " << i << " tolerance " << tol);
      CHECK(max_abs_diff(to_double(out.middleRows(s0, n)), ref.out) <= tol);
      CHECK(max_abs_diff(to_double(out.middleRows(s0, n)), to_double(single)) <= 2 * tol);
    }
  }
}

TEST_CASE("batch: bad batches and plans are rejected naming the sequence and the values") {
  std::mt19937_64 rng(205);
  gqa_batch_data<float> x(rng, {{50, 2, true}, {80, 1, false}, {20, 3, true}}, 16);
  const attention_options opt{.causal = true};
  const batch_plan plan = plan_batch(x.batch(), opt);
  fmat out(x.q.rows(), x.h * x.d);
  const tensor3_view<float> ov(out.data(), {out.rows(), x.h, x.d});
  auto b = x.batch();
  // Positions out of order within a sequence.
  std::vector<std::int64_t> bad_pos = x.qpos;
  std::swap(bad_pos[3], bad_pos[4]);
  auto bb = b;
  bb.q_positions = bad_pos;
  ATTNKIT_CHECK_INVALID(attend_batch(plan, bb, ov, opt), "attend_batch", "sequence 2",
                        "out of order");
  // q_indptr that does not cover the queries, or runs backwards.
  const std::vector<std::int64_t> short_ptr = {0, 2, 3, 5}, back_ptr = {0, 3, 2, 6};
  bb = b, bb.q_indptr = short_ptr;
  ATTNKIT_CHECK_INVALID(attend_batch(plan, bb, ov, opt), "q_indptr ends at 5", "6 tokens");
  bb = b, bb.q_indptr = back_ptr;
  ATTNKIT_CHECK_INVALID(attend_batch(plan, bb, ov, opt), "sequence 1 has query rows [3, 2)");
  // A plan for another batch shape, for another variant, or an empty one.
  gqa_batch_data<float> other(rng, {{50, 1, true}, {80, 1, false}, {20, 3, true}}, 16);
  ATTNKIT_CHECK_INVALID(attend_batch(plan_batch(other.batch(), opt), b, ov, opt), "sequence 0",
                        "another shape", "Tq=2", "Tq=1");
  ATTNKIT_CHECK_INVALID(attend_batch(batch_plan{}, b, ov, opt), "made for 0 sequences");
  // A view whose page table points outside its pool is caught when the view is made.
  const std::vector<std::int32_t> table = {0, 99};
  ATTNKIT_CHECK_INVALID(
      kv_view<float>::paged({x.pool.data(), 16 * 64, 64, 64, x.pool.page_stride()},
                            {x.pool.data() + 2 * 16 * 64, 16 * 64, 64, 64, x.pool.page_stride()},
                            2, page_table{table, 16}, 50, std::span(x.kpos[0]).first(20)),
      "page table entry 1 is page 99", "[0, 50)");
  // Outputs of the wrong shape; a view of another geometry.
  fmat small(x.q.rows() - 1, x.h * x.d);
  ATTNKIT_CHECK_INVALID(
      attend_batch(plan, b, tensor3_view<float>(small.data(), {small.rows(), x.h, x.d}), opt),
      "attend_batch", "out");
  dense_cache<float> narrow({.kv_heads = 2, .head_dim = 32, .capacity = 10});
  std::vector<kv_view<float>> views = x.views;
  views[1] = narrow.view();
  bb = b, bb.kv = views;
  ATTNKIT_CHECK_INVALID(attend_batch(plan, bb, ov, opt), "sequence 1's view has", "head_dim=32");
  // Weights out is not a batch feature.
  fmat w(x.q.rows(), x.h * 100);
  attention_options wo = opt;
  wo.weights = tensor3_view<float>(w.data(), {x.q.rows(), x.h, 100});
  ATTNKIT_CHECK_INVALID(attend_batch(plan, b, ov, wo), "weights output");
}
