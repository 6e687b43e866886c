// ATTNKIT_STATIC_TARGET_ONLY (core/cpu.hpp): this binary is built with it and the project's
// flags (-march=native where ATTNKIT_NATIVE is on), so it holds the kernels of the one target
// those flags enable, runs them without asking the CPU, and they give the reference's answer.
#include "gqa_fixture.hpp"

using namespace attnkit;
using namespace attnkit::test;

namespace {

/// The target the compiler's flags enable, by core/cpu.hpp's rule: AVX-512 F/BW/VL/DQ with
/// AVX2, FMA and F16C; else AVX2, FMA and F16C; else NEON on AArch64; else scalar.
constexpr simd_target flags_target() {
#if defined(__x86_64__) && defined(__AVX512F__) && defined(__AVX512BW__) &&                    \
    defined(__AVX512VL__) && defined(__AVX512DQ__) && defined(__AVX2__) && defined(__FMA__) && \
    defined(__F16C__)
  return simd_target::avx512;
#elif defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  return simd_target::avx2;
#elif defined(__aarch64__) && defined(__ARM_NEON)
  return simd_target::neon;
#else
  return simd_target::scalar;
#endif
}

}  // namespace

TEST_CASE("ATTNKIT_STATIC_TARGET_ONLY: the flags' target alone, chosen without detection",
          "[core][simd]") {
  INFO("flags' target: " << target_name(flags_target()));
  for (simd_target t : all_simd_targets) {
    CHECK(target_compiled(t) == (t == flags_target()));
    if (t != flags_target()) {
      ATTNKIT_CHECK_INVALID(parse_target(target_name(t)), "not compiled in this build");
      ATTNKIT_CHECK_INVALID(set_target(t), "is not supported here");
    }
  }
  CHECK(supported_targets() == std::vector<simd_target>{flags_target()});
  CHECK(best_target() == flags_target());
  CHECK(active_target() == flags_target());
  CHECK(detail::simd_vector_target() == (flags_target() != simd_target::scalar));
}

TEMPLATE_TEST_CASE("ATTNKIT_STATIC_TARGET_ONLY: its kernels give the double reference's answer",
                   "[core][simd]", float, bf16) {
  std::mt19937_64 rng(GENERATE(range(1, 7)) * 104729);
  gqa_case c;
  c.kv_heads = 1 + static_cast<std::int64_t>(rng() % 3);
  c.heads = c.kv_heads * (1 + static_cast<std::int64_t>(rng() % 6));
  c.head_dim = c.v_head_dim = rng() % 2 ? 64 : 128;
  c.tq = rng() % 2 ? 1 : 40;  // a decode (streaming tiles) and a prefill chunk (GEMM tiles)
  c.tk = 40 + static_cast<std::int64_t>(rng() % 1200);
  c.products = rng() % 2 ? product_math::bf16 : product_math::f32;
  INFO(describe(c));
  const gqa_data x = make_gqa_data(rng, c);
  const fmat out = run_kernel<TestType>(c, x, thread_pool(2));
  const double a = x.a_max(c.head_dim), v_max = x.v.cwiseAbs().maxCoeff();
  // The reference has the cache's rounded K and V; bf16 products on a bf16 cache, where the CPU
  // computes them, round the queries and probabilities too: one more bf16 term of the size of the
  // storage's (tests/gqa_fixture.hpp bounds it more tightly).
  const bool rounded_products = std::same_as<TestType, bf16> && c.products == product_math::bf16;
  const double tol = float_tolerance(c.head_dim, c.tk, a, v_max) +
                     (rounded_products ? storage_tolerance<bf16>(a, v_max) : 0);
  CHECK(max_abs_diff(to_double(out), run_reference<TestType>(c, x).out) <= tol);
}
