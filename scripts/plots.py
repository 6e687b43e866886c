#!/usr/bin/env python3
"""Draws the charts of docs/benchmarks.md from the JSON that scripts/plots.sh collects.

  python3 scripts/plots.py RESULTS_DIR OUT_DIR [--threads N]

RESULTS_DIR holds compare.json (attnkit-compare --json), prefill/N-RUN.json (attnkit-compare runs
per prefill length), batch/B-RUN.json (attnkit-compare --batch --json per batch size; a point is
the median of its runs) and
convert/ROUTE-RANK.json (attnkit-convert --json). Every chart is written as PNG and SVG by
gnuplot; its title names the machine, the thread count and the date. The decode-vs-context
chart is attnkit-compare's own (--plot), not redrawn here.
"""
import argparse
import glob
import json
import os
import statistics
import subprocess
import sys


def load(path):
    with open(path) as f:
        return json.load(f)


def datablock(name, rows):
    """A gnuplot inline data block: rows of values, strings quoted."""
    lines = [f"${name} << EOD"]
    for r in rows:
        lines.append(" ".join(f'"{v}"' if isinstance(v, str) else repr(v) for v in r))
    lines.append("EOD")
    return "\n".join(lines) + "\n"


def draw(out_dir, stem, title, body):
    """Renders the gnuplot commands `body` under `title` into OUT_DIR/stem.png and .svg."""
    for ext, terminal in (("png", "pngcairo size 1000,620 font 'Helvetica,10'"),
                          ("svg", "svg size 1000,620 dynamic font 'Helvetica,12'")):
        path = os.path.join(out_dir, f"{stem}.{ext}")
        script = (f"set terminal {terminal}\nset termoption noenhanced\n"
                  f"set output '{path}'\nset title \"{title}\"\nset grid\n" + body)
        subprocess.run(["gnuplot"], input=script, text=True, check=True)
        print(f"plots.py: wrote {path}", file=sys.stderr)


def lines_plot(series, style="linespoints lw 2"):
    """'plot' over data blocks: series is a list of (block name, title)."""
    return "plot " + ", ".join(f"${b} using 1:2 with {style} title '{t}'" for b, t in series) + "\n"


def group(points):
    """[(series, x, y)] -> {series: [(x, median y)]} in first-seen order, x ascending (the median
    over the runs that measured the same point)."""
    runs = {}
    for s, x, y in points:
        runs.setdefault(s, {}).setdefault(x, []).append(y)
    return {s: [(x, statistics.median(ys)) for x, ys in sorted(xs.items())]
            for s, xs in runs.items()}


def series_blocks(groups):
    text, series = "", []
    for i, (name, pts) in enumerate(groups.items()):
        text += datablock(f"s{i}", pts)
        series.append((f"s{i}", name))
    return text, series


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    compare = load(os.path.join(a.results, "compare.json"))
    cfg = compare["config"]
    stamp = f"{compare['machine']}, {a.threads} threads, {compare['date']}"

    # KV bytes per token and layer, per variant (the cache each one holds, at the storage type).
    rows = [r for r in compare["rows"] if r["kv_bytes_per_token"] > 0]
    body = datablock("kv", [(r["variant"], r["kv_bytes_per_token"]) for r in rows])
    body += ("set style data histograms\nset style fill solid 0.8 border -1\nset boxwidth 0.8\n"
             "set logscale y 2\nset format y '%g'\nset ylabel 'KV cache bytes per token per layer'\n"
             f"set yrange [{min(r['kv_bytes_per_token'] for r in rows) / 2}:"
             f"{max(r['kv_bytes_per_token'] for r in rows) * 2}]\n"
             "set xtics rotate by -35 scale 0\nset key off\nset bmargin 9\n"
             "plot $kv using 2:xtic(1) lc rgb '#3070b0', "
             "$kv using 0:2:(sprintf('%d', $2)) with labels offset 0,0.8 notitle\n")
    geom = f"D {cfg['model_dim']}, H {cfg['heads']}, H_kv {cfg['kv_heads']}, d {cfg['head_dim']}"
    draw(a.out, "kv_bytes_per_token",
         f"KV bytes per token per layer ({cfg['storage']}; GQA family and TPA at {geom}; "
         f"Shared: a 32-layer stack's mean)\\n{stamp}", body)

    # Causal prefill GFLOP/s vs length: the attention products over the causal triangle.
    pts = []
    for f in glob.glob(os.path.join(a.results, "prefill", "*.json")):
        run = load(f)
        n = run["config"]["prefill"]
        for r in run["rows"]:
            if r["prefill_ms"] and r["prefill_flop"]:
                pts.append((r["variant"], n, r["prefill_flop"] / (r["prefill_ms"] * 1e6)))
    text, series = series_blocks(group(pts))
    body = text + ("set logscale x 2\nset xlabel 'prefill length (tokens, causal, from position 0)'\n"
                   "set ylabel 'attention GFLOP/s (2 (d_qk + d_v) H per query-key pair)'\n"
                   "set key outside right top\nset yrange [0:*]\n" + lines_plot(series))
    draw(a.out, "prefill_gflops",
         f"Causal prefill throughput vs length ({cfg['storage']} cache; median of 3 runs)\\n{stamp}",
         body)

    # Batch decode: share of the measured read bandwidth vs decode sequences per step.
    pts = []
    for f in glob.glob(os.path.join(a.results, "batch", "*.json")):
        run = load(f)
        for r in run["rows"]:
            pts.append((f"{r['variant']} ({r['shape']})", run["batch"]["decodes"],
                        100.0 * r["bandwidth_share"]))
    b = load(glob.glob(os.path.join(a.results, "batch", "*.json"))[0])["batch"]
    text, series = series_blocks(group(pts))
    body = text + ("set logscale x 2\nset xlabel 'decode sequences per batch step'\n"
                   "set ylabel 'KV bytes / step time, % of measured read bandwidth'\n"
                   "set key bottom right\nset yrange [0:*]\n" + lines_plot(series))
    draw(a.out, "batch_bandwidth",
         f"Batched decode over paged caches (page {b['page_size']}, contexts "
         f"{b['min_context']}-{b['max_context']}, {b['storage']}; median of 3 runs)\\n{stamp}", body)

    # Conversion of the trained tiny model: held-out error and NLL vs kv_lora_rank.
    per_route = {}
    for f in glob.glob(os.path.join(a.results, "convert", "*.json")):
        route, rank = os.path.basename(f)[:-5].rsplit("-", 1)
        run = load(f)
        errs = [layer["steps"][-1]["heldout_rel_error"] for layer in run["layers"]]
        per_route.setdefault(route, []).append(
            (int(rank), sum(errs) / len(errs), run["nll_after"], run["nll_before"]))
    names = {"transmla": "TransMLA (qk_mqa_dim 64, FreqFold 2)",
             "mha2mla": "MHA2MLA (2-norm, 32 RoPE dims per KV head)"}
    text, err_series, nll_series = "", [], []
    nll_before = None
    for i, (route, pts) in enumerate(sorted(per_route.items())):
        pts.sort()
        nll_before = pts[0][3]
        text += datablock(f"e{i}", [(p[0], p[1]) for p in pts])
        text += datablock(f"n{i}", [(p[0], p[2]) for p in pts])
        err_series.append((f"e{i}", names.get(route, route)))
        nll_series.append((f"n{i}", names.get(route, route)))
    body = text + ("set multiplot layout 1,2 title \"Conversion of models/tiny-llama-bytes "
                   "(4 layers, H 8, H_kv 2, d 64; 256 KV elements per token and layer)\\n"
                   f"{stamp}\"\nunset title\nset xlabel 'kv_lora_rank d_c'\n"
                   "set key bottom left\nset ylabel 'held-out relative error of the attention "
                   "output (mean over layers)'\nset yrange [0:*]\n" + lines_plot(err_series) +
                   "set ylabel 'next-byte NLL, evaluation rows (written checkpoint)'\n"
                   f"set key top right\nf(x) = {nll_before}\n" + lines_plot(nll_series)[:-1] +
                   ", f(x) with lines dt 2 lc rgb 'black' title 'source model'\n"
                   "unset multiplot\n")
    draw(a.out, "conversion_vs_rank", "", body)


if __name__ == "__main__":
    main()
