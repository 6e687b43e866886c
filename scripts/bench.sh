#!/usr/bin/env bash
# Builds and runs the benchmarks (Release, -march=native), 5 interleaved repetitions each, and
# prints the target figures as ratios of medians from the same run. JSON lands in
# build/bench-results/. Usage: bash scripts/bench.sh [gqa] [mla] [tpa] [convert] [shared] [batch] [kernels]
# (default: all seven)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/deps.sh"
cmake -S "$root" -B "$root/build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-O3 -DNDEBUG" >/dev/null
which=("$@")
[ ${#which[@]} -gt 0 ] || which=(gqa mla tpa convert shared batch kernels)
mkdir -p "$root/build/bench-results"
for b in "${which[@]}"; do
  cmake --build "$root/build" --target "bench_$b" -j"$(nproc)" >/dev/null
  out="$root/build/bench-results/bench_$b.json"
  "$root/build/bench/bench_$b" --benchmark_repetitions=5 --benchmark_report_aggregates_only=true \
    --benchmark_enable_random_interleaving=true --benchmark_min_time=0.2 \
    --benchmark_out="$out" --benchmark_out_format=json >/dev/null
  python3 "$root/scripts/bench_summary.py" "$out"
  echo
done
