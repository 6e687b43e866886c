#!/usr/bin/env bash
# The whole test suite: install what is missing, then
#   1. Release build (-O2) with -march=native, all tests via CTest on the best SIMD target of this CPU
#      (the command-line tools and their tests included), then the kernel suites again on every
#      other target it runs (ATTNKIT_TARGET: avx2, scalar; core/cpu.hpp), and the bf16-product
#      tests on every other engine it runs (ATTNKIT_BF16_ENGINE=dot: vdpbf16ps beside AMX). The
#      binaries that run on the best target only (examples, tools, the checkpoint and approximate
#      conversion suites) are compiled for it alone (ATTNKIT_ONE_TARGET_TOOLS);
#   2. AddressSanitizer + UndefinedBehaviorSanitizer build at -Og without -march: every Catch2
#      suite on the scalar target (the compiler's baseline, Eigen's GEMM tiles), then the suites
#      that drive the vector kernels hardest on each vector target (the examples' and tools'
#      end-to-end runs stay in step 1: the suites cover the library code they drive). Those
#      suites have every target's kernels, chosen at run time; the others are compiled for the
#      scalar target alone (ATTNKIT_SCALAR_ONLY), which they run here. Any sanitizer report fails
#      the run. The slowest reference runs are left out here, as under qemu in step 3 (step 1 runs
#      them on every target): the trained tiny model's log-likelihoods and the long-context decode.
#      Line tables only (-g1): sanitizer reports keep file:line, the build is a third faster;
#      -Og rather than -O1: a quarter less compile time for a tenth more test time;
#   3. the kernel suites cross-compiled for AArch64 (g++-aarch64-linux-gnu) and run under
#      qemu-user on the NEON target (the scalar target's code is the same C++ as on x86);
#   4. the differential fuzz target (clang, libFuzzer + ASan + UBSan; built beside step 2's tests,
#      run beside step 3's build) for a bounded time on the best target (scripts/fuzz.sh;
#      ATTNKIT_FUZZ_SECONDS, default 60; the corpus replay of each further target would cost
#      another minute of the CI budget).
# Benchmarks are built in step 1 (so they keep compiling) but not run. The wall time of every stage
# is printed at the end (also when a stage fails).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
jobs=$(nproc)
# stage NAME: ends the running stage and starts NAME; every stage's wall time is printed at exit.
stage_times=()
stage_name=""
stage_start=$SECONDS
end_stage() {
  [ -n "$stage_name" ] && stage_times+=("$stage_name: $((SECONDS - stage_start)) s")
  stage_name=""
}
stage() {
  end_stage
  stage_name=$1
  stage_start=$SECONDS
  echo "== attnkit: $1 =="
}
report_stages() {
  end_stage
  echo "== attnkit: wall time per stage (total $SECONDS s) =="
  printf '  %s\n' "${stage_times[@]}"
}
trap report_stages EXIT
stage "packages (scripts/deps.sh)"
bash "$root/scripts/deps.sh"

# Suites that run no kernel code of their own or take minutes: once per build, on the default
# target (CTest names are "binary:test case"). The Release build compiles their binaries, and the
# examples' and tools', for that target alone (ATTNKIT_ONE_TARGET_TOOLS), as test_static_target is.
once_only='^(packaging|docs|tools|examples|test_checkpoint|test_convert_approx|test_static_target):'

stage "Release build"
# -O2: a sixth less compile time than CMake's -O3 for the same tests (each translation unit
# compiles the kernels once per SIMD target).
cmake -S "$root" -B "$root/build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-O2 -DNDEBUG" \
  -DATTNKIT_ONE_TARGET_TOOLS=ON >/dev/null
cmake --build "$root/build" -j"$jobs"
# attnkit_targets: the targets this CPU runs; the automatic one; the bf16-product engines it runs
# besides the automatic one (vdpbf16ps on a CPU with AMX).
mapfile -t found < <("$root/build/tests/attnkit_targets")
read -r -a targets <<<"${found[0]}"
read -r -a engines <<<"${found[2]:-}"
stage "Release tests on ${found[1]}"
(cd "$root/build" && ctest --output-on-failure -j"$jobs")
for t in "${targets[@]}"; do
  [ "$t" = "${found[1]}" ] && continue
  stage "the kernel suites on ATTNKIT_TARGET=$t"
  (cd "$root/build" && ATTNKIT_TARGET=$t ctest --output-on-failure -j"$jobs" -E "$once_only")
done
for e in "${engines[@]}"; do
  stage "the bf16-product tests on ATTNKIT_BF16_ENGINE=$e"
  (cd "$root/build" && ATTNKIT_BF16_ENGINE=$e ctest --output-on-failure -j"$jobs" -R 'bf16 products')
done

stage "ASan + UBSan build (-Og)"
# The suites run on every vector target below (test_core and test_batch hold bf16-product tests).
vector_suites=(test_core test_kernels test_policy test_robustness test_shared test_batch)
vector_regex="^($(IFS='|'; echo "${vector_suites[*]}")):"
san="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
dir=build-sanitize
cmake -S "$root" -B "$root/$dir" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-Og -g1" \
  -DCMAKE_CXX_FLAGS="$san" -DCMAKE_EXE_LINKER_FLAGS="$san" -DATTNKIT_NATIVE=OFF \
  -DATTNKIT_BUILD_BENCHMARKS=OFF -DATTNKIT_BUILD_EXAMPLES=OFF -DATTNKIT_BUILD_TOOLS=OFF \
  -DATTNKIT_PRECISION_LOSS_TESTS=OFF -DATTNKIT_VECTOR_TESTS="$(IFS=';'; echo "${vector_suites[*]}")" >/dev/null
cmake --build "$root/$dir" -j"$jobs"
# The sanitizer runs leave out the slowest reference runs, which the Release run above checks on
# every target: the trained tiny model's log-likelihoods through the decoder (8 rows of 512 tokens
# each, three times; the decoder's code runs under the sanitizers in the every-family decoder
# tests), and the long-context decode over 4096 keys for six group sizes, whose time there is the
# fixture's and the double reference's (the long-context key splits run under the sanitizers in
# the decode of 128 heads over 4096 keys).
sanitized_ctest() {  # sanitized_ctest TARGET [ctest args...]
  local t=$1
  shift
  (cd "$root/$dir" && ATTNKIT_TARGET=$t ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ctest --output-on-failure -j"$jobs" \
    -E "^(packaging|docs): |^test_checkpoint: ?decoder: .*tiny model|^test_kernels: ?long-context decode" "$@")
}
# Meanwhile the fuzz target builds (step 4), so that it is ready when the cross build starts.
mkdir -p "$root/build-fuzz"
bash "$root/scripts/fuzz.sh" build >"$root/build-fuzz/build.log" 2>&1 &
background=$!
trap 'kill "$background" 2>/dev/null || true; report_stages' EXIT
stage "ASan + UBSan tests on ATTNKIT_TARGET=scalar (the fuzz target building beside them)"
sanitized_ctest scalar
for t in "${targets[@]}"; do
  [ "$t" = scalar ] && continue
  stage "ASan + UBSan, the vector kernels on ATTNKIT_TARGET=$t"
  sanitized_ctest "$t" -R "$vector_regex"
done
for e in "${engines[@]}"; do
  stage "ASan + UBSan, the bf16-product tests on ATTNKIT_BF16_ENGINE=$e"
  ATTNKIT_BF16_ENGINE=$e sanitized_ctest avx512 -R "$vector_regex.*bf16 products"
done

stage "the fuzz target's build (rest of it)"
fuzz_built=0
wait "$background" || fuzz_built=$?
cat "$root/build-fuzz/build.log"
[ "$fuzz_built" = 0 ] || exit "$fuzz_built"
stage "AArch64 cross build beside differential fuzzing (libFuzzer, ASan + UBSan)"
# One fuzzing process for a bounded wall time, beside the cross build's one translation unit.
bash "$root/scripts/fuzz.sh" "${ATTNKIT_FUZZ_SECONDS:-60}" >"$root/build-fuzz/run.log" 2>&1 &  # the best target
background=$!
# The suites of the vector code (kernels.inl): streaming and GEMM tiles of every storage type,
# softmax and exp, TPA's head combination; the driver above it is the same C++ as on x86. Compiled
# for the NEON target alone (ATTNKIT_STATIC_TARGET_ONLY): the scalar target's code is that of x86.
neon_suites=(test_kernels)
cmake -S "$root" -B "$root/build-aarch64" -DCMAKE_TOOLCHAIN_FILE="$root/cmake/aarch64-linux-gnu.cmake" \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-O2 -DNDEBUG -DATTNKIT_STATIC_TARGET_ONLY" \
  -DATTNKIT_NATIVE=OFF -DATTNKIT_BUILD_BENCHMARKS=OFF -DATTNKIT_BUILD_EXAMPLES=OFF \
  -DATTNKIT_BUILD_TOOLS=OFF -DATTNKIT_PRECISION_LOSS_TESTS=OFF >/dev/null
cmake --build "$root/build-aarch64" -j"$jobs" --target "${neon_suites[@]}"
fuzzed=0
wait "$background" || fuzzed=$?
cat "$root/build-fuzz/run.log"
[ "$fuzzed" = 0 ] || exit "$fuzzed"

stage "the kernel suites on the NEON target under qemu-user"
# The long-context decode is left out here as in the sanitizer runs: under qemu its time is the
# fixture's and the double reference's (the decode of 128 heads over 4096 keys runs).
(cd "$root/build-aarch64" && ATTNKIT_TARGET=neon ctest --output-on-failure -j"$jobs" \
  -R "^($(IFS='|'; echo "${neon_suites[*]}")):" -E "^test_kernels: ?long-context decode")
