#!/usr/bin/env bash
# Runs the measurements behind the charts of docs/benchmarks.md with JSON output and draws them
# (gnuplot, PNG and SVG): decode time vs context for every variant, KV bytes per token, prefill
# GFLOP/s vs length, batch-decode bandwidth share vs batch size, and conversion error and NLL on
# the trained tiny model vs kv_lora_rank for TransMLA and MHA2MLA. About 25 minutes here.
#   bash scripts/plots.sh [--quick] [--bin BUILD_DIR] [--threads N] [OUT_DIR]
# OUT_DIR: docs/img (the charts; the JSON they are drawn from goes to OUT_DIR/data). --bin: use the binaries of an existing build instead of building one.
# --quick: tiny shapes, for the test that keeps this script working (seconds, not minutes).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/docs/img
bin=""
quick=0
threads=2
while (($#)); do
  case $1 in
    --quick) quick=1 ;;
    --bin) bin=$2; shift ;;
    --threads) threads=$2; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    -*) echo "plots.sh: unknown flag $1" >&2; exit 2 ;;
    *) out=$1 ;;
  esac
  shift
done
if [ -z "$bin" ]; then
  bash "$root/scripts/deps.sh"
  bin=$root/build
  cmake -S "$root" -B "$bin" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$bin" --target attnkit-compare attnkit-convert -j"$(nproc)" >/dev/null
fi
command -v gnuplot >/dev/null || { echo "plots.sh: needs gnuplot (apt-get install gnuplot-nox)" >&2; exit 2; }
compare=$bin/examples/attnkit-compare
convert=$bin/tools/attnkit-convert
results=$out/data  # the JSON behind the charts, kept beside them
rm -rf "$results"
mkdir -p "$out" "$results/prefill" "$results/batch" "$results/convert"
ckpt=$(mktemp -d)
trap 'rm -rf "$ckpt"' EXIT

if ((quick)); then
  geometry=(--model-dim 256 --heads 8 --kv-heads 2 --head-dim 32)
  sweep=(--context 512 --plot-contexts 128,256,512 --rows GQA,MQA,TPA-R2,Shared-L3-8B,GQA-\>MLA-exact)
  prefill_lengths=(64 128); prefill_rows=GQA,TPA-R2
  batch_sizes=(1 2); batch=(--min-context 128 --max-context 256)
  ranks=(32 64); convert_data=(--calibration-rows 0:2 --eval-rows 64:65 --heldout 64)
else
  geometry=()
  sweep=(--context 16384 --plot-contexts 512,1024,2048,4096,8192,16384)
  prefill_lengths=(256 512 1024 2048 4096); prefill_rows=MHA,GQA,MQA,MLA-V2-Lite,TPA-R2
  batch_sizes=(1 2 4 8 16 32 64); batch=()
  ranks=(32 64 128 192); convert_data=()
fi
common=(--storage bf16 --threads "$threads")

echo "plots.sh: decode vs context (every variant) ..." >&2
"$compare" "${common[@]}" "${geometry[@]}" "${sweep[@]}" --json \
  --plot "$out/decode_vs_context.png" --plot "$out/decode_vs_context.svg" > "$results/compare.json"
# Prefill and batch points: three runs each, rounds interleaved (the chart takes the median), so
# one noisy moment of a shared machine moves one run, not the point.
for run in 1 2 3; do
  for n in "${prefill_lengths[@]}"; do
    echo "plots.sh: prefill of $n tokens (run $run of 3) ..." >&2
    "$compare" "${common[@]}" "${geometry[@]}" --rows "$prefill_rows" --context "$n" --prefill "$n" \
      --json 2>/dev/null > "$results/prefill/$n-$run.json"
  done
  for b in "${batch_sizes[@]}"; do
    echo "plots.sh: batch of $b decodes (run $run of 3) ..." >&2
    "$compare" "${common[@]}" --batch --decodes "$b" --prefills 0 "${batch[@]}" --json \
      > "$results/batch/$b-$run.json"
  done
done
model=$root/models/tiny-llama-bytes
for r in "${ranks[@]}"; do
  echo "plots.sh: conversions of the tiny model to kv_lora_rank $r ..." >&2
  "$convert" "$model" "$ckpt/out" --overwrite --threads "$threads" --json "${convert_data[@]}" \
    --method transmla --qk-mqa-dim 64 --kv-lora-rank "$r" --freqfold 2 > "$results/convert/transmla-$r.json"
  "$convert" "$model" "$ckpt/out" --overwrite --threads "$threads" --json "${convert_data[@]}" \
    --method mha2mla --rope-dim 32 --selection 2-norm --latent-dim "$r" > "$results/convert/mha2mla-$r.json"
done
python3 "$root/scripts/plots.py" "$results" "$out" --threads "$threads"
