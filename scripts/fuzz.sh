#!/usr/bin/env bash
# Builds the differential fuzz target (fuzz/attention_fuzz.cpp) with clang's libFuzzer, ASan and
# UBSan (no -march: the kernels of every SIMD target are in the binary) and runs it on each
# target of ATTNKIT_FUZZ_TARGETS (default: best; names as for ATTNKIT_TARGET, core/cpu.hpp)
# for a bounded time (default 60 s each) starting from the corpus in fuzz/corpus. New inputs go to
# build-fuzz/new-corpus (copy the interesting ones into fuzz/corpus by hand); a crash leaves its
# input in build-fuzz/ and fails the script. The binary is rebuilt only when a header or the
# target's source is newer; `build` builds it and runs nothing.
#   scripts/fuzz.sh [seconds per target | build]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-60}
out="$root/build-fuzz"
bin="$out/attention_fuzz"
mkdir -p "$out/new-corpus"
flags=(-std=c++20 -O1 -gline-tables-only -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
  -fno-omit-frame-pointer -pthread -I"$root/include" $(pkg-config --cflags eigen3))
if [ ! -x "$bin" ] || [ -n "$(find "$root/include" "$root/fuzz/attention_fuzz.cpp" -newer "$bin" -print -quit)" ]; then
  echo "== attnkit: building the fuzz target =="
  clang++ "${flags[@]}" "$root/fuzz/attention_fuzz.cpp" -o "$bin.tmp"
  mv "$bin.tmp" "$bin"  # never a half-written binary that looks up to date
fi
[ "$seconds" = build ] && exit 0
for target in ${ATTNKIT_FUZZ_TARGETS:-best}; do
  echo "== attnkit: fuzzing for ${seconds} s (ATTNKIT_TARGET=$target) =="
  (cd "$out" && ATTNKIT_TARGET=$target ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ./attention_fuzz -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 \
    -max_len=4096 -print_final_stats=1 new-corpus "$root/fuzz/corpus" 2>&1 | tail -n 25)
done
