#!/usr/bin/env python3
"""Interleaved A/B of the same Google Benchmark binary built from two (or more) trees.

Runs every binary on the filter `rounds` times, alternating the order each round, and prints the
median real time of each benchmark per binary and its ratio to the first. Timings on a shared VM
move by tens of percent between runs; only ratios of medians from one interleaved session mean
anything, and --min-time of 0.5 s or more keeps single runs from dominating.

  python3 scripts/bench_ab.py --filter 'gqa_decode' --rounds 8 --min-time 0.5 \\
      old=/tmp/base/build/bench/bench_gqa new=build/bench/bench_gqa
"""
import argparse
import collections
import json
import statistics
import subprocess

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--filter", default=".", help="--benchmark_filter regex")
parser.add_argument("--rounds", type=int, default=6)
parser.add_argument("--min-time", default="0.5", help="--benchmark_min_time per run (seconds)")
parser.add_argument("binaries", nargs="+", help="tag=path of each benchmark binary")
args = parser.parse_args()

bins = dict(b.split("=", 1) for b in args.binaries)
tags = list(bins)
unit_us = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}
times = collections.defaultdict(lambda: collections.defaultdict(list))
for r in range(args.rounds):
    for tag in tags if r % 2 == 0 else tags[::-1]:
        out = subprocess.run([bins[tag], f"--benchmark_filter={args.filter}", f"--benchmark_min_time={args.min_time}",
                              "--benchmark_format=json"], capture_output=True, text=True, check=True).stdout
        for b in json.loads(out)["benchmarks"]:
            times[b["name"]][tag].append(b["real_time"] * unit_us[b["time_unit"]])

print(f"{'benchmark (median us)':62s} " + " ".join(f"{t:>10s}" for t in tags))
for name, per_tag in times.items():
    med = [statistics.median(per_tag[t]) for t in tags]
    print(f"{name:62s} " + " ".join(f"{m:10.1f}" for m in med) + "  " +
          " ".join(f"{t}/{tags[0]} {m / med[0]:.3f}" for t, m in zip(tags[1:], med[1:])))
