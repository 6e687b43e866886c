// gqa_layer against the double reference layer; configuration and weight-shape errors; every
// layer's product_math reaching its kernel.
#include <numeric>

#include "layer_fixture.hpp"
#include "mla_fixture.hpp"
#include "tpa_fixture.hpp"

using namespace attnkit;
using namespace attnkit::test;

TEMPLATE_TEST_CASE("gqa_layer matches the double reference layer", "[layer]", float, bf16, half) {
  using S = TestType;
  std::mt19937_64 rng(GENERATE(1, 2, 3, 4, 5));
  const std::int64_t hkv = 1 + static_cast<std::int64_t>(rng() % 3),
                     g = 1 + static_cast<std::int64_t>(rng() % 4);
  gqa_config cfg{
      .model_dim = 48 + static_cast<std::int64_t>(rng() % 3) * 16,
      .heads = hkv * g,
      .kv_heads = hkv,
      .head_dim = rng() % 2 ? 32 : 16,
      .v_head_dim = rng() % 2 ? 0 : 24,
      .rope = {.theta = 10000.0,
               .layout = rng() % 2 ? rope_layout::half_split : rope_layout::interleaved}};
  if (rng() % 2) cfg.rope.rotary_dim = cfg.head_dim / 2;
  if (rng() % 3 == 0) cfg.window = 5 + static_cast<std::int64_t>(rng() % 20);
  const bool biases = rng() % 2, qk_norm = rng() % 3 == 0;
  // bf16 caches also with bf16 products (the queries and probabilities rounded as well).
  const bool products = std::same_as<S, bf16> && GENERATE(false, true);
  if (products) cfg.products = product_math::bf16;
  const auto w = make_layer_data(rng, cfg, biases, qk_norm);
  const std::int64_t t = 1 + static_cast<std::int64_t>(rng() % 60);
  const fmat x = random_matrix(rng, t, cfg.model_dim);
  const auto pos = gapped_positions(rng, t, static_cast<std::int64_t>(rng() % 100), 4);

  gqa_layer layer(cfg, w.weights());
  auto cache = layer.make_cache<S>(t);
  fmat y(t, cfg.model_dim);
  thread_pool pool(2);
  layer.forward(view_of(x), pos, cache, view_of(y), pool);
  CHECK(cache.size() == t);

  const double scale = 1.0 / std::sqrt(double(cfg.head_dim)), a = layer_a_max(w, x);
  const auto ref =
      reference::gqa_layer_forward(to_double(x), pos, w.reference_weights(), cfg.heads,
                                   cfg.kv_heads, cfg.head_dim, cfg.rope, scale, cfg.window);
  const double tol = layer_rel_tolerance<S>(cfg, t, a);
  INFO("storage=" << storage_name<S>() << " products=" << products << " H=" << cfg.heads << " H_kv="
                  << hkv << " biases=" << biases << " qk_norm=" << qk_norm << " tol=" << tol);
  CHECK(rel_error(to_double(y), ref) <= tol);

  if constexpr (!std::same_as<S, float>) {
    // The storage term above is a worst case, far above the errors a 16-bit cache makes, so
    // the two halves are also checked tightly: the cache holds the reference's K and V each
    // rounded once to S (worst_rounding), and the output is the reference's attention over them.
    const auto heads = reference::gqa_heads(to_double(x), pos, w.reference_weights(), cfg.heads,
                                            hkv, cfg.head_dim, cfg.rope);
    const auto kv = cache.view();
    const dmat k = cached_rows(kv.keys(), t, hkv, cfg.head_dim),
               v = cached_rows(kv.values(), t, hkv, cfg.v_head_dim ? cfg.v_head_dim : cfg.head_dim);
    CHECK(worst_rounding<S>(k, heads.k) <= 1);
    CHECK(worst_rounding<S>(v, heads.v) <= 1);
    // The layer's output is the reference's attention over what the cache holds, to float
    // round-off (with f32 products: bf16 products round the queries too).
    if (!products) {
      const auto r =
          reference::attention(heads.q, pos, k, v, pos, cfg.heads, hkv, scale, true, cfg.window);
      dmat over_cache = r.out * w.reference_weights().o.transpose();
      if (!w.ob.empty()) over_cache.rowwise() += w.reference_weights().o_bias.transpose();
      CHECK(rel_error(to_double(y), over_cache) <= layer_rel_tolerance<float>(cfg, t, a));
    }
  }
}

TEST_CASE("gqa_layer with per-KV-head RoPE frequency tables matches the reference",
          "[layer][rope]") {
  std::mt19937_64 rng(77);
  gqa_config cfg{.model_dim = 64,
                 .heads = 4,
                 .kv_heads = 2,
                 .head_dim = 16,
                 .rope = {.theta = 10000.0,
                          .rotary_dim = 8,
                          .frequency_dim = 16,
                          .frequency_index = {{0, 2, 4, 6}, {1, 3, 5, 7}}}};
  const auto w = make_layer_data(rng, cfg, false);
  const fmat x = random_matrix(rng, 12, 64);
  std::vector<std::int64_t> pos(12);
  std::iota(pos.begin(), pos.end(), 3);
  gqa_layer layer(cfg, w.weights());
  auto cache = layer.make_cache<float>(12);
  fmat y(12, 64);
  layer.forward(view_of(x), pos, cache, view_of(y));
  // The reference ropes query head h with KV head h/g's table.
  rope_config qrope = cfg.rope;
  qrope.frequency_index = {cfg.rope.frequency_index[0], cfg.rope.frequency_index[0],
                           cfg.rope.frequency_index[1], cfg.rope.frequency_index[1]};
  const reference::matrix xd = to_double(x);
  reference::matrix q = xd * to_double(w.q).transpose(), k = xd * to_double(w.k).transpose(),
                    v = xd * to_double(w.v).transpose();
  reference::rope_rows(q, 4, 16, pos, qrope);
  reference::rope_rows(k, 2, 16, pos, cfg.rope);
  const auto a = reference::attention(q, pos, k, v, pos, 4, 2, 0.25);
  const reference::matrix ref = a.out * to_double(w.o).transpose();
  CHECK(rel_error(to_double(y), ref) <= layer_rel_tolerance<float>(cfg, 12, layer_a_max(w, x)));
}

TEST_CASE("layers: product_math reaches the GQA, MLA (absorbed) and TPA kernels", "[layer][bf16]") {
  // A 40-token prefill over bf16 caches: the GEMM tiles, whose shapes here (d_qk whole 32s, d_v
  // whole 16s) both bf16 engines take. Where the CPU runs bf16 products the rounded queries
  // must change the output; elsewhere (scalar and AVX2 targets, CPUs without them) the layer
  // must compute as f32, bit for bit. The random layer tests above bound the change.
  std::mt19937_64 rng(21);
  const std::int64_t t = 40, dm = 64;
  const fmat x = random_matrix(rng, t, dm);
  std::vector<std::int64_t> pos(t);
  std::iota(pos.begin(), pos.end(), 0);
  thread_pool pool(2);
  auto check = [&]<class Layer>(std::type_identity<Layer>, const char* name, const auto& cfg,
                                const auto& weights, auto... path) {
    auto forward = [&](product_math p) {
      auto c = cfg;
      c.products = p;
      Layer layer(c, weights);
      auto cache = layer.template make_cache<bf16>(t);
      fmat y(t, dm);
      layer.forward(view_of(x), pos, cache, view_of(y), pool, path...);
      return y;
    };
    const fmat f32 = forward(product_math::f32), b16 = forward(product_math::bf16);
    INFO(name << ": bf16 products available " << bf16_products_available());
    if (bf16_products_available()) {
      CHECK(f32 != b16);
      CHECK(rel_error(to_double(b16), to_double(f32)) <= 0.05);
    } else {
      CHECK(f32 == b16);
    }
  };
  const gqa_config gc{.model_dim = dm, .heads = 4, .kv_heads = 2, .head_dim = 32};
  check(std::type_identity<gqa_layer>{}, "gqa_layer", gc,
        make_layer_data(rng, gc, false).weights());
  const mla_config mc{.model_dim = dm,
                      .heads = 4,
                      .latent_dim = 64,
                      .nope_dim = 16,
                      .rope_dim = 32,
                      .v_head_dim = 16};
  check(std::type_identity<mla_layer>{}, "mla_layer", mc, make_mla(rng, mc, false, false).weights(),
        mla_path::absorbed);
  const tpa_config tc{
      .model_dim = dm, .heads = 4, .head_dim = 32, .q_rank = 2, .k_rank = 2, .v_rank = 2};
  check(std::type_identity<tpa_layer>{}, "tpa_layer", tc, make_tpa(rng, tc, false).weights(),
        tpa_path::factorized);
}

TEST_CASE("gqa_layer: invalid configurations and weights throw naming the tensor and shapes",
          "[layer][errors]") {
  std::mt19937_64 rng(5);
  gqa_config cfg{.model_dim = 32, .heads = 4, .kv_heads = 2, .head_dim = 8};
  auto w = make_layer_data(rng, cfg, true);
  ATTNKIT_CHECK_INVALID(
      gqa_layer({.model_dim = 32, .heads = 3, .kv_heads = 2, .head_dim = 8}, w.weights()),
      "heads=3 must be a multiple of kv_heads=2");
  ATTNKIT_CHECK_INVALID(
      gqa_layer({.model_dim = 0, .heads = 4, .kv_heads = 2, .head_dim = 8}, w.weights()),
      "model_dim must be > 0");
  gqa_weights bad = w.weights();
  bad.k_proj = matrix_view<const float>(w.k.data(), {8, 32});
  ATTNKIT_CHECK_INVALID(gqa_layer(cfg, bad), "weight k_proj has shape [8, 32] but [16, 32]");
  bad = w.weights();
  bad.o_proj = matrix_view<const float>(w.o.data(), {32, 16});
  ATTNKIT_CHECK_INVALID(gqa_layer(cfg, bad), "weight o_proj has shape [32, 16] but [32, 32]");
  bad = w.weights();
  bad.v_proj_bias = std::span(w.vb).first(3);
  ATTNKIT_CHECK_INVALID(gqa_layer(cfg, bad), "v_proj_bias has 3 entries but 16");
  bad = w.weights();
  bad.k_norm = std::span(w.vb).first(5);
  ATTNKIT_CHECK_INVALID(gqa_layer(cfg, bad), "k_norm has 5 entries but 8");
  bad = w.weights();
  bad.q_proj = matrix_view<const float>(w.q.data(), {32, 32}, {64, 2});
  ATTNKIT_CHECK_INVALID(gqa_layer(cfg, bad), "unit column stride");
  gqa_config badrope = cfg;
  badrope.rope.rotary_dim = 5;
  ATTNKIT_CHECK_INVALID(gqa_layer(badrope, w.weights()), "rotary_dim must be even");

  gqa_layer layer(cfg, w.weights());
  auto cache = layer.make_cache<float>(2);
  fmat x = random_matrix(rng, 3, 32), y(3, 32);
  std::vector<std::int64_t> pos{0, 1, 2};
  ATTNKIT_CHECK_INVALID(layer.forward(view_of(x), pos, cache, view_of(y)),
                        "appending 3 tokens to size=0 exceeds capacity=2");
  CHECK(cache.size() == 0);
  auto cache2 = layer.make_cache<float>(8);
  ATTNKIT_CHECK_INVALID(layer.forward(view_of(x), std::span(pos).first(2), cache2, view_of(y)),
                        "positions has 2 entries but x has T=3");
  fmat y_bad(3, 31);
  ATTNKIT_CHECK_INVALID(layer.forward(view_of(x), pos, cache2, view_of(y_bad)),
                        "y has shape [3, 31] but [3, 32]");
  dense_cache<float> wrong({.kv_heads = 1, .head_dim = 8, .capacity = 8});
  ATTNKIT_CHECK_INVALID(layer.forward(view_of(x), pos, wrong, view_of(y)), "cache has kv_heads=1",
                        "the layer needs 2");
}
