// TPA identities: MHA, MQA and GQA are TPA with fixed head factors (I5); RoPE on the B factors
// equals RoPE on the materialised Q/K (I6); the FlashTPA contraction order equals the
// materialised computation (I7); prefill == chunked prefill == token-by-token decode.
#include "layer_fixture.hpp"
#include "tpa_fixture.hpp"

using namespace attnkit;
using namespace attnkit::test;

namespace {
template <class Cache, class Layer>
fmat run_chunks(Layer& layer, Cache& cache, const fmat& x, const std::vector<std::int64_t>& pos,
                std::int64_t chunk, auto... extra) {
  fmat y(x.rows(), x.cols());
  thread_pool pool(2);
  for (std::int64_t s = 0; s < x.rows(); s += chunk) {
    const std::int64_t n = std::min(chunk, x.rows() - s);
    layer.forward(matrix_view<const float>(x.row(s).data(), {n, x.cols()}),
                  std::span(pos).subspan(s, n), cache,
                  matrix_view<float>(y.row(s).data(), {n, x.cols()}), pool, extra...);
  }
  return y;
}
}  // namespace

TEST_CASE("I5: MHA, MQA and GQA equal TPA with fixed head factors", "[identity][tpa]") {
  // GQA with G KV heads is TPA with R_K = R_V = G, a_j = G * [h in group j] (the 1/R factor
  // cancels G), B_K = W_K of KV head j, and the plain q_proj (TPA-KVonly). MHA: G = H; MQA: G = 1.
  std::mt19937_64 rng(GENERATE(1, 2, 3));
  const std::int64_t h = 8, d = 16, dm = 48;
  for (std::int64_t g : {h, std::int64_t{1}, std::int64_t{2}, std::int64_t{4}}) {
    gqa_config gc{.model_dim = dm,
                  .heads = h,
                  .kv_heads = g,
                  .head_dim = d,
                  .rope = {.theta = 10000.0, .layout = rope_layout::half_split}};
    const auto gw = make_layer_data(rng, gc, false);
    gqa_layer gqa(gc, gw.weights());
    fmat a(g, h);  // [R, H]
    a.setZero();
    for (std::int64_t hh = 0; hh < h; ++hh) a(hh / (h / g), hh) = float(g);
    tpa_layer tpa({.model_dim = dm,
                   .heads = h,
                   .head_dim = d,
                   .q_rank = 0,
                   .k_rank = g,
                   .v_rank = g,
                   .rope = gc.rope},
                  {.q_proj = view_of(gw.q),
                   .w_b_k = view_of(gw.k),
                   .w_b_v = view_of(gw.v),
                   .o_proj = view_of(gw.o),
                   .a_k = view_of(a),
                   .a_v = view_of(a)});
    const std::int64_t t = 30;
    const fmat x = random_matrix(rng, t, dm);
    const auto pos = gapped_positions(rng, t, 0, 2);
    auto gcache = gqa.make_cache<float>(t);
    auto tcache = tpa.make_cache<float>(t);
    const fmat yg = run_chunks(gqa, gcache, x, pos, t), yt = run_chunks(tpa, tcache, x, pos, t);
    INFO("G=" << g);
    CHECK(rel_error(to_double(yt), to_double(yg)) <=
          2 * layer_rel_tolerance<float>(gc, t, layer_a_max(gw, x)) + 2 * 4 * 0x1p-24 * double(g));
    // TPA's cache holds R (H + 2d) elements per token instead of 2 G d.
    CHECK(tcache.bytes_per_token() == g * (h + d) * 2 * 4);
  }
}

TEST_CASE("I6: RoPE on the B factors equals RoPE on the materialised Q and K",
          "[identity][tpa][rope]") {
  std::mt19937_64 rng(GENERATE(21, 22, 23));
  tpa_config cfg = random_tpa_config(rng);
  if (cfg.q_rank == 0) cfg.q_rank = 3;
  const auto w = make_tpa(rng, cfg, false);
  tpa_layer layer(cfg, w.weights());
  const std::int64_t t = 17;
  const reference::matrix x = to_double(random_matrix(rng, t, cfg.model_dim));
  const auto pos = gapped_positions(rng, t, 1000, 5);
  const double s = 1 / std::sqrt(double(cfg.head_dim));
  const auto on_b = reference::tpa_forward(x, pos, w.reference_weights(), w.shape(layer.scales()),
                                           cfg.rope, s, true);
  const auto on_q = reference::tpa_forward(x, pos, w.reference_weights(), w.shape(layer.scales()),
                                           cfg.rope, s, false);
  CHECK(rel_error(on_b, on_q) <= 1e-12);  // double round-off only
}

TEMPLATE_TEST_CASE(
    "I7: the FlashTPA order equals the materialised computation, prefill == chunked == decode",
    "[identity][tpa]", float, bf16) {
  std::mt19937_64 rng(GENERATE(31, 32, 33, 34));
  tpa_config cfg = random_tpa_config(rng);
  if (rng() % 2) cfg.window = 11;
  const auto w = make_tpa(rng, cfg, rng() % 3 == 0);
  tpa_layer layer(cfg, w.weights());
  const std::int64_t t = 45;
  const fmat x = random_matrix(rng, t, cfg.model_dim);
  const auto pos = gapped_positions(rng, t, 0, 3);
  auto c1 = layer.make_cache<TestType>(t), c2 = layer.make_cache<TestType>(t),
       c3 = layer.make_cache<TestType>(t), c4 = layer.make_cache<TestType>(t);
  const fmat flash = run_chunks(layer, c1, x, pos, t, tpa_path::factorized);
  const fmat mat = run_chunks(layer, c2, x, pos, t, tpa_path::materialized);
  const fmat chunked = run_chunks(layer, c3, x, pos, 8, tpa_path::factorized);
  const fmat decode = run_chunks(layer, c4, x, pos, 1, tpa_path::factorized);
  const double tol = 2 * tpa_rel_tolerance<float>(cfg, t, tpa_a_max(w, layer, x));
  INFO("H=" << cfg.heads << " R=" << cfg.q_rank << "/" << cfg.k_rank << "/" << cfg.v_rank);
  CHECK(rel_error(to_double(flash), to_double(mat)) <= tol);
  CHECK(rel_error(to_double(chunked), to_double(flash)) <= tol);
  CHECK(rel_error(to_double(decode), to_double(flash)) <= tol);
}
