#!/usr/bin/env bash
# Builds the differential fuzz target (fuzz/attention_fuzz.cpp) with clang's libFuzzer, ASan and
# UBSan and runs it on each target of ATTNKIT_FUZZ_TARGETS (default: best; names as for
# ATTNKIT_TARGET, core/cpu.hpp) for a bounded time (default 60 s each) starting from the corpus in
# fuzz/corpus. For the default, only this CPU's best target is compiled (-march=native with
# ATTNKIT_STATIC_TARGET_ONLY: a quarter less to build); for a list, every target's kernels
# (no -march), each binary cached under its own name. New inputs go to
# build-fuzz/new-corpus (copy the interesting ones into fuzz/corpus by hand); a crash leaves its
# input in build-fuzz/ and fails the script. The binary is rebuilt only when a header or the
# target's source is newer; `build` builds it and runs nothing.
#   scripts/fuzz.sh [seconds per target | build]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-60}
out="$root/build-fuzz"
targets=${ATTNKIT_FUZZ_TARGETS:-best}
mkdir -p "$out/new-corpus"
flags=(-std=c++20 -O1 -gline-tables-only -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
  -fno-omit-frame-pointer -pthread -I"$root/include" $(pkg-config --cflags eigen3))
if [ "$targets" = best ]; then
  bin="$out/attention_fuzz_native"
  flags+=(-march=native -DATTNKIT_STATIC_TARGET_ONLY)
else
  bin="$out/attention_fuzz"
fi
if [ ! -x "$bin" ] || [ -n "$(find "$root/include" "$root/fuzz/attention_fuzz.cpp" -newer "$bin" -print -quit)" ]; then
  echo "== attnkit: building the fuzz target =="
  clang++ "${flags[@]}" "$root/fuzz/attention_fuzz.cpp" -o "$bin.tmp"
  mv "$bin.tmp" "$bin"  # never a half-written binary that looks up to date
fi
[ "$seconds" = build ] && exit 0
for target in $targets; do
  echo "== attnkit: fuzzing for ${seconds} s (ATTNKIT_TARGET=$target) =="
  (cd "$out" && ATTNKIT_TARGET=$target ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
    "$bin" -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 \
    -max_len=4096 -print_final_stats=1 new-corpus "$root/fuzz/corpus" 2>&1 | tail -n 25)
done
