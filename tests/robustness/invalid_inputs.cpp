// Invalid, extreme and odd arguments, as a hostile but realistic user passes them: each gets an
// attnkit::invalid_argument that names the parameter and the value (never a crash, a wrap-around
// or a silent wrong answer), and a call that throws changes nothing.
#include <attnkit/attnkit.hpp>
#include <attnkit/convert/mha2mla.hpp>
#include <attnkit/convert/synthetic.hpp>
#include <attnkit/convert/transmla.hpp>

#include <limits>

#include "layer_fixture.hpp"
#include "mla_fixture.hpp"
#include "tpa_fixture.hpp"

using namespace attnkit;
using namespace attnkit::test;

TEST_CASE("cache sizes whose element counts overflow int64 are rejected by name",
          "[robustness][cache]") {
  ATTNKIT_CHECK_INVALID(
      dense_cache<float>({.kv_heads = 8, .head_dim = 128, .capacity = std::int64_t{1} << 61}),
      "dense_cache: kv_heads x capacity", "overflows int64");
  ATTNKIT_CHECK_INVALID(dense_cache<bf16>({.kv_heads = 1,
                                           .head_dim = 1,
                                           .v_head_dim = 0,
                                           .capacity = std::numeric_limits<std::int64_t>::max()}),
                        "allocation of 9223372036854775807 elements", "impossible");
  ATTNKIT_CHECK_INVALID(
      latent_cache<float>(
          {.latent_dim = 512, .rope_dim = 64, .rope_heads = 1, .capacity = std::int64_t{1} << 60}),
      "latent_cache: capacity x row width", "overflows int64");
  ATTNKIT_CHECK_INVALID(factorized_cache<float>({.heads = 32,
                                                 .head_dim = 128,
                                                 .k_rank = 2,
                                                 .v_rank = 2,
                                                 .capacity = std::int64_t{1} << 58}),
                        "factorized_cache: capacity x rank x width", "overflows int64");
  ATTNKIT_CHECK_INVALID(online_softmax(std::int64_t{1} << 40, std::int64_t{1} << 40),
                        "online_softmax: rows * dim", "overflows int64");
  ATTNKIT_CHECK_INVALID(online_softmax(-1, 4), "online_softmax: rows and dim must be >= 0",
                        "rows=-1");
}

TEST_CASE("null data is named as null, not as a shape mismatch", "[robustness][errors]") {
  std::vector<float> v(4 * 16), q(2 * 16), out(2 * 16);
  const std::vector<std::int64_t> pos{0, 1, 2, 3};
  const std::int64_t qp = 3;
  ATTNKIT_CHECK_INVALID(kv_view<float>(tensor3_view<const float>(nullptr, {4, 1, 16}),
                                       tensor3_view<const float>(v.data(), {4, 1, 16}), pos),
                        "kv_view: the key data is a null pointer for 4 tokens");
  ATTNKIT_CHECK_INVALID(kv_view<float>(tensor3_view<const float>(v.data(), {4, 1, 16}),
                                       tensor3_view<const float>(nullptr, {4, 1, 16}), pos),
                        "kv_view: v is a null pointer with shape [4, 1, 16] (64 elements)");
  const kv_view<float> kv(tensor3_view<const float>(v.data(), {4, 1, 16}),
                          tensor3_view<const float>(v.data(), {4, 1, 16}), pos);
  ATTNKIT_CHECK_INVALID(attend(tensor3_view<const float>(q.data(), {1, 2, 16}), std::span(&qp, 1),
                               kv, tensor3_view<float>(nullptr, {1, 2, 16})),
                        "attend: out is a null pointer with shape [1, 2, 16] (32 elements)");
  factor_view<float> f{.heads = 2,
                       .head_dim = 16,
                       .v_head_dim = 16,
                       .k_rank = 1,
                       .v_rank = 1,
                       .a_k = v.data(),
                       .b_k = nullptr,
                       .a_v = v.data(),
                       .b_v = v.data(),
                       .positions = pos};
  ATTNKIT_CHECK_INVALID(
      attend_factorized(tensor3_view<const float>(q.data(), {1, 1, 2}),
                        tensor3_view<const float>(q.data(), {1, 1, 16}), std::span(&qp, 1), f,
                        tensor3_view<float>(out.data(), {1, 2, 16})),
      "attend_factorized: factor b_k is a null pointer for 4 tokens");
}

TEST_CASE("outputs that overlap inputs are rejected", "[robustness][errors]") {
  std::mt19937_64 rng(3);
  const fmat k = random_matrix(rng, 4, 16);
  fmat q = random_matrix(rng, 2, 2 * 16);
  const std::vector<std::int64_t> pos{0, 1, 2, 3}, qpos{2, 3};
  const kv_view<float> kv(tensor3_view<const float>(k.data(), {4, 1, 16}),
                          tensor3_view<const float>(k.data(), {4, 1, 16}), pos);
  const tensor3_view<const float> qv(q.data(), {2, 2, 16});
  // Exact aliasing, and a view shifted by one head into q.
  ATTNKIT_CHECK_INVALID(attend(qv, qpos, kv, tensor3_view<float>(q.data(), {2, 2, 16})),
                        "attend: out overlaps the input q");
  ATTNKIT_CHECK_INVALID(
      attend(tensor3_view<const float>(q.data(), {1, 2, 16}), std::span(qpos).first(1), kv,
             tensor3_view<float>(q.data() + 16, {1, 2, 16})),
      "attend: out overlaps the input q");
  fmat out(2, 2 * 16);
  ATTNKIT_CHECK_INVALID(attend(qv, qpos, kv, tensor3_view<float>(out.data(), {2, 2, 16}),
                               {.lse = matrix_view<float>(out.data(), {2, 2})}),
                        "attend: lse overlaps the input out");
  // Side by side in one buffer is fine.
  std::vector<float> both(2 * 2 * 16 * 2);
  std::copy(q.data(), q.data() + q.size(), both.begin());
  attend(tensor3_view<const float>(both.data(), {2, 2, 16}), qpos, kv,
         tensor3_view<float>(both.data() + 64, {2, 2, 16}));
  fmat want(2, 2 * 16);
  attend(qv, qpos, kv, tensor3_view<float>(want.data(), {2, 2, 16}));
  CHECK(std::equal(want.data(), want.data() + want.size(), both.begin() + 64));
}

TEST_CASE("a moved-from cache is empty and refuses appends", "[robustness][cache]") {
  std::mt19937_64 rng(4);
  const fmat k = random_matrix(rng, 2, 16);
  const std::vector<std::int64_t> pos{0, 1};
  dense_cache<float> a({.kv_heads = 1, .head_dim = 16, .capacity = 4});
  a.append(tensor3_view<const float>(k.data(), {2, 1, 16}),
           tensor3_view<const float>(k.data(), {2, 1, 16}), pos);
  dense_cache<float> b(std::move(a));
  CHECK(b.size() == 2);
  CHECK(a.size() == 0);      // NOLINT(bugprone-use-after-move): the point of the test
  CHECK(a.capacity() == 0);  // NOLINT(bugprone-use-after-move)
  ATTNKIT_CHECK_INVALID(a.append(tensor3_view<const float>(k.data(), {2, 1, 16}),
                                 tensor3_view<const float>(k.data(), {2, 1, 16}), pos),
                        "exceeds capacity=0");
  CHECK(b.view().keys().row(0, 1)[3] == k(1, 3));
  latent_cache<float> la({.latent_dim = 8, .rope_dim = 4, .capacity = 3});
  latent_cache<float> lb = std::move(la);
  CHECK((la.size() == 0 && la.capacity() == 0 && lb.capacity() == 3));  // NOLINT
  factorized_cache<float> fa({.heads = 2, .head_dim = 8, .k_rank = 1, .v_rank = 1, .capacity = 3});
  factorized_cache<float> fb(std::move(fa));
  fa = std::move(fb);                                                   // and back, by assignment
  CHECK((fb.size() == 0 && fb.capacity() == 0 && fa.capacity() == 3));  // NOLINT
}

TEST_CASE("conversion options and data that would divide by zero or poison the fit are rejected",
          "[robustness][convert]") {
  const gqa_config cfg{
      .model_dim = 64, .heads = 4, .kv_heads = 2, .head_dim = 16, .rope = {.theta = 10000.0}};
  const auto layer = convert::synthetic::make_layer(cfg, 1, 8.0);
  std::mt19937_64 rng(2);
  fmat calib = convert::synthetic::activations(rng, 64, 64, 16, 8.0);
  const matrix_view<const float> none{};
  auto transmla = [&](convert::transmla_options o) {
    return convert::gqa_to_mla_transmla(cfg, layer.weights(), view_of(calib), none, o);
  };
  ATTNKIT_CHECK_INVALID(
      transmla({.qk_mqa_dim = 8, .kv_lora_rank = 16, .freqfold = 0, .auto_tokens = 0}),
      "transmla: auto_tokens must be >= 1", "got 0");
  ATTNKIT_CHECK_INVALID(
      transmla({.qk_mqa_dim = 8, .kv_lora_rank = 16, .freqfold = 0, .auto_tokens = -1}),
      "auto_tokens must be >= 1", "got -1");
  ATTNKIT_CHECK_INVALID(transmla({.qk_mqa_dim = 8, .kv_lora_rank = 16, .freqfold = -2}),
                        "transmla: freqfold must be >= 0", "got -2");
  calib(5, 7) = std::numeric_limits<float>::quiet_NaN();
  ATTNKIT_CHECK_INVALID(transmla({.qk_mqa_dim = 8, .kv_lora_rank = 16}),
                        "transmla: calibration token 5 column 7 is nan");
  ATTNKIT_CHECK_INVALID(convert::gqa_to_mla_mha2mla(cfg, layer.weights(), view_of(calib), none,
                                                    {.rope_dim = 4, .latent_dim = 16}),
                        "mha2mla: calibration token 5 column 7 is nan");
  calib(5, 7) = 0.f;
  fmat heldout = calib.topRows(8);
  heldout(2, 1) = std::numeric_limits<float>::infinity();
  ATTNKIT_CHECK_INVALID(
      convert::gqa_to_mla_mha2mla(cfg, layer.weights(), view_of(calib), view_of(heldout),
                                  {.rope_dim = 4, .latent_dim = 16}),
      "mha2mla: heldout token 2 column 1 is inf");
}

TEST_CASE("windows and positions at the ends of int64 never overflow", "[robustness][mask]") {
  constexpr std::int64_t mx = std::numeric_limits<std::int64_t>::max();
  std::mt19937_64 rng(8);
  const fmat q = random_matrix(rng, 1, 2 * 16), k = random_matrix(rng, 8, 16),
             v = random_matrix(rng, 8, 16);
  const std::vector<std::int64_t> neg{-9, -8, -7, -6, -5, -4, -3, -2},
      far{-5, 0, mx - 1, mx, mx, mx, mx, mx};
  for (const auto& [kpos, qp, window] :
       {std::tuple{neg, std::int64_t{-2}, mx}, std::tuple{far, mx, std::int64_t{10}}}) {
    const kv_view<float> kv(tensor3_view<const float>(k.data(), {8, 1, 16}),
                            tensor3_view<const float>(v.data(), {8, 1, 16}), kpos);
    for (auto st : {tile_strategy::streaming, tile_strategy::gemm}) {
      fmat out(1, 2 * 16);
      attend(tensor3_view<const float>(q.data(), {1, 2, 16}), std::span(&qp, 1), kv,
             tensor3_view<float>(out.data(), {1, 2, 16}), {.window = window, .strategy = st});
      reference::attention_rules rules;
      rules.window = window;
      const auto ref = reference::attention(to_double(q), std::span(&qp, 1), to_double(k),
                                            to_double(v), kpos, 2, 1, 0.25, rules);
      CHECK(ref.out.cwiseAbs().maxCoeff() > 0);  // keys are visible: not a masked row
      CHECK(max_abs_diff(to_double(out), ref.out) <= 1e-5);
    }
    // The same positions through TPA (k_rank = v_rank = 1: K and V rows are a_k b_k, a_v b_v).
    const fmat aq = random_matrix(rng, 1, 2), ak = fmat::Ones(8, 2);
    const factor_view<float> f{.heads = 2,
                               .head_dim = 16,
                               .v_head_dim = 16,
                               .k_rank = 1,
                               .v_rank = 1,
                               .a_k = ak.data(),
                               .b_k = k.data(),
                               .a_v = ak.data(),
                               .b_v = v.data(),
                               .positions = kpos};
    fmat out(1, 2 * 16);
    attend_factorized(tensor3_view<const float>(aq.data(), {1, 1, 2}),
                      tensor3_view<const float>(q.data(), {1, 1, 16}), std::span(&qp, 1), f,
                      tensor3_view<float>(out.data(), {1, 2, 16}), {.window = window});
    reference::attention_rules rules;
    rules.window = window;
    const reference::matrix qm =
        reference::tpa_materialise(to_double(aq), to_double(q).leftCols(16), 1, 2, 1.0);
    const auto ref = reference::attention(qm, std::span(&qp, 1), to_double(k), to_double(v), kpos,
                                          2, 1, 0.25, rules);
    CHECK(ref.out.cwiseAbs().maxCoeff() > 0);
    CHECK(max_abs_diff(to_double(out), ref.out) <= 1e-5);
  }
}

TEST_CASE("a layer call that throws leaves the cache unchanged, bad scales fail at construction",
          "[robustness][errors][layer]") {
  std::mt19937_64 rng(12);
  const fmat x = random_matrix(rng, 2, 32);
  fmat y(32, 2);  // the transpose of y's shape: a column-major view of y [2, 32]
  const matrix_view<float> y_cm(y.data(), {2, 32}, {1, 2});
  const std::vector<std::int64_t> pos{0, 1};
  const mla_config mc{
      .model_dim = 32, .heads = 2, .latent_dim = 16, .nope_dim = 8, .rope_dim = 4, .v_head_dim = 8};
  const auto mw = make_mla(rng, mc, false, true);
  mla_layer ml(mc, mw.weights());
  auto mcache = ml.make_cache<float>(4);
  ATTNKIT_CHECK_INVALID(ml.forward(view_of(x), pos, mcache, y_cm), "unit column stride");
  CHECK(mcache.size() == 0);
  const tpa_config tc{
      .model_dim = 32, .heads = 2, .head_dim = 8, .q_rank = 2, .k_rank = 1, .v_rank = 1};
  const auto tw = make_tpa(rng, tc, false);
  tpa_layer tl(tc, tw.weights());
  auto tcache = tl.make_cache<float>(4);
  ATTNKIT_CHECK_INVALID(tl.forward(view_of(x), pos, tcache, y_cm), "unit column stride");
  CHECK(tcache.size() == 0);
  mla_config bad_m = mc;
  bad_m.scale = INFINITY;
  ATTNKIT_CHECK_INVALID(mla_layer(bad_m, mw.weights()), "mla_config: scale must be finite");
  tpa_config bad_t = tc;
  bad_t.scale = NAN;
  ATTNKIT_CHECK_INVALID(tpa_layer(bad_t, tw.weights()), "tpa_config: scale must be finite");
  const gqa_config gc{.model_dim = 32, .heads = 2, .kv_heads = 1, .head_dim = 16, .scale = NAN};
  const auto gw =
      make_layer_data(rng, {.model_dim = 32, .heads = 2, .kv_heads = 1, .head_dim = 16}, false);
  ATTNKIT_CHECK_INVALID(gqa_layer(gc, gw.weights()), "gqa_config: scale must be finite");
}
