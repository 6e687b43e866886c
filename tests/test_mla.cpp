// MLA: latent cache, layer vs the double reference (both paths), configuration errors.
#include "layer_fixture.hpp"
#include "mla_fixture.hpp"

using namespace attnkit;
using namespace attnkit::test;

static_assert(kv_cache<latent_cache<float>>);
static_assert(kv_cache<latent_cache<bf16>>);
static_assert(kv_cache<latent_cache<half>>);

TEMPLATE_TEST_CASE("latent_cache: bytes per token, one row (c | k_rope...) per token, rollback",
                   "[mla][cache]", float, bf16, half) {
  using S = TestType;
  latent_cache<S> c({.latent_dim = 512, .rope_dim = 64, .rope_heads = 1, .capacity = 8});
  CHECK(c.bytes_per_token() == (512 + 64) * static_cast<std::int64_t>(sizeof(S)));
  latent_cache<S> g({.latent_dim = 32, .rope_dim = 8, .rope_heads = 4, .capacity = 8});
  CHECK(g.bytes_per_token() == (32 + 4 * 8) * static_cast<std::int64_t>(sizeof(S)));
  std::mt19937_64 rng(3);
  const fmat cl = random_matrix(rng, 3, 32), kr = random_matrix(rng, 3, 4 * 8);
  const std::vector<std::int64_t> pos{10, 11, 15};
  g.append(view_of(cl), tensor3_view<const float>(kr.data(), {3, 4, 8}), pos);
  CHECK(g.size() == 3);
  CHECK(g.rows()[2 * 64 + 5] == static_cast<S>(cl(2, 5)));
  CHECK(g.rows()[1 * 64 + 32 + 2 * 8 + 3] == static_cast<S>(kr(1, 2 * 8 + 3)));
  CHECK(g.positions()[2] == 15);
  g.truncate(1);
  CHECK(g.size() == 1);
  ATTNKIT_CHECK_INVALID(g.append(view_of(cl), tensor3_view<const float>(kr.data(), {3, 4, 8}),
                                 std::span(pos).first(2)),
                        "latent_cache::append: c has shape [3, 32] but [2, 32]");
  latent_cache<S> small({.latent_dim = 32, .rope_dim = 8, .rope_heads = 4, .capacity = 2});
  ATTNKIT_CHECK_INVALID(
      small.append(view_of(cl), tensor3_view<const float>(kr.data(), {3, 4, 8}), pos),
      "appending 3 tokens to size=0 exceeds capacity=2");
  ATTNKIT_CHECK_INVALID(latent_cache<S>({.latent_dim = 0, .rope_dim = 8, .capacity = 2}),
                        "latent_dim must be > 0");
}

TEMPLATE_TEST_CASE("mla_layer matches the double reference on both paths", "[mla][layer]", float,
                   bf16) {
  using S = TestType;
  const std::uint64_t seed = GENERATE(range(1, 9));
  std::mt19937_64 rng(seed * 31);
  mla_config cfg = random_mla_config(rng);
  // bf16 caches also with bf16 products (the absorbed path's latent queries and probabilities
  // rounded as well; the naive path attends over float K and V).
  const bool products = std::same_as<S, bf16> && GENERATE(false, true);
  if (products) cfg.products = product_math::bf16;
  const bool biases = rng() % 2, norm = rng() % 2;
  const auto w = make_mla(rng, cfg, biases, norm);
  const std::int64_t t = 1 + static_cast<std::int64_t>(rng() % 40);
  const fmat x = random_matrix(rng, t, cfg.model_dim);
  const auto pos = gapped_positions(rng, t, static_cast<std::int64_t>(rng() % 50), 3);
  const auto ref = reference::mla_forward(to_double(x), pos, w.reference_weights(), w.shape(),
                                          cfg.rope, w.scale());
  const double tol = mla_rel_tolerance<S>(cfg, t, mla_a_max(w, x, pos));
  thread_pool pool(2);
  for (mla_path path : {mla_path::naive, mla_path::absorbed}) {
    mla_layer layer(cfg, w.weights());
    auto cache = layer.make_cache<S>(t);
    fmat y(t, cfg.model_dim);
    layer.forward(view_of(x), pos, cache, view_of(y), pool, path);
    INFO("path=" << (path == mla_path::naive ? "naive" : "absorbed") << " products=" << products
                 << " H=" << cfg.heads << " rope_heads=" << cfg.rope_heads
                 << " q_lora=" << cfg.q_lora_rank << " biases=" << biases << " norm=" << norm
                 << " layout=" << to_string(cfg.rope.layout) << " tol=" << tol);
    CHECK(rel_error(to_double(y), ref) <= tol);
    if constexpr (!std::same_as<S, float>) {
      // The storage term above is a worst case: the cache must also hold the reference's latent
      // rows [c | k_rope of each rope group], each element rounded once to S.
      const auto rw = w.reference_weights();
      const std::int64_t dc = cfg.latent_dim, dr = cfg.rope_dim, nr = cfg.rope_heads,
                         dqk = cfg.nope_dim + dr, g = cfg.heads / nr;
      reference::matrix kva = to_double(x) * rw.kv_a_proj_with_mqa.transpose();
      if (rw.kv_a_proj_bias.size()) kva.rowwise() += rw.kv_a_proj_bias.transpose();
      reference::matrix want(t, dc + nr * dr);
      want.leftCols(dc) =
          rw.kv_a_layernorm.size()
              ? reference::rms_norm_rows(kva.leftCols(dc), rw.kv_a_layernorm, w.shape().rms_eps)
              : reference::matrix(kva.leftCols(dc));
      const auto heads = reference::mla_materialise(to_double(x), pos, rw, w.shape(), cfg.rope);
      for (std::int64_t grp = 0; grp < nr; ++grp)  // the group's first head holds its k_rope
        want.middleCols(dc + grp * dr, dr) = heads.k.middleCols(grp * g * dqk + cfg.nope_dim, dr);
      const dmat rows = cached_rows(cache.view().keys(), t, 1, dc + nr * dr);
      CHECK(worst_rounding<S>(rows, want) <= 1);
      // And the output is the reference's attention over the per-head K and V those rows form
      // (W_UK c and the group's k_rope; W_UV c), to float round-off with f32 products.
      if (!products) {
        const std::int64_t dn = cfg.nope_dim, dv = cfg.v_head_dim;
        reference::matrix kv = rows.leftCols(dc) * rw.kv_b_proj.transpose();
        if (rw.kv_b_proj_bias.size()) kv.rowwise() += rw.kv_b_proj_bias.transpose();
        reference::matrix k(t, cfg.heads * dqk), v(t, cfg.heads * dv);
        for (std::int64_t hh = 0; hh < cfg.heads; ++hh) {
          k.middleCols(hh * dqk, dn) = kv.middleCols(hh * (dn + dv), dn);
          k.middleCols(hh * dqk + dn, dr) = rows.middleCols(dc + hh / g * dr, dr);
          v.middleCols(hh * dv, dv) = kv.middleCols(hh * (dn + dv) + dn, dv);
        }
        const auto r =
            reference::attention(heads.q, pos, k, v, pos, cfg.heads, cfg.heads, w.scale());
        reference::matrix over_cache = r.out * rw.o_proj.transpose();
        if (rw.o_proj_bias.size()) over_cache.rowwise() += rw.o_proj_bias.transpose();
        CHECK(rel_error(to_double(y), over_cache) <=
              mla_rel_tolerance<float>(cfg, t, mla_a_max(w, x, pos)));
      }
    }
  }
}

TEST_CASE(
    "mla_layer: DeepSeek-V2-Lite shapes (d_c 512, d_R 64, 576-element cache) match the reference",
    "[mla][layer]") {
  std::mt19937_64 rng(99);
  mla_config cfg{.model_dim = 256,
                 .heads = 4,
                 .latent_dim = 512,
                 .nope_dim = 128,
                 .rope_dim = 64,
                 .v_head_dim = 128};
  cfg.mscale = 1.f + 0.0707f * std::log(40.f);  // YaRN factor 40, mscale_all_dim 0.707
  const auto w = make_mla(rng, cfg, false, true);
  const std::int64_t t = 24;
  const fmat x = random_matrix(rng, t, cfg.model_dim);
  std::vector<std::int64_t> pos(t);
  for (std::int64_t i = 0; i < t; ++i) pos[static_cast<std::size_t>(i)] = 3000 + i;
  mla_layer layer(cfg, w.weights());
  auto cache = layer.make_cache<float>(t);
  CHECK(cache.bytes_per_token() == 576 * 4);
  fmat y(t, cfg.model_dim);
  layer.forward(view_of(x), pos, cache, view_of(y), serial_executor{}, mla_path::absorbed);
  const auto ref = reference::mla_forward(to_double(x), pos, w.reference_weights(), w.shape(),
                                          cfg.rope, w.scale());
  CHECK(rel_error(to_double(y), ref) <= mla_rel_tolerance<float>(cfg, t, mla_a_max(w, x, pos)));
  CHECK(layer.scale() == Approx(0.1147).epsilon(1e-3));  // 192^-1/2 (1 + 0.0707 ln 40)^2
  CHECK(layer.absorbed_max_tokens() == 170);
}

TEST_CASE("mla_layer: W_UV folded into o_proj gives the same function", "[mla][layer]") {
  std::mt19937_64 rng(7);
  mla_config cfg = random_mla_config(rng);
  const auto w = make_mla(rng, cfg, true, true);
  const std::int64_t t = 9;
  const fmat x = random_matrix(rng, t, cfg.model_dim);
  const auto pos = gapped_positions(rng, t, 0, 2);
  fmat y1(t, cfg.model_dim), y2(t, cfg.model_dim);
  mla_layer plain(cfg, w.weights());
  auto c1 = plain.make_cache<float>(t);
  plain.forward(view_of(x), pos, c1, view_of(y1), serial_executor{}, mla_path::absorbed);
  cfg.fold_uv_into_o = true;
  mla_layer folded(cfg, w.weights());
  auto c2 = folded.make_cache<float>(t);
  folded.forward(view_of(x), pos, c2, view_of(y2), serial_executor{}, mla_path::absorbed);
  CHECK(rel_error(to_double(y2), to_double(y1)) <=
        2 * mla_rel_tolerance<float>(cfg, t, mla_a_max(w, x, pos)));
}

TEST_CASE("mla_layer: invalid configurations and tensors throw naming the tensor and both shapes",
          "[mla][errors]") {
  std::mt19937_64 rng(11);
  mla_config cfg{
      .model_dim = 32, .heads = 2, .latent_dim = 16, .nope_dim = 8, .rope_dim = 4, .v_head_dim = 8};
  auto w = make_mla(rng, cfg, false, false);
  auto bad_cfg = [&](auto edit) {
    mla_config c = cfg;
    edit(c);
    return c;
  };
  ATTNKIT_CHECK_INVALID(mla_layer(bad_cfg([](mla_config& c) { c.rope_dim = 5; }), w.weights()),
                        "rope_dim must be even", "got 5");
  ATTNKIT_CHECK_INVALID(
      mla_layer(bad_cfg([](mla_config& c) { c.rope.rotary_dim = 8; }), w.weights()),
      "rope.rotary_dim=8 must be in [0, rope_dim=4]");
  ATTNKIT_CHECK_INVALID(mla_layer(bad_cfg([](mla_config& c) { c.rope_heads = 3; }), w.weights()),
                        "heads=2 must be a multiple of rope_heads=3");
  mla_weights bad = w.weights();
  bad.kv_b_proj = matrix_view<const float>(w.kv_b.data(), {16, 16});
  ATTNKIT_CHECK_INVALID(mla_layer(cfg, bad),
                        "tensor kv_b_proj has shape [16, 16] but [32, 16] was expected");
  bad = w.weights();
  bad.kv_a_proj_with_mqa = matrix_view<const float>(w.kv_a.data(), {16, 32});
  ATTNKIT_CHECK_INVALID(mla_layer(cfg, bad),
                        "tensor kv_a_proj_with_mqa has shape [16, 32] but [20, 32]");
  bad = w.weights();
  bad.o_proj = {};
  ATTNKIT_CHECK_INVALID(mla_layer(cfg, bad), "tensor o_proj is missing", "[32, 16]");
  ATTNKIT_CHECK_INVALID(mla_layer(bad_cfg([](mla_config& c) { c.q_lora_rank = 8; }), w.weights()),
                        "q_lora_rank=8 uses q_a_proj/q_b_proj, but q_proj was also given");
  bad = w.weights();
  bad.q_proj = {};
  ATTNKIT_CHECK_INVALID(mla_layer(cfg, bad), "tensor q_proj is missing", "[24, 32]");
  bad = w.weights();
  bad.kv_a_layernorm = std::span(w.q_bias.data(), 0);
  std::vector<float> short_norm(5, 1.f);
  bad.kv_a_layernorm = short_norm;
  ATTNKIT_CHECK_INVALID(mla_layer(cfg, bad),
                        "tensor kv_a_layernorm has 5 entries but latent_dim=16");
  bad = w.weights();
  std::vector<float> kb(7);
  bad.kv_b_proj_bias = kb;
  ATTNKIT_CHECK_INVALID(mla_layer(cfg, bad), "kv_b_proj_bias has 7 entries but 32");
  mla_layer layer(cfg, w.weights());
  latent_cache<float> wrong({.latent_dim = 16, .rope_dim = 8, .capacity = 4});
  fmat x = random_matrix(rng, 1, 32), y(1, 32);
  const std::int64_t p = 0;
  ATTNKIT_CHECK_INVALID(layer.forward(view_of(x), std::span(&p, 1), wrong, view_of(y)),
                        "latent width 16 and key width 24", "the layer needs 16 and 20");
  std::vector<float> ql(16), qr(4), o(16);
  auto cache = layer.make_cache<float>(2);
  ATTNKIT_CHECK_INVALID(
      attend_latent(tensor3_view<const float>(ql.data(), {1, 1, 16}),
                    tensor3_view<const float>(qr.data(), {1, 1, 3}), std::span(&p, 1), cache,
                    tensor3_view<float>(o.data(), {1, 1, 16})),
      "q_rope width 3 does not divide", "key width 20 - latent 16");
  ATTNKIT_CHECK_INVALID(
      attend_latent(tensor3_view<const float>(ql.data(), {1, 1, 16}),
                    tensor3_view<const float>(qr.data(), {1, 1, 4}), std::span(&p, 1), cache,
                    tensor3_view<float>(o.data(), {1, 1, 16}), {.scale = NAN}),
      "attend_latent: scale must be finite");
}
