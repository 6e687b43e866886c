#!/usr/bin/env bash
# The whole test suite: install what is missing, then
#   1. Release build with -march=native (the AVX-512 kernels), all tests via CTest;
#   2. AddressSanitizer + UndefinedBehaviorSanitizer build at -O1 without -march=native (the
#      portable kernels), all tests again; any sanitizer report fails the run.
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
cmake -S "$root" -B "$root/build-sanitize" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g" \
  -DCMAKE_CXX_FLAGS="$san" -DCMAKE_EXE_LINKER_FLAGS="$san" -DATTNKIT_NATIVE=OFF -DATTNKIT_BUILD_BENCHMARKS=OFF \
  -DATTNKIT_PRECISION_LOSS_TESTS=OFF >/dev/null
cmake --build "$root/build-sanitize" -j"$jobs"
(cd "$root/build-sanitize" && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --output-on-failure -j"$jobs")
