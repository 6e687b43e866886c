// The approximate conversions (MHA2MLA and TransMLA routes): their exact limits (I2, I8, full-rank
// SVD/PCA), monotone error in the rank on decaying spectra, the selections, reports and option
// errors.
#include <attnkit/attnkit.hpp>
#include "layer_fixture.hpp"

#include <attnkit/convert/mha2mla.hpp>
#include <attnkit/convert/synthetic.hpp>
#include <attnkit/convert/transmla.hpp>

using namespace attnkit;
using namespace attnkit::test;
namespace cv = attnkit::convert;

namespace {

/// A random small GQA configuration (both pair layouts, partial rotary, biases).
struct random_case {
  gqa_config cfg;
  gqa_layer_data w;
  fmat calib, heldout;
  bool biases;
};

random_case make_case(std::uint64_t seed, bool allow_tables = true) {
  std::mt19937_64 rng(seed * 7919);
  const std::int64_t hkv = 1 + static_cast<std::int64_t>(rng() % 3),
                     g = 1 + static_cast<std::int64_t>(rng() % 3);
  gqa_config cfg{
      .model_dim = 40,
      .heads = hkv * g,
      .kv_heads = hkv,
      .head_dim = rng() % 2 ? 16 : 24,
      .v_head_dim = rng() % 3 == 0 ? 8 : 0,
      .rope = {.theta = 10000.0,
               .layout = rng() % 2 ? rope_layout::half_split : rope_layout::interleaved}};
  if (rng() % 3 == 0) cfg.rope.rotary_dim = cfg.head_dim / 2;
  if (allow_tables && rng() % 3 == 0) add_random_kv_head_tables(rng, cfg);
  const bool biases = rng() % 2;
  random_case c{cfg, make_layer_data(rng, cfg, biases), random_matrix(rng, 300, cfg.model_dim),
                random_matrix(rng, 24, cfg.model_dim), biases};
  return c;
}

std::string describe(const gqa_config& c) {
  std::ostringstream s;
  s << "H=" << c.heads << " H_kv=" << c.kv_heads << " d=" << c.head_dim << " d_v=" << c.v_head_dim
    << " layout=" << to_string(c.rope.layout) << " rot=" << c.rope.rotary_dim
    << " tables=" << c.rope.frequency_index.size();
  return s.str();
}

/// Relative output difference of two MLA checkpoints on x at positions 0..T-1.
double checkpoint_difference(const cv::mla_checkpoint& a, const cv::mla_checkpoint& b,
                             const fmat& x) {
  mla_layer la(a.config, a.weights()), lb(b.config, b.weights());
  const std::int64_t t = x.rows(), dm = x.cols();
  std::vector<std::int64_t> pos(static_cast<std::size_t>(t));
  std::iota(pos.begin(), pos.end(), std::int64_t{0});
  fmat ya(t, dm), yb(t, dm);
  auto ca = la.make_cache<float>(t);
  auto cb = lb.make_cache<float>(t);
  la.forward(view_of(x), pos, ca, view_of(ya));
  lb.forward(view_of(x), pos, cb, view_of(yb));
  return (ya.cast<double>() - yb.cast<double>()).norm() / ya.cast<double>().norm();
}

}  // namespace

TEST_CASE("I8: MHA2MLA partial RoPE keeping every pair is exact, for every selection",
          "[convert][identity]") {
  const std::uint64_t seed = GENERATE(range(1, 9));
  auto c = make_case(seed);
  gqa_layer gqa(c.cfg, c.w.weights());
  const std::int64_t rot = c.cfg.rope.rotary_dim ? c.cfg.rope.rotary_dim : c.cfg.head_dim;
  const double tol =
      4 * layer_rel_tolerance<float>(gqa.config(), c.heldout.rows(), layer_a_max(c.w, c.heldout));
  for (auto sel : {cv::rope_selection::high, cv::rope_selection::low, cv::rope_selection::uniform,
                   cv::rope_selection::two_norm}) {
    const auto res =
        cv::gqa_to_mla_mha2mla(c.cfg, c.w.weights(), view_of(c.calib), view_of(c.heldout),
                               {.rope_dim = rot, .selection = sel});
    INFO(describe(c.cfg) << " selection=" << cv::to_string(sel) << " err=" << res.steps[0].rel_error
                         << " tol=" << tol);
    REQUIRE(res.steps.size() == 1);
    CHECK(res.steps[0].rel_error <= tol);
    CHECK(res.steps[0].kv_elements_after == res.steps[0].kv_elements_before);
    CHECK(res.checkpoint.config.rope_heads == c.cfg.kv_heads);
  }
  // Dropping a pair (here the fastest) changes the function: the check above can fail.
  if (rot >= 4) {
    const auto res =
        cv::gqa_to_mla_mha2mla(c.cfg, c.w.weights(), view_of(c.calib), view_of(c.heldout),
                               {.rope_dim = rot - 2, .selection = cv::rope_selection::low});
    CHECK(res.steps[0].rel_error > 10 * tol);
  }
}

TEST_CASE("MHA2MLA SVD (joint and split) at full rank is exact, cache and report sizes",
          "[convert][identity]") {
  const std::uint64_t seed = GENERATE(range(1, 7));
  auto c = make_case(seed);
  gqa_layer gqa(c.cfg, c.w.weights());
  const std::int64_t hkv = c.cfg.kv_heads, d = c.cfg.head_dim,
                     dv = c.cfg.v_head_dim ? c.cfg.v_head_dim : d;
  const std::int64_t rot = c.cfg.rope.rotary_dim ? c.cfg.rope.rotary_dim : d;
  const double tol =
      8 * layer_rel_tolerance<float>(gqa.config(), c.heldout.rows(), layer_a_max(c.w, c.heldout));
  for (auto mode : {cv::svd_mode::joint, cv::svd_mode::split}) {
    // Keep every RoPE pair so that the only change would come from the SVD.
    const std::int64_t lk = hkv * (d - rot), lv = hkv * dv;
    const std::int64_t full = mode == cv::svd_mode::joint ? lk + lv : 2 * std::max(lk, lv);
    if (mode == cv::svd_mode::split && lk != lv) continue;  // split halves the width evenly
    const auto res = cv::gqa_to_mla_mha2mla(
        c.cfg, c.w.weights(), view_of(c.calib), view_of(c.heldout),
        {.rope_dim = rot, .selection = cv::rope_selection::high, .svd = mode, .latent_dim = full});
    INFO(describe(c.cfg) << " mode=" << (mode == cv::svd_mode::joint ? "joint" : "split")
                         << " err=" << res.steps.back().rel_error << " tol=" << tol);
    REQUIRE(res.steps.size() == 2);
    CHECK(res.steps[1].rel_error <= tol);
    CHECK(res.steps[1].kv_elements_after == full + hkv * rot);
    mla_layer mla(res.checkpoint.config, res.checkpoint.weights());
    CHECK(mla.make_cache<float>(1).bytes_per_token() == (full + hkv * rot) * 4);
  }
}

TEST_CASE("I2: TransMLA RoRoPE with F = 1 and RoPE on every rotated dim is exact",
          "[convert][identity]") {
  const std::uint64_t seed = GENERATE(range(1, 9));
  auto c = make_case(seed, /*allow_tables=*/false);
  gqa_layer gqa(c.cfg, c.w.weights());
  const std::int64_t rot = c.cfg.rope.rotary_dim ? c.cfg.rope.rotary_dim : c.cfg.head_dim;
  const double tol =
      8 * layer_rel_tolerance<float>(gqa.config(), c.heldout.rows(), layer_a_max(c.w, c.heldout));
  const auto res = cv::gqa_to_mla_transmla(
      c.cfg, c.w.weights(), view_of(c.calib), view_of(c.heldout),
      {.qk_mqa_dim = rot, .freqfold = 1, .stop_after = cv::transmla_step::rorope});
  INFO(describe(c.cfg) << " err=" << res.steps[0].rel_error << " tol=" << tol);
  REQUIRE(res.steps.size() == 1);
  CHECK(res.steps[0].rel_error <= tol);
  CHECK(res.checkpoint.config.rope_heads == 1);
  CHECK(res.steps[0].kv_elements_after == res.steps[0].kv_elements_before);
  if (c.cfg.kv_heads > 1 && rot >= 4) {  // folding frequencies (F = 2) is an approximation
    const auto folded = cv::gqa_to_mla_transmla(
        c.cfg, c.w.weights(), view_of(c.calib), view_of(c.heldout),
        {.qk_mqa_dim = rot, .freqfold = 2, .stop_after = cv::transmla_step::rorope});
    CHECK(folded.steps[0].rel_error > 10 * tol);
  }
}

TEST_CASE("TransMLA joint PCA at full rank equals the partial-RoPE model, native DeepSeek RoPE",
          "[convert][identity]") {
  const std::uint64_t seed = GENERATE(range(1, 7));
  auto c = make_case(seed, false);
  const std::int64_t hkv = c.cfg.kv_heads, d = c.cfg.head_dim,
                     dv = c.cfg.v_head_dim ? c.cfg.v_head_dim : d;
  const std::int64_t rot = c.cfg.rope.rotary_dim ? c.cfg.rope.rotary_dim : d, qk = rot / 2;
  cv::transmla_options opt{.qk_mqa_dim = qk,
                           .kv_lora_rank = hkv * (d + dv) - qk,
                           .freqfold = 2,
                           .stop_after = cv::transmla_step::partial_rope};
  const auto partial =
      cv::gqa_to_mla_transmla(c.cfg, c.w.weights(), view_of(c.calib), view_of(c.heldout), opt);
  opt.stop_after = cv::transmla_step::low_rank;
  const auto full =
      cv::gqa_to_mla_transmla(c.cfg, c.w.weights(), view_of(c.calib), view_of(c.heldout), opt);
  REQUIRE(full.steps.size() == 2);
  gqa_layer gqa(c.cfg, c.w.weights());
  const double tol =
      8 * layer_rel_tolerance<float>(gqa.config(), c.heldout.rows(), layer_a_max(c.w, c.heldout));
  const double diff = checkpoint_difference(partial.checkpoint, full.checkpoint, c.heldout);
  INFO(describe(c.cfg) << " diff=" << diff << " tol=" << tol
                       << " err partial=" << partial.steps[0].rel_error);
  CHECK(diff <= tol);
  CHECK(full.steps[1].kv_elements_after == opt.kv_lora_rank + qk);
  CHECK(full.checkpoint.config.rope_dim == qk);
  CHECK(full.checkpoint.config.nope_dim == d);
  // C = 2, F = 2: pair p uses original pair 2p: theta^(-2(2p)/rot) = theta^(-2p/qk), DeepSeek's
  // table.
  CHECK(full.checkpoint.config.rope.frequency_index.empty());
  CHECK(full.checkpoint.config.rope.frequency_dim == 0);
}

TEST_CASE("held-out error never increases with the latent width on decaying spectra", "[convert]") {
  // The RoPE steps are made exact (MHA2MLA keeps every pair; TransMLA on one KV head with F = 1
  // and qk_mqa_dim = the rotary dims keeps RoPE on every component), so the error is the low-rank
  // step's alone: the latent is the projection of the K/V activations on the leading principal
  // axes, nested in the rank, so every token's K/V residual shrinks as the rank grows.
  std::mt19937_64 rng(9);
  const auto calib = cv::synthetic::activations(rng, 2048, 96, 64, 8.0);
  const auto heldout =
      cv::synthetic::activations(rng, 64, 96, 64, 8.0);  // new draws, same subspace
  auto monotone = [&](const char* what, const std::vector<std::int64_t>& ranks, auto&& convert) {
    double prev = std::numeric_limits<double>::infinity(), first = 0;
    for (std::int64_t r : ranks) {
      const double err = convert(r);
      INFO(what << " rank=" << r << " err=" << err << " previous=" << prev);
      CHECK(err <= prev * (1 + 1e-6));
      if (r == ranks.front()) first = err;
      prev = err;
    }
    INFO(what << " err at rank " << ranks.front() << " = " << first << ", at full rank " << prev);
    CHECK(prev < 1e-4);  // full rank: exact
    CHECK(first > 0.1);  // the smallest rank loses something: the checks above can fail
  };
  {
    gqa_config cfg{.model_dim = 96,
                   .heads = 8,
                   .kv_heads = 2,
                   .head_dim = 16,
                   .rope = {.theta = 10000.0, .rotary_dim = 8}};
    const auto layer = cv::synthetic::make_layer(cfg, 5, 6.0, true);
    monotone("MHA2MLA joint", {4, 8, 12, 16, 24, 32, 40, 48}, [&](std::int64_t r) {
      return cv::gqa_to_mla_mha2mla(
                 cfg, layer.weights(), view_of(calib), view_of(heldout),
                 {.rope_dim = 8, .selection = cv::rope_selection::high, .latent_dim = r})
          .steps.back()
          .rel_error;
    });
  }
  {
    gqa_config cfg{.model_dim = 96,
                   .heads = 8,
                   .kv_heads = 1,
                   .head_dim = 16,
                   .rope = {.theta = 10000.0, .rotary_dim = 8}};
    const auto layer = cv::synthetic::make_layer(cfg, 6, 6.0, true);
    monotone("TransMLA", {2, 4, 8, 12, 16, 20, 24}, [&](std::int64_t r) {
      return cv::gqa_to_mla_transmla(cfg, layer.weights(), view_of(calib), view_of(heldout),
                                     {.qk_mqa_dim = 8, .kv_lora_rank = r, .freqfold = 1})
          .steps.back()
          .rel_error;
    });
  }
}

TEST_CASE("TransMLA on a GQA layer: the error falls with the rank to the floor of the RoPE steps",
          "[convert]") {
  gqa_config cfg{
      .model_dim = 96, .heads = 8, .kv_heads = 4, .head_dim = 16, .rope = {.theta = 10000.0}};
  const auto layer = cv::synthetic::make_layer(cfg, 5, 6.0, true);
  std::mt19937_64 rng(9);
  const auto calib = cv::synthetic::activations(rng, 2048, cfg.model_dim, 64, 8.0);
  const auto heldout = cv::synthetic::activations(rng, 64, cfg.model_dim, 64, 8.0);
  std::vector<double> err;
  for (std::int64_t r : {8, 16, 32, 120}) {
    const auto res = cv::gqa_to_mla_transmla(cfg, layer.weights(), view_of(calib), view_of(heldout),
                                             {.qk_mqa_dim = 8, .kv_lora_rank = r, .freqfold = 4});
    REQUIRE(res.steps.size() == 2);
    err.push_back(res.steps[1].rel_error);
    INFO("kv_lora_rank=" << r << " err=" << err.back()
                         << " partial-RoPE floor=" << res.steps[0].rel_error);
    if (r == 120) CHECK(err.back() == Approx(res.steps[0].rel_error).epsilon(1e-3));
  }
  CHECK(err[0] > err[1]);
  CHECK(err[1] > err[2]);
}

TEST_CASE("MHA2MLA selections: high, low, uniform pairs, 2-norm finds the dominant pairs",
          "[convert]") {
  gqa_config cfg{.model_dim = 32, .heads = 4, .kv_heads = 2, .head_dim = 16};
  std::mt19937_64 rng(4);
  auto w = make_layer_data(rng, cfg, false);
  const fmat calib = random_matrix(rng, 200, 32);
  using V = std::vector<std::int64_t>;
  auto pick = [&](cv::rope_selection s, std::int64_t r, std::int64_t start = 0) {
    return cv::select_rope_pairs(cfg, w.weights(), view_of(calib),
                                 {.rope_dim = r, .selection = s, .uniform_start = start});
  };
  CHECK(pick(cv::rope_selection::high, 4)[1] == V{0, 1});
  CHECK(pick(cv::rope_selection::low, 4)[0] == V{6, 7});
  CHECK(pick(cv::rope_selection::uniform, 4, 1)[0] == V{1, 5});
  // Scale pair 3 (half-split coordinates 3 and 11) of KV head 1 and its query heads 2, 3 up.
  for (std::int64_t c : {3, 11}) {
    w.k.row(16 + c) *= 20;
    w.q.row(2 * 16 + c) *= 20;
    w.q.row(3 * 16 + c) *= 20;
  }
  const auto sel = pick(cv::rope_selection::two_norm, 2);
  CHECK(sel[1] == V{3});
  CHECK(sel[0] != V{3});
}

TEST_CASE("approximate conversions: invalid options throw naming the option", "[convert][errors]") {
  gqa_config cfg{.model_dim = 32, .heads = 4, .kv_heads = 2, .head_dim = 16};
  std::mt19937_64 rng(8);
  const auto w = make_layer_data(rng, cfg, false);
  const fmat calib = random_matrix(rng, 50, 32), wrong = random_matrix(rng, 50, 31), none(0, 32);
  auto trans = [&](cv::transmla_options o, const fmat& x = fmat()) {
    return cv::gqa_to_mla_transmla(cfg, w.weights(), view_of(x.size() ? x : calib), view_of(none),
                                   o);
  };
  auto m2m = [&](cv::mha2mla_options o, const fmat& x = fmat()) {
    return cv::gqa_to_mla_mha2mla(cfg, w.weights(), view_of(x.size() ? x : calib), view_of(none),
                                  o);
  };
  ATTNKIT_CHECK_INVALID(trans({.qk_mqa_dim = 32}), "qk_mqa_dim must be even and in [2, d=16]",
                        "got 32");
  ATTNKIT_CHECK_INVALID(trans({.qk_mqa_dim = 7}), "qk_mqa_dim", "got 7");
  ATTNKIT_CHECK_INVALID(trans({.qk_mqa_dim = 4, .freqfold = 2}), "freqfold F=2",
                        "collapse factor C=4");
  ATTNKIT_CHECK_INVALID(trans({.qk_mqa_dim = 4, .kv_lora_rank = 61}),
                        "kv_lora_rank must be in [1, 60]", "got 61");
  ATTNKIT_CHECK_INVALID(trans({.qk_mqa_dim = 4, .kv_lora_rank = 8}, wrong),
                        "calibration has width 31");
  ATTNKIT_CHECK_INVALID(m2m({.rope_dim = 5, .selection = cv::rope_selection::high}),
                        "rope_dim must be even", "got 5");
  ATTNKIT_CHECK_INVALID(m2m({.rope_dim = 18, .selection = cv::rope_selection::high}), "rope_dim",
                        "got 18");
  ATTNKIT_CHECK_INVALID(
      m2m({.rope_dim = 4, .selection = cv::rope_selection::high, .latent_dim = 57}),
      "latent_dim (joint SVD rank) must be <= 56", "got 57");
  ATTNKIT_CHECK_INVALID(m2m({.rope_dim = 4,
                             .selection = cv::rope_selection::high,
                             .svd = cv::svd_mode::split,
                             .latent_dim = 60}),
                        "latent_dim=60", "above their maxima 24");
  ATTNKIT_CHECK_INVALID(m2m({.rope_dim = 6, .selection = cv::rope_selection::uniform}),
                        "uniform selection");
  ATTNKIT_CHECK_INVALID(m2m({.rope_dim = 4}, wrong), "calibration has width 31");
  ATTNKIT_CHECK_INVALID(
      cv::gqa_to_mla_mha2mla(cfg, w.weights(), view_of(none), view_of(none), {.rope_dim = 4}),
      "two_norm selection needs calibration tokens");
  // QK-norm and per-KV-head tables are refused with the reason.
  const auto normed = make_layer_data(rng, cfg, false, true);
  ATTNKIT_CHECK_INVALID(cv::gqa_to_mla_transmla(cfg, normed.weights(), view_of(calib),
                                                view_of(none), {.qk_mqa_dim = 4}),
                        "QK-norm", "does not commute");
  ATTNKIT_CHECK_INVALID(
      cv::gqa_to_mla_mha2mla(cfg, normed.weights(), view_of(calib), view_of(none), {.rope_dim = 4}),
      "QK-norm");
  auto tabled = cfg;
  tabled.rope.frequency_index = {{0, 1, 2, 3, 4, 5, 6, 7}, {0, 2, 4, 6, 1, 3, 5, 7}};
  ATTNKIT_CHECK_INVALID(cv::gqa_to_mla_transmla(tabled, w.weights(), view_of(calib), view_of(none),
                                                {.qk_mqa_dim = 4}),
                        "per-KV-head RoPE tables");
}

TEST_CASE("TransMLA freqfold auto: picks a valid F no worse than F = C on the probe tokens",
          "[convert]") {
  gqa_config cfg{
      .model_dim = 96, .heads = 8, .kv_heads = 4, .head_dim = 32, .rope = {.theta = 10000.0}};
  const auto layer = cv::synthetic::make_layer(cfg, 3, 8.0);
  std::mt19937_64 rng(5);
  const auto calib = cv::synthetic::activations(rng, 1024, cfg.model_dim, 64, 8.0);
  const cv::transmla_options base{.qk_mqa_dim = 16,
                                  .freqfold = 0,
                                  .auto_tokens = 128,
                                  .stop_after = cv::transmla_step::partial_rope};
  // Held-out = the probe itself, so the reported errors are the ones auto compared.
  const fmat probe = calib.topRows(128);
  const auto automatic =
      cv::gqa_to_mla_transmla(cfg, layer.weights(), view_of(calib), view_of(probe), base);
  auto at_c = base;
  at_c.freqfold = 2;  // C = 32 / 16
  const auto fixed =
      cv::gqa_to_mla_transmla(cfg, layer.weights(), view_of(calib), view_of(probe), at_c);
  const std::string& name = automatic.steps[0].step;
  INFO(name << " err=" << automatic.steps[0].rel_error << " vs F=2: " << fixed.steps[0].rel_error);
  const bool valid_f =
      name.find("F=2,") != std::string::npos || name.find("F=4,") != std::string::npos ||
      name.find("F=8,") != std::string::npos || name.find("F=16,") != std::string::npos;
  CHECK(valid_f);
  CHECK(automatic.steps[0].rel_error <= fixed.steps[0].rel_error);
}
