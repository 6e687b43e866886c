#!/usr/bin/env bash
# The whole test suite: install what is missing, then
#   1. Release build with -march=native (the AVX-512 kernels), all tests via CTest, the
#      command-line tools (attnkit-run, attnkit-convert) and their tests included;
#   2. AddressSanitizer + UndefinedBehaviorSanitizer build at -O1 without -march=native (the
#      portable kernels), every Catch2 suite again (the examples' and tools' end-to-end runs
#      stay in step 1: the suites cover the library code they drive, test_checkpoint the
#      checkpoint reader and decoder of the tools); any sanitizer report fails the run.
#      Line tables only (-g1): sanitizer reports keep file:line, the build is a third faster;
#   3. the same sanitizers with -march=native: the GQA kernel, policy (every variant),
#      robustness (every variant, special values) and shared-attention tests on the AVX-512
#      kernels;
#   4. the differential fuzz target (clang, libFuzzer + ASan + UBSan, AVX-512 kernels) for a
#      bounded time from its corpus (scripts/fuzz.sh; ATTNKIT_FUZZ_SECONDS, default 60).
# Benchmarks are built in step 1 (so they keep compiling) but not run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
jobs=$(nproc)
bash "$root/scripts/deps.sh"

echo "== attnkit: Release build and tests =="
cmake -S "$root" -B "$root/build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$root/build" -j"$jobs"
(cd "$root/build" && ctest --output-on-failure -j"$jobs")

echo "== attnkit: ASan + UBSan build and tests (-O1, portable code paths) =="
san="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
sanitized() {  # sanitized BUILD_DIR NATIVE [targets...]: configure, build, run their tests
  local dir=$1 native=$2
  shift 2
  cmake -S "$root" -B "$root/$dir" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" \
    -DCMAKE_CXX_FLAGS="$san" -DCMAKE_EXE_LINKER_FLAGS="$san" -DATTNKIT_NATIVE="$native" \
    -DATTNKIT_BUILD_BENCHMARKS=OFF -DATTNKIT_BUILD_EXAMPLES=OFF -DATTNKIT_BUILD_TOOLS=OFF \
    -DATTNKIT_PRECISION_LOSS_TESTS=OFF >/dev/null
  local filter=()
  if (($#)); then
    cmake --build "$root/$dir" -j"$jobs" --target "$@"
    filter=(-R "^($(IFS='|'; echo "$*")):")  # CTest names are "binary:test case"
  else
    cmake --build "$root/$dir" -j"$jobs"
  fi
  (cd "$root/$dir" && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ctest --output-on-failure -j"$jobs" \
    -E '^packaging: ' "${filter[@]}")  # packaging: checked in the Release run
}
sanitized build-sanitize OFF

echo "== attnkit: ASan + UBSan on the AVX-512 kernels (-O1 -march=native) =="
sanitized build-sanitize-native ON test_gqa_kernel test_policy test_robustness test_shared

echo "== attnkit: differential fuzzing (libFuzzer, ASan + UBSan, AVX-512 kernels) =="
ATTNKIT_FUZZ_TARGETS=native bash "$root/scripts/fuzz.sh" "${ATTNKIT_FUZZ_SECONDS:-60}"
