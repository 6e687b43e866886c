// attnkit-compare: the attention variants side by side at one model geometry.
// Per variant: KV-cache bytes per token per layer, cache GiB for a whole model and context,
// attention decode latency per token at a context length, causal prefill time, and the max
// relative error of the decode output against the double-precision reference. With --plot, the
// attention decode of every row again at a sweep of context lengths, drawn by gnuplot.
// Default geometry: a Llama-3-8B attention layer (D 4096, H 32, H_kv 8, d 128, theta 5e5).
#include <attnkit/attnkit.hpp>
#include <attnkit/reference/attention.hpp>
#include <attnkit/reference/mla.hpp>
#include <attnkit/reference/tpa.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <functional>
#include <numeric>
#include <limits>
#include <cmath>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "compare_batch.hpp"

namespace ak = attnkit;

namespace {

struct options {
  std::int64_t model_dim = 4096, heads = 32, kv_heads = 8, head_dim = 128;
  double theta = 500000.0;
  std::int64_t context = 4096, prefill = 1024, layers = 32, model_tokens = 32768;
  int threads = 2;
  std::string storage = "f32";
  bool json = false;
  std::int64_t calibration = 4096;
  bool batch = false;  // --batch: the mixed-batch serving step instead of the table
  std::vector<std::string> plots;            // --plot FILE (.png or .svg), any number of them
  std::vector<std::int64_t> plot_contexts;   // --plot-contexts; empty: halvings of --context
  bool decode_only = false;                  // the sweep's runs: attention decode and its error
  bool announce = true;                      // measures() reports progress on stderr
  compare_batch::batch_options batch_opt;
  std::vector<std::string> rows{"MHA",           "GQA",          "MQA",
                                "MLA-V2-Lite",   "MLA-V3",       "TPA-R2",
                                "TPA-R1",        "TPA-T6-small", "GQA->MLA-exact",
                                "GQA->TransMLA", "GQA->MHA2MLA", "Shared-L2-7B",
                                "Shared-L3-8B"};
  bool wants(const std::string& name) const {
    return std::find(rows.begin(), rows.end(), name) != rows.end();
  }
  /// wants(name), announcing the row on stderr as its measurement starts (progress; the table
  /// and the JSON go to stdout).
  bool measures(const std::string& name) const {
    if (!wants(name)) return false;
    if (announce) std::fprintf(stderr, "attnkit-compare: measuring %s ...\n", name.c_str());
    return true;
  }
};

struct row {
  std::string variant, detail;
  std::int64_t kv_bytes_per_token = 0;
  double kv_gib = 0, decode_us = 0, layer_decode_us = 0, prefill_ms = 0, max_rel_err = 0,
         layer_rel_err = 0;
  double prefill_flop = 0;  ///< the attention products of the causal prefill, 2 (d_qk + d_v) H per pair
};

/// One point of the --plot sweep: a row's attention decode at one context length.
struct sweep_point {
  std::string variant;
  std::int64_t context = 0;
  double decode_us = 0;
};

/// The attention FLOPs of a causal prefill of n tokens from position 0: n (n + 1) / 2 query-key
/// pairs per head, each a d_qk dot product and a d_v axpy (2 FLOPs per multiply-add).
double causal_prefill_flop(std::int64_t n, std::int64_t heads, std::int64_t d_qk, std::int64_t d_v) {
  return double(n) * double(n + 1) / 2.0 * double(heads) * 2.0 * double(d_qk + d_v);
}

const char* usage =
    "usage: attnkit-compare [options]\n"
    "  --model-dim N   model width D (4096)        --heads N      query heads H (32)\n"
    "  --kv-heads N    GQA KV heads (8)            --head-dim N   head dim d (128)\n"
    "  --theta X       RoPE base (500000)          --context N    decode context length (4096)\n"
    "  --prefill N     causal prefill tokens (1024) --layers N    layers for the GiB column (32)\n"
    "  --tokens N      tokens for the GiB column (32768)\n"
    "  --threads N     worker threads (2)          --storage S    f32 | bf16 | f16 (f32)\n"
    "  --rows LIST     comma-separated rows: MHA,GQA,MQA (at the geometry above), MLA-V2-Lite,\n"
    "                  MLA-V3 (DeepSeek shapes, each naive and absorbed), TPA-R2, TPA-R1 (T6 "
    "factors\n"
    "                  at the geometry above, R_Q 6), TPA-T6-small (D 768, H 34, d 64); default: "
    "all\n"
    "                  GQA->MLA-exact, GQA->TransMLA, GQA->MHA2MLA (a synthetic GQA layer at the "
    "geometry\n"
    "                  above converted exactly, and compressed to 512 + 64 elements per token)\n"
    "                  Shared-L2-7B, Shared-L3-8B (shared attention: a Llama-2-7B / Llama-3-8B shaped\n"
    "                  32-layer stack, followers 23-26 of donor 22; two rows each, unshared and\n"
    "                  shared, timing the 5-layer span's attention)\n"
    "  --calibration N calibration tokens for the conversions (4096)\n"
    "  --json          machine-readable output\n"
  "  --plot FILE     also measure every row's attention decode at a sweep of context lengths and\n"
  "                  draw it with gnuplot (decode time per step vs context, log-log) into FILE,\n"
  "                  .png or .svg; repeat the flag for both. Rows without an attention decode\n"
  "                  (GQA-> conversions) are not swept.\n"
  "  --plot-contexts LIST  comma-separated context lengths of the sweep (default: --context and\n"
  "                  its halvings down to 128, at most 6)\n"
    "  --batch         one serving step of a mixed batch per variant (GQA at the geometry,\n"
    "                  MLA-V2-Lite, TPA-R2) over paged caches: batched vs one call per sequence,\n"
    "                  tokens/s, KV GB/s and the share of the read bandwidth. With it:\n"
    "  --decodes N     decode sequences (32)       --min-context N / --max-context N (1024 / 16384)\n"
    "  --prefills N    prefill chunks (2)          --chunk N      tokens per chunk (512)\n"
    "  --page-size N   tokens per page (16)\n"
    "  --products P    f32 (default) or bf16: the products over bf16 caches (--storage bf16), bf16\n"
    "                  on AMX tiles or vdpbf16ps where the CPU has them (queries and probabilities\n"
    "                  rounded to bf16)\n";

/// "a,b,,c" -> {"a", "b", "", "c"}.
std::vector<std::string> split_commas(const std::string& list) {
  std::vector<std::string> out;
  for (std::size_t p = 0; p <= list.size();) {
    const std::size_t q = std::min(list.find(',', p), list.size());
    out.push_back(list.substr(p, q - p));
    p = q + 1;
  }
  return out;
}

options parse(int argc, char** argv) {
  options o;
  auto need = [&](int& i) -> std::string {
    if (i + 1 >= argc)
      throw ak::invalid_argument(std::string("attnkit-compare: ") + argv[i] + " needs a value");
    return argv[++i];
  };
  auto integer = [&](int& i, bool zero_ok = false) {
    const std::string flag = argv[i], v = need(i);
    char* end = nullptr;
    const long long x = std::strtoll(v.c_str(), &end, 10);
    if (*end || x < (zero_ok ? 0 : 1))
      throw ak::invalid_argument("attnkit-compare: " + flag + " must be a " +
                                 (zero_ok ? "non-negative" : "positive") + " integer, got '" + v +
                                 "'");
    return static_cast<std::int64_t>(x);
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--model-dim")
      o.model_dim = integer(i);
    else if (a == "--heads")
      o.heads = integer(i);
    else if (a == "--kv-heads")
      o.kv_heads = integer(i);
    else if (a == "--head-dim")
      o.head_dim = integer(i);
    else if (a == "--theta")
      o.theta = std::stod(need(i));
    else if (a == "--context")
      o.context = integer(i);
    else if (a == "--prefill")
      o.prefill = integer(i);
    else if (a == "--layers")
      o.layers = integer(i);
    else if (a == "--tokens")
      o.model_tokens = integer(i);
    else if (a == "--calibration")
      o.calibration = integer(i);
    else if (a == "--threads")
      o.threads = static_cast<int>(integer(i));
    else if (a == "--storage")
      o.storage = need(i);
    else if (a == "--json")
      o.json = true;
    else if (a == "--plot") {
      const std::string f = need(i);
      const auto ends = [&](const char* e) {
        return f.size() > 4 && f.compare(f.size() - 4, 4, e) == 0;
      };
      if (!ends(".png") && !ends(".svg"))
        throw ak::invalid_argument("attnkit-compare: --plot FILE must end in .png or .svg, got '" +
                                   f + "'");
      if (f.find('\'') != std::string::npos)  // it is quoted that way in the gnuplot script
        throw ak::invalid_argument("attnkit-compare: --plot FILE may not contain a ' (got " + f +
                                   ")");
      o.plots.push_back(f);
    } else if (a == "--plot-contexts") {
      o.plot_contexts.clear();
      for (const std::string& v : split_commas(need(i))) {
        char* end = nullptr;
        const long long x = std::strtoll(v.c_str(), &end, 10);
        if (v.empty() || *end || x < 1)
          throw ak::invalid_argument(
              "attnkit-compare: --plot-contexts must be positive integers, got '" + v + "'");
        o.plot_contexts.push_back(x);
      }
    }
    else if (a == "--batch")
      o.batch = true;
    else if (a == "--decodes")
      o.batch_opt.decodes = integer(i, true);
    else if (a == "--min-context")
      o.batch_opt.min_context = integer(i);
    else if (a == "--max-context")
      o.batch_opt.max_context = integer(i);
    else if (a == "--prefills")
      o.batch_opt.prefills = integer(i, true);
    else if (a == "--chunk")
      o.batch_opt.chunk = integer(i);
    else if (a == "--page-size")
      o.batch_opt.page_size = integer(i);
    else if (a == "--products") {
      const std::string v = need(i);
      if (v != "f32" && v != "bf16")
        throw ak::invalid_argument("attnkit-compare: --products must be f32 or bf16, got '" + v +
                                   "'");
      o.batch_opt.products = v == "bf16" ? ak::product_math::bf16 : ak::product_math::f32;
    }
    else if (a == "--rows") {
      o.rows.clear();
      for (const std::string& r : split_commas(need(i))) {
        const options all;
        if (!all.wants(r))
          throw ak::invalid_argument("attnkit-compare: --rows: unknown row '" + r +
                                     "' (MHA, GQA, MQA, MLA-V2-Lite, MLA-V3, TPA-R2, TPA-R1, "
                                     "TPA-T6-small, GQA->MLA-exact, GQA->TransMLA, "
                                     "GQA->MHA2MLA, Shared-L2-7B, Shared-L3-8B)");
        o.rows.push_back(r);
      }
    } else if (a == "--help" || a == "-h") {
      std::cout << usage;
      std::exit(0);
    } else {
      throw ak::invalid_argument("attnkit-compare: unknown flag '" + a + "'\n" + usage);
    }
  }
  if (o.batch_opt.min_context > o.batch_opt.max_context)
    throw ak::invalid_argument("attnkit-compare: --min-context must be <= --max-context");
  if (o.batch_opt.decodes + o.batch_opt.prefills == 0)
    throw ak::invalid_argument("attnkit-compare: --batch needs --decodes or --prefills > 0");
  o.batch_opt.heads = o.heads, o.batch_opt.kv_heads = o.kv_heads, o.batch_opt.head_dim = o.head_dim;
  o.batch_opt.threads = o.threads, o.batch_opt.json = o.json;
  if (o.heads % o.kv_heads != 0)
    throw ak::invalid_argument("attnkit-compare: --heads=" + std::to_string(o.heads) +
                               " must be a multiple of --kv-heads=" + std::to_string(o.kv_heads));
  if (o.plot_contexts.empty())
    for (std::int64_t c = o.context; c >= 128 && o.plot_contexts.size() < 6; c /= 2)
      o.plot_contexts.insert(o.plot_contexts.begin(), c);
  if (o.plot_contexts.empty()) o.plot_contexts.push_back(o.context);
  if (!o.plots.empty() && std::system("command -v gnuplot >/dev/null 2>&1") != 0)
    throw ak::invalid_argument(
        "attnkit-compare: --plot needs gnuplot on PATH (Debian: apt-get install gnuplot-nox)");
  if (o.storage != "f32" && o.storage != "bf16" && o.storage != "f16")
    throw ak::invalid_argument("attnkit-compare: --storage must be f32, bf16 or f16, got '" +
                               o.storage + "'");
  return o;
}

/// Median wall time in microseconds of fn over `reps` runs after one warm-up.
double median_us(int reps, const std::function<void()>& fn) {
  fn();
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto a = std::chrono::steady_clock::now();
    fn();
    t.push_back(
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

using fmat = ak::row_matrix<float>;
fmat random_matrix(std::mt19937_64& rng, std::int64_t r, std::int64_t c, float sigma = 1.f) {
  std::normal_distribution<float> nd(0.f, sigma);
  fmat m(r, c);
  for (std::int64_t i = 0; i < m.size(); ++i) m.data()[i] = nd(rng);
  return m;
}

/// The full layer (projections, RoPE, cache append, attention, output projection) with random
/// weights at the geometry: decode latency at the context held by `cache` (the appended token
/// is rolled back after each step), and the relative error (max |y - y_ref| / max |y_ref|) of
/// a 16-token forward against the double reference layer.
template <ak::storage_type S>
void layer_columns(const options& o, std::int64_t kv_heads, ak::dense_cache<S>& cache,
                   ak::thread_pool& pool, row& r) {
  const std::int64_t dm = o.model_dim, h = o.heads, d = o.head_dim;
  std::mt19937_64 rng(42);
  const float s = 1.f / std::sqrt(float(dm));
  const fmat wq = random_matrix(rng, h * d, dm, s), wk = random_matrix(rng, kv_heads * d, dm, s),
             wv = random_matrix(rng, kv_heads * d, dm, s),
             wo = random_matrix(rng, dm, h * d, 1.f / std::sqrt(float(h * d)));
  const ak::gqa_config cfg{.model_dim = dm,
                           .heads = h,
                           .kv_heads = kv_heads,
                           .head_dim = d,
                           .rope = {.theta = o.theta, .layout = ak::rope_layout::half_split}};
  ak::gqa_layer layer(cfg, {ak::view_of(wq), ak::view_of(wk), ak::view_of(wv), ak::view_of(wo)});

  ak::dense_cache<S> big(
      {.kv_heads = kv_heads, .head_dim = d, .v_head_dim = d, .capacity = cache.size() + 1});
  {  // the same context, one slot to spare
    std::vector<float> k(static_cast<std::size_t>(cache.size() * kv_heads * d), 0.1f);
    std::vector<std::int64_t> pos(cache.positions().begin(), cache.positions().end());
    big.append(ak::tensor3_view<const float>(k.data(), {cache.size(), kv_heads, d}),
               ak::tensor3_view<const float>(k.data(), {cache.size(), kv_heads, d}), pos);
  }
  const fmat x = random_matrix(rng, 16, dm);
  fmat y(16, dm);
  const std::int64_t next = big.size();
  r.layer_decode_us = median_us(15, [&] {
    layer.forward(ak::matrix_view<const float>(x.data(), {1, dm}), std::span(&next, 1), big,
                  ak::matrix_view<float>(y.data(), {1, dm}), pool);
    big.truncate(next);
  });

  std::vector<std::int64_t> pos(16);
  for (std::int64_t i = 0; i < 16; ++i) pos[static_cast<std::size_t>(i)] = 1000 + 3 * i;
  auto fresh = layer.make_cache<S>(16);
  layer.forward(ak::view_of(x), pos, fresh, ak::view_of(y), pool);
  ak::reference::gqa_weights rw;
  rw.q = wq.cast<double>(), rw.k = wk.cast<double>(), rw.v = wv.cast<double>(),
  rw.o = wo.cast<double>();
  const auto ref = ak::reference::gqa_layer_forward(x.cast<double>(), pos, rw, h, kv_heads, d,
                                                    cfg.rope, 1.0 / std::sqrt(double(d)));
  r.layer_rel_err = (y.cast<double>() - ref).cwiseAbs().maxCoeff() / ref.cwiseAbs().maxCoeff();
}

/// A GQA-family row (MHA, GQA, MQA are one kernel with different kv_heads): roped random K/V
/// at contiguous positions; decode = one query at the last position; prefill = causal, all
/// queries of a fresh `prefill`-token cache.
template <ak::storage_type S>
row gqa_family_row(const options& o, const std::string& name, std::int64_t kv_heads,
                   ak::thread_pool& pool) {
  const std::int64_t h = o.heads, d = o.head_dim, t = o.context;
  std::mt19937_64 rng(static_cast<std::uint64_t>(kv_heads));
  const fmat k = random_matrix(rng, t, kv_heads * d), v = random_matrix(rng, t, kv_heads * d),
             q = random_matrix(rng, 1, h * d);
  std::vector<std::int64_t> pos(static_cast<std::size_t>(t));
  for (std::int64_t i = 0; i < t; ++i) pos[static_cast<std::size_t>(i)] = i;
  ak::dense_cache<S> cache({.kv_heads = kv_heads, .head_dim = d, .v_head_dim = d, .capacity = t});
  cache.append(ak::tensor3_view<const float>(k.data(), {t, kv_heads, d}),
               ak::tensor3_view<const float>(v.data(), {t, kv_heads, d}), pos);
  fmat out(1, h * d);
  ak::attention_workspace ws;
  const std::int64_t qpos = t - 1;
  auto decode = [&] {
    ak::attend(ak::tensor3_view<const float>(q.data(), {1, h, d}), std::span(&qpos, 1), cache,
               ak::tensor3_view<float>(out.data(), {1, h, d}), {}, pool, &ws);
  };
  row r{name,
        "H=" + std::to_string(h) + " H_kv=" + std::to_string(kv_heads) + " d=" + std::to_string(d),
        cache.bytes_per_token()};
  r.kv_gib =
      double(r.kv_bytes_per_token) * double(o.layers) * double(o.model_tokens) / double(1 << 30);
  r.decode_us = median_us(15, decode);
  // Error of the decode output against the double reference on the exact (unrounded) K/V.
  const auto ref =
      ak::reference::attention(q.cast<double>(), std::span(&qpos, 1), k.cast<double>(),
                               v.cast<double>(), pos, h, kv_heads, 1.0 / std::sqrt(double(d)));
  r.max_rel_err =
      (out.cast<double>() - ref.out).cwiseAbs().maxCoeff() / ref.out.cwiseAbs().maxCoeff();
  if (o.decode_only) return r;

  const std::int64_t tp = o.prefill;
  const fmat qp = random_matrix(rng, tp, h * d);
  ak::dense_cache<S> pc({.kv_heads = kv_heads, .head_dim = d, .v_head_dim = d, .capacity = tp});
  const std::int64_t n = std::min(tp, t);
  pc.append(ak::tensor3_view<const float>(k.data(), {n, kv_heads, d}),
            ak::tensor3_view<const float>(v.data(), {n, kv_heads, d}),
            std::span(pos).first(static_cast<std::size_t>(n)));
  std::vector<std::int64_t> ppos(pos.begin(), pos.begin() + n);
  fmat pout(n, h * d);
  r.prefill_ms =
      median_us(3,
                [&] {
                  ak::attend(ak::tensor3_view<const float>(qp.data(), {n, h, d}), ppos, pc,
                             ak::tensor3_view<float>(pout.data(), {n, h, d}), {}, pool, &ws);
                }) /
      1000.0;
  r.prefill_flop = causal_prefill_flop(n, h, d, d);
  layer_columns<S>(o, kv_heads, cache, pool, r);
  return r;
}

/// Median wall time, with fewer repetitions for slow calls (naive MLA decode at 128 heads).
double adaptive_median_us(const std::function<void()>& fn) {
  const auto a = std::chrono::steady_clock::now();
  fn();
  const double once =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a).count();
  return median_us(once > 2e5 ? 2 : once > 2e4 ? 5 : 15, fn);
}

/// Two rows (naive, absorbed) for an MLA layer with random weights. attn decode: the attention
/// core of that path at the context (naive: K/V materialised from the latent, then MHA;
/// absorbed: attend_latent); attn prefill: the same for `prefill` causal queries; layer decode
/// and layer err: mla_layer with the path forced; attn err: decode output vs the double reference.
template <ak::storage_type S>
std::vector<row> mla_rows(const options& o, const std::string& name, const ak::mla_config& cfg,
                          ak::thread_pool& pool) {
  const std::int64_t dm = cfg.model_dim, h = cfg.heads, dc = cfg.latent_dim, dn = cfg.nope_dim,
                     dr = cfg.rope_dim;
  const std::int64_t dv = cfg.v_head_dim, dqk = dn + dr, t = o.context, w = dc + dr;
  std::mt19937_64 rng(7);
  auto rnd = [&](std::int64_t r, std::int64_t c, float s) { return random_matrix(rng, r, c, s); };
  const float sd = 1.f / std::sqrt(float(dm));
  const fmat q_proj = cfg.q_lora_rank ? fmat() : rnd(h * dqk, dm, sd);
  const fmat q_a = cfg.q_lora_rank ? rnd(cfg.q_lora_rank, dm, sd) : fmat();
  const fmat q_b = cfg.q_lora_rank
                       ? rnd(h * dqk, cfg.q_lora_rank, 1.f / std::sqrt(float(cfg.q_lora_rank)))
                       : fmat();
  const std::vector<float> q_norm(static_cast<std::size_t>(cfg.q_lora_rank), 1.f),
      kv_norm(static_cast<std::size_t>(dc), 1.f);
  const fmat kv_a = rnd(w, dm, sd), kv_b = rnd(h * (dn + dv), dc, 1.f / std::sqrt(float(dc))),
             o_proj = rnd(dm, h * dv, 1.f / std::sqrt(float(h * dv)));
  auto view = [](const fmat& m) {
    return m.size() ? ak::view_of(m) : ak::matrix_view<const float>{};
  };
  const ak::mla_weights weights{view(q_proj), view(q_a), q_norm,     view(q_b),
                                view(kv_a),   kv_norm,   view(kv_b), view(o_proj)};
  ak::mla_layer layer(cfg, weights);

  // The latent cache at the context: random normalised latents and rope keys.
  const fmat lat = random_matrix(rng, t, dc), kr = random_matrix(rng, t, dr);
  std::vector<std::int64_t> pos(static_cast<std::size_t>(t));
  for (std::int64_t i = 0; i < t; ++i) pos[static_cast<std::size_t>(i)] = i;
  ak::latent_cache<S> cache({.latent_dim = dc, .rope_dim = dr, .rope_heads = 1, .capacity = t + 1});
  cache.append(ak::view_of(lat), ak::tensor3_view<const float>(kr.data(), {t, 1, dr}), pos);
  const std::int64_t qpos = t - 1;
  ak::attention_options opt;
  opt.scale = layer.scale();
  ak::attention_workspace ws;

  // Absorbed core: q_latent [1, H, d_c], q_rope [1, H, d_R] -> out [1, H, d_c].
  const fmat ql = random_matrix(rng, 1, h * dc, 0.05f), qr = random_matrix(rng, 1, h * dr);
  fmat olat(1, h * dc);
  auto absorbed = [&](std::int64_t n, const float* qlp, const float* qrp, const std::int64_t* qp,
                      float* out, const ak::latent_cache<S>& c) {
    ak::attend_latent(ak::tensor3_view<const float>(qlp, {n, h, dc}),
                      ak::tensor3_view<const float>(qrp, {n, h, dr}),
                      std::span(qp, static_cast<std::size_t>(n)), c,
                      ak::tensor3_view<float>(out, {n, h, dc}), opt, pool, &ws);
  };
  // Naive core: K_i = [W_UK_i c ; k_rope], V_i = W_UV_i c for the cached tokens, then MHA.
  fmat kf, vf, cf;
  auto naive = [&](std::int64_t n, const float* q, const std::int64_t* qp, float* out,
                   const ak::latent_cache<S>& c) {
    const std::int64_t tk = c.size();
    cf.resize(tk, w);
    kf.resize(tk, h * dqk);
    vf.resize(tk, h * dv);
    for (std::int64_t s = 0; s < tk; ++s)
      ak::detail::to_float_row(c.rows() + s * w, cf.row(s).data(), w);
    pool.parallel_for(h, [&](std::int64_t i) {
      using cmap = Eigen::Map<const fmat, Eigen::Unaligned, Eigen::OuterStride<>>;
      using mmap = Eigen::Map<fmat, Eigen::Unaligned, Eigen::OuterStride<>>;
      const cmap cl(cf.data(), tk, dc, Eigen::OuterStride<>(w));
      mmap(kf.data() + i * dqk, tk, dn, Eigen::OuterStride<>(h * dqk)).noalias() =
          cl * kv_b.middleRows(i * (dn + dv), dn).transpose();
      mmap(vf.data() + i * dv, tk, dv, Eigen::OuterStride<>(h * dv)).noalias() =
          cl * kv_b.middleRows(i * (dn + dv) + dn, dv).transpose();
      for (std::int64_t s = 0; s < tk; ++s)
        std::copy(cf.row(s).data() + dc, cf.row(s).data() + w, kf.row(s).data() + i * dqk + dn);
    });
    const ak::kv_view<float> kv(ak::tensor3_view<const float>(kf.data(), {tk, h, dqk}),
                                ak::tensor3_view<const float>(vf.data(), {tk, h, dv}),
                                c.positions());
    ak::attend(ak::tensor3_view<const float>(q, {n, h, dqk}),
               std::span(qp, static_cast<std::size_t>(n)), kv,
               ak::tensor3_view<float>(out, {n, h, dv}), opt, pool, &ws);
  };
  const fmat qn = random_matrix(rng, 1, h * dqk, 0.05f);
  fmat on(1, h * dv);

  std::vector<row> rows;
  for (const bool is_absorbed : {false, true}) {
    row r{name + (is_absorbed ? " absorbed" : " naive"),
          "H=" + std::to_string(h) + " d_c=" + std::to_string(dc) + " d_R=" + std::to_string(dr) +
              (cfg.q_lora_rank ? " qLoRA" : ""),
          cache.bytes_per_token()};
    r.kv_gib =
        double(r.kv_bytes_per_token) * double(o.layers) * double(o.model_tokens) / double(1 << 30);
    using rmat = ak::reference::matrix;
    if (is_absorbed) {
      r.decode_us =
          adaptive_median_us([&] { absorbed(1, ql.data(), qr.data(), &qpos, olat.data(), cache); });
      // Reference: an MQA of [q_latent ; q_rope] against rows [c ; k_rope] with values c.
      rmat q(1, h * w);
      for (std::int64_t i = 0; i < h; ++i) {
        q.block(0, i * w, 1, dc) = ql.block(0, i * dc, 1, dc).cast<double>();
        q.block(0, i * w + dc, 1, dr) = qr.block(0, i * dr, 1, dr).cast<double>();
      }
      const rmat exact_k = (rmat(t, w) << lat.cast<double>(), kr.cast<double>()).finished();
      const auto ref = ak::reference::attention(q, std::span(&qpos, 1), exact_k,
                                                exact_k.leftCols(dc), pos, h, 1, opt.scale.value());
      r.max_rel_err =
          (olat.cast<double>() - ref.out).cwiseAbs().maxCoeff() / ref.out.cwiseAbs().maxCoeff();
    } else {
      r.decode_us = adaptive_median_us([&] { naive(1, qn.data(), &qpos, on.data(), cache); });
      if (o.decode_only) {  // the sweep: no reference (V3's materialised K/V in double are GBs)
        rows.push_back(r);
        continue;
      }
      // Reference on the materialised K/V (the naive path's own intermediate).
      const auto ref =
          ak::reference::attention(qn.cast<double>(), std::span(&qpos, 1), kf.cast<double>(),
                                   vf.cast<double>(), pos, h, h, opt.scale.value());
      r.max_rel_err =
          (on.cast<double>() - ref.out).cwiseAbs().maxCoeff() / ref.out.cwiseAbs().maxCoeff();
    }
    if (o.decode_only) {
      rows.push_back(r);
      continue;
    }
    // Causal prefill of `prefill` tokens through the same core.
    {
      const std::int64_t n = std::min(o.prefill, t);
      ak::latent_cache<S> pc({.latent_dim = dc, .rope_dim = dr, .rope_heads = 1, .capacity = n});
      pc.append(ak::matrix_view<const float>(lat.data(), {n, dc}),
                ak::tensor3_view<const float>(kr.data(), {n, 1, dr}),
                std::span(pos).first(static_cast<std::size_t>(n)));
      const fmat pq = random_matrix(rng, n, h * (is_absorbed ? dc : dqk), 0.05f),
                 pr = random_matrix(rng, n, h * dr);
      fmat po(n, h * (is_absorbed ? dc : dv));
      r.prefill_ms = adaptive_median_us([&] {
                       if (is_absorbed)
                         absorbed(n, pq.data(), pr.data(), pos.data(), po.data(), pc);
                       else
                         naive(n, pq.data(), pos.data(), po.data(), pc);
                     }) /
                     1000.0;
      r.prefill_flop = is_absorbed ? causal_prefill_flop(n, h, w, dc) : causal_prefill_flop(n, h, dqk, dv);
    }
    // Layer: decode at the context (token appended, then rolled back), and error vs reference.
    const ak::mla_path path = is_absorbed ? ak::mla_path::absorbed : ak::mla_path::naive;
    const fmat x = random_matrix(rng, 8, dm);
    fmat y(8, dm);
    const std::int64_t next = cache.size();
    r.layer_decode_us = adaptive_median_us([&] {
      layer.forward(ak::matrix_view<const float>(x.data(), {1, dm}), std::span(&next, 1), cache,
                    ak::matrix_view<float>(y.data(), {1, dm}), pool, path);
      cache.truncate(next);
    });
    std::vector<std::int64_t> lpos(8);
    for (std::int64_t i = 0; i < 8; ++i) lpos[static_cast<std::size_t>(i)] = 500 + 2 * i;
    auto fresh = layer.make_cache<S>(8);
    layer.forward(ak::view_of(x), lpos, fresh, ak::view_of(y), pool, path);
    auto d = [](const fmat& m) { return m.size() ? rmat(m.cast<double>()) : rmat(); };
    auto dvec = [](const std::vector<float>& v) {
      return Eigen::Map<const Eigen::VectorXf>(v.data(), static_cast<Eigen::Index>(v.size()))
          .cast<double>()
          .eval();
    };
    ak::reference::mla_weights rw;
    rw.q_proj = d(q_proj), rw.q_a_proj = d(q_a), rw.q_b_proj = d(q_b),
    rw.kv_a_proj_with_mqa = d(kv_a), rw.kv_b_proj = d(kv_b);
    rw.o_proj = d(o_proj), rw.q_a_layernorm = dvec(q_norm), rw.kv_a_layernorm = dvec(kv_norm);
    const auto ref = ak::reference::mla_forward(
        x.cast<double>(), lpos, rw, {h, dc, dn, dr, dv, 1, cfg.rms_eps}, cfg.rope, layer.scale());
    r.layer_rel_err = (y.cast<double>() - ref).cwiseAbs().maxCoeff() / ref.cwiseAbs().maxCoeff();
    rows.push_back(r);
  }
  return rows;
}

/// A TPA row with random T6 weights: attn decode/prefill = attend_factorized (FlashTPA order)
/// on random factors at the context; layer = tpa_layer; errors vs the double reference
/// (materialised Q/K/V for the kernel; reference::tpa_forward for the layer).
template <ak::storage_type S>
row tpa_row(const options& o, const std::string& name, const ak::tpa_config& cfg,
            ak::thread_pool& pool) {
  const std::int64_t dm = cfg.model_dim, h = cfg.heads, d = cfg.head_dim, rq = cfg.q_rank,
                     rk = cfg.k_rank, rv = cfg.v_rank;
  const std::int64_t t = o.context;
  std::mt19937_64 rng(11);
  const float sd = 1.f / std::sqrt(float(dm));
  const fmat waq = random_matrix(rng, h * rq, dm, sd), wbq = random_matrix(rng, rq * d, dm, sd),
             wak = random_matrix(rng, h * rk, dm, sd), wbk = random_matrix(rng, rk * d, dm, sd),
             wav = random_matrix(rng, h * rv, dm, sd), wbv = random_matrix(rng, rv * d, dm, sd),
             wo = random_matrix(rng, dm, h * d, 1.f / std::sqrt(float(h * d)));
  ak::tpa_layer layer(cfg, {.w_a_q = ak::view_of(waq),
                            .w_b_q = ak::view_of(wbq),
                            .w_a_k = ak::view_of(wak),
                            .w_b_k = ak::view_of(wbk),
                            .w_a_v = ak::view_of(wav),
                            .w_b_v = ak::view_of(wbv),
                            .o_proj = ak::view_of(wo)});
  const ak::tpa_scales sc = layer.scales();
  // Cache of random factors at the context.
  const fmat ak_ = random_matrix(rng, t, rk * h), bk = random_matrix(rng, t, rk * d, 0.3f),
             av = random_matrix(rng, t, rv * h), bv = random_matrix(rng, t, rv * d);
  std::vector<std::int64_t> pos(static_cast<std::size_t>(t));
  for (std::int64_t i = 0; i < t; ++i) pos[static_cast<std::size_t>(i)] = i;
  auto cache = layer.make_cache<S>(t + 1);
  cache.append({ak::tensor3_view<const float>(ak_.data(), {t, rk, h}),
                ak::tensor3_view<const float>(bk.data(), {t, rk, d}),
                ak::tensor3_view<const float>(av.data(), {t, rv, h}),
                ak::tensor3_view<const float>(bv.data(), {t, rv, d}), pos});
  const fmat aq = random_matrix(rng, 1, rq * h), bq = random_matrix(rng, 1, rq * d, 0.3f);
  const fmat aq_scaled = aq * sc.q;  // the kernel's query is A_Q^T B_Q: T6's 1/R_Q goes into A_Q
  fmat out(1, h * d);
  const std::int64_t qpos = t - 1;
  ak::attention_workspace ws;
  row r{name,
        "H=" + std::to_string(h) + " d=" + std::to_string(d) + " R=" + std::to_string(rq) + "/" +
            std::to_string(rk) + "/" + std::to_string(rv),
        cache.bytes_per_token()};
  r.kv_gib =
      double(r.kv_bytes_per_token) * double(o.layers) * double(o.model_tokens) / double(1 << 30);
  r.decode_us = median_us(15, [&] {
    ak::attend_factorized(ak::tensor3_view<const float>(aq_scaled.data(), {1, rq, h}),
                          ak::tensor3_view<const float>(bq.data(), {1, rq, d}), std::span(&qpos, 1),
                          cache, ak::tensor3_view<float>(out.data(), {1, h, d}), {}, pool, &ws);
  });
  {
    using rmat = ak::reference::matrix;
    const rmat q =
        ak::reference::tpa_materialise(aq.cast<double>(), bq.cast<double>(), rq, h, sc.q);
    const rmat k =
        ak::reference::tpa_materialise(ak_.cast<double>(), bk.cast<double>(), rk, h, sc.k);
    const rmat v =
        ak::reference::tpa_materialise(av.cast<double>(), bv.cast<double>(), rv, h, sc.v);
    const auto ref = ak::reference::attention(q, std::span(&qpos, 1), k, v, pos, h, h,
                                              1.0 / std::sqrt(double(d)));
    r.max_rel_err =
        (out.cast<double>() - ref.out).cwiseAbs().maxCoeff() / ref.out.cwiseAbs().maxCoeff();
  }
  if (o.decode_only) return r;
  {  // causal prefill of `prefill` query tokens against as many cached tokens
    const std::int64_t n = std::min(o.prefill, t);
    auto pc = layer.make_cache<S>(n);
    pc.append({ak::tensor3_view<const float>(ak_.data(), {n, rk, h}),
               ak::tensor3_view<const float>(bk.data(), {n, rk, d}),
               ak::tensor3_view<const float>(av.data(), {n, rv, h}),
               ak::tensor3_view<const float>(bv.data(), {n, rv, d}),
               std::span(pos).first(static_cast<std::size_t>(n))});
    const fmat paq = random_matrix(rng, n, rq * h), pbq = random_matrix(rng, n, rq * d, 0.3f);
    fmat po(n, h * d);
    r.prefill_ms = median_us(3,
                             [&] {
                               ak::attend_factorized(
                                   ak::tensor3_view<const float>(paq.data(), {n, rq, h}),
                                   ak::tensor3_view<const float>(pbq.data(), {n, rq, d}),
                                   std::span(pos).first(static_cast<std::size_t>(n)), pc,
                                   ak::tensor3_view<float>(po.data(), {n, h, d}), {}, pool, &ws);
                             }) /
                   1000.0;
    r.prefill_flop = causal_prefill_flop(n, h, d, d);
  }
  const fmat x = random_matrix(rng, 8, dm);
  fmat y(8, dm);
  const std::int64_t next = cache.size();
  r.layer_decode_us = median_us(15, [&] {
    layer.forward(ak::matrix_view<const float>(x.data(), {1, dm}), std::span(&next, 1), cache,
                  ak::matrix_view<float>(y.data(), {1, dm}), pool);
    cache.truncate(next);
  });
  std::vector<std::int64_t> lpos(8);
  for (std::int64_t i = 0; i < 8; ++i) lpos[static_cast<std::size_t>(i)] = 900 + 3 * i;
  auto fresh = layer.make_cache<S>(8);
  layer.forward(ak::view_of(x), lpos, fresh, ak::view_of(y), pool);
  auto dd = [](const fmat& m) { return ak::reference::matrix(m.cast<double>()); };
  const ak::reference::tpa_weights rw{dd(waq), dd(wbq), {}, dd(wak), dd(wbk), dd(wav),
                                      dd(wbv), dd(wo),  {}, {},      {}};
  const auto ref = ak::reference::tpa_forward(x.cast<double>(), lpos, rw,
                                              {h, d, d, rq, rk, rv, sc.q, sc.k, sc.v}, cfg.rope,
                                              1.0 / std::sqrt(double(d)));
  r.layer_rel_err = (y.cast<double>() - ref).cwiseAbs().maxCoeff() / ref.cwiseAbs().maxCoeff();
  return r;
}

/// Conversion rows: a synthetic GQA layer at the geometry (decaying spectra, see
/// convert/synthetic.hpp) converted exactly and compressed by TransMLA and MHA2MLA to
/// qk_mqa_dim + kv_lora_rank = 64 + 512 elements per token (d/2 + a quarter of the GQA cache for
/// smaller geometries).
/// layer decode: the converted mla_layer (absorbed path) at the context; layer err: the
/// conversion report's relative Frobenius error of the layer output vs the GQA layer on 256
/// held-out tokens (a different measure from the other rows' max-abs error vs a reference).
template <ak::storage_type S>
std::vector<row> conversion_rows(const options& o, ak::thread_pool& pool) {
  namespace cv = ak::convert;
  if (o.decode_only ||
      (!o.wants("GQA->MLA-exact") && !o.wants("GQA->TransMLA") && !o.wants("GQA->MHA2MLA")))
    return {};  // the synthetic layer and its calibration data cost seconds to build
  const ak::gqa_config cfg{.model_dim = o.model_dim,
                           .heads = o.heads,
                           .kv_heads = o.kv_heads,
                           .head_dim = o.head_dim,
                           .rope = {.theta = o.theta}};
  const auto layer = cv::synthetic::make_layer(cfg, 1, o.model_dim / 16.0);
  std::mt19937_64 rng(2);
  const std::int64_t sub = std::min<std::int64_t>(o.model_dim, 512);
  const auto calib = cv::synthetic::activations(rng, o.calibration, o.model_dim, sub, sub / 8.0);
  const auto heldout = cv::synthetic::activations(rng, 256, o.model_dim, sub, sub / 8.0);
  const std::int64_t d = o.head_dim, qk = std::min<std::int64_t>(64, d / 2), collapse = d / qk;
  const std::int64_t rank = std::min<std::int64_t>(512, o.kv_heads * 2 * d / 4);  // Llama-3-8B: 512
  const std::int64_t fold =
      (d / 2) % (2 * collapse) == 0 ? 2 * collapse : collapse;  // Llama-3-8B: F = 4
  const std::int64_t m2m_rope = std::max<std::int64_t>(2, qk / o.kv_heads / 2 * 2);
  std::vector<row> rows;
  auto add = [&](const std::string& name, const std::string& detail, const cv::mla_checkpoint& c,
                 double err) {
    ak::mla_layer mla(c.config, c.weights());
    auto cache = mla.make_cache<S>(o.context + 1);
    const std::int64_t w = c.config.latent_dim, nr = c.config.rope_heads * c.config.rope_dim;
    for (std::int64_t s = 0; s < o.context;
         s += 256) {  // random latent rows at positions 0..context-1
      const std::int64_t n = std::min<std::int64_t>(256, o.context - s);
      const fmat lat = random_matrix(rng, n, w), kr = random_matrix(rng, n, nr);
      std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
      std::iota(pos.begin(), pos.end(), s);
      cache.append(
          ak::view_of(lat),
          ak::tensor3_view<const float>(kr.data(), {n, c.config.rope_heads, c.config.rope_dim}),
          pos);
    }
    const fmat x = random_matrix(rng, 1, o.model_dim);
    fmat y(1, o.model_dim);
    const std::int64_t next = o.context;
    row r{name, detail, cache.bytes_per_token()};
    r.kv_gib =
        double(r.kv_bytes_per_token) * double(o.layers) * double(o.model_tokens) / double(1 << 30);
    r.decode_us = r.prefill_ms = r.max_rel_err = std::numeric_limits<double>::quiet_NaN();
    r.layer_decode_us = median_us(15, [&] {
      mla.forward(ak::view_of(x), std::span(&next, 1), cache, ak::view_of(y), pool,
                  ak::mla_path::absorbed);
      cache.truncate(next);
    });
    r.layer_rel_err = err;
    rows.push_back(r);
  };
  if (o.measures("GQA->MLA-exact")) {
    ak::gqa_layer gqa(cfg, layer.weights());
    const auto [c, rep] = cv::gqa_to_mla_exact(cfg, layer.weights());
    ak::mla_layer mla(c.config, c.weights());
    std::vector<std::int64_t> pos(static_cast<std::size_t>(heldout.rows()));
    std::iota(pos.begin(), pos.end(), std::int64_t{0});
    add("GQA->MLA-exact",
        "d_c=" + std::to_string(c.config.latent_dim) + " " + std::to_string(o.kv_heads) +
            " rope keys",
        c, cv::output_rel_error(gqa, mla, ak::view_of(heldout), pos));
  }
  if (o.measures("GQA->TransMLA")) {
    const auto res =
        cv::gqa_to_mla_transmla(cfg, layer.weights(), ak::view_of(calib), ak::view_of(heldout),
                                {.qk_mqa_dim = qk, .kv_lora_rank = rank, .freqfold = fold}, pool);
    add("GQA->TransMLA",
        "d_c=" + std::to_string(rank) + " d_R=" + std::to_string(qk) + " F=" + std::to_string(fold),
        res.checkpoint, res.steps.back().rel_error);
  }
  if (o.measures("GQA->MHA2MLA")) {
    const auto res =
        cv::gqa_to_mla_mha2mla(cfg, layer.weights(), ak::view_of(calib), ak::view_of(heldout),
                               {.rope_dim = m2m_rope, .latent_dim = rank}, pool);
    add("GQA->MHA2MLA",
        "d_c=" + std::to_string(rank) + " 2-norm r=" + std::to_string(m2m_rope) + "/KV head",
        res.checkpoint, res.steps.back().rel_error);
  }
  return rows;
}

/// Shared attention at a 32-layer stack of H 32, d 128 (H_kv 32: Llama-2-7B; 8: Llama-3-8B)
/// with followers 23-26 of donor 22 (the paper's plan): two rows, the 5-layer span unshared
/// (5 GQA layers) and shared (the donor hands its weights P [H, T] to 4 value-only followers).
/// KV B/token: the whole stack's bytes per token over its 32 layers (so KV GiB is the stack's);
/// attn decode: one decode step through the span's attention; attn err: the followers' outputs
/// against the double reference P_donor V_follower.
template <ak::storage_type S>
std::vector<row> shared_rows(const options& o, const std::string& name, std::int64_t kv_heads,
                             ak::thread_pool& pool) {
  constexpr std::int64_t h = 32, d = 128, layers = 32, followers = 4;
  const std::int64_t t = o.context, qpos = t - 1;
  std::mt19937_64 rng(static_cast<std::uint64_t>(kv_heads) + 7);
  // One random K and V serve every layer of the span (timing and error do not depend on it).
  const fmat k = random_matrix(rng, t, kv_heads * d), v = random_matrix(rng, t, kv_heads * d),
             q = random_matrix(rng, 1, h * d);
  std::vector<std::int64_t> pos(static_cast<std::size_t>(t));
  for (std::int64_t i = 0; i < t; ++i) pos[static_cast<std::size_t>(i)] = i;
  const ak::tensor3_view<const float> kt(k.data(), {t, kv_heads, d}), vt(v.data(), {t, kv_heads, d});
  std::vector<ak::dense_cache<S>> dense;
  for (int i = 0; i <= followers; ++i) {
    dense.emplace_back(ak::dense_cache_config{kv_heads, d, d, t});
    dense.back().append(kt, vt, pos);
  }
  std::vector<ak::value_cache<S>> values;
  for (int i = 0; i < followers; ++i) {
    values.emplace_back(ak::value_cache_config{kv_heads, d, t});
    values.back().append(vt, pos);
  }
  fmat out(1, h * d), p(1, h * t);
  std::vector<fmat> follower_out(followers, fmat(1, h * d));
  ak::attention_workspace ws;
  const ak::tensor3_view<const float> qv(q.data(), {1, h, d});
  const ak::tensor3_view<float> ov(out.data(), {1, h, d});
  const ak::tensor3_view<float> pv(p.data(), {1, h, t});
  const double unshared_us = median_us(9, [&] {
    for (const auto& c : dense) ak::attend(qv, std::span(&qpos, 1), c, ov, {}, pool, &ws);
  });
  const double shared_us = median_us(9, [&] {
    ak::attend(qv, std::span(&qpos, 1), dense[0], ov, {.weights = pv}, pool, &ws);
    for (int i = 0; i < followers; ++i)
      ak::attend_shared(ak::tensor3_view<const float>(pv), values[static_cast<std::size_t>(i)],
                        ak::tensor3_view<float>(follower_out[static_cast<std::size_t>(i)].data(),
                                                {1, h, d}),
                        pool, &ws);
  });
  // The followers against P_donor V_follower in double (V rounded through S, as cached).
  fmat vs(t, kv_heads * d);
  for (std::int64_t i = 0; i < vs.size(); ++i)
    vs.data()[i] = static_cast<float>(static_cast<S>(v.data()[i]));
  fmat ks = k;
  for (std::int64_t i = 0; i < ks.size(); ++i)
    ks.data()[i] = static_cast<float>(static_cast<S>(k.data()[i]));
  ak::reference::attention_rules rules;
  const auto pref = ak::reference::attention_weights(q.cast<double>(), std::span(&qpos, 1),
                                                     ks.cast<double>(), pos, h, kv_heads,
                                                     1.0 / std::sqrt(double(d)), rules);
  const auto ref = ak::reference::weighted_values(pref, vs.cast<double>(), h, kv_heads);
  double err = 0;
  for (const auto& f : follower_out)
    err = std::max(err, (f.cast<double>() - ref).cwiseAbs().maxCoeff() / ref.cwiseAbs().maxCoeff());

  const std::int64_t layer_bytes = dense[0].bytes_per_token(),
                     follower_bytes = values[0].bytes_per_token();
  const std::int64_t unshared_stack = layers * layer_bytes,
                     shared_stack = (layers - followers) * layer_bytes + followers * follower_bytes;
  auto make = [&](const std::string& variant, const std::string& detail, std::int64_t stack_bytes,
                  double us, double e) {
    row r{variant, detail, stack_bytes / layers};
    r.kv_gib = double(stack_bytes) * double(o.model_tokens) / double(1 << 30);
    r.decode_us = us;
    r.layer_decode_us = r.prefill_ms = r.layer_rel_err = std::nan("");
    r.max_rel_err = e;
    return r;
  };
  const std::string geom = "H_kv=" + std::to_string(kv_heads);
  return {make(name + "-span", "5 GQA layers, " + geom, unshared_stack, unshared_us, std::nan("")),
          make(name, "donor+4 followers, " + geom, shared_stack, shared_us, err)};
}

template <ak::storage_type S>
std::vector<row> all_rows(const options& o, ak::thread_pool& pool) {
  std::vector<row> rows;
  if (o.measures("MHA")) rows.push_back(gqa_family_row<S>(o, "MHA", o.heads, pool));
  if (o.measures("GQA")) rows.push_back(gqa_family_row<S>(o, "GQA", o.kv_heads, pool));
  if (o.measures("MQA")) rows.push_back(gqa_family_row<S>(o, "MQA", 1, pool));
  // DeepSeek-V2-Lite: D 2048, H 16, no q-LoRA; DeepSeek-V3-shaped: D 7168, H 128, q-LoRA 1536.
  const ak::mla_config v2{.model_dim = 2048,
                          .heads = 16,
                          .latent_dim = 512,
                          .nope_dim = 128,
                          .rope_dim = 64,
                          .v_head_dim = 128};
  ak::mla_config v3 = v2;
  v3.model_dim = 7168;
  v3.heads = 128;
  v3.q_lora_rank = 1536;
  if (o.measures("MLA-V2-Lite"))
    for (auto r : mla_rows<S>(o, "MLA-V2-Lite", v2, pool)) rows.push_back(r);
  if (o.measures("MLA-V3"))
    for (auto r : mla_rows<S>(o, "MLA-V3", v3, pool)) rows.push_back(r);
  // TPA (T6): R_Q 6 with R_K = R_V = 2 or 1 at the geometry of the GQA rows, and T6-small.
  const ak::tpa_config llama_tpa{.model_dim = o.model_dim,
                                 .heads = o.heads,
                                 .head_dim = o.head_dim,
                                 .q_rank = 6,
                                 .k_rank = 2,
                                 .v_rank = 2,
                                 .rope = {.theta = o.theta}};
  if (o.measures("TPA-R2")) rows.push_back(tpa_row<S>(o, "TPA-R2", llama_tpa, pool));
  if (o.measures("TPA-R1")) {
    ak::tpa_config c = llama_tpa;
    c.k_rank = c.v_rank = 1;
    rows.push_back(tpa_row<S>(o, "TPA-R1", c, pool));
  }
  if (o.measures("TPA-T6-small"))
    rows.push_back(tpa_row<S>(o, "TPA-T6-small",
                              {.model_dim = 768,
                               .heads = 34,
                               .head_dim = 64,
                               .q_rank = 6,
                               .k_rank = 2,
                               .v_rank = 2,
                               .rope = {.theta = 10000.0}},
                              pool));
  for (auto r : conversion_rows<S>(o, pool)) rows.push_back(r);
  if (o.measures("Shared-L2-7B"))
    for (auto r : shared_rows<S>(o, "Shared-L2-7B", 32, pool)) rows.push_back(r);
  if (o.measures("Shared-L3-8B"))
    for (auto r : shared_rows<S>(o, "Shared-L3-8B", 8, pool)) rows.push_back(r);
  return rows;
}

void print_table(const options& o, const std::vector<row>& rows) {
  std::printf("attnkit %s  geometry D=%lld H=%lld d=%lld theta=%g  storage=%s  threads=%d\n",
              ATTNKIT_VERSION_STRING, (long long)o.model_dim, (long long)o.heads,
              (long long)o.head_dim, o.theta, o.storage.c_str(), o.threads);
  std::printf(
      "medians. attn = attention core (one query token vs the cache / causal prefill); layer = "
      "projections +\n"
      "RoPE + append + attention + output projection. errors: max |out - ref| / max |ref| vs the "
      "double reference\n\n");
  std::printf("%-20s %-26s %12s %14s %14s %14s %14s %12s %12s\n", "variant", "shape", "KV B/token",
              "KV GiB", "attn decode", "layer decode", "attn prefill", "attn err", "layer err");
  char gib_head[64], dec_head[64], pre_head[64];
  std::snprintf(gib_head, sizeof gib_head, "(%lldL x %lldk)", (long long)o.layers,
                (long long)(o.model_tokens / 1024));
  if (o.context % 1024 == 0)
    std::snprintf(dec_head, sizeof dec_head, "(us @ %lldk)", (long long)(o.context / 1024));
  else
    std::snprintf(dec_head, sizeof dec_head, "(us @ %lld)", (long long)o.context);
  std::snprintf(pre_head, sizeof pre_head, "(ms, %lld tok)", (long long)o.prefill);
  std::printf("%-20s %-26s %12s %14s %14s %14s %14s %12s %12s\n", "", "", "(per layer)", gib_head,
              dec_head, "(us/token)", pre_head, "", "");
  auto cell = [](double v, const char* fmt) {  // "-" for a column a row does not measure
    char b[32];
    if (std::isnan(v)) return std::string("-");
    std::snprintf(b, sizeof b, fmt, v);
    return std::string(b);
  };
  for (const auto& r : rows)
    std::printf("%-20s %-26s %12lld %14.2f %14s %14s %14s %12s %12s\n", r.variant.c_str(),
                r.detail.c_str(), (long long)r.kv_bytes_per_token, r.kv_gib,
                cell(r.decode_us, "%.1f").c_str(), cell(r.layer_decode_us, "%.1f").c_str(),
                cell(r.prefill_ms, "%.2f").c_str(), cell(r.max_rel_err, "%.2e").c_str(),
                cell(r.layer_rel_err, "%.2e").c_str());
  if (std::any_of(rows.begin(), rows.end(),
                  [](const row& r) { return r.variant.rfind("GQA->", 0) == 0; }))
    std::printf(
        "\nGQA-> rows: a synthetic GQA layer at the geometry, converted (exact) or compressed; "
        "layer decode = the\n"
        "converted MLA layer (absorbed path); layer err = relative Frobenius error of its output "
        "vs the GQA layer\n"
        "on 256 held-out tokens (the conversion report's figure).\n");
  if (std::any_of(rows.begin(), rows.end(),
                  [](const row& r) { return r.variant.rfind("Shared-", 0) == 0; }))
    std::printf(
        "\nShared- rows: a 32-layer stack (H 32, d 128) whose layers 23-26 reuse the attention "
        "weights of layer 22;\n"
        "KV B/token = the whole stack's bytes per token / 32 layers (KV GiB: the stack's); attn "
        "decode = one decode\n"
        "step through the 5-layer span's attention (-span: 5 GQA layers; shared: the donor writes "
        "P [H, T], 4\n"
        "value-only followers read it); attn err = the followers vs P_donor V_follower in "
        "double.\n");
}

/// all_rows for the storage type named by --storage.
std::vector<row> rows_in_storage(const options& o, ak::thread_pool& pool) {
  return o.storage == "bf16"  ? all_rows<ak::bf16>(o, pool)
         : o.storage == "f16" ? all_rows<ak::half>(o, pool)
                              : all_rows<float>(o, pool);
}

/// The decode of every row again at each context of the sweep (attention core only; rows
/// without one, the conversions, are skipped).
std::vector<sweep_point> decode_sweep(const options& o, ak::thread_pool& pool) {
  std::vector<sweep_point> points;
  for (const std::int64_t c : o.plot_contexts) {
    std::fprintf(stderr, "attnkit-compare: plot sweep, context %lld ...\n", (long long)c);
    options at = o;
    at.context = c;
    at.decode_only = true;
    at.announce = false;
    for (const auto& r : rows_in_storage(at, pool))
      if (!std::isnan(r.decode_us)) points.push_back({r.variant, c, r.decode_us});
  }
  return points;
}

/// "Intel(R) Xeon(R) ..., 16 vCPUs": the model name from /proc/cpuinfo where there is one.
std::string machine_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line, name = "unknown CPU";
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0 && line.find(':') != std::string::npos) {
      name = line.substr(line.find(':') + 2);
      break;
    }
  return name + ", " + std::to_string(std::thread::hardware_concurrency()) + " vCPUs";
}

std::string today() {
  const std::time_t now = std::time(nullptr);
  char b[16];
  std::strftime(b, sizeof b, "%Y-%m-%d", std::gmtime(&now));
  return b;
}

/// The sweep as a log-log chart, one line per row, rendered by gnuplot into `file` (.png or
/// .svg). The title names the machine, the threads, the storage and the date.
void write_plot(const options& o, const std::vector<sweep_point>& points, const std::string& file) {
  std::vector<std::string> variants;
  for (const auto& p : points)
    if (std::find(variants.begin(), variants.end(), p.variant) == variants.end())
      variants.push_back(p.variant);
  const bool svg = file.compare(file.size() - 4, 4, ".svg") == 0;
  std::ostringstream g;
  g << (svg ? "set terminal svg size 1000,620 dynamic font 'Helvetica,12'\n"
            : "set terminal pngcairo size 1000,620 font 'Helvetica,10'\n");
  g << "set termoption noenhanced\nset output '" << file << "'\n"
    << "set title \"attnkit " << ATTNKIT_VERSION_STRING << ": attention decode per step vs context ("
    << o.storage << " cache, " << o.threads << " threads)\\n" << machine_name() << ", " << today()
    << "\"\n"
    << "set logscale x 2\nset logscale y 10\nset xlabel 'context length (tokens)'\n"
    << "set ylabel 'attention decode per step (us, median)'\nset format y '%g'\n"
    << "set grid\nset key outside right top\nset xtics (";
  for (std::size_t i = 0; i < o.plot_contexts.size(); ++i)
    g << (i ? ", " : "") << o.plot_contexts[i];
  const auto [lo, hi] = std::minmax_element(o.plot_contexts.begin(), o.plot_contexts.end());
  g << ")\nset xrange [" << double(*lo) / 1.15 << ":" << double(*hi) * 1.15 << "]\n";
  for (std::size_t v = 0; v < variants.size(); ++v) {
    g << "$d" << v << " << EOD\n";
    for (const auto& p : points)
      if (p.variant == variants[v]) g << p.context << ' ' << p.decode_us << '\n';
    g << "EOD\n";
  }
  // One dash pattern per family (GQA solid, MLA dashed, TPA dotted, shared dash-dot) and a
  // colour per row, so 14 rows stay tellable apart.
  const char* colours[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
                           "#e377c2", "#17becf", "#7f7f7f", "#bcbd22", "#000000", "#393b79"};
  auto dash = [](const std::string& v) {
    return v.rfind("MLA", 0) == 0      ? 2
           : v.rfind("TPA", 0) == 0    ? 3
           : v.rfind("Shared", 0) == 0 ? 4
                                       : 1;
  };
  g << "plot ";
  for (std::size_t v = 0; v < variants.size(); ++v)
    g << (v ? ", " : "") << "$d" << v << " using 1:2 with linespoints lw 2 dt " << dash(variants[v])
      << " pt " << v % 13 + 1 << " lc rgb '" << colours[v % 12] << "' title '" << variants[v]
      << "'";
  g << "\n";
  FILE* pipe = popen("gnuplot", "w");
  if (!pipe) throw std::runtime_error("attnkit-compare: could not start gnuplot");
  const std::string script = g.str();
  std::fwrite(script.data(), 1, script.size(), pipe);
  if (pclose(pipe) != 0)
    throw std::runtime_error("attnkit-compare: gnuplot failed to write '" + file + "'");
  std::fprintf(stderr, "attnkit-compare: wrote %s\n", file.c_str());
}

void print_sweep_table(const options& o, const std::vector<sweep_point>& points) {
  std::printf("\nattention decode per step (us, median) vs context length\n%-22s", "variant");
  for (const std::int64_t c : o.plot_contexts) std::printf(" %10lld", (long long)c);
  std::printf("\n");
  for (std::size_t i = 0; i < points.size(); ++i) {
    if (points[i].context != o.plot_contexts.front()) continue;
    std::printf("%-22s", points[i].variant.c_str());
    for (const auto& p : points)
      if (p.variant == points[i].variant) std::printf(" %10.1f", p.decode_us);
    std::printf("\n");
  }
}

void print_json(const options& o, const std::vector<row>& rows,
                const std::vector<sweep_point>& sweep) {
  std::printf("{\n  \"attnkit_version\": \"%s\",\n", ATTNKIT_VERSION_STRING);
  std::printf(
      "  \"config\": {\"model_dim\": %lld, \"heads\": %lld, \"kv_heads\": %lld, \"head_dim\": "
      "%lld, \"theta\": %g, "
      "\"context\": %lld, \"prefill\": %lld, \"layers\": %lld, \"tokens\": %lld, \"threads\": %d, "
      "\"storage\": \"%s\"},\n",
      (long long)o.model_dim, (long long)o.heads, (long long)o.kv_heads, (long long)o.head_dim,
      o.theta, (long long)o.context, (long long)o.prefill, (long long)o.layers,
      (long long)o.model_tokens, o.threads, o.storage.c_str());
  std::printf("  \"rows\": [\n");
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const auto& r = rows[i];
    auto num = [](double v, const char* fmt) {  // JSON has no NaN: null for an unmeasured column
      char b[32];
      if (std::isnan(v)) return std::string("null");
      std::snprintf(b, sizeof b, fmt, v);
      return std::string(b);
    };
    std::printf(
        "    {\"variant\": \"%s\", \"shape\": \"%s\", \"kv_bytes_per_token\": %lld, \"kv_gib\": "
        "%.4f, "
        "\"decode_us\": %s, \"layer_decode_us\": %s, \"prefill_ms\": %s, \"max_rel_err\": %s, "
        "\"layer_rel_err\": %s, \"prefill_flop\": %s}%s\n",
        r.variant.c_str(), r.detail.c_str(), (long long)r.kv_bytes_per_token, r.kv_gib,
        num(r.decode_us, "%.2f").c_str(), num(r.layer_decode_us, "%.2f").c_str(),
        num(r.prefill_ms, "%.3f").c_str(), num(r.max_rel_err, "%.3e").c_str(),
        num(r.layer_rel_err, "%.3e").c_str(), num(r.prefill_flop > 0 ? r.prefill_flop : std::nan(""), "%.6g").c_str(),
        i + 1 < rows.size() ? "," : "");
  }
  std::printf("  ],\n  \"machine\": \"%s\",\n  \"date\": \"%s\",\n  \"sweep\": [", machine_name().c_str(),
              today().c_str());
  for (std::size_t i = 0; i < sweep.size(); ++i)
    std::printf("%s\n    {\"variant\": \"%s\", \"context\": %lld, \"decode_us\": %.2f}", i ? "," : "",
                sweep[i].variant.c_str(), (long long)sweep[i].context, sweep[i].decode_us);
  std::printf("%s]\n}\n", sweep.empty() ? "" : "\n  ");
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const options o = parse(argc, argv);
    ak::thread_pool pool(o.threads);
    if (o.batch) {
      const double bandwidth = compare_batch::read_bandwidth(pool, o.threads);
      const auto rows = o.storage == "bf16"  ? compare_batch::run_all<ak::bf16>(o.batch_opt, pool)
                        : o.storage == "f16" ? compare_batch::run_all<ak::half>(o.batch_opt, pool)
                                             : compare_batch::run_all<float>(o.batch_opt, pool);
      compare_batch::print(o.batch_opt, o.storage, bandwidth, rows);
      return 0;
    }
    const std::vector<row> rows = rows_in_storage(o, pool);
    const std::vector<sweep_point> sweep =
        o.plots.empty() ? std::vector<sweep_point>{} : decode_sweep(o, pool);
    for (const auto& f : o.plots) write_plot(o, sweep, f);
    if (o.json) {
      print_json(o, rows, sweep);
    } else {
      print_table(o, rows);
      if (!sweep.empty()) print_sweep_table(o, sweep);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
  return 0;
}
