// RoPE: both layouts against the complex-rotation definition, partial rotary dims, frequency
// tables, the relative-position property, and invalid configurations.
#include <numeric>

#include "test_util.hpp"

using namespace attnkit;
using namespace attnkit::test;

TEST_CASE("rope matches the complex-rotation definition (both layouts, partial dims, tables)",
          "[rope]") {
  std::mt19937_64 rng(GENERATE(11, 12, 13, 14, 15, 16));
  const rope_layout layout = rng() % 2 ? rope_layout::half_split : rope_layout::interleaved;
  const std::int64_t d = 2 * (1 + static_cast<std::int64_t>(rng() % 64));
  const std::int64_t rot = 2 * (1 + static_cast<std::int64_t>(rng() % (d / 2)));
  const std::int64_t heads = 1 + static_cast<std::int64_t>(rng() % 4);
  rope_config cfg{.theta = rng() % 2 ? 10000.0 : 500000.0, .layout = layout, .rotary_dim = rot};
  const int table_mode = static_cast<int>(rng() % 3);  // 0: none, 1: shared, 2: per head
  if (table_mode > 0) {
    cfg.frequency_dim = d;  // MHA2MLA style: kept frequencies of the full head
    for (std::int64_t h = 0; h < (table_mode == 1 ? 1 : heads); ++h) {
      std::vector<std::int64_t> t(static_cast<std::size_t>(rot / 2));
      for (auto& f : t) f = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(d / 2));
      cfg.frequency_index.push_back(t);
    }
  }
  INFO("d=" << d << " rot=" << rot << " layout=" << to_string(layout) << " tables=" << table_mode);
  const rope r(cfg, d, heads);
  const fmat x = random_matrix(rng, heads, d);
  for (std::int64_t pos : {std::int64_t{0}, std::int64_t{1}, std::int64_t{17}, std::int64_t{4095},
                           std::int64_t{131071}}) {
    for (std::int64_t h = 0; h < heads; ++h) {
      std::vector<float> got(x.row(h).data(), x.row(h).data() + d);
      std::vector<double> want(got.begin(), got.end());
      r.apply(got.data(), pos, h);
      reference::rope_rotate(want.data(), d, pos, cfg, h);
      // Angles are formed in double, so only the final rounding to float remains: 2 u per
      // coordinate of a unit-variance vector (|x| <= ~5).
      for (std::int64_t c = 0; c < d; ++c) CHECK(std::abs(got[c] - want[c]) <= 4 * 0x1p-24 * 8);
      // Coordinates past rotary_dim are untouched.
      for (std::int64_t c = rot; c < d; ++c) CHECK(got[c] == x(h, c));
    }
  }
}

TEST_CASE("rope: half_split and interleaved are the same rotation up to a coordinate permutation",
          "[rope]") {
  const std::int64_t d = 8;
  rope hs({.theta = 100.0, .layout = rope_layout::half_split}, d);
  rope il({.theta = 100.0, .layout = rope_layout::interleaved}, d);
  float a[d] = {1, 2, 3, 4, 5, 6, 7, 8};
  float b[d] = {1, 5, 2, 6, 3, 7, 4, 8};  // pair p = (p, p + 4) laid out as (2p, 2p + 1)
  hs.apply(a, 7);
  il.apply(b, 7);
  for (int p = 0; p < 4; ++p) {
    CHECK(a[p] == Approx(b[2 * p]).epsilon(1e-6));
    CHECK(a[p + 4] == Approx(b[2 * p + 1]).epsilon(1e-6));
  }
}

TEST_CASE("rope: scores depend only on the position difference", "[rope]") {
  std::mt19937_64 rng(GENERATE(21, 22, 23));
  const std::int64_t d = 64;
  const rope_layout layout = rng() % 2 ? rope_layout::half_split : rope_layout::interleaved;
  const rope r({.theta = 10000.0, .layout = layout}, d);
  const fmat qk = random_matrix(rng, 2, d);
  auto score = [&](std::int64_t m, std::int64_t n) {
    std::vector<double> q(qk.row(0).data(), qk.row(0).data() + d),
        k(qk.row(1).data(), qk.row(1).data() + d);
    r.apply(q.data(), m);
    r.apply(k.data(), n);
    double s = 0;
    for (std::int64_t c = 0; c < d; ++c) s += q[c] * k[c];
    return s;
  };
  for (std::int64_t delta : {0, 1, 5, 100}) {
    const double base = score(delta, 0);
    for (std::int64_t shift : {1, 37, 1000, 65536})
      CHECK(score(delta + shift, shift) == Approx(base).margin(1e-9 * d));
  }
  // Rotation preserves norms.
  std::vector<double> q(qk.row(0).data(), qk.row(0).data() + d);
  const double n0 = std::inner_product(q.begin(), q.end(), q.begin(), 0.0);
  r.apply(q.data(), 12345);
  CHECK(std::inner_product(q.begin(), q.end(), q.begin(), 0.0) == Approx(n0).epsilon(1e-12));
}

TEST_CASE("rope: invalid configurations throw naming the parameter", "[rope][errors]") {
  ATTNKIT_CHECK_INVALID(rope({.rotary_dim = 3}, 8), "rotary_dim must be even", "got 3");
  ATTNKIT_CHECK_INVALID(rope({.rotary_dim = 10}, 8), "rotary_dim must be in [1, head_dim=8]",
                        "got 10");
  ATTNKIT_CHECK_INVALID(rope({.theta = -1.0}, 8), "theta must be finite and > 0", "got -1");
  ATTNKIT_CHECK_INVALID(rope({}, 0), "head_dim must be > 0");
  ATTNKIT_CHECK_INVALID(rope({.frequency_index = {{0, 1}}}, 8), "frequency_index[0] has 2 entries",
                        "rotary_dim/2=4");
  ATTNKIT_CHECK_INVALID(rope({.frequency_index = {{0, 1, 2, 9}}}, 8), "frequency_index[0][3]=9");
  ATTNKIT_CHECK_INVALID(rope({.frequency_index = {{0, 1, 2, 3}, {0, 1, 2, 3}}}, 8, 3),
                        "0, 1 or heads=3 tables", "got 2");
}
