#!/usr/bin/env bash
# Builds the differential fuzz target (fuzz/attention_fuzz.cpp) with clang's libFuzzer, ASan and
# UBSan, for the AVX-512 kernels (-march=native) and the portable ones, and runs each for a
# bounded time (default 60 s each) starting from the corpus in fuzz/corpus. New inputs go to
# build-fuzz/new-corpus (copy the interesting ones into fuzz/corpus by hand); a crash leaves its
# input in build-fuzz/ and fails the script.
#   scripts/fuzz.sh [seconds per target]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-60}
out="$root/build-fuzz"
mkdir -p "$out/new-corpus"
flags=(-std=c++20 -O1 -gline-tables-only -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
  -fno-omit-frame-pointer -pthread -I"$root/include" $(pkg-config --cflags eigen3))
for target in ${ATTNKIT_FUZZ_TARGETS:-native portable}; do
  arch=()
  [ "$target" = native ] && arch=(-march=native)
  echo "== attnkit: building the fuzz target ($target kernels) =="
  clang++ "${flags[@]}" "${arch[@]}" "$root/fuzz/attention_fuzz.cpp" -o "$out/attention_fuzz_$target"
  echo "== attnkit: fuzzing for ${seconds} s ($target kernels) =="
  (cd "$out" && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
    "./attention_fuzz_$target" -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 \
    -max_len=4096 -print_final_stats=1 new-corpus "$root/fuzz/corpus" 2>&1 | tail -n 25)
done
