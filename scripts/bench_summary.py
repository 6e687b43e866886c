#!/usr/bin/env python3
"""Reads bench_gqa's JSON (--benchmark_repetitions=N --benchmark_out=F) and prints the figures the
foundation's speed targets are stated in, each as a ratio of medians taken in the same run.

usage: scripts/bench_summary.py bench_gqa.json
"""
import json
import sys


def medians(path):
    with open(path) as f:
        data = json.load(f)
    out = {}
    for b in data["benchmarks"]:
        if b.get("aggregate_name", "median") != "median" and b.get("run_type") == "aggregate":
            continue
        name = b.get("run_name", b["name"]).replace("/real_time", "")
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        out[name] = b
    return data.get("context", {}), out


def main():
    ctx, m = medians(sys.argv[1])
    gbs = lambda n: m[n]["bytes_per_second"] / 1e9
    us = lambda n: m[n]["real_time"] * {"us": 1, "ms": 1e3, "ns": 1e-3, "s": 1e6}[m[n]["time_unit"]]
    print(f"host: {ctx.get('host_name', '?')}, {ctx.get('num_cpus', '?')} CPUs, date {ctx.get('date', '?')}")
    bw1 = gbs("attnkit::bench::BM_read_bandwidth/threads:1")
    bw2 = gbs("attnkit::bench::BM_read_bandwidth/threads:2")
    fma1 = m["attnkit::bench::BM_fma_peak/threads:1"]["FLOPS"] / 1e9
    fma2 = m["attnkit::bench::BM_fma_peak/threads:2"]["FLOPS"] / 1e9
    print(f"roofline: read bandwidth {bw1:.1f} GB/s (1 thread), {bw2:.1f} GB/s (2 threads); "
          f"FP32 FMA peak {fma1:.0f} / {fma2:.0f} GFLOP/s")
    print("\nGQA decode (H 32, H_kv 8, d 128), median time, KV read rate, share of the read bandwidth:")
    for s in ("float", "ak::bf16"):
        for t in (1024, 4096, 16384):
            for th in (1, 2):
                n = f"BM_gqa_decode<{s}>/T:{t}/threads:{th}"
                bw = bw1 if th == 1 else bw2
                bound = m[n]["bytes_per_second"] * us(n) * 1e-6 / (bw * 1e9) * 1e6
                print(f"  {s:9s} T={t:5d} threads={th}: {us(n):8.1f} us  {gbs(n):6.1f} GB/s  "
                      f"{100 * gbs(n) / bw:5.1f}% of read BW  (time / bandwidth bound = {us(n) / bound:.2f})")
    f32 = us("BM_gqa_decode<float>/T:16384/threads:2")
    b16 = us("BM_gqa_decode<ak::bf16>/T:16384/threads:2")
    print(f"\nbf16 vs f32 decode speedup, T=16384, 2 threads: {f32 / b16:.2f}x")
    print("\nGQA causal prefill, GFLOP/s (share of the FMA peak):")
    for s in ("float", "ak::bf16"):
        for t in (512, 2048):
            for th in (1, 2):
                n = f"BM_gqa_prefill_causal<{s}>/T:{t}/threads:{th}"
                fl = m[n]["FLOPS"] / 1e9
                peak = fma1 if th == 1 else fma2
                print(f"  {s:9s} T={t:5d} threads={th}: {us(n) / 1e3:8.1f} ms  {fl:6.1f} GFLOP/s  ({100 * fl / peak:4.1f}% of peak)")


if __name__ == "__main__":
    main()
