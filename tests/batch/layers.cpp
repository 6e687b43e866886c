// Layers over a batch: one forward_batch call for a step of many sequences (decodes, a
// speculative multi-token step, a prefill chunk) equals each sequence's own forward call, leaves
// every cache as those calls would, reuses one plan across the layers of a step, and changes no
// cache when it throws.
#include <numeric>

#include "layer_fixture.hpp"
#include "mla_fixture.hpp"
#include "tpa_fixture.hpp"

using namespace attnkit;
using namespace attnkit::test;

namespace {

/// A cache per sequence holding `history` tokens at positions 0.., from the layer itself.
template <class Cache>
void prefill(gqa_layer& layer, Cache& cache, std::int64_t history, std::mt19937_64& rng) {
  const std::int64_t d = layer.config().model_dim;
  const fmat x = random_matrix(rng, history, d);
  fmat y(history, d);
  std::vector<std::int64_t> pos(static_cast<std::size_t>(history));
  std::iota(pos.begin(), pos.end(), 0);
  layer.forward(view_of(x), pos, cache, view_of(y));
}

}  // namespace

/// A batch step of `layer` over paged caches against one `single` forward call per sequence on
/// caches of its own (the same history in both), for two steps; a second layer of each step (the
/// same weights, caches forked from the first's history) reuses the step's plan and gives the
/// same answer bitwise. single_forward(layer, x, positions, cache, y); tolerance(t, x_rows).
template <storage_type S, class Layer, class Layout, class SingleForward, class Tolerance>
void check_batch_step(std::mt19937_64& rng, Layer& layer, Layer& single, const Layout& layout,
                      std::int64_t model_dim, SingleForward&& single_forward,
                      Tolerance&& tolerance) {
  using cache_t = paged_cache<S, Layout>;
  // history (tokens already cached), new tokens this step
  const std::vector<std::pair<std::int64_t, std::int64_t>> seqs = {
      {40, 1}, {0, 12}, {130, 4}, {7, 1}, {300, 1}, {64, 33}};
  Layout l = layout;
  l.validate();
  page_pool<S> pool({.num_pages = 400, .page_size = 16, .token_elements = l.token_elements()});
  std::vector<cache_t> batch_caches, single_caches;
  for (const auto& [hist, add] : seqs) {
    batch_caches.emplace_back(pool, layout);
    single_caches.emplace_back(pool, layout);
    const fmat x = random_matrix(rng, hist, model_dim);
    fmat y(hist, model_dim);
    std::vector<std::int64_t> pos(static_cast<std::size_t>(hist));
    std::iota(pos.begin(), pos.end(), 0);
    layer.forward(view_of(x), pos, batch_caches.back(), view_of(y));
    single.forward(view_of(x), pos, single_caches.back(), view_of(y));
  }
  std::vector<std::int64_t> indptr = {0}, pos;
  for (const auto& [hist, add] : seqs) {
    for (std::int64_t i = 0; i < add; ++i) pos.push_back(hist + i);
    indptr.push_back(indptr.back() + add);
  }
  const std::int64_t t = indptr.back();
  std::vector<cache_t*> ptrs;
  for (auto& c : batch_caches) ptrs.push_back(&c);
  thread_pool threads(3);
  for (int step = 0; step < 2; ++step) {
    const fmat x = random_matrix(rng, t, model_dim);
    fmat y(t, model_dim), y2(t, model_dim);
    batch_plan plan;
    layer.forward_batch(view_of(x), pos, indptr, std::span(ptrs), view_of(y), plan, threads);
    CHECK(plan.sequences() == static_cast<std::int64_t>(seqs.size()));
    for (std::size_t s = 0; s < seqs.size(); ++s) {
      const std::int64_t b = indptr[s], n = indptr[s + 1] - b;
      fmat ys(n, model_dim);
      single_forward(single, matrix_view<const float>(x.data() + b * model_dim, {n, model_dim}),
                     std::span(pos).subspan(static_cast<std::size_t>(b), static_cast<std::size_t>(n)),
                     single_caches[s], view_of(ys));
      const double tol = tolerance(single_caches[s].size(), fmat(x.middleRows(b, n)));
      INFO("step " << step << " sequence " << s << " tolerance " << tol);
      CHECK(rel_error(to_double(y.middleRows(b, n)), to_double(ys)) <= 2 * tol);
      CHECK(batch_caches[s].size() == single_caches[s].size());
      CHECK(std::ranges::equal(batch_caches[s].positions(), single_caches[s].positions()));
    }
    // A second layer of the step reuses the plan, over caches that share the first layer's
    // history pages (the new tokens are then written to copies of the shared last pages).
    std::vector<cache_t> other;
    std::vector<cache_t*> other_ptrs;
    for (std::size_t s = 0; s < seqs.size(); ++s)
      other.push_back(batch_caches[s].fork(batch_caches[s].size() - (indptr[s + 1] - indptr[s])));
    for (auto& c : other) other_ptrs.push_back(&c);
    layer.forward_batch(view_of(x), pos, indptr, std::span(other_ptrs), view_of(y2), plan, threads);
    CHECK((y2.array() == y.array()).all());
    for (auto& p : pos) p += 33;  // the next step's positions: after every sequence's last
  }
}

// bf16 caches with bf16 products: the batch must reach the products the single calls use (a
// batch on f32 products would miss the float tolerance by far).
TEMPLATE_TEST_CASE(
    "layer batch step: GQA, MLA and TPA layers equal one forward call per sequence, "
    "over paged caches",
    "", float, bf16) {
  using S = TestType;
  const product_math products = std::same_as<S, bf16> ? product_math::bf16 : product_math::f32;
  std::mt19937_64 rng(301);
  {
    gqa_config cfg{.model_dim = 96, .heads = 6, .kv_heads = 2, .head_dim = 32};
    cfg.rope.theta = 10000;
    cfg.products = products;
    const gqa_layer_data w = make_layer_data(rng, cfg, true, true);
    gqa_layer layer(cfg, w.weights()), single(cfg, w.weights());
    INFO("GQA");
    check_batch_step<S>(
        rng, layer, single, paged_dense{2, 32, 32}, cfg.model_dim,
        [](gqa_layer& l, auto x, auto p, auto& c, auto y) { l.forward(x, p, c, y); },
        [&](std::int64_t t, const fmat& x) {
          return layer_rel_tolerance<float>(cfg, t, layer_a_max(w, x));
        });
  }
  for (int i = 0; i < 3; ++i) {
    mla_config cfg = random_mla_config(rng);
    cfg.products = products;
    const mla_data w = make_mla(rng, cfg, i == 1, i != 2);
    mla_layer layer(cfg, w.weights()), single(cfg, w.weights());
    INFO("MLA: H " << cfg.heads << " d_c " << cfg.latent_dim << " rope heads " << cfg.rope_heads);
    check_batch_step<S>(
        rng, layer, single, paged_latent{cfg.latent_dim, cfg.rope_dim, cfg.rope_heads},
        cfg.model_dim,
        [](mla_layer& l, auto x, auto p, auto& c, auto y) {
          l.forward(x, p, c, y, serial_executor{}, mla_path::absorbed);
        },
        [&](std::int64_t t, const fmat& x) {
          std::vector<std::int64_t> p(static_cast<std::size_t>(x.rows()));
          std::iota(p.begin(), p.end(), 0);
          return mla_rel_tolerance<float>(cfg, t, mla_a_max(w, x, p));
        });
  }
  for (int i = 0; i < 3; ++i) {
    tpa_config cfg = random_tpa_config(rng);
    cfg.products = products;
    const tpa_data w = make_tpa(rng, cfg, i == 2);
    tpa_layer layer(cfg, w.weights()), single(cfg, w.weights());
    INFO("TPA: H " << cfg.heads << " ranks " << cfg.q_rank << " " << cfg.k_rank << " " << cfg.v_rank);
    check_batch_step<S>(
        rng, layer, single,
        paged_factors{.heads = cfg.heads,
                      .head_dim = cfg.head_dim,
                      .v_head_dim = cfg.v_head_dim,
                      .k_rank = cfg.k_rank,
                      .v_rank = cfg.v_rank},
        cfg.model_dim,
        [](tpa_layer& l, auto x, auto p, auto& c, auto y) {
          l.forward(x, p, c, y, serial_executor{}, tpa_path::factorized);
        },
        [&](std::int64_t t, const fmat& x) {
          return tpa_rel_tolerance<float>(cfg, t, tpa_a_max(w, layer, x));
        });
  }
}

TEST_CASE("GQA layer batch step: a call that throws changes no cache") {
  std::mt19937_64 rng(302);
  gqa_config cfg{.model_dim = 32, .heads = 2, .kv_heads = 1, .head_dim = 16};
  const gqa_layer_data w = make_layer_data(rng, cfg, false);
  gqa_layer layer(cfg, w.weights());
  auto a = layer.make_cache<float>(10), b = layer.make_cache<float>(3);
  prefill(layer, a, 4, rng);
  std::vector<dense_cache<float>*> ptrs = {&a, &b};
  const std::vector<std::int64_t> indptr = {0, 2, 6}, pos = {4, 5, 0, 1, 2, 3};
  const fmat x = random_matrix(rng, 6, 32);
  fmat y(6, 32);
  batch_plan plan;
  ATTNKIT_CHECK_INVALID(layer.forward_batch(view_of(x), pos, indptr, std::span(ptrs), view_of(y), plan),
                        "gqa_layer::forward_batch", "sequence 1", "exceeds capacity=3");
  CHECK(a.size() == 4);
  CHECK(b.size() == 0);
  // A plan of another step's shape: rejected after the appends, which are rolled back.
  auto c = layer.make_cache<float>(10);
  ptrs[1] = &c;
  batch_plan stale;
  {
    const std::vector<std::int64_t> one = {0, 1, 2}, p1 = {4, 0};
    layer.forward_batch(matrix_view<const float>(x.data(), {2, 32}), p1, one, std::span(ptrs),
                        matrix_view<float>(y.data(), {2, 32}), stale);
    a.truncate(4), c.truncate(0);
  }
  ATTNKIT_CHECK_INVALID(layer.forward_batch(view_of(x), pos, indptr, std::span(ptrs), view_of(y), stale),
                        "another shape");
  CHECK(a.size() == 4);
  CHECK(c.size() == 0);
  ptrs[1] = &a;
  ATTNKIT_CHECK_INVALID(layer.forward_batch(view_of(x), pos, indptr, std::span(ptrs), view_of(y), plan),
                        "the same cache is also sequence 1");
}
