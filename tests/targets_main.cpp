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
    // AMX, where present, is always the automatic choice; vdpbf16ps only where it is fast and
    // there is no AMX.
    namespace d = attnkit::detail;
    const bool dot_is_automatic = d::cpu_has_fast_bf16_dot() && !d::cpu_has_amx_bf16();
    std::printf("%s\n", attnkit::cpu_supports(attnkit::simd_target::avx512) &&
                                d::cpu_has_bf16_dot() && !dot_is_automatic
                            ? "dot"
                            : "");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
