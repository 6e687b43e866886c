#!/usr/bin/env bash
# Model-scale conversion benchmark: the attention of a Llama-3-8B-shaped 32-layer checkpoint
# (bf16 q/k/v/o, written by make_synthetic_checkpoint.cpp) converted by attnkit-convert with
# 32k Gaussian calibration tokens per layer, one layer at a time; wall time and peak resident
# memory from /usr/bin/time.
#   bash scripts/bench_convert_model.sh [BUILD_DIR] [WORK_DIR] [extra attnkit-convert flags]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build}
work=${2:-/tmp/attnkit-bench-convert}
shift $(( $# > 2 ? 2 : $# ))
mkdir -p "$work"
if [ ! -f "$work/source/config.json" ]; then
  g++ -std=c++20 -O2 -I"$root/include" $(pkg-config --cflags eigen3) "$root/scripts/make_synthetic_checkpoint.cpp" \
    -o "$work/make_synthetic_checkpoint"
  "$work/make_synthetic_checkpoint" "$work/source" 32
fi
/usr/bin/time -f "wall %e s, peak resident %M KiB" "$build/tools/attnkit-convert" "$work/source" "$work/converted" \
  --overwrite --method transmla --qk-mqa-dim 64 --kv-lora-rank 512 --freqfold 4 --synthetic-calibration 32768 \
  --heldout 256 --threads 2 --dtype bf16 "$@"
