// attnkit_targets: prints the SIMD targets this build has and this CPU runs, one line, slowest
// first, then the one ATTNKIT_TARGET (or the automatic choice) selects. scripts/test.sh runs the
// suites once per target it lists.
#include <attnkit/core/cpu.hpp>

#include <cstdio>
#include <exception>

int main() {
  try {
    for (attnkit::simd_target t : attnkit::supported_targets())
      std::printf("%s ", attnkit::target_name(t));
    std::printf("\n%s\n", attnkit::target_name(attnkit::active_target()));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
