// GQA -> MLA conversion: the exact conversion (identity I1) in both tensor layouts computes the
// GQA layer's function to float round-off, with exactly the GQA cache size.
#include <attnkit/attnkit.hpp>
#include "layer_fixture.hpp"

#include <attnkit/convert/gqa_to_mla.hpp>  // also in the umbrella header

using namespace attnkit;
using namespace attnkit::test;

TEST_CASE("I1: exact GQA -> MLA equals the GQA layer (both layouts, both MLA paths)",
          "[convert][identity]") {
  const std::uint64_t seed = GENERATE(range(1, 11));
  std::mt19937_64 rng(seed * 17);
  const std::int64_t hkv = 1 + static_cast<std::int64_t>(rng() % 3),
                     g = 1 + static_cast<std::int64_t>(rng() % 4);
  gqa_config cfg{
      .model_dim = 48,
      .heads = hkv * g,
      .kv_heads = hkv,
      .head_dim = rng() % 2 ? 16 : 24,
      .v_head_dim = rng() % 3 == 0 ? 8 : 0,
      .rope = {.theta = rng() % 2 ? 10000.0 : 500000.0,
               .layout = rng() % 2 ? rope_layout::half_split : rope_layout::interleaved}};
  if (rng() % 3 == 0) cfg.rope.rotary_dim = cfg.head_dim / 2;
  if (rng() % 3 == 0) add_random_kv_head_tables(rng, cfg);  // MHA2MLA-style
  if (rng() % 4 == 0) cfg.window = 7;
  const bool biases = rng() % 2, qk_norm = rng() % 3 == 0;
  const auto w = make_layer_data(rng, cfg, biases, qk_norm);
  gqa_layer gqa(cfg, w.weights());
  const std::int64_t t = 20;
  const fmat x = random_matrix(rng, t, cfg.model_dim);
  const auto pos = gapped_positions(rng, t, 30, 3);
  const double tol = 2 * layer_rel_tolerance<float>(gqa.config(), t, layer_a_max(w, x));
  for (auto layout : {convert::mla_layout::grouped_rope, convert::mla_layout::deepseek}) {
    if (qk_norm && layout == convert::mla_layout::deepseek) {  // refused, with the reason
      ATTNKIT_CHECK_INVALID(convert::gqa_to_mla_exact(cfg, w.weights(), layout), "QK-norm",
                            "use mla_layout::grouped_rope");
      continue;
    }
    const auto [ckpt, report] = convert::gqa_to_mla_exact(cfg, w.weights(), layout);
    mla_layer mla(ckpt.config, ckpt.weights());
    const auto gqa_cache = gqa.make_cache<float>(1);
    const auto mla_cache = mla.make_cache<float>(1);
    // The latent cache is the GQA cache: same elements, same bytes, per token.
    CHECK(mla_cache.bytes_per_token() == gqa_cache.bytes_per_token());
    CHECK(report.kv_elements_before == report.kv_elements_after);
    for (auto path : {mla_path::absorbed, mla_path::naive}) {
      const double err = convert::output_rel_error(gqa, mla, view_of(x), pos, path);
      INFO(report.step << " path=" << (path == mla_path::naive ? "naive" : "absorbed")
                       << " H=" << cfg.heads << " H_kv=" << hkv << " d=" << cfg.head_dim
                       << " layout=" << to_string(cfg.rope.layout) << " rot=" << cfg.rope.rotary_dim
                       << " tables=" << cfg.rope.frequency_index.size() << " biases=" << biases
                       << " qk_norm=" << qk_norm << " err=" << err << " tol=" << tol);
      CHECK(err <= tol);
    }
  }
}

TEST_CASE("I1 with QK-norm (Qwen3 style): the normalised, roped K is cached, always exercised",
          "[convert][identity]") {
  std::mt19937_64 rng(77);
  gqa_config cfg{
      .model_dim = 40, .heads = 6, .kv_heads = 2, .head_dim = 16, .rope = {.theta = 1e6}};
  const auto w = make_layer_data(rng, cfg, true, true);
  gqa_layer gqa(cfg, w.weights());
  const auto [ckpt, report] = convert::gqa_to_mla_exact(cfg, w.weights());
  CHECK(ckpt.k_rope_norm.size() == 16);
  mla_layer mla(ckpt.config, ckpt.weights());
  const std::int64_t t = 15;
  const fmat x = random_matrix(rng, t, 40);
  const auto pos = gapped_positions(rng, t, 0, 2);
  const double tol = 2 * layer_rel_tolerance<float>(gqa.config(), t, layer_a_max(w, x));
  CHECK(convert::output_rel_error(gqa, mla, view_of(x), pos, mla_path::absorbed) <= tol);
  CHECK(convert::output_rel_error(gqa, mla, view_of(x), pos, mla_path::naive) <= tol);
  // Dropping the norms changes the function: the test can fail.
  auto plain = ckpt;
  plain.q_rope_norm.clear();
  plain.k_rope_norm.clear();
  mla_layer wrong(plain.config, plain.weights());
  CHECK(convert::output_rel_error(gqa, wrong, view_of(x), pos) > 100 * tol);
}

TEST_CASE("exact conversion: DeepSeek layout tensor shapes", "[convert]") {
  std::mt19937_64 rng(3);
  gqa_config cfg{.model_dim = 64, .heads = 8, .kv_heads = 2, .head_dim = 16};
  const auto w = make_layer_data(rng, cfg, false);
  const auto [ckpt, report] =
      convert::gqa_to_mla_exact(cfg, w.weights(), convert::mla_layout::deepseek);
  CHECK(ckpt.config.rope_heads == 1);
  CHECK(ckpt.config.rope_dim == 2 * 16);
  CHECK(ckpt.config.nope_dim == 0);
  CHECK(ckpt.config.latent_dim == 2 * 16);
  CHECK(ckpt.kv_a_proj_with_mqa.rows() == 32 + 32);  // [c (d_c) | k_pe (d_R)]
  CHECK(ckpt.kv_b_proj.rows() == 8 * (0 + 16));      // per head [W_UK (0) ; W_UV (d_v)]
  CHECK(ckpt.q_proj.rows() == 8 * 32);               // per head [q_nope (0) ; q_pe (d_R)]
  CHECK(ckpt.config.rope.layout == rope_layout::interleaved);
  CHECK(report.kv_elements_after == 2 * 2 * 16);
}
