// TPA: factorized cache, the FlashTPA kernel and the layer against the double reference,
// configuration errors.
#include <array>

#include "layer_fixture.hpp"
#include "tpa_fixture.hpp"

using namespace attnkit;
using namespace attnkit::test;

static_assert(kv_cache<factorized_cache<float>>);
static_assert(kv_cache<factorized_cache<bf16>>);
static_assert(kv_cache<factorized_cache<half>>);

namespace {
/// A factor cache of kpos.size() tokens holding A_K [T, R_K, H], B_K [T, R_K, d], A_V [T, R_V, H]
/// and B_V [T, R_V, d_v] (row-major, T rows each) at positions kpos.
template <class S>
factorized_cache<S> filled_factor_cache(std::int64_t h, std::int64_t d, std::int64_t dv,
                                        std::int64_t rk, std::int64_t rv, const fmat& ak,
                                        const fmat& bk, const fmat& av, const fmat& bv,
                                        std::span<const std::int64_t> kpos) {
  const auto tk = static_cast<std::int64_t>(kpos.size());
  factorized_cache<S> cache(
      {.heads = h, .head_dim = d, .v_head_dim = dv, .k_rank = rk, .v_rank = rv, .capacity = tk});
  cache.append({tensor3_view<const float>(ak.data(), {tk, rk, h}),
                tensor3_view<const float>(bk.data(), {tk, rk, d}),
                tensor3_view<const float>(av.data(), {tk, rv, h}),
                tensor3_view<const float>(bv.data(), {tk, rv, dv}), kpos});
  return cache;
}
}  // namespace

TEMPLATE_TEST_CASE("factorized_cache: (R_K (H + d) + R_V (H + d_v)) elements per token",
                   "[tpa][cache]", float, bf16, half) {
  using S = TestType;
  factorized_cache<S> c({.heads = 32, .head_dim = 128, .k_rank = 1, .v_rank = 1, .capacity = 4});
  CHECK(c.bytes_per_token() == 320 * static_cast<std::int64_t>(sizeof(S)));
  factorized_cache<S> t6({.heads = 34, .head_dim = 64, .k_rank = 2, .v_rank = 2, .capacity = 4});
  CHECK(t6.bytes_per_token() == (2 * (34 + 64) * 2) * static_cast<std::int64_t>(sizeof(S)));
  ATTNKIT_CHECK_INVALID(
      factorized_cache<S>({.heads = 4, .head_dim = 8, .k_rank = 0, .v_rank = 1, .capacity = 4}),
      "factorized_cache: k_rank must be > 0, got 0");
  ATTNKIT_CHECK_INVALID(
      factorized_cache<S>({.heads = 4, .head_dim = 8, .k_rank = 1, .v_rank = -1, .capacity = 4}),
      "factorized_cache: v_rank must be > 0, got -1");
  std::vector<float> buf(64, 1.f);
  std::vector<std::int64_t> pos{0, 1};
  factorized_cache<S> small({.heads = 2, .head_dim = 4, .k_rank = 1, .v_rank = 1, .capacity = 1});
  ATTNKIT_CHECK_INVALID(small.append({tensor3_view<const float>(buf.data(), {2, 1, 2}),
                                      tensor3_view<const float>(buf.data(), {2, 1, 4}),
                                      tensor3_view<const float>(buf.data(), {2, 1, 2}),
                                      tensor3_view<const float>(buf.data(), {2, 1, 4}), pos}),
                        "appending 2 tokens to size=0 exceeds capacity=1");
  ATTNKIT_CHECK_INVALID(small.append({tensor3_view<const float>(buf.data(), {2, 2, 2}),
                                      tensor3_view<const float>(buf.data(), {2, 1, 4}),
                                      tensor3_view<const float>(buf.data(), {2, 1, 2}),
                                      tensor3_view<const float>(buf.data(), {2, 1, 4}), pos}),
                        "a_k has shape [2, 2, 2] but [2, 1, 2]");
}

TEMPLATE_TEST_CASE("attend_factorized matches attention on the materialised Q, K, V",
                   "[tpa][kernel]", float, bf16) {
  using S = TestType;
  // bf16 products (bf16 caches): where vdpbf16ps runs, or AMX with d_v whole 16-column tiles,
  // the value GEMM rounds the value weights p A_V to bf16, which adds the probability-rounding
  // bound of gqa_fixture.hpp over the (s, v) terms; on AMX with d whole 32-column tiles the D
  // dots take B_Q rounded to bf16, so the reference takes it rounded too; elsewhere the answer
  // is the f32 path's, bit for bit.
  const bool products = std::same_as<S, bf16> && GENERATE(false, true);
  std::mt19937_64 rng(GENERATE(1, 2, 3, 4, 5, 6, 7, 8));
  const std::int64_t h = 1 + static_cast<std::int64_t>(rng() % 40), d = rng() % 2 ? 64 : 40,
                     dv = rng() % 2 ? d : 24;
  const std::int64_t rq = 1 + static_cast<std::int64_t>(rng() % 6),
                     rk = 1 + static_cast<std::int64_t>(rng() % 3),
                     rv = 1 + static_cast<std::int64_t>(rng() % 3);
  const std::int64_t tk = 1 + static_cast<std::int64_t>(rng() % 900),
                     tq = rng() % 2 ? 1 : 1 + static_cast<std::int64_t>(rng() % 20);
  const fmat aq = random_matrix(rng, tq, rq * h), bq = random_matrix(rng, tq, rq * d, 0.5f),
             ak = random_matrix(rng, tk, rk * h), bk = random_matrix(rng, tk, rk * d, 0.5f),
             av = random_matrix(rng, tk, rv * h), bv = random_matrix(rng, tk, rv * dv);
  const auto kpos = gapped_positions(rng, tk, 0, 2);
  std::vector<std::int64_t> qpos;
  for (std::int64_t i = 0; i < tq; ++i)
    qpos.push_back(i == tq - 1 ? kpos.back() : kpos[rng() % kpos.size()]);
  const auto cache = filled_factor_cache<S>(h, d, dv, rk, rv, ak, bk, av, bv, kpos);
  const tpa_scales sc{1.f / float(rq), 1.f / float(rk), 1.f / float(rv)};
  fmat out(tq, h * dv), lse(tq, h);
  thread_pool pool(2);
  attention_options opt;
  opt.lse = matrix_view<float>(lse.data(), {tq, h});
  const fmat aq_scaled = aq * sc.q;  // the kernel's query is A_Q^T B_Q: T6's 1/R_Q goes into A_Q
  factor_view<S> f = cache.view();
  f.k_scale = sc.k, f.v_scale = sc.v;
  auto run = [&](product_math m, fmat& o) {
    opt.products = m;
    attend_factorized(tensor3_view<const float>(aq_scaled.data(), {tq, rq, h}),
                      tensor3_view<const float>(bq.data(), {tq, rq, d}), qpos, f,
                      tensor3_view<float>(o.data(), {tq, h, dv}), opt, pool);
  };
  run(products ? product_math::bf16 : product_math::f32, out);
  const bool rounded =
      products && (detail::bf16_dot_available() || (detail::bf16_amx_available() && dv % 16 == 0));
  const bool rounded_q = products && detail::bf16_amx_available() && d % 32 == 0;
  if (products && !rounded && !rounded_q) {
    fmat f32(tq, h * dv);
    run(product_math::f32, f32);
    CHECK(out == f32);
    return;
  }
  // Reference on the cached (rounded) factors.
  const reference::matrix q = reference::tpa_materialise(
      to_double(aq), to_double(rounded_q ? round_trip<bf16>(bq) : bq), rq, h, sc.q);
  const reference::matrix k = reference::tpa_materialise(to_double(round_trip<S>(ak)),
                                                         to_double(round_trip<S>(bk)), rk, h, sc.k);
  const reference::matrix v = reference::tpa_materialise(to_double(round_trip<S>(av)),
                                                         to_double(round_trip<S>(bv)), rv, h, sc.v);
  const double scale = 1 / std::sqrt(double(d));
  const auto ref = reference::attention(q, qpos, k, v, kpos, h, h, scale);
  double qn = 0, kn = 0;
  for (std::int64_t i = 0; i < tq; ++i)
    for (std::int64_t j = 0; j < h; ++j) qn = std::max(qn, q.row(i).segment(j * d, d).norm());
  for (std::int64_t i = 0; i < tk; ++i)
    for (std::int64_t j = 0; j < h; ++j) kn = std::max(kn, k.row(i).segment(j * d, d).norm());
  const double a = scale * qn * kn;
  // The kernel forms scores as sums over R_Q R_K rank pairs of length-d dots: the float
  // tolerance of gqa_fixture.hpp with d replaced by R_Q R_K d, plus R_V for the value sums.
  const double tol =
      4 * 0x1p-24 * v.cwiseAbs().maxCoeff() *
      (std::sqrt(double(tk)) + 2 * std::sqrt(double(rq * rk * d)) * a + double(rv) + 8);
  INFO("H=" << h << " d=" << d << " dv=" << dv << " R=" << rq << "/" << rk << "/" << rv
            << " Tk=" << tk << " Tq=" << tq << " tol=" << tol << " rounded weights: " << rounded
            << ", B_Q: " << rounded_q);
  if (!rounded) {
    CHECK(max_abs_diff(to_double(out), ref.out) <= tol);
  } else {
    // Each value weight w = p A_V(s)[v, h] rounded: sum_(s, v) e w B_V(s)[v, c] v_scale.
    const dmat p = reference::attention_weights(q, qpos, k, kpos, h, h, scale, {});
    const dmat avr = to_double(round_trip<S>(av)), bvr = to_double(round_trip<S>(bv));
    double worst = 0;
    for (std::int64_t t = 0; t < tq; ++t)
      for (std::int64_t j = 0; j < h; ++j)
        for (std::int64_t c = 0; c < dv; ++c) {
          double ss = 0;
          for (std::int64_t s = 0; s < tk; ++s)
            for (std::int64_t r = 0; r < rv; ++r) {
              const double term = p(t * h + j, s) * avr(s, r * h + j) * bvr(s, r * dv + c);
              ss += term * term;
            }
          const double bound = tol + 6 * unit_roundoff<bf16>() * sc.v * std::sqrt(ss);
          worst = std::max(worst, std::abs(out(t, j * dv + c) - ref.out(t, j * dv + c)) / bound);
        }
    CHECK(worst <= 1.0);
  }
  for (std::int64_t i = 0; i < tq; ++i)
    for (std::int64_t j = 0; j < h; ++j)
      CHECK(std::abs(lse(i, j) - ref.lse(i, j)) <= 1e-4 * (1 + std::abs(ref.lse(i, j)) + a));
}

TEST_CASE("attend_factorized: f32 products on AMX tiles (three bf16 parts) as accurate as FMAs",
          "[tpa][kernel][amx]") {
  // On AMX the D dots and the value GEMM take B_Q and the value weights as three exact bf16
  // parts; their error against the double reference must stay within twice that of the FMA path
  // (the avx2 target) on the same data (measured: 0.2-1.1 times it; with two parts up to 8.5
  // times).
  if (!detail::bf16_amx_available() || !cpu_supports(simd_target::avx2)) {
    SUCCEED("no AMX engine on this CPU (the f32 products stay on FMAs)");
    return;
  }
  for (const std::uint64_t seed : {1, 2, 3, 4}) {
    std::mt19937_64 rng(seed * 101);
    // 16 and 32 heads: the value GEMM on tiles too (whole 16-row tiles); 5 and 19: the dots.
    const std::int64_t h = std::array<std::int64_t, 4>{16, 5, 32, 19}[seed - 1], d = 64,
                       dv = rng() % 2 ? 64 : 32, tk = rng() % 2 ? 40 : 300, tq = rng() % 2 ? 1 : 5;
    const std::int64_t rq = 1 + static_cast<std::int64_t>(rng() % 4),
                       rk = 1 + static_cast<std::int64_t>(rng() % 3),
                       rv = 1 + static_cast<std::int64_t>(rng() % 3);
    const fmat aq = random_matrix(rng, tq, rq * h), bq = random_matrix(rng, tq, rq * d, 0.5f),
               ak = random_matrix(rng, tk, rk * h), bk = random_matrix(rng, tk, rk * d, 0.5f),
               av = random_matrix(rng, tk, rv * h), bv = random_matrix(rng, tk, rv * dv);
    std::vector<std::int64_t> kpos(static_cast<std::size_t>(tk)), qpos;
    for (std::int64_t i = 0; i < tk; ++i) kpos[static_cast<std::size_t>(i)] = i;
    for (std::int64_t i = 0; i < tq; ++i) qpos.push_back(tk - tq + i);
    const auto cache = filled_factor_cache<bf16>(h, d, dv, rk, rv, ak, bk, av, bv, kpos);
    const tpa_scales sc{1.f / float(rq), 1.f / float(rk), 1.f / float(rv)};
    const fmat aq_scaled = aq * sc.q;
    factor_view<bf16> f = cache.view();
    f.k_scale = sc.k, f.v_scale = sc.v;
    auto run = [&] {
      fmat o(tq, h * dv);
      attend_factorized(tensor3_view<const float>(aq_scaled.data(), {tq, rq, h}),
                        tensor3_view<const float>(bq.data(), {tq, rq, d}), qpos, f,
                        tensor3_view<float>(o.data(), {tq, h, dv}), {});
      return o;
    };
    const fmat on_tiles = run();
    const simd_target before = active_target();
    set_target(simd_target::avx2);
    const fmat on_fmas = run();
    set_target(before);
    const reference::matrix q =
        reference::tpa_materialise(to_double(aq), to_double(bq), rq, h, sc.q);
    const reference::matrix k = reference::tpa_materialise(
        to_double(round_trip<bf16>(ak)), to_double(round_trip<bf16>(bk)), rk, h, sc.k);
    const reference::matrix v = reference::tpa_materialise(
        to_double(round_trip<bf16>(av)), to_double(round_trip<bf16>(bv)), rv, h, sc.v);
    const auto ref = reference::attention(q, qpos, k, v, kpos, h, h, 1 / std::sqrt(double(d)));
    const double floor = 0x1p-26 * v.cwiseAbs().maxCoeff(),
                 fma_error = max_abs_diff(to_double(on_fmas), ref.out),
                 tile_error = max_abs_diff(to_double(on_tiles), ref.out);
    INFO("H=" << h << " dv=" << dv << " R=" << rq << "/" << rk << "/" << rv << " Tk=" << tk
              << " Tq=" << tq << " FMA error " << fma_error << ", tiles " << tile_error);
    CHECK(tile_error <= 2 * std::max(fma_error, floor));
  }
}

TEMPLATE_TEST_CASE("tpa_layer matches the double reference (full, KV-only, fixed head factors)",
                   "[tpa][layer]", float, bf16) {
  using S = TestType;
  std::mt19937_64 rng(GENERATE(range(11, 19)));
  tpa_config cfg = random_tpa_config(rng);
  // bf16 caches also with bf16 products (value weights, on AMX also B_Q, rounded as well).
  const bool products = std::same_as<S, bf16> && GENERATE(false, true);
  if (products) cfg.products = product_math::bf16;
  const bool fixed = rng() % 3 == 0;
  const auto w = make_tpa(rng, cfg, fixed);
  const std::int64_t t = 1 + static_cast<std::int64_t>(rng() % 40);
  const fmat x = random_matrix(rng, t, cfg.model_dim);
  const auto pos = gapped_positions(rng, t, 50, 3);
  tpa_layer layer(cfg, w.weights());
  const auto ref =
      reference::tpa_forward(to_double(x), pos, w.reference_weights(), w.shape(layer.scales()),
                             cfg.rope, 1 / std::sqrt(double(cfg.head_dim)));
  const double tol = tpa_rel_tolerance<S>(cfg, t, tpa_a_max(w, layer, x));
  thread_pool pool(2);
  for (tpa_path path : {tpa_path::factorized, tpa_path::materialized}) {
    auto cache = layer.make_cache<S>(t);
    fmat y(t, cfg.model_dim);
    layer.forward(view_of(x), pos, cache, view_of(y), pool, path);
    INFO("path=" << (path == tpa_path::factorized ? "factorized" : "materialized")
                 << " products=" << products << " H=" << cfg.heads << " R=" << cfg.q_rank << "/"
                 << cfg.k_rank << "/" << cfg.v_rank << " fixed=" << fixed << " tol=" << tol);
    CHECK(rel_error(to_double(y), ref) <= tol);
    if constexpr (!std::same_as<S, float>) {
      // The storage term above is a worst case, far above what a 16-bit cache costs, so the two
      // halves are also checked tightly: the cache holds the reference's factors each rounded
      // once to S, and the output is the reference's attention over the K and V they form.
      const auto rw = w.reference_weights();
      const auto sh = w.shape(layer.scales());
      const auto want = reference::tpa_cache_factors(to_double(x), pos, rw, sh, cfg.rope);
      const auto fv = cache.view();
      auto stored = [&](auto row_of, std::int64_t width) {  // [T, width] as double
        dmat m(t, width);
        for (std::int64_t i = 0; i < t; ++i)
          for (std::int64_t c = 0; c < width; ++c) m(i, c) = static_cast<float>(row_of(i)[c]);
        return m;
      };
      const std::int64_t h = cfg.heads, rk = sh.k_rank, rv = sh.v_rank;
      const dmat ak = stored([&](std::int64_t i) { return fv.a_k_row(i); }, rk * h),
                 bk = stored([&](std::int64_t i) { return fv.b_k_row(i); }, rk * sh.head_dim),
                 av = stored([&](std::int64_t i) { return fv.a_v_row(i); }, rv * h),
                 bv = stored([&](std::int64_t i) { return fv.b_v_row(i); }, rv * sh.v_head_dim);
      CHECK(worst_rounding<S>(ak, want.a_k) <= 1);
      CHECK(worst_rounding<S>(bk, want.b_k) <= 1);
      CHECK(worst_rounding<S>(av, want.a_v) <= 1);
      CHECK(worst_rounding<S>(bv, want.b_v) <= 1);
      if (!products) {  // bf16 products round the queries and value weights too
        const auto q = reference::tpa_heads(to_double(x), pos, rw, sh, cfg.rope).q;
        const auto r =
            reference::attention(q, pos, reference::tpa_materialise(ak, bk, rk, h, sh.k_scale),
                                 reference::tpa_materialise(av, bv, rv, h, sh.v_scale), pos, h, h,
                                 1 / std::sqrt(double(cfg.head_dim)));
        CHECK(rel_error(to_double(y), dmat(r.out * rw.o_proj.transpose())) <=
              tpa_rel_tolerance<float>(cfg, t, tpa_a_max(w, layer, x)));
      }
    }
  }
}

TEST_CASE("tpa_layer: invalid ranks and tensors throw naming them", "[tpa][errors]") {
  std::mt19937_64 rng(3);
  tpa_config cfg{
      .model_dim = 32, .heads = 4, .head_dim = 16, .q_rank = 2, .k_rank = 2, .v_rank = 1};
  const auto w = make_tpa(rng, cfg, false);
  auto edit = [&](auto f) {
    tpa_config c = cfg;
    f(c);
    return c;
  };
  ATTNKIT_CHECK_INVALID(tpa_layer(edit([](tpa_config& c) { c.k_rank = 0; }), w.weights()),
                        "k_rank must be >= 1, got 0");
  ATTNKIT_CHECK_INVALID(tpa_layer(edit([](tpa_config& c) { c.v_rank = -2; }), w.weights()),
                        "v_rank must be >= 1, got -2");
  ATTNKIT_CHECK_INVALID(tpa_layer(edit([](tpa_config& c) { c.q_rank = -1; }), w.weights()),
                        "q_rank must be >= 0");
  ATTNKIT_CHECK_INVALID(tpa_layer(edit([](tpa_config& c) { c.k_rank = 3; }), w.weights()),
                        "tensor w_a_k has shape [8, 32] but [12, 32] was expected");
  tpa_weights bad = w.weights();
  bad.w_b_v = {};
  ATTNKIT_CHECK_INVALID(tpa_layer(cfg, bad), "tensor w_b_v is missing", "[16, 32]");
  bad = w.weights();
  std::vector<float> fixed(8, 1.f);
  bad.a_k = matrix_view<const float>(fixed.data(), {2, 4});
  ATTNKIT_CHECK_INVALID(tpa_layer(cfg, bad), "exactly one of w_a_k (contextual) and a_k");
  bad = w.weights();
  bad.q_proj = bad.w_b_q;
  ATTNKIT_CHECK_INVALID(tpa_layer(cfg, bad),
                        "q_rank=2 factorizes the queries, but q_proj was also given");
  tpa_layer layer(cfg, w.weights());
  factorized_cache<float> wrong(
      {.heads = 4, .head_dim = 16, .k_rank = 1, .v_rank = 1, .capacity = 2});
  fmat x = random_matrix(rng, 1, 32), y(1, 32);
  const std::int64_t p = 0;
  ATTNKIT_CHECK_INVALID(layer.forward(view_of(x), std::span(&p, 1), wrong, view_of(y)),
                        "cache has heads=4", "k_rank=1", "the layer needs 4, 16, 16, 2, 1");
}
