// Views, Eigen interop, errors, version macros.
#include "test_util.hpp"

using namespace attnkit;
using namespace attnkit::test;

TEST_CASE("version macros match project(VERSION)", "[core]") {
  CHECK(std::string(ATTNKIT_VERSION_STRING) == ATTNKIT_CMAKE_PROJECT_VERSION);
  CHECK(ATTNKIT_VERSION ==
        ATTNKIT_VERSION_MAJOR * 10000 + ATTNKIT_VERSION_MINOR * 100 + ATTNKIT_VERSION_PATCH);
  CHECK(ATTNKIT_VERSION_AT_LEAST(0, 1, 0));
  CHECK_FALSE(ATTNKIT_VERSION_AT_LEAST(99, 0, 0));
}

TEST_CASE("strided_view: contiguous row-major extents and strides", "[core][view]") {
  std::vector<float> buf(2 * 3 * 4);
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<float>(i);
  tensor3_view<float> v(buf.data(), {2, 3, 4});
  CHECK(v.rank() == 3);
  CHECK(v.extent(0) == 2);
  CHECK(v.stride(0) == 12);
  CHECK(v.stride(1) == 4);
  CHECK(v.stride(2) == 1);
  CHECK(v.size() == 24);
  CHECK(v(1, 2, 3) == 23.f);
  CHECK(v.slice_ptr(1) == buf.data() + 12);
  tensor3_view<const float> c = v;  // T -> const T
  CHECK(c(1, 0, 2) == 14.f);
}

TEST_CASE("strided_view: 64-bit offsets do not overflow", "[core][view]") {
  // A view whose offsets pass 2^31 elements; only the arithmetic is exercised.
  float* base = nullptr;
  matrix_view<float> v(base, {std::int64_t{1} << 20, std::int64_t{1} << 13});
  CHECK(&v((std::int64_t{1} << 20) - 1, 0) - base ==
        ((std::int64_t{1} << 20) - 1) * (std::int64_t{1} << 13));
}

TEST_CASE("strided_view <-> Eigen Map round trip with strides", "[core][view]") {
  fmat m(5, 7);
  for (int i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(i);
  // A non-contiguous column block of a row-major matrix.
  auto blk = m.block(1, 2, 3, 4);
  matrix_view<float> v(&blk(0, 0), {3, 4}, {m.outerStride(), 1});
  auto map = as_eigen(v);
  CHECK(map.rows() == 3);
  CHECK(map.cols() == 4);
  CHECK(map(2, 3) == m(3, 5));
  map(0, 0) = -1.f;
  CHECK(m(1, 2) == -1.f);
  // view_of a column-major matrix: strides are swapped.
  Eigen::MatrixXf cm = Eigen::MatrixXf::Random(3, 4);
  auto cv = view_of(cm);
  CHECK(cv.stride(0) == 1);
  CHECK(cv.stride(1) == 3);
  CHECK(cv(2, 1) == cm(2, 1));
  const fmat& cref = m;
  auto rv = view_of(cref);
  static_assert(std::is_same_v<decltype(rv), matrix_view<const float>>);
  CHECK(rv(4, 6) == m(4, 6));
}

TEST_CASE("invalid_argument derives from std::invalid_argument and names the values", "[core]") {
  try {
    detail::require(false, "param=", 3, " must be < ", 2);
    FAIL("no throw");
  } catch (const std::invalid_argument& e) {
    CHECK(std::string(e.what()) == "attnkit: param=3 must be < 2");
  }
  tensor3_view<const float> v(nullptr, {0, 2, 3});
  ATTNKIT_CHECK_INVALID(detail::require_extents(v, {1, 2, 3}, "q"),
                        "q has shape [0, 2, 3] but [1, 2, 3]");
}

TEST_CASE("SIMD targets: detection, names, forcing one", "[core][simd]") {
  const auto targets = supported_targets();
  REQUIRE(!targets.empty());
  CHECK(targets.front() == simd_target::scalar);
#ifdef ATTNKIT_SCALAR_ONLY
  CHECK(targets.size() == 1);
  CHECK(!target_compiled(simd_target::avx2));
  CHECK(!target_compiled(simd_target::neon));
#endif
  CHECK(cpu_supports(best_target()));
  CHECK(std::find(targets.begin(), targets.end(), best_target()) != targets.end());
  CHECK(parse_target("best") == best_target());
  const simd_target before = active_target();
  for (simd_target t : targets) {
    CHECK(parse_target(target_name(t)) == t);
    set_target(t);
    CHECK(active_target() == t);
    // The layout choices the kernels read follow the target.
    CHECK(detail::simd_lanes() >= 1);
    CHECK(detail::simd_vector_target() == (t != simd_target::scalar));
    CHECK((detail::bf16_pair_group() == 0 || detail::bf16_pair_group() == 2 * detail::simd_lanes()));
    // bf16 products only on the avx512 target, on one engine or the other.
    if (t != simd_target::avx512) CHECK(!bf16_products_available());
    CHECK(bf16_products_available() ==
          (detail::bf16_amx_available() || detail::bf16_dot_available()));
  }
  set_target(before);
  ATTNKIT_CHECK_INVALID(parse_target("avx9"), "target=avx9: unknown target");
  for (simd_target t : all_simd_targets)
    if (!target_compiled(t)) {
      ATTNKIT_CHECK_INVALID(parse_target(target_name(t)), "not compiled in this build");
      ATTNKIT_CHECK_INVALID(set_target(t), "is not supported here");
    }
}

TEST_CASE("bf16 products: the engine ATTNKIT_BF16_ENGINE forces is the one that runs",
          "[core][simd]") {
  using detail::bf16_engine;
  const char* what = "ATTNKIT_BF16_ENGINE";
  CHECK(detail::parse_bf16_engine("", what) == bf16_engine::automatic);
  CHECK(detail::parse_bf16_engine("f32", what) == bf16_engine::f32);
  ATTNKIT_CHECK_INVALID(detail::parse_bf16_engine("avx", what),
                        "ATTNKIT_BF16_ENGINE=avx: unknown engine");
  if (detail::cpu_has_amx_bf16())
    CHECK(detail::parse_bf16_engine("amx", what) == bf16_engine::amx);
  else
    ATTNKIT_CHECK_INVALID(detail::parse_bf16_engine("amx", what), "no AMX-BF16");
  if (detail::cpu_has_bf16_dot())
    CHECK(detail::parse_bf16_engine("dot", what) == bf16_engine::dot);
  else
    ATTNKIT_CHECK_INVALID(detail::parse_bf16_engine("dot", what), "no AVX-512 BF16");

  // This process's engine (scripts/test.sh runs the bf16-product tests once per engine).
  const simd_target before = active_target();
  if (cpu_supports(simd_target::avx512)) {
    set_target(simd_target::avx512);
    const bf16_engine e = detail::forced_bf16_engine();
    INFO("ATTNKIT_BF16_ENGINE=" << (std::getenv("ATTNKIT_BF16_ENGINE")
                                        ? std::getenv("ATTNKIT_BF16_ENGINE")
                                        : ""));
    CHECK(detail::bf16_amx_available() ==
          (detail::cpu_has_amx_bf16() && (e == bf16_engine::automatic || e == bf16_engine::amx)));
    if (e == bf16_engine::dot) CHECK(detail::bf16_dot_available());
    if (e == bf16_engine::f32) CHECK(!bf16_products_available());
    set_target(before);
  }
}

TEST_CASE("l1_range_prefetch: every line of its ranges once and in order, none past capacity",
          "[core][simd]") {
  // The line a step issued is the one before `next` (step() advances it past that line).
  alignas(64) static char buf[64 * 64];
  auto issued = [](detail::l1_range_prefetch& pf, int steps) {
    std::vector<const char*> lines;
    for (int i = 0; i < steps; ++i) {
      const char* before = pf.next;
      pf.step();
      if (pf.next != before) lines.push_back(pf.next - 64);
    }
    return lines;
  };
  detail::l1_range_prefetch pf;
  CHECK(issued(pf, 4).empty());
  // Ranges starting inside a line (from that line), ending inside one (through it), one line.
  pf.add(buf + 70, buf + 200);     // lines 1, 2, 3
  pf.add(buf + 1024, buf + 1088);  // line 16
  pf.add(buf + 640, buf + 641);    // line 10
  const std::vector<const char*> want{buf + 64, buf + 128, buf + 192, buf + 1024, buf + 640};
  CHECK(issued(pf, 20) == want);
  detail::l1_range_prefetch full;
  for (int i = 0; i <= detail::l1_range_prefetch::capacity; ++i)
    full.add(buf + 64 * i, buf + 64 * i + 64);
  CHECK(full.count == -1);
  CHECK(issued(full, 40).empty());
}

TEST_CASE("SIMD targets: permute_pairs round trip for every group size", "[core][simd]") {
  // On every target this CPU runs: its own group (2 lanes) takes its vector code, others scalars.
  const simd_target before = active_target();
  for (simd_target t : supported_targets()) {
    set_target(t);
    for (std::int64_t group : {0, 2, 8, 16, 32, 64})
      for (std::int64_t n : {0, 5, 16, 40, 64, 70, 136}) {
        std::vector<float> x(static_cast<std::size_t>(n));
        for (std::int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(i);
        auto y = x;
        detail::permute_pairs(y.data(), n, group);
        // Each whole group: its even columns, then its odd ones; the columns after them unmoved.
        const std::int64_t whole = group ? n / group * group : 0;
        for (std::int64_t c = 0; c < whole; c += group)
          for (std::int64_t j = 0; j < group / 2; ++j) {
            CHECK(y[c + j] == x[c + 2 * j]);
            CHECK(y[c + group / 2 + j] == x[c + 2 * j + 1]);
          }
        for (std::int64_t i = whole; i < n; ++i) CHECK(y[i] == x[i]);
        detail::unpermute_pairs(y.data(), n, group);
        CHECK(y == x);
      }
  }
  set_target(before);
}
