// attnkit_targets: prints the SIMD targets this build has and this CPU runs, one line, slowest
// first, then the one ATTNKIT_TARGET (or the automatic choice) selects, then the engines of
// product_math::bf16 this CPU runs besides the automatic choice (ATTNKIT_BF16_ENGINE values).
// scripts/test.sh runs the suites once per target and the bf16-product tests once per engine.
#include <attnkit/core/cpu.hpp>

#include <cstdio>
#include <exception>

int main() {
  try {
    for (attnkit::simd_target t : attnkit::supported_targets())
      std::printf("%s ", attnkit::target_name(t));
    std::printf("\n%s\n", attnkit::target_name(attnkit::active_target()));
    namespace d = attnkit::detail;
    std::printf("%s\n", attnkit::cpu_supports(attnkit::simd_target::avx512) &&
                                d::cpu_has_bf16_dot() &&
                                d::automatic_bf16_engine() != d::bf16_engine::dot
                            ? "dot"
                            : "");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
