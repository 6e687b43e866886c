// Attention policies at the driver's seam, for every variant (GQA family, absorbed MLA, TPA):
// soft-capping (Gemma 2), attention sinks (gpt-oss), ALiBi (BLOOM, MPT), caller mask predicates
// (prefix-LM as in PaliGemma, packed documents, per-head masks), the position rule's block
// classification and overflow-free arithmetic, and the public state merge (cascade attention).
#include <attnkit/reference/tpa.hpp>

#include <limits>

#include "gqa_fixture.hpp"
#include "mla_fixture.hpp"
#include "tpa_fixture.hpp"

using namespace attnkit;
using namespace attnkit::test;

namespace {

/// A random policy of the kind a model family uses, as kernel options and as reference rules.
struct policy_case {
  std::string name;
  attention_options opt;
  reference::attention_rules rules;
  std::vector<float> slopes, sinks;
  double extra_logit = 0;  ///< largest |ALiBi bias|: adds to the score magnitude A
};

/// ALiBi slopes 2^(-8 (i + 1) / H) (Press et al.; BLOOM, MPT).
std::vector<float> alibi_slopes(std::int64_t heads) {
  std::vector<float> s;
  for (std::int64_t i = 0; i < heads; ++i)
    s.push_back(std::exp2(-8.f * float(i + 1) / float(heads)));
  return s;
}

policy_case make_policy(int kind, std::int64_t heads, std::mt19937_64& rng, double max_distance) {
  policy_case p;
  switch (kind) {
    case 0:  // Gemma 2: cap 50 on attention logits; a small cap so that it bites on our scores
      p.name = "softcap";
      p.opt.logit_softcap = 2.5f;
      p.rules.softcap = 2.5;
      break;
    case 1: {  // gpt-oss: one learned sink logit per head
      p.name = "sinks";
      std::uniform_real_distribution<float> d(-3.f, 3.f);
      for (std::int64_t h = 0; h < heads; ++h) p.sinks.push_back(d(rng));
      break;
    }
    case 2:
      p.name = "alibi";
      p.slopes = alibi_slopes(heads);
      p.extra_logit = p.slopes.front() * max_distance;
      break;
    default:  // all three at once
      p.name = "softcap+sinks+alibi";
      p.opt.logit_softcap = 4.f;
      p.rules.softcap = 4.0;
      p.slopes = alibi_slopes(heads);
      for (std::int64_t h = 0; h < heads; ++h) p.sinks.push_back(float(h % 3) - 1.f);
      p.extra_logit = p.slopes.front() * max_distance;
  }
  p.opt.alibi_slopes = p.slopes;
  p.opt.sinks = p.sinks;
  p.rules.alibi_slopes.assign(p.slopes.begin(), p.slopes.end());
  p.rules.sinks.assign(p.sinks.begin(), p.sinks.end());
  return p;
}

/// Checks out/lse of a kernel against the reference result.
void check_result(const fmat& out, const fmat& lse, const reference::attention_result& ref,
                  double a, double v_max, std::int64_t heads) {
  const double tol = float_tolerance(0, 0, a, v_max);
  INFO("A=" << a << " tolerance=" << tol);
  CHECK(max_abs_diff(to_double(out), ref.out) <= tol);
  for (std::int64_t t = 0; t < ref.lse.rows(); ++t)
    for (std::int64_t h = 0; h < heads; ++h) {
      if (std::isinf(ref.lse(t, h)))
        CHECK(lse(t, h) == -INFINITY);
      else
        CHECK(std::abs(lse(t, h) - ref.lse(t, h)) <= 2 * u * (std::abs(ref.lse(t, h)) + 2 + a));
    }
}

/// Packed documents: a token sees only keys of its own document (positions / 37).
struct same_document {
  bool operator()(const mask_args& a) const { return a.q_pos / 37 == a.k_pos / 37; }
};
/// Prefix-LM (PaliGemma): the first `prefix` positions see each other both ways; the rest is
/// causal.
struct prefix_lm {
  std::int64_t prefix;
  bool operator()(const mask_args& a) const { return a.k_pos <= a.q_pos || a.k_pos < prefix; }
};
/// A head-dependent mask: even heads see every key, odd heads skip keys at positions divisible
/// by 3.
struct odd_heads_skip_thirds {
  bool operator()(const mask_args& a) const { return a.head % 2 == 0 || a.k_pos % 3 != 0; }
};

}  // namespace

TEST_CASE("GQA kernel: soft-cap, sinks and ALiBi match the reference on both tile strategies",
          "[policy][gqa]") {
  const int kind = GENERATE(0, 1, 2, 3);
  const tile_strategy st = GENERATE(tile_strategy::streaming, tile_strategy::gemm);
  const std::uint64_t seed = GENERATE(1, 2, 3);
  std::mt19937_64 rng(seed * 131 + static_cast<std::uint64_t>(kind));
  gqa_case c{.heads = 8,
             .kv_heads = 2,
             .head_dim = 64,
             .v_head_dim = 48,
             .tk = 1 + static_cast<std::int64_t>(rng() % 700),
             .tq = seed == 1 ? 1 : 37,
             .strategy = st};
  const gqa_data x = make_gqa_data(rng, c);
  policy_case p = make_policy(kind, c.heads, rng, 3.0 * double(c.tk) + 1010);
  INFO(p.name << " " << describe(c));
  thread_pool pool(2);
  dense_cache<float> cache({.kv_heads = c.kv_heads,
                            .head_dim = c.head_dim,
                            .v_head_dim = c.v_head_dim,
                            .capacity = c.tk});
  cache.append(tensor3_view<const float>(x.k.data(), {c.tk, c.kv_heads, c.head_dim}),
               tensor3_view<const float>(x.v.data(), {c.tk, c.kv_heads, c.v_head_dim}), x.k_pos);
  fmat out(c.tq, c.heads * c.v_head_dim), lse(c.tq, c.heads);
  p.opt.strategy = st;
  p.opt.lse = matrix_view<float>(lse.data(), {c.tq, c.heads});
  attend(tensor3_view<const float>(x.q.data(), {c.tq, c.heads, c.head_dim}), x.q_pos, cache,
         tensor3_view<float>(out.data(), {c.tq, c.heads, c.v_head_dim}), p.opt, pool);
  const auto ref = reference::attention(to_double(x.q), x.q_pos, to_double(x.k), to_double(x.v),
                                        x.k_pos, c.heads, c.kv_heads, x.scale, p.rules);
  check_result(out, lse, ref, x.a_max(c.head_dim) + p.extra_logit, x.v.cwiseAbs().maxCoeff(),
               c.heads);
}

TEST_CASE("GQA kernel: caller mask predicates (documents, prefix-LM, per head) match the reference",
          "[policy][gqa]") {
  const int which = GENERATE(0, 1, 2);
  const tile_strategy st = GENERATE(tile_strategy::streaming, tile_strategy::gemm);
  std::mt19937_64 rng(static_cast<std::uint64_t>(which * 7 + 3));
  gqa_case c{.heads = 6,
             .kv_heads = 3,
             .head_dim = 32,
             .v_head_dim = 32,
             .tk = 300,
             .tq = 120,
             .strategy = st};
  gqa_data x = make_gqa_data(rng, c);
  for (std::int64_t i = 0; i < c.tk; ++i)
    x.k_pos[static_cast<std::size_t>(i)] = i;  // a prefill over 0..299
  for (std::int64_t i = 0; i < c.tq; ++i) x.q_pos[static_cast<std::size_t>(i)] = 180 + i;
  fmat out(c.tq, c.heads * c.v_head_dim), lse(c.tq, c.heads);
  attention_options opt{.lse = matrix_view<float>(lse.data(), {c.tq, c.heads}), .strategy = st};
  reference::attention_rules rules;
  const tensor3_view<const float> q(x.q.data(), {c.tq, c.heads, c.head_dim});
  const kv_view<float> kv(tensor3_view<const float>(x.k.data(), {c.tk, c.kv_heads, c.head_dim}),
                          tensor3_view<const float>(x.v.data(), {c.tk, c.kv_heads, c.v_head_dim}),
                          x.k_pos);
  const tensor3_view<float> o(out.data(), {c.tq, c.heads, c.v_head_dim});
  thread_pool pool(2);
  if (which == 0) {
    attend(q, x.q_pos, kv, o, opt, pool, nullptr, same_document{});
    rules.mask = [](auto, auto qp, auto, auto kp, auto) { return qp / 37 == kp / 37; };
  } else if (which == 1) {  // the mask widens nothing, so prefix-LM turns the causal rule off
    opt.causal = rules.causal = false;
    attend(q, x.q_pos, kv, o, opt, pool, nullptr, prefix_lm{200});
    rules.mask = [](auto, auto qp, auto, auto kp, auto) { return kp <= qp || kp < 200; };
  } else {
    attend(q, x.q_pos, kv, o, opt, pool, nullptr, odd_heads_skip_thirds{});
    rules.mask = [](auto, auto, auto, auto kp, auto h) { return h % 2 == 0 || kp % 3 != 0; };
  }
  const auto ref = reference::attention(to_double(x.q), x.q_pos, to_double(x.k), to_double(x.v),
                                        x.k_pos, c.heads, c.kv_heads, x.scale, rules);
  check_result(out, lse, ref, x.a_max(c.head_dim), x.v.cwiseAbs().maxCoeff(), c.heads);
}

TEST_CASE("absorbed MLA kernel: policies and a mask predicate match the reference on (c, k_rope)",
          "[policy][mla]") {
  const int kind = GENERATE(0, 1, 2, 3, 4);
  std::mt19937_64 rng(static_cast<std::uint64_t>(900 + kind));
  const std::int64_t h = 8, dc = 48, dr = 16, tk = 1 + static_cast<std::int64_t>(rng() % 500),
                     tq = kind % 2 ? 1 : 9;
  const fmat c = random_matrix(rng, tk, dc), kr = random_matrix(rng, tk, dr),
             ql = random_matrix(rng, tq, h * dc, 0.3f), qr = random_matrix(rng, tq, h * dr, 0.3f);
  const auto kpos = gapped_positions(rng, tk, 10, 2);
  std::vector<std::int64_t> qpos;
  for (std::int64_t i = 0; i < tq; ++i) qpos.push_back(kpos[rng() % kpos.size()] + 1);
  latent_cache<float> cache({.latent_dim = dc, .rope_dim = dr, .capacity = tk});
  cache.append(view_of(c), tensor3_view<const float>(kr.data(), {tk, 1, dr}), kpos);
  policy_case p = kind < 4 ? make_policy(kind, h, rng, double(kpos.back()) + 2) : policy_case{};
  fmat out(tq, h * dc), lse(tq, h);
  p.opt.scale = 0.1f;
  p.opt.lse = matrix_view<float>(lse.data(), {tq, h});
  thread_pool pool(2);
  if (kind < 4) {
    attend_latent(tensor3_view<const float>(ql.data(), {tq, h, dc}),
                  tensor3_view<const float>(qr.data(), {tq, h, dr}), qpos, cache,
                  tensor3_view<float>(out.data(), {tq, h, dc}), p.opt, pool);
  } else {
    attend_latent(tensor3_view<const float>(ql.data(), {tq, h, dc}),
                  tensor3_view<const float>(qr.data(), {tq, h, dr}), qpos, cache,
                  tensor3_view<float>(out.data(), {tq, h, dc}), p.opt, pool, nullptr,
                  same_document{});
    p.rules.mask = [](auto, auto qp, auto, auto kp, auto) { return qp / 37 == kp / 37; };
  }
  // The same attention as an MQA on [q_latent ; q_rope] . [c ; k_rope] with values c.
  reference::matrix q(tq, h * (dc + dr)), k(tk, dc + dr);
  for (std::int64_t t = 0; t < tq; ++t)
    for (std::int64_t i = 0; i < h; ++i)
      q.row(t).segment(i * (dc + dr), dc + dr) << to_double(ql).row(t).segment(i * dc, dc),
          to_double(qr).row(t).segment(i * dr, dr);
  k << to_double(c), to_double(kr);
  const auto ref = reference::attention(q, qpos, k, to_double(c), kpos, h, 1, 0.1, p.rules);
  double qn = 0, kn = 0;
  for (std::int64_t t = 0; t < tq; ++t)
    for (std::int64_t i = 0; i < h; ++i)
      qn = std::max(qn, q.row(t).segment(i * (dc + dr), dc + dr).norm());
  for (std::int64_t s = 0; s < tk; ++s) kn = std::max(kn, k.row(s).norm());
  INFO(p.name);
  check_result(out, lse, ref, 0.1 * qn * kn + p.extra_logit, c.cwiseAbs().maxCoeff(), h);
}

TEST_CASE("TPA kernel: policies and a mask predicate match the reference on materialised Q, K, V",
          "[policy][tpa]") {
  const int kind = GENERATE(0, 1, 2, 3, 4);
  std::mt19937_64 rng(static_cast<std::uint64_t>(1700 + kind));
  const std::int64_t h = 20, d = 32, rq = 3, rk = 2, rv = 2,
                     tk = 1 + static_cast<std::int64_t>(rng() % 400), tq = kind % 2 ? 1 : 5;
  const fmat aq = random_matrix(rng, tq, rq * h), bq = random_matrix(rng, tq, rq * d, 0.5f),
             ak = random_matrix(rng, tk, rk * h), bk = random_matrix(rng, tk, rk * d, 0.5f),
             av = random_matrix(rng, tk, rv * h), bv = random_matrix(rng, tk, rv * d);
  const auto kpos = gapped_positions(rng, tk, 0, 2);
  std::vector<std::int64_t> qpos;
  for (std::int64_t i = 0; i < tq; ++i) qpos.push_back(kpos[rng() % kpos.size()]);
  factorized_cache<float> cache(
      {.heads = h, .head_dim = d, .k_rank = rk, .v_rank = rv, .capacity = tk});
  cache.append({tensor3_view<const float>(ak.data(), {tk, rk, h}),
                tensor3_view<const float>(bk.data(), {tk, rk, d}),
                tensor3_view<const float>(av.data(), {tk, rv, h}),
                tensor3_view<const float>(bv.data(), {tk, rv, d}), kpos});
  policy_case p = kind < 4 ? make_policy(kind, h, rng, double(kpos.back()) + 2) : policy_case{};
  fmat out(tq, h * d), lse(tq, h);
  p.opt.lse = matrix_view<float>(lse.data(), {tq, h});
  thread_pool pool(2);
  const tensor3_view<const float> a_q(aq.data(), {tq, rq, h}), b_q(bq.data(), {tq, rq, d});
  const tensor3_view<float> o(out.data(), {tq, h, d});
  if (kind < 4) {
    attend_factorized(a_q, b_q, qpos, cache, o, p.opt, pool);
  } else {
    attend_factorized(a_q, b_q, qpos, cache, o, p.opt, pool, nullptr, odd_heads_skip_thirds{});
    p.rules.mask = [](auto, auto, auto, auto kp, auto hh) { return hh % 2 == 0 || kp % 3 != 0; };
  }
  const reference::matrix q = reference::tpa_materialise(to_double(aq), to_double(bq), rq, h, 1.0);
  const reference::matrix k =
      reference::tpa_materialise(to_double(ak), to_double(bk), rk, h, 1.0 / rk);
  const reference::matrix v =
      reference::tpa_materialise(to_double(av), to_double(bv), rv, h, 1.0 / rv);
  const double scale = 1 / std::sqrt(double(d));
  const auto ref = reference::attention(q, qpos, k, v, kpos, h, h, scale, p.rules);
  double qn = 0, kn = 0;
  for (std::int64_t i = 0; i < h; ++i) {
    for (std::int64_t t = 0; t < tq; ++t) qn = std::max(qn, q.row(t).segment(i * d, d).norm());
    for (std::int64_t s = 0; s < tk; ++s) kn = std::max(kn, k.row(s).segment(i * d, d).norm());
  }
  INFO(p.name);
  // The factorized products add rounding over R_Q R_K terms: a few u A more (test_tpa derives it).
  check_result(out, lse, ref, 2 * (scale * qn * kn + p.extra_logit), v.cwiseAbs().maxCoeff(), h);
}

TEST_CASE("position_mask: block classification agrees with every pair, at any int64 positions",
          "[policy][mask]") {
  constexpr std::int64_t lo = std::numeric_limits<std::int64_t>::min(),
                         hi = std::numeric_limits<std::int64_t>::max();
  std::mt19937_64 rng(5);
  const std::int64_t anchors[] = {lo, lo + 3, -7, -1, 0, 2, 40, hi - 9, hi};
  const std::int64_t windows[] = {0, 1, 2, 5, 11, hi};
  for (int it = 0; it < 4000; ++it) {
    auto range = [&](std::int64_t& a, std::int64_t& b) {
      const std::int64_t base = anchors[rng() % 9];
      a = base, b = base;
      const std::int64_t w = static_cast<std::int64_t>(rng() % 6);
      if (base <= hi - w)
        b = base + w;
      else
        a = base - w;
    };
    std::int64_t qmin, qmax, kmin, kmax;
    range(qmin, qmax);
    range(kmin, kmax);
    const position_mask pm{rng() % 2 == 0, windows[rng() % 6]};
    reference::attention_rules rules;
    rules.causal = pm.causal;
    if (pm.window) rules.window = pm.window;
    bool any = false, all = true;
    for (std::int64_t q = qmin;; ++q) {
      for (std::int64_t k = kmin;; ++k) {
        const bool v = rules.visible(0, q, 0, k, 0);
        CHECK(pm.visible(q, k) == v);
        any = any || v, all = all && v;
        if (k == kmax) break;
      }
      if (q == qmax) break;
    }
    const block_visibility b = pm.block(qmin, qmax, kmin, kmax);
    INFO("q [" << qmin << ", " << qmax << "] k [" << kmin << ", " << kmax << "] causal "
               << pm.causal << " window " << pm.window);
    CHECK(b == (!any  ? block_visibility::none
                : all ? block_visibility::full
                      : block_visibility::partial));
  }
}

TEST_CASE("merge_attention_states: two key sets merged equal attention over their union",
          "[policy][merge]") {
  std::mt19937_64 rng(77);
  const std::int64_t h = 4, hkv = 2, d = 32, tq = 6, tk = 500;
  gqa_case c{.heads = h, .kv_heads = hkv, .head_dim = d, .v_head_dim = d, .tk = tk, .tq = tq};
  const gqa_data x = make_gqa_data(rng, c);
  const fmat full = run_kernel<float>(c, x);
  // Keys split at n1: a "shared prefix" and a "suffix"; the second also where it sees nothing.
  for (const std::int64_t n1 : {std::int64_t{0}, std::int64_t{123}, tk}) {
    const std::size_t s1 = static_cast<std::size_t>(n1);
    auto part = [&](std::int64_t b, std::int64_t n, fmat& o, fmat& l) {
      o.resize(tq, h * d), l.resize(tq, h);
      const kv_view<float> kv(
          tensor3_view<const float>(x.k.data() + b * hkv * d, {n, hkv, d}),
          tensor3_view<const float>(x.v.data() + b * hkv * d, {n, hkv, d}),
          std::span(x.k_pos).subspan(static_cast<std::size_t>(b), static_cast<std::size_t>(n)));
      attend(tensor3_view<const float>(x.q.data(), {tq, h, d}), x.q_pos, kv,
             tensor3_view<float>(o.data(), {tq, h, d}),
             {.lse = matrix_view<float>(l.data(), {tq, h})});
    };
    fmat oa, la, ob, lb, merged(tq, h * d), lm(tq, h);
    part(0, n1, oa, la);
    part(n1, tk - n1, ob, lb);
    (void)s1;
    merge_attention_states(tensor3_view<const float>(oa.data(), {tq, h, d}), view_of(la),
                           tensor3_view<const float>(ob.data(), {tq, h, d}), view_of(lb),
                           tensor3_view<float>(merged.data(), {tq, h, d}), view_of(lm));
    CHECK(max_abs_diff(to_double(merged), to_double(full)) <=
          8 * u * x.v.cwiseAbs().maxCoeff() * (2 + x.a_max(d)));
    const auto ref = run_reference<float>(c, x);
    for (std::int64_t t = 0; t < tq; ++t)
      for (std::int64_t i = 0; i < h; ++i)
        if (std::isinf(ref.lse(t, i)))
          CHECK(lm(t, i) == -INFINITY);
        else
          CHECK(std::abs(lm(t, i) - ref.lse(t, i)) <= 1e-5 * (1 + std::abs(ref.lse(t, i))));
  }
  // In place (out aliases o_a) and shape errors.
  fmat o(1, 4), l = fmat::Constant(1, 2, -INFINITY), o2 = fmat::Ones(1, 4),
                l2 = fmat::Constant(1, 2, -INFINITY);
  merge_attention_states(tensor3_view<const float>(o2.data(), {1, 2, 2}), view_of(l2),
                         tensor3_view<const float>(o2.data(), {1, 2, 2}), view_of(l2),
                         tensor3_view<float>(o.data(), {1, 2, 2}), view_of(l));
  CHECK(o.cwiseAbs().maxCoeff() == 0.f);  // both sides empty: 0, LSE -inf
  CHECK((l.array() == -INFINITY).all());
  ATTNKIT_CHECK_INVALID(
      merge_attention_states(tensor3_view<const float>(o2.data(), {1, 2, 2}), view_of(l2),
                             tensor3_view<const float>(o2.data(), {1, 1, 4}), view_of(l2),
                             tensor3_view<float>(o.data(), {1, 2, 2})),
      "merge_attention_states: o_b has shape [1, 1, 4] but [1, 2, 2]");
}

TEST_CASE("policy options are validated before anything runs", "[policy][errors]") {
  dense_cache<float> cache({.kv_heads = 1, .head_dim = 8, .capacity = 2});
  std::vector<float> q(2 * 8), out(2 * 8), one(1);
  const std::vector<std::int64_t> pos{0};
  auto call = [&](const attention_options& o) {
    attend(tensor3_view<const float>(q.data(), {1, 2, 8}), pos, cache,
           tensor3_view<float>(out.data(), {1, 2, 8}), o);
  };
  ATTNKIT_CHECK_INVALID(call({.logit_softcap = 0.f}),
                        "logit_softcap must be finite and > 0, got 0");
  ATTNKIT_CHECK_INVALID(call({.logit_softcap = NAN}), "logit_softcap must be finite");
  ATTNKIT_CHECK_INVALID(call({.alibi_slopes = one}),
                        "alibi_slopes has 1 entries but there are 2 query heads");
  ATTNKIT_CHECK_INVALID(call({.sinks = one}), "sinks has 1 entries but there are 2 query heads");
  factorized_cache<float> fc({.heads = 2, .head_dim = 8, .k_rank = 1, .v_rank = 1, .capacity = 2});
  ATTNKIT_CHECK_INVALID(attend_factorized(tensor3_view<const float>(q.data(), {1, 1, 2}),
                                          tensor3_view<const float>(q.data(), {1, 1, 8}), pos, fc,
                                          tensor3_view<float>(out.data(), {1, 2, 8}),
                                          {.strategy = tile_strategy::gemm}),
                        "strategy gemm is not available");
}
