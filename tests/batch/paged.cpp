// Paged storage: page pools, paged caches of every cache type and the paged views the kernels
// read. A paged cache holds the same tokens as a contiguous one, so the kernels must give the
// same answer: bitwise when pages hold whole key blocks (the driver then forms the same blocks),
// else within the float tolerance of the double reference, for every page size (1, 16, 48, one
// not dividing T), shuffled page order and shared prefix pages. A paged GQA decode step walks
// every KV head in one work item with key blocks of its own (gqa_products::merges_heads): its
// answer is bitwise the same for every page size and page order, and equals the contiguous
// cache's within the kernels' tolerance.
#include <attnkit/reference/tpa.hpp>

#include <algorithm>
#include <numeric>
#include <sys/mman.h>

#include "gqa_fixture.hpp"

using namespace attnkit;
using namespace attnkit::test;

namespace {

/// Scrambles the pool's free list: pages are handed out in a random order afterwards.
template <storage_type S>
void shuffle_free_pages(page_pool<S>& pool, std::mt19937_64& rng) {
  std::vector<std::int32_t> all;
  while (pool.free_pages() > 0) all.push_back(pool.allocate());
  std::shuffle(all.begin(), all.end(), rng);
  for (const auto p : all) pool.release(p);
}

/// A pool with room for case c's keys at page size ps (and a few pages more).
page_pool_config pool_for(const gqa_case& c, std::int64_t ps) {
  return {.num_pages = c.tk / ps + 8,
          .page_size = ps,
          .token_elements = c.kv_heads * (c.head_dim + c.v_head_dim)};
}

template <storage_type S>
paged_cache<S, paged_dense> paged_copy(page_pool<S>& pool, const gqa_case& c, const gqa_data& x) {
  paged_cache<S, paged_dense> cache(pool, {c.kv_heads, c.head_dim, c.v_head_dim});
  // Appended in uneven chunks: appends that start mid-page.
  for (std::int64_t t0 = 0, step = 1; t0 < c.tk; t0 += step, step = step * 3 % 29 + 1) {
    const std::int64_t n = std::min(step, c.tk - t0);
    cache.append(dense_append{
        tensor3_view<const float>(x.k.data() + t0 * x.k.cols(), {n, c.kv_heads, c.head_dim}),
        tensor3_view<const float>(x.v.data() + t0 * x.v.cols(), {n, c.kv_heads, c.v_head_dim}),
        std::span(x.k_pos).subspan(static_cast<std::size_t>(t0), static_cast<std::size_t>(n))});
  }
  return cache;
}

template <storage_type S, class KV>
fmat attend_over(const gqa_case& c, const gqa_data& x, const KV& kv) {
  fmat out(c.tq, c.heads * c.v_head_dim);
  attend(tensor3_view<const float>(x.q.data(), {c.tq, c.heads, c.head_dim}), x.q_pos, kv,
         tensor3_view<float>(out.data(), {c.tq, c.heads, c.v_head_dim}),
         {.causal = c.causal, .window = c.window, .strategy = c.strategy, .products = c.products});
  return out;
}

/// Whether attend of case c over the paged cache runs as one work item of every KV head
/// (the library's rule, gqa_products::merges_heads), whose key blocks differ from the
/// contiguous cache's.
template <storage_type S>
bool merged_decode(const gqa_case& c, const paged_cache<S, paged_dense>& paged) {
  const attention_options opt{.strategy = c.strategy, .products = c.products};
  return detail::gqa_products<S>::merges_heads(
      c.tq, detail::kv_view_of(paged), detail::streams(opt, c.heads / c.kv_heads, c.tq), false);
}

/// A merged decode's answer at another page size (7: no block boundary on a page boundary) in
/// another page order: bitwise the same.
template <storage_type S>
void check_same_at_another_page_size(const gqa_case& c, const gqa_data& x, const fmat& got,
                                     std::mt19937_64& rng) {
  page_pool<S> other(pool_for(c, 7));
  shuffle_free_pages(other, rng);
  CHECK((attend_over<S>(c, x, paged_copy(other, c, x)).array() == got.array()).all());
}

template <storage_type S>
void check_paged_gqa(std::mt19937_64& rng) {
  for (const std::int64_t ps : {1, 16, 48, 128}) {
    for (const std::int64_t tq : {1, 3, 37}) {
      gqa_case c;
      c.tk = 200 + static_cast<std::int64_t>(rng() % 200), c.tq = tq;
      c.strategy = static_cast<tile_strategy>(rng() % 3);
      const gqa_data x = make_gqa_data(rng, c);
      page_pool<S> pool(pool_for(c, ps));
      shuffle_free_pages(pool, rng);
      const auto paged = paged_copy(pool, c, x);
      REQUIRE(paged.size() == c.tk);
      const fmat got = attend_over<S>(c, x, paged);
      const fmat contiguous = run_kernel<S>(c, x);
      INFO(describe(c) << " page_size=" << ps);
      const bool merged = merged_decode(c, paged);
      if (merged) check_same_at_another_page_size<S>(c, x, got, rng);
      if (ps % 128 == 0 && !merged) {
        CHECK((got.array() == contiguous.array()).all());  // the same key blocks: bitwise
      } else {
        const auto ref = run_reference<S>(c, x);
        const double v_max = x.v.cwiseAbs().maxCoeff(), a = x.a_max(c.head_dim);
        const double tol = float_tolerance(c.head_dim, c.tk, a, v_max) +
                           (std::same_as<S, float> ? 0 : storage_tolerance<S>(a, v_max));
        CHECK(max_abs_diff(to_double(got), ref.out) <= tol);
      }
    }
  }
}

}  // namespace

TEST_CASE("paged GQA cache: equal to the contiguous cache for page sizes 1, 16, 48, 128 and shuffled pages") {
  std::mt19937_64 rng(101);
  check_paged_gqa<float>(rng);
  check_paged_gqa<bf16>(rng);
  check_paged_gqa<half>(rng);
}

TEST_CASE(
    "paged GQA decode (one item for all KV heads): per-head options, LSE, weights and key splits "
    "equal the contiguous cache's") {
  // A paged streaming decode step walks every KV head in one work item (gqa_products::
  // merges_heads); the contiguous cache runs one item per KV head. Each row's math is the same,
  // the key splits differ: equal within the kernels' tolerance, per-head options included.
  std::mt19937_64 rng(107);
  thread_pool pool3(3);
  for (const std::int64_t ps : {1, 16, 48}) {
    for (const std::int64_t kv_heads : {2, 4}) {
      gqa_case c{.heads = 4 * kv_heads,
                 .kv_heads = kv_heads,
                 .tk = 500 + static_cast<std::int64_t>(rng() % 300),
                 .tq = 1,
                 .window = 300,
                 .strategy = tile_strategy::streaming};
      const gqa_data x = make_gqa_data(rng, c);
      page_pool<bf16> pool(pool_for(c, ps));
      shuffle_free_pages(pool, rng);
      const auto paged = paged_copy(pool, c, x);
      dense_cache<bf16> flat({.kv_heads = c.kv_heads,
                              .head_dim = c.head_dim,
                              .v_head_dim = c.v_head_dim,
                              .capacity = c.tk});
      flat.append(tensor3_view<const float>(x.k.data(), {c.tk, c.kv_heads, c.head_dim}),
                  tensor3_view<const float>(x.v.data(), {c.tk, c.kv_heads, c.v_head_dim}), x.k_pos);
      std::vector<float> slopes, sinks;
      for (std::int64_t h = 0; h < c.heads; ++h)
        slopes.push_back(0.01f * static_cast<float>(h + 1)), sinks.push_back(0.5f - 0.1f * h);
      auto run = [&](const auto& cache, fmat& out, fmat& lse, std::vector<float>& w) {
        out.resize(c.tq, c.heads * c.v_head_dim), lse.resize(c.tq, c.heads);
        w.assign(static_cast<std::size_t>(c.tq * c.heads * c.tk), -1.f);
        attend(tensor3_view<const float>(x.q.data(), {c.tq, c.heads, c.head_dim}), x.q_pos, cache,
               tensor3_view<float>(out.data(), {c.tq, c.heads, c.v_head_dim}),
               {.window = c.window,
                .logit_softcap = 20.f,
                .alibi_slopes = slopes,
                .sinks = sinks,
                .lse = matrix_view<float>(lse.data(), {c.tq, c.heads}),
                .weights = tensor3_view<float>(w.data(), {c.tq, c.heads, c.tk}),
                .strategy = c.strategy},
               pool3);
      };
      fmat o_flat, o_paged, l_flat, l_paged;
      std::vector<float> w_flat, w_paged;
      run(flat, o_flat, l_flat, w_flat);
      run(paged, o_paged, l_paged, w_paged);
      INFO(describe(c) << " page_size=" << ps);
      const double v_max = x.v.cwiseAbs().maxCoeff(), a = x.a_max(c.head_dim);
      // Both answers are float computations on the same stored K/V: twice the kernel's tolerance.
      CHECK(max_abs_diff(to_double(o_paged), to_double(o_flat)) <=
            2 * float_tolerance(c.head_dim, c.tk, a, v_max));
      CHECK(max_abs_diff(to_double(l_paged), to_double(l_flat)) <=
            0x1p-24 * 8 * (1 + 2 * a + l_flat.cwiseAbs().maxCoeff()));
      double w_diff = 0;
      for (std::size_t i = 0; i < w_flat.size(); ++i)
        w_diff = std::max(w_diff, std::abs(double(w_paged[i]) - double(w_flat[i])));
      CHECK(w_diff <= 2 * float_tolerance(c.head_dim, c.tk, a, 1.0));
    }
  }
}

TEST_CASE(
    "paged bf16 cache with bf16 products: the contiguous cache's answer, bitwise for the same key "
    "blocks",
    "[bf16]") {
  // Both read the same key blocks; the products pair rows through their page pointers.
  // Tiles of 80 rows, and single row tiles (4 and 16 rows: AMX reads their value rows in place);
  // a streaming decode step (vdpbf16ps scores where it runs), whose paged item of every KV head
  // forms blocks of its own: bitwise at another page size, and the contiguous cache's answer
  // within the products' tolerance (vdpbf16ps: both against the reference on rounded queries
  // and probabilities) or the float kernels' (elsewhere, where the streaming path is f32).
  std::mt19937_64 rng(103);
  constexpr auto gemm = tile_strategy::gemm;
  for (const std::int64_t ps : {1, 16, 48})
    for (const auto& [heads, kv_heads, tq, strategy] : {std::tuple{8, 2, 40, gemm},
                                                        {8, 2, 1, gemm},
                                                        {16, 1, 1, gemm},
                                                        {8, 2, 1, tile_strategy::streaming}}) {
      gqa_case c{.heads = heads,
                 .kv_heads = kv_heads,
                 .tk = 300 + static_cast<std::int64_t>(rng() % 50),
                 .tq = tq,
                 .strategy = strategy,
                 .products = product_math::bf16};
      const gqa_data x = make_gqa_data(rng, c);
      page_pool<bf16> pool(pool_for(c, ps));
      shuffle_free_pages(pool, rng);
      INFO(describe(c) << " page_size=" << ps);
      const auto paged = paged_copy(pool, c, x);
      const fmat got = attend_over<bf16>(c, x, paged), contiguous = run_kernel<bf16>(c, x);
      if (!merged_decode(c, paged)) {
        CHECK((got.array() == contiguous.array()).all());
        continue;
      }
      check_same_at_another_page_size<bf16>(c, x, got, rng);
      if (detail::bf16_dot_available()) {
        const bool pv_pairs = c.v_head_dim % 32 == 0;  // P V on rounded probabilities
        CHECK(bf16_products_error_ratio(c, x, got, pv_pairs) <= 1.0);
        CHECK(bf16_products_error_ratio(c, x, contiguous, pv_pairs) <= 1.0);
      } else {
        const double v_max = x.v.cwiseAbs().maxCoeff(), a = x.a_max(c.head_dim);
        CHECK(max_abs_diff(to_double(got), to_double(contiguous)) <=
              2 * float_tolerance(c.head_dim, c.tk, a, v_max));
      }
    }
}

TEST_CASE("paged latent cache with bf16 products: bitwise the contiguous cache's answer",
          "[bf16][mla]") {
  // An MLA decode step's 16 heads: one row tile, whose values are the gathered key rows.
  std::mt19937_64 rng(104);
  const std::int64_t h = 16, dc = 64, dr = 32, tk = 333, tq = 1;  // AMX: d_qk a multiple of 32
  std::vector<std::int64_t> kp(static_cast<std::size_t>(tk)), qp{tk - 1};
  std::iota(kp.begin(), kp.end(), 0);
  const fmat c = random_matrix(rng, tk, dc), kr = random_matrix(rng, tk, dr);
  const fmat ql = random_matrix(rng, tq, h * dc, 0.3f), qr = random_matrix(rng, tq, h * dr);
  latent_cache<bf16> flat({.latent_dim = dc, .rope_dim = dr, .capacity = tk});
  const latent_append a{view_of(c), tensor3_view<const float>(kr.data(), {tk, 1, dr}), kp};
  flat.append(a);
  const tensor3_view<const float> qlv(ql.data(), {tq, h, dc}), qrv(qr.data(), {tq, h, dr});
  const attention_options opt{.products = product_math::bf16};
  fmat o1(tq, h * dc);
  attend_latent(qlv, qrv, qp, flat, tensor3_view<float>(o1.data(), {tq, h, dc}), opt);
  for (const std::int64_t ps : {1, 16, 48}) {
    page_pool<bf16> pool({.num_pages = tk / ps + 4, .page_size = ps, .token_elements = dc + dr});
    shuffle_free_pages(pool, rng);
    paged_cache<bf16, paged_latent> paged(pool, {dc, dr, 1});
    paged.append(a);
    fmat o2(tq, h * dc);
    attend_latent(qlv, qrv, qp, paged, tensor3_view<float>(o2.data(), {tq, h, dc}), opt);
    INFO("page_size=" << ps);
    CHECK((o1.array() == o2.array()).all());
  }
}

namespace {

/// The contiguous and the paged answers: bitwise equal when pages hold whole key blocks (128),
/// else each within the kernels' tolerance u max|v| (4 + 3 A) of the double reference.
void check_pair(const fmat& flat, const fmat& paged, const dmat& ref, double v_max, double a_max,
                std::int64_t ps) {
  if (ps % 128 == 0) {
    CHECK((flat.array() == paged.array()).all());
    return;
  }
  const double tol = 0x1p-24 * v_max * (4 + 3 * a_max);
  INFO("A=" << a_max << " tolerance=" << tol);
  CHECK(max_abs_diff(to_double(flat), ref) <= tol);
  CHECK(max_abs_diff(to_double(paged), ref) <= tol);
}

/// Latent, factor and value caches of S, paged and contiguous, at page sizes 1, 16, 48, 128.
template <storage_type S>
void check_paged_others(std::mt19937_64& rng) {
  for (const std::int64_t ps : {1, 16, 48, 128}) {
    const std::int64_t tk = 150 + static_cast<std::int64_t>(rng() % 100),
                       tq = 1 + static_cast<std::int64_t>(rng() % 5);
    std::vector<std::int64_t> kp(static_cast<std::size_t>(tk)), qp;
    std::iota(kp.begin(), kp.end(), 0);
    for (std::int64_t i = 0; i < tq; ++i) qp.push_back(tk - tq + i);
    const attention_options opt{.causal = true};
    INFO("page_size=" << ps << " Tk=" << tk << " Tq=" << tq);
    {  // absorbed MLA over a latent cache
      const std::int64_t h = 8, dc = 64, dr = 16;
      const fmat c = random_matrix(rng, tk, dc), kr = random_matrix(rng, tk, dr);
      const fmat ql = random_matrix(rng, tq, h * dc, 0.3f), qr = random_matrix(rng, tq, h * dr);
      latent_cache<S> flat({.latent_dim = dc, .rope_dim = dr, .capacity = tk});
      page_pool<S> pool({.num_pages = tk / ps + 4, .page_size = ps, .token_elements = dc + dr});
      shuffle_free_pages(pool, rng);
      paged_cache<S, paged_latent> paged(pool, {dc, dr, 1});
      const latent_append a{view_of(c), tensor3_view<const float>(kr.data(), {tk, 1, dr}), kp};
      flat.append(a), paged.append(a);
      const tensor3_view<const float> qlv(ql.data(), {tq, h, dc}), qrv(qr.data(), {tq, h, dr});
      fmat o1(tq, h * dc), o2(tq, h * dc);
      attend_latent(qlv, qrv, qp, flat, tensor3_view<float>(o1.data(), {tq, h, dc}), opt);
      attend_latent(qlv, qrv, qp, paged, tensor3_view<float>(o2.data(), {tq, h, dc}), opt);
      dmat q(tq, h * (dc + dr)), k(tk, dc + dr);
      for (std::int64_t t = 0; t < tq; ++t)
        for (std::int64_t i = 0; i < h; ++i)
          q.row(t).segment(i * (dc + dr), dc + dr) << ql.row(t).segment(i * dc, dc).cast<double>(),
              qr.row(t).segment(i * dr, dr).cast<double>();
      k << to_double(round_trip<S>(c)), to_double(round_trip<S>(kr));
      const double scale = 1 / std::sqrt(double(dc + dr));
      const auto ref = reference::attention(q, qp, k, k.leftCols(dc), kp, h, 1, scale, true,
                                            std::nullopt);
      check_pair(o1, o2, ref.out, c.cwiseAbs().maxCoeff(),
                 scale * max_segment_norm(q, dc + dr) * max_segment_norm(k, dc + dr), ps);
    }
    {  // TPA over a factorized cache
      const std::int64_t h = 8, d = 32, rq = 2, rk = 2, rv = 3;
      const fmat ak = random_matrix(rng, tk, rk * h), bk = random_matrix(rng, tk, rk * d),
                 av = random_matrix(rng, tk, rv * h), bv = random_matrix(rng, tk, rv * d),
                 aq = random_matrix(rng, tq, rq * h), bq = random_matrix(rng, tq, rq * d);
      factorized_cache<S> flat(
          {.heads = h, .head_dim = d, .k_rank = rk, .v_rank = rv, .capacity = tk});
      page_pool<S> pool({.num_pages = tk / ps + 4,
                         .page_size = ps,
                         .token_elements = rk * (h + d) + rv * (h + d)});
      shuffle_free_pages(pool, rng);
      paged_cache<S, paged_factors> paged(
          pool, {.heads = h, .head_dim = d, .k_rank = rk, .v_rank = rv});
      const factorized_append a{tensor3_view<const float>(ak.data(), {tk, rk, h}),
                                tensor3_view<const float>(bk.data(), {tk, rk, d}),
                                tensor3_view<const float>(av.data(), {tk, rv, h}),
                                tensor3_view<const float>(bv.data(), {tk, rv, d}), kp};
      flat.append(a), paged.append(a);
      fmat o1(tq, h * d), o2(tq, h * d);
      const tensor3_view<const float> aqv(aq.data(), {tq, rq, h}), bqv(bq.data(), {tq, rq, d});
      attend_factorized(aqv, bqv, qp, flat, tensor3_view<float>(o1.data(), {tq, h, d}), opt);
      attend_factorized(aqv, bqv, qp, paged, tensor3_view<float>(o2.data(), {tq, h, d}), opt);
      const dmat q = reference::tpa_materialise(to_double(aq), to_double(bq), rq, h, 1.0);
      const dmat k = reference::tpa_materialise(to_double(round_trip<S>(ak)),
                                                to_double(round_trip<S>(bk)), rk, h, 1.0 / rk);
      const dmat v = reference::tpa_materialise(to_double(round_trip<S>(av)),
                                                to_double(round_trip<S>(bv)), rv, h, 1.0 / rv);
      const double scale = 1 / std::sqrt(double(d));
      const auto ref = reference::attention(q, qp, k, v, kp, h, h, scale, true, std::nullopt);
      check_pair(o1, o2, ref.out, v.cwiseAbs().maxCoeff(),
                 scale * max_segment_norm(q, d) * max_segment_norm(k, d), ps);
    }
    {  // a shared-attention follower over a value cache
      const std::int64_t h = 8, hkv = 2, dv = 48;
      const fmat v = random_matrix(rng, tk, hkv * dv);
      fmat p = random_matrix(rng, tq * h, tk).cwiseAbs();  // rows normalised: donor weights
      for (std::int64_t r = 0; r < p.rows(); ++r) p.row(r) /= p.row(r).sum();
      value_cache<S> flat({.kv_heads = hkv, .v_head_dim = dv, .capacity = tk});
      page_pool<S> pool({.num_pages = tk / ps + 4, .page_size = ps, .token_elements = hkv * dv});
      shuffle_free_pages(pool, rng);
      paged_cache<S, paged_values> paged(pool, {hkv, dv});
      const value_append a{tensor3_view<const float>(v.data(), {tk, hkv, dv}), kp};
      flat.append(a), paged.append(a);
      fmat o1(tq, h * dv), o2(tq, h * dv);
      const tensor3_view<const float> pv(p.data(), {tq, h, tk});
      attend_shared(pv, flat, tensor3_view<float>(o1.data(), {tq, h, dv}));
      attend_shared(pv, paged, tensor3_view<float>(o2.data(), {tq, h, dv}));
      check_pair(o1, o2, reference::weighted_values(to_double(p), to_double(round_trip<S>(v)), h, hkv),
                 v.cwiseAbs().maxCoeff(), 0, ps);
    }
  }
}

}  // namespace

TEST_CASE("paged latent, factor and value caches: equal to their contiguous caches, every storage type") {
  std::mt19937_64 rng(102);
  check_paged_others<float>(rng);
  check_paged_others<bf16>(rng);
  check_paged_others<half>(rng);
}

TEST_CASE("paged cache: pages are shared by forks and copied before a shared page is written") {
  std::mt19937_64 rng(103);
  const gqa_case c{.heads = 4, .kv_heads = 2, .head_dim = 16, .v_head_dim = 16, .tk = 100, .tq = 1};
  const gqa_data x = make_gqa_data(rng, c);
  const std::int64_t ps = 16;
  page_pool<float> pool({.num_pages = 20, .page_size = ps, .token_elements = 2 * 2 * 16});
  auto kv = [&](std::int64_t t0, std::int64_t n) {
    return dense_append{tensor3_view<const float>(x.k.data() + t0 * x.k.cols(), {n, 2, 16}),
                        tensor3_view<const float>(x.v.data() + t0 * x.v.cols(), {n, 2, 16}),
                        std::span(x.k_pos).subspan(static_cast<std::size_t>(t0),
                                                   static_cast<std::size_t>(n))};
  };
  paged_cache<float, paged_dense> a(pool, {2, 16, 16});
  a.append(kv(0, 40));  // pages: 16 + 16 + 8 of 16
  REQUIRE(pool.free_pages() == 17);
  {
    auto b = a.fork(40);  // shares all three pages, the last one partly filled
    CHECK(pool.free_pages() == 17);
    for (const auto p : a.pages()) CHECK(pool.ref_count(p) == 2);
    b.append(kv(40, 30));  // copies the shared last page, then two more pages of its own
    CHECK(pool.free_pages() == 14);
    CHECK(a.pages()[2] != b.pages()[2]);
    CHECK(pool.ref_count(a.pages()[2]) == 1);
    CHECK(a.pages()[0] == b.pages()[0]);
    // a still reads its own 40 tokens; b reads 70, the same as one sequence written at once.
    paged_cache<float, paged_dense> whole(pool, {2, 16, 16});
    whole.append(kv(0, 70));
    gqa_case c70 = c;
    c70.tk = 70;
    gqa_data x70 = x;
    x70.q_pos = {x.k_pos[69]};
    CHECK((attend_over<float>(c70, x70, b).array() == attend_over<float>(c70, x70, whole).array()).all());
    a.append(kv(40, 5));  // a's own last page: written in place
    CHECK(pool.ref_count(a.pages()[0]) == 2);
    b.truncate(10);  // rollback: b keeps one (shared) page
    CHECK(b.pages().size() == 1);
  }
  CHECK(pool.free_pages() == 17);  // b and whole gave every page back
  a.clear();
  CHECK(pool.free_pages() == 20);
}

TEST_CASE("paged cache: a failed append changes nothing, and bad pools, layouts and tables are rejected by name") {
  page_pool<float> pool({.num_pages = 3, .page_size = 4, .token_elements = 8});
  paged_cache<float, paged_values> c(pool, {2, 4});
  fmat v = fmat::Ones(12, 8);
  std::vector<std::int64_t> pos(12);
  std::iota(pos.begin(), pos.end(), 0);
  c.append(value_append{tensor3_view<const float>(v.data(), {6, 2, 4}), std::span(pos).first(6)});
  ATTNKIT_CHECK_INVALID(
      c.append(value_append{tensor3_view<const float>(v.data(), {7, 2, 4}), std::span(pos).first(7)}),
      "paged_cache::append", "needs 2 free pages", "the pool has 1");
  CHECK(c.size() == 6);
  CHECK(c.positions().back() == 5);
  ATTNKIT_CHECK_INVALID(
      c.append(value_append{tensor3_view<const float>(v.data(), {1, 2, 3}), std::span(pos).first(1)}),
      "paged_cache::append: v");
  ATTNKIT_CHECK_INVALID((paged_cache<float, paged_dense>(pool, {2, 4, 4})), "paged_cache",
                        "pool's 8 elements per token", "layout's 16");
  ATTNKIT_CHECK_INVALID((page_pool<float>({.num_pages = 2, .page_size = 0, .token_elements = 8})),
                        "page_size must be > 0");
  std::vector<float> mem(60);
  ATTNKIT_CHECK_INVALID(
      (page_pool<float>({.num_pages = 2, .page_size = 4, .token_elements = 8}, mem.data(), 60)),
      "holds 60 elements", "need 64");
  ATTNKIT_CHECK_INVALID(pool.release(2), "page 2 is already free");
  ATTNKIT_CHECK_INVALID(pool.retain(7), "page 7 is outside [0, 3)");
  // Views over engine memory: every page of the table checked against the pool.
  std::vector<float> k(64), vv(64);
  const std::vector<std::int32_t> table = {1, 5};
  ATTNKIT_CHECK_INVALID(kv_view<float>::paged({k.data(), 16, 4, 4, 32}, {vv.data(), 16, 4, 4, 32},
                                              2, page_table{table, 4}, 2, std::span(pos).first(8)),
                        "page table entry 1 is page 5", "outside the pool's [0, 2)");
  ATTNKIT_CHECK_INVALID(kv_view<float>::paged({k.data(), 16, 4, 4, 32}, {vv.data(), 16, 4, 4, 32},
                                              2, page_table{std::span(table).first(1), 4}, 2,
                                              std::span(pos).first(6)),
                        "has 1 pages but 6 tokens of page_size 4 need 2");
}

TEST_CASE("paged view: a pool of more than 2^31 elements is addressed with 64-bit offsets") {
  // 2^31 + 2^20 bf16 elements of address space, reserved and never touched except the two pages
  // the view uses (one at the very end).
  const std::int64_t d = 64, ps = 16, page_elems = 2 * ps * d;  // K and V of one KV head
  const std::int64_t num_pages = ((std::int64_t{1} << 31) + (1 << 20)) / page_elems;
  const std::size_t bytes = static_cast<std::size_t>(num_pages * page_elems) * sizeof(bf16);
  void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
  REQUIRE(mem != MAP_FAILED);
  auto* pool = static_cast<bf16*>(mem);
  std::mt19937_64 rng(104);
  const fmat k = random_matrix(rng, 2 * ps, d), v = random_matrix(rng, 2 * ps, d),
             q = random_matrix(rng, 1, 4 * d);
  const std::vector<std::int32_t> table = {static_cast<std::int32_t>(num_pages - 1), 3};
  REQUIRE(static_cast<std::int64_t>(table[0]) * page_elems > (std::int64_t{1} << 31));
  for (std::int64_t t = 0; t < 2 * ps; ++t)
    for (std::int64_t c = 0; c < d; ++c) {
      bf16* page = pool + table[static_cast<std::size_t>(t / ps)] * page_elems;
      page[(t % ps) * d + c] = static_cast<bf16>(k(t, c));
      page[ps * d + (t % ps) * d + c] = static_cast<bf16>(v(t, c));
    }
  std::vector<std::int64_t> pos(2 * ps);
  std::iota(pos.begin(), pos.end(), 0);
  const auto view = kv_view<bf16>::paged({pool, ps * d, d, d, page_elems},
                                         {pool + ps * d, ps * d, d, d, page_elems}, 1,
                                         page_table{table, ps}, num_pages, pos);
  fmat got(1, 4 * d);
  const std::vector<std::int64_t> qp = {2 * ps - 1};
  attend(tensor3_view<const float>(q.data(), {1, 4, d}), qp, view,
         tensor3_view<float>(got.data(), {1, 4, d}));
  const auto ref = reference::attention(to_double(q), qp, to_double(round_trip<bf16>(k)),
                                        to_double(round_trip<bf16>(v)), pos, 4, 1,
                                        1 / std::sqrt(double(d)), true, std::nullopt);
  const double a_max = max_segment_norm(to_double(q), d) * max_segment_norm(to_double(k), d) /
                       std::sqrt(double(d));
  CHECK(max_abs_diff(to_double(got), ref.out) <=
        float_tolerance(d, 2 * ps, a_max, v.cwiseAbs().maxCoeff()) +
            storage_tolerance<bf16>(a_max, v.cwiseAbs().maxCoeff()));
  munmap(mem, bytes);
}
