#!/usr/bin/env python3
"""Reads the JSON of bench_gqa, bench_mla, bench_tpa, bench_convert, bench_shared, bench_batch or bench_kernels
(--benchmark_repetitions=N --benchmark_out=F) and prints the figures the speed targets are stated in, each as a ratio
of medians taken in the same run.

usage: scripts/bench_summary.py bench_gqa.json|bench_mla.json|bench_tpa.json|bench_convert.json|bench_shared.json|...
"""
import json
import sys

TARGETS = ["scalar", "avx2", "avx512", "neon"]  # attnkit::all_simd_targets


def medians(path):
    with open(path) as f:
        data = json.load(f)
    out = {}
    for b in data["benchmarks"]:
        if b.get("error_occurred"):  # skipped: a target or path this CPU lacks
            continue
        if b.get("aggregate_name", "median") != "median" and b.get("run_type") == "aggregate":
            continue
        name = b.get("run_name", b["name"]).replace("/real_time", "")
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        out[name] = b
    return data.get("context", {}), out


def mla(m, us, bw2, fma2):
    print("\nMLA absorbed decode (d_c 512, d_R 64), 2 threads: time, GFLOP/s, share of its roofline "
          "max(bytes / read BW, FLOPs / FMA peak):")
    for s in ("float", "ak::bf16", "ak::bf16, true"):
        for h in (16, 128):
            for t in (1024, 4096, 16384):
                n = f"BM_mla_absorbed_decode<{s}>/H:{h}/T:{t}/threads:2"
                if n not in m:  # bf16 products: only where the CPU has them
                    continue
                fl = m[n]["FLOPS"] * us(n) * 1e-6
                by = m[n]["bytes_per_second"] * us(n) * 1e-6
                roof = max(by / (bw2 * 1e9), fl / (fma2 * 1e9)) * 1e6
                print(f"  {s:9s} H={h:3d} T={t:5d}: {us(n):9.1f} us  {m[n]['FLOPS'] / 1e9:6.1f} GFLOP/s  "
                      f"{100 * roof / us(n):5.1f}% of roofline ({100 * m[n]['FLOPS'] / 1e9 / fma2:4.1f}% of FMA peak)")
    print("\nabsorbed vs naive vs GQA decode (Llama-3-8B, H 32/8, d 128), f32, 2 threads:")
    for t in (1024, 4096, 16384):
        a = us(f"BM_mla_absorbed_decode<float>/H:16/T:{t}/threads:2")
        nv = us(f"BM_mla_naive_decode/H:16/T:{t}/threads:2")
        g = us(f"BM_gqa_decode<float>/T:{t}/threads:2")
        gb = us(f"BM_gqa_decode<ak::bf16>/T:{t}/threads:2")
        print(f"  T={t:5d}: absorbed H16 {a:8.1f} us, naive H16 {nv / 1e3:8.1f} ms ({nv / a:6.1f}x slower), "
              f"GQA f32 {g:8.1f} us ({g / a:4.2f}x the absorbed time), GQA bf16 {gb:8.1f} us")
    for t in (1024, 4096):
        a = us(f"BM_mla_absorbed_decode<float>/H:128/T:{t}/threads:2")
        nv = us(f"BM_mla_naive_decode/H:128/T:{t}/threads:2")
        print(f"  T={t:5d}: absorbed H128 {a:8.1f} us, naive H128 {nv / 1e3:8.1f} ms ({nv / a:6.1f}x slower)")


def tpa(m, us, bw2, fma2):
    names = {0: "llama R2", 1: "llama R1", 2: "T6-small"}
    print("\nTPA decode (FlashTPA order), 2 threads: time, GFLOP/s, GB/s, share of its roofline "
          "max(bytes / read BW, FLOPs / FMA peak), speed-up over GQA decode (H 32/8, d 128, same storage):")
    for s in ("float", "ak::bf16"):
        for sh in (0, 1, 2):
            for t in (1024, 4096, 16384):
                n = f"BM_tpa_decode<{s}>/shape:{sh}/T:{t}/threads:2"
                if n not in m:
                    continue
                fl = m[n]["FLOPS"] * us(n) * 1e-6
                by = m[n]["bytes_per_second"] * us(n) * 1e-6
                roof = max(by / (bw2 * 1e9), fl / (fma2 * 1e9)) * 1e6
                regime = "compute" if fl / (fma2 * 1e9) > by / (bw2 * 1e9) else "memory"
                g = f"BM_gqa_decode<{s}>/T:{t}/threads:2"
                vs = f"{us(g) / us(n):5.2f}x GQA" if g in m else ""
                print(f"  {s:9s} {names[sh]:9s} T={t:5d}: {us(n):8.1f} us  {m[n]['FLOPS'] / 1e9:6.1f} GFLOP/s  "
                      f"{m[n]['bytes_per_second'] / 1e9:5.1f} GB/s  {100 * roof / us(n):5.1f}% of roofline ({regime}-bound)  {vs}")
    for t in (512, 2048):
        f = f"BM_tpa_layer_prefill/path:0/T:{t}/threads:2"
        mt = f"BM_tpa_layer_prefill/path:1/T:{t}/threads:2"
        if f in m and mt in m:
            print(f"  layer prefill T={t}: factorized {us(f) / 1e3:7.1f} ms, materialized {us(mt) / 1e3:7.1f} ms")


def convert(m, us, bw2, fma2):
    print("\nConversion of a Llama-3-8B-shaped layer (D 4096, H 32, H_kv 8, d 128) to 512 + 64 elements per token, "
          "32768 calibration tokens, 2 threads (target < 10 s):")
    for n, what in (("BM_transmla_conversion/threads:2/iterations:1", "TransMLA (F=4)"),
                    ("BM_mha2mla_conversion/threads:2/iterations:1", "MHA2MLA (2-norm, joint SVD)")):
        steps = ", ".join(f"step {k[4:-2]} {m[n][k]:.2f} s" for k in sorted(m[n]) if k.startswith("step"))
        print(f"  {what:28s}: {us(n) / 1e6:6.2f} s  ({steps})")
    a = us("BM_mla_absorbed_decode<float>/H:32/T:16384/threads:2")
    g = us("BM_gqa_decode<float>/T:16384/threads:2")
    n = "BM_mla_absorbed_decode<float>/H:32/T:16384/threads:2"
    fl = m[n]["FLOPS"] * a * 1e-6
    by = m[n]["bytes_per_second"] * a * 1e-6
    roof = max(by / (bw2 * 1e9), fl / (fma2 * 1e9)) * 1e6
    print(f"\ndecode attention at T=16384, f32, 2 threads: converted layer (absorbed, H 32 over 576) {a:8.1f} us "
          f"({100 * roof / a:.1f}% of its roofline, compute-bound), original GQA {g:8.1f} us; GQA / converted = {g / a:.2f}")


def shared(m, us, bw2, fma2):
    print("\nShared attention: a 5-layer span (donor + 4 followers) vs 5 GQA layers, H 32, d 128, bf16, "
          "2 threads (target: shared >= 1.5x faster per decode step at T=16384):")
    for hkv in (32, 8):
        for t in (4096, 16384):
            u = f"BM_span_decode_unshared/{t}/{hkv}/2"
            sh = f"BM_span_decode_shared/{t}/{hkv}/2"
            print(f"  decode H_kv={hkv:2d} T={t:5d}: unshared {us(u) / 1e3:7.2f} ms ({m[u]['kv_bytes'] / 1e6:6.0f} MB KV), "
                  f"shared {us(sh) / 1e3:7.2f} ms ({m[sh]['kv_bytes'] / 1e6:6.0f} MB KV): {us(u) / us(sh):.2f}x")
    print("\nCausal prefill T=2048, H_kv 32: time and what the donor hands on (flash: O(T H)):")
    for kind in ("unshared", "flash", "materialised"):
        for p, products in ((0, "f32"), (1, "bf16")):
            n = f"BM_span_prefill_{kind}/2048/2048/32/2/{p}/iterations:2"
            print(f"  {kind:12s} {products} products: {us(n) / 1e3:8.1f} ms  "
                  f"hand-off {m[n]['handoff_bytes'] / 1e6:8.2f} MB  "
                  f"followers' workspace {m[n]['workspace_bytes'] / 1e6:6.2f} MB")
    print("\nChunk of Tq queries over 4096 keys: materialised / flash time (the automatic rule's data):")
    for tq in (1, 16, 128, 512):
        a = us(f"BM_span_chunk_materialised/{tq}/4096/32/2/0")
        b = us(f"BM_span_chunk_flash/{tq}/4096/32/2/0")
        print(f"  Tq={tq:4d}: materialised {a / 1e3:8.2f} ms, flash {b / 1e3:8.2f} ms, ratio {a / b:.2f}")


def batch(m, us, bw2, fma2):
    print("\nBatched decode: 32 sequences of 1k-16k tokens, bf16, 2 threads, one attend_batch vs a loop "
          "of single calls (targets: >= 80% (GQA) of the read bandwidth, >= 70% (MLA) of the roofline, "
          ">= 1.3x the loop, page size 16 <= 10% over contiguous); f32 and bf16 products:")
    for v in ("gqa", "mla"):
        for p, products in ((0, "f32"), (1, "bf16")):
            for ps in (0, 16, 64):
                b, l = f"BM_batch_{v}/{ps}/2/{p}", f"BM_loop_{v}/{ps}/2/{p}"
                gbs = m[b]["bytes_per_second"] / 1e9
                what = "contiguous" if ps == 0 else f"page {ps:2d}  "
                flops = (f", {m[b]['FLOPS'] / 1e9:5.0f} GFLOP/s = {100 * m[b]['FLOPS'] / 1e9 / fma2:3.0f}% of the FMA peak"
                         if "FLOPS" in m[b] else "")
                print(f"  {v.upper()} {products:4s} {what}: batch {us(b) / 1e3:7.2f} ms ({gbs:5.1f} GB/s, "
                      f"{100 * gbs / bw2:3.0f}% of read BW{flops}), loop {us(l) / 1e3:7.2f} ms: {us(l) / us(b):.2f}x")
            c, p16 = us(f"BM_batch_{v}/0/2/{p}"), us(f"BM_batch_{v}/16/2/{p}")
            print(f"  {v.upper()} {products:4s} page 16 vs contiguous: {100 * (p16 / c - 1):+.0f}%")
    print(f"  plan_batch for the 32 sequences: {us('BM_plan_gqa/2'):.1f} us")
    print("Single-sequence GQA decode (attend), bf16 cache: paged against contiguous:")
    for t in (1024, 16384):
        for th in (1, 2):
            single = {ps: us(f"BM_single_gqa/page:{ps}/T:{t}/threads:{th}") for ps in (0, 16, 64)}
            c = single[0]
            pages = ", ".join(f"page {ps} {single[ps] / 1e3:6.2f} ms ({100 * (single[ps] / c - 1):+.0f}%)"
                              for ps in (16, 64))
            print(f"  T={t:5d}, {th} thread{'s' if th > 1 else ' '}: contiguous {c / 1e3:6.2f} ms, {pages}")


def kernels(m, peak):
    print("\nkernels alone, operands in cache, 1 thread: GFLOP/s (share of the target's FMA peak)")
    for n, b in sorted(m.items()):
        if not n.startswith("BM_kernel_"):
            continue
        k = int(n.rsplit(":", 1)[1])
        if "FLOPS" in b:
            fl = b["FLOPS"] / 1e9
            share = f"({100 * fl / peak(1, k):5.1f}% of peak)" if TARGETS[k] != "scalar" else ""
            print(f"  {n:48s} {TARGETS[k]:6s} {fl:6.1f} GFLOP/s {share}")
        else:
            print(f"  {n:48s} {TARGETS[k]:6s} {b['items_per_second'] / 1e6:6.0f} M scores/s")


def main():
    ctx, m = medians(sys.argv[1])
    gbs = lambda n: m[n]["bytes_per_second"] / 1e9
    us = lambda n: m[n]["real_time"] * {"us": 1, "ms": 1e3, "ns": 1e-3, "s": 1e6}[m[n]["time_unit"]]
    print(f"host: {ctx.get('host_name', '?')}, {ctx.get('num_cpus', '?')} CPUs, date {ctx.get('date', '?')}")
    # The FMA peak of each SIMD target (bench/roofline.hpp); the kernels of the other binaries run
    # on the best one, the fastest.
    peak = lambda th, k: m[f"attnkit::bench::BM_fma_peak/threads:{th}/target:{k}"]["FLOPS"] / 1e9
    if any(k.startswith("BM_kernel_") for k in m):  # kernels alone: no memory traffic to compare
        kernels(m, peak)
        return
    bw1 = gbs("attnkit::bench::BM_read_bandwidth/threads:1")
    bw2 = gbs("attnkit::bench::BM_read_bandwidth/threads:2")
    targets = sorted({int(n.rsplit(":", 1)[1]) for n in m if n.startswith("attnkit::bench::BM_fma_peak/")})
    fma1, fma2 = (max(peak(th, k) for k in targets) for th in (1, 2))
    print(f"roofline: read bandwidth {bw1:.1f} GB/s (1 thread), {bw2:.1f} GB/s (2 threads); "
          f"FP32 FMA peak {fma1:.0f} / {fma2:.0f} GFLOP/s")
    if any(k.startswith("BM_batch_") for k in m):
        batch(m, us, bw2, fma2)
        return
    if any(k.startswith("BM_span_") for k in m):
        shared(m, us, bw2, fma2)
        return
    if any(k.startswith("BM_transmla_") for k in m):
        convert(m, us, bw2, fma2)
        return
    if any(k.startswith("BM_mla_") for k in m):
        mla(m, us, bw2, fma2)
        return
    if any(k.startswith("BM_tpa_") for k in m):
        tpa(m, us, bw2, fma2)
        return
    names = TARGETS
    gqa = [k for k in targets if f"BM_gqa_decode<float, true>/T:16384/threads:1/target:{k}" in m]
    print("\nGQA decode (H 32, H_kv 8, d 128), median time, KV read rate, share of the read bandwidth:")
    for s in ("float", "ak::bf16"):
        for t in (1024, 4096, 16384):
            for th in (1, 2):
                for k in gqa:
                    n = f"BM_gqa_decode<{s}, true>/T:{t}/threads:{th}/target:{k}"
                    bw = bw1 if th == 1 else bw2
                    print(f"  {s:9s} T={t:5d} threads={th} {names[k]:6s}: {us(n):8.1f} us  {gbs(n):6.1f} GB/s  "
                          f"{100 * gbs(n) / bw:5.1f}% of read BW")
    best = max(gqa)
    for s in ("float", "ak::bf16"):
        for th in (1, 2):
            ref = us(f"BM_gqa_decode<{s}, true>/T:16384/threads:{th}/target:{best}")
            for k in gqa:
                if k != best:
                    r = us(f"BM_gqa_decode<{s}, true>/T:16384/threads:{th}/target:{k}") / ref
                    print(f"  {s:9s} T=16384 threads={th}: {names[k]} / {names[best]} time {r:.2f}x")
    print("\nGQA decode in a model step (32 layers' caches in turn, streamed from memory), per step:")
    for s in ("float", "ak::bf16"):
        for t in (4096, 16384):
            for th in (1, 2):
                ref = f"BM_gqa_decode_model_step<{s}>/T:{t}/threads:{th}/target:{best}"
                for k in gqa:
                    n = f"BM_gqa_decode_model_step<{s}>/T:{t}/threads:{th}/target:{k}"
                    bw = bw1 if th == 1 else bw2
                    print(f"  {s:9s} T={t:5d} threads={th} {names[k]:6s}: {us(n) / 1e3:8.1f} ms  {gbs(n):6.1f} GB/s  "
                          f"{100 * gbs(n) / bw:5.1f}% of read BW  {us(n) / us(ref):5.2f}x {names[best]}")
    for th in (1, 2):
        f32 = us(f"BM_gqa_decode<float, true>/T:16384/threads:{th}/target:{best}")
        b16 = us(f"BM_gqa_decode<ak::bf16, true>/T:16384/threads:{th}/target:{best}")
        print(f"\nbf16 vs f32 decode speedup, T=16384, {th} thread(s), {names[best]}: {f32 / b16:.2f}x")
    print("\nGQA causal prefill, GFLOP/s (share of the target's FMA peak):")
    for s in ("float", "ak::bf16", "ak::bf16, true"):
        for t in (512, 2048):
            for th in (1, 2):
                for k in gqa:
                    n = f"BM_gqa_prefill_causal<{s}>/T:{t}/threads:{th}/target:{k}"
                    if n not in m:  # bf16 products: only where the target has them
                        continue
                    fl = m[n]["FLOPS"] / 1e9
                    # (The scalar target's tiles are Eigen's, vectorised for the build's baseline:
                    # no one-lane peak bounds them.)
                    share = f"({100 * fl / peak(th, k):4.1f}% of peak)" if names[k] != "scalar" else ""
                    label = {"float": "float", "ak::bf16": "bf16", "ak::bf16, true": "bf16 prod"}[s]
                    print(f"  {label:9s} T={t:5d} threads={th} {names[k]:6s}: {us(n) / 1e3:8.1f} ms  {fl:6.1f} GFLOP/s  {share}")
    for th in (1, 2):
        f32 = us(f"BM_gqa_prefill_causal<float>/T:2048/threads:{th}/target:{best}")
        for s, what in (("ak::bf16", "bf16 cache"), ("ak::bf16, true", "bf16 products")):
            n = f"BM_gqa_prefill_causal<{s}>/T:2048/threads:{th}/target:{best}"
            if n in m:
                print(f"{what} vs f32 causal prefill T=2048, {th} thread(s), {names[best]}: {f32 / us(n):.2f}x")


if __name__ == "__main__":
    main()
