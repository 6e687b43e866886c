// attnkit-compare: the attention variants side by side at one model geometry.
// Per variant: KV-cache bytes per token per layer, cache GiB for a whole model and context,
// attention decode latency per token at a context length, causal prefill time, and the max
// relative error of the decode output against the double-precision reference.
// Default geometry: a Llama-3-8B attention layer (D 4096, H 32, H_kv 8, d 128, theta 5e5).
#include <attnkit/attnkit.hpp>
#include <attnkit/reference/attention.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <random>
#include <string>
#include <vector>

namespace ak = attnkit;

namespace {

struct options {
  std::int64_t model_dim = 4096, heads = 32, kv_heads = 8, head_dim = 128;
  double theta = 500000.0;
  std::int64_t context = 4096, prefill = 1024, layers = 32, model_tokens = 32768;
  int threads = 2;
  std::string storage = "f32";
  bool json = false;
};

struct row {
  std::string variant, detail;
  std::int64_t kv_bytes_per_token = 0;
  double kv_gib = 0, decode_us = 0, layer_decode_us = 0, prefill_ms = 0, max_rel_err = 0, layer_rel_err = 0;
};

const char* usage =
    "usage: attnkit-compare [options]\n"
    "  --model-dim N   model width D (4096)        --heads N      query heads H (32)\n"
    "  --kv-heads N    GQA KV heads (8)            --head-dim N   head dim d (128)\n"
    "  --theta X       RoPE base (500000)          --context N    decode context length (4096)\n"
    "  --prefill N     causal prefill tokens (1024) --layers N    layers for the GiB column (32)\n"
    "  --tokens N      tokens for the GiB column (32768)\n"
    "  --threads N     worker threads (2)          --storage S    f32 | bf16 | f16 (f32)\n"
    "  --json          machine-readable output\n";

options parse(int argc, char** argv) {
  options o;
  auto need = [&](int& i) -> std::string {
    if (i + 1 >= argc) throw ak::invalid_argument(std::string("attnkit-compare: ") + argv[i] + " needs a value");
    return argv[++i];
  };
  auto integer = [&](int& i) {
    const std::string flag = argv[i], v = need(i);
    char* end = nullptr;
    const long long x = std::strtoll(v.c_str(), &end, 10);
    if (*end || x <= 0) throw ak::invalid_argument("attnkit-compare: " + flag + " must be a positive integer, got '" + v + "'");
    return static_cast<std::int64_t>(x);
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--model-dim") o.model_dim = integer(i);
    else if (a == "--heads") o.heads = integer(i);
    else if (a == "--kv-heads") o.kv_heads = integer(i);
    else if (a == "--head-dim") o.head_dim = integer(i);
    else if (a == "--theta") o.theta = std::stod(need(i));
    else if (a == "--context") o.context = integer(i);
    else if (a == "--prefill") o.prefill = integer(i);
    else if (a == "--layers") o.layers = integer(i);
    else if (a == "--tokens") o.model_tokens = integer(i);
    else if (a == "--threads") o.threads = static_cast<int>(integer(i));
    else if (a == "--storage") o.storage = need(i);
    else if (a == "--json") o.json = true;
    else if (a == "--help" || a == "-h") {
      std::cout << usage;
      std::exit(0);
    } else {
      throw ak::invalid_argument("attnkit-compare: unknown flag '" + a + "'\n" + usage);
    }
  }
  if (o.heads % o.kv_heads != 0)
    throw ak::invalid_argument("attnkit-compare: --heads=" + std::to_string(o.heads) + " must be a multiple of --kv-heads=" +
                               std::to_string(o.kv_heads));
  if (o.storage != "f32" && o.storage != "bf16" && o.storage != "f16")
    throw ak::invalid_argument("attnkit-compare: --storage must be f32, bf16 or f16, got '" + o.storage + "'");
  return o;
}

/// Median wall time in microseconds of fn over `reps` runs after one warm-up.
double median_us(int reps, const std::function<void()>& fn) {
  fn();
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto a = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a).count());
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
void layer_columns(const options& o, std::int64_t kv_heads, ak::dense_cache<S>& cache, ak::thread_pool& pool, row& r) {
  const std::int64_t dm = o.model_dim, h = o.heads, d = o.head_dim;
  std::mt19937_64 rng(42);
  const float s = 1.f / std::sqrt(float(dm));
  const fmat wq = random_matrix(rng, h * d, dm, s), wk = random_matrix(rng, kv_heads * d, dm, s),
             wv = random_matrix(rng, kv_heads * d, dm, s), wo = random_matrix(rng, dm, h * d, 1.f / std::sqrt(float(h * d)));
  const ak::gqa_config cfg{.model_dim = dm, .heads = h, .kv_heads = kv_heads, .head_dim = d,
                           .rope = {.theta = o.theta, .layout = ak::rope_layout::half_split}};
  ak::gqa_layer layer(cfg, {ak::view_of(wq), ak::view_of(wk), ak::view_of(wv), ak::view_of(wo)});

  ak::dense_cache<S> big({.kv_heads = kv_heads, .qk_dim = d, .v_dim = d, .capacity = cache.size() + 1});
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
  const ak::reference::gqa_weights rw{wq.cast<double>(), wk.cast<double>(), wv.cast<double>(), wo.cast<double>(), {}, {}, {}, {}};
  const auto ref = ak::reference::gqa_layer_forward(x.cast<double>(), pos, rw, h, kv_heads, d, cfg.rope, 1.0 / std::sqrt(double(d)));
  r.layer_rel_err = (y.cast<double>() - ref).cwiseAbs().maxCoeff() / ref.cwiseAbs().maxCoeff();
}

/// A GQA-family row (MHA, GQA, MQA are one kernel with different kv_heads): roped random K/V
/// at contiguous positions; decode = one query at the last position; prefill = causal, all
/// queries of a fresh `prefill`-token cache.
template <ak::storage_type S>
row gqa_family_row(const options& o, const std::string& name, std::int64_t kv_heads, ak::thread_pool& pool) {
  const std::int64_t h = o.heads, d = o.head_dim, t = o.context;
  std::mt19937_64 rng(static_cast<std::uint64_t>(kv_heads));
  const fmat k = random_matrix(rng, t, kv_heads * d), v = random_matrix(rng, t, kv_heads * d), q = random_matrix(rng, 1, h * d);
  std::vector<std::int64_t> pos(static_cast<std::size_t>(t));
  for (std::int64_t i = 0; i < t; ++i) pos[static_cast<std::size_t>(i)] = i;
  ak::dense_cache<S> cache({.kv_heads = kv_heads, .qk_dim = d, .v_dim = d, .capacity = t});
  cache.append(ak::tensor3_view<const float>(k.data(), {t, kv_heads, d}), ak::tensor3_view<const float>(v.data(), {t, kv_heads, d}), pos);
  fmat out(1, h * d);
  ak::attention_workspace ws;
  const std::int64_t qpos = t - 1;
  auto decode = [&] {
    ak::attend(ak::tensor3_view<const float>(q.data(), {1, h, d}), std::span(&qpos, 1), cache,
               ak::tensor3_view<float>(out.data(), {1, h, d}), {}, pool, &ws);
  };
  row r{name, "H=" + std::to_string(h) + " H_kv=" + std::to_string(kv_heads) + " d=" + std::to_string(d),
        cache.bytes_per_token()};
  r.kv_gib = double(r.kv_bytes_per_token) * double(o.layers) * double(o.model_tokens) / double(1 << 30);
  r.decode_us = median_us(15, decode);
  // Error of the decode output against the double reference on the exact (unrounded) K/V.
  const auto ref = ak::reference::attention(q.cast<double>(), std::span(&qpos, 1), k.cast<double>(), v.cast<double>(), pos, h,
                                            kv_heads, 1.0 / std::sqrt(double(d)));
  r.max_rel_err = (out.cast<double>() - ref.out).cwiseAbs().maxCoeff() / ref.out.cwiseAbs().maxCoeff();

  const std::int64_t tp = o.prefill;
  const fmat qp = random_matrix(rng, tp, h * d);
  ak::dense_cache<S> pc({.kv_heads = kv_heads, .qk_dim = d, .v_dim = d, .capacity = tp});
  const std::int64_t n = std::min(tp, t);
  pc.append(ak::tensor3_view<const float>(k.data(), {n, kv_heads, d}), ak::tensor3_view<const float>(v.data(), {n, kv_heads, d}),
            std::span(pos).first(static_cast<std::size_t>(n)));
  std::vector<std::int64_t> ppos(pos.begin(), pos.begin() + n);
  fmat pout(n, h * d);
  r.prefill_ms = median_us(3, [&] {
                   ak::attend(ak::tensor3_view<const float>(qp.data(), {n, h, d}), ppos, pc,
                              ak::tensor3_view<float>(pout.data(), {n, h, d}), {}, pool, &ws);
                 }) / 1000.0;
  layer_columns<S>(o, kv_heads, cache, pool, r);
  return r;
}

template <ak::storage_type S>
std::vector<row> all_rows(const options& o, ak::thread_pool& pool) {
  std::vector<row> rows;
  rows.push_back(gqa_family_row<S>(o, "MHA", o.heads, pool));
  rows.push_back(gqa_family_row<S>(o, "GQA", o.kv_heads, pool));
  rows.push_back(gqa_family_row<S>(o, "MQA", 1, pool));
  return rows;
}

void print_table(const options& o, const std::vector<row>& rows) {
  std::printf("attnkit %s  geometry D=%lld H=%lld d=%lld theta=%g  storage=%s  threads=%d\n", ATTNKIT_VERSION_STRING,
              (long long)o.model_dim, (long long)o.heads, (long long)o.head_dim, o.theta, o.storage.c_str(), o.threads);
  std::printf("medians. attn = attention core (one query token vs the cache / causal prefill); layer = projections +\n"
              "RoPE + append + attention + output projection. errors: max |out - ref| / max |ref| vs the double reference\n\n");
  std::printf("%-8s %-22s %12s %14s %14s %14s %14s %12s %12s\n", "variant", "shape", "KV B/token", "KV GiB", "attn decode",
              "layer decode", "attn prefill", "attn err", "layer err");
  char gib_head[64], dec_head[64], pre_head[64];
  std::snprintf(gib_head, sizeof gib_head, "(%lldL x %lldk)", (long long)o.layers, (long long)(o.model_tokens / 1024));
  std::snprintf(dec_head, sizeof dec_head, "(us @ %lldk)", (long long)(o.context / 1024));
  std::snprintf(pre_head, sizeof pre_head, "(ms, %lld tok)", (long long)o.prefill);
  std::printf("%-8s %-22s %12s %14s %14s %14s %14s %12s %12s\n", "", "", "(per layer)", gib_head, dec_head, "(us/token)",
              pre_head, "", "");
  for (const auto& r : rows)
    std::printf("%-8s %-22s %12lld %14.2f %14.1f %14.1f %14.2f %12.2e %12.2e\n", r.variant.c_str(), r.detail.c_str(),
                (long long)r.kv_bytes_per_token, r.kv_gib, r.decode_us, r.layer_decode_us, r.prefill_ms, r.max_rel_err,
                r.layer_rel_err);
}

void print_json(const options& o, const std::vector<row>& rows) {
  std::printf("{\n  \"attnkit_version\": \"%s\",\n", ATTNKIT_VERSION_STRING);
  std::printf("  \"config\": {\"model_dim\": %lld, \"heads\": %lld, \"kv_heads\": %lld, \"head_dim\": %lld, \"theta\": %g, "
              "\"context\": %lld, \"prefill\": %lld, \"layers\": %lld, \"tokens\": %lld, \"threads\": %d, \"storage\": \"%s\"},\n",
              (long long)o.model_dim, (long long)o.heads, (long long)o.kv_heads, (long long)o.head_dim, o.theta,
              (long long)o.context, (long long)o.prefill, (long long)o.layers, (long long)o.model_tokens, o.threads,
              o.storage.c_str());
  std::printf("  \"rows\": [\n");
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const auto& r = rows[i];
    std::printf("    {\"variant\": \"%s\", \"shape\": \"%s\", \"kv_bytes_per_token\": %lld, \"kv_gib\": %.4f, "
                "\"decode_us\": %.2f, \"layer_decode_us\": %.2f, \"prefill_ms\": %.3f, \"max_rel_err\": %.3e, "
                "\"layer_rel_err\": %.3e}%s\n",
                r.variant.c_str(), r.detail.c_str(), (long long)r.kv_bytes_per_token, r.kv_gib, r.decode_us, r.layer_decode_us,
                r.prefill_ms, r.max_rel_err, r.layer_rel_err, i + 1 < rows.size() ? "," : "");
  }
  std::printf("  ]\n}\n");
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const options o = parse(argc, argv);
    ak::thread_pool pool(o.threads);
    std::vector<row> rows = o.storage == "bf16" ? all_rows<ak::bf16>(o, pool)
                            : o.storage == "f16" ? all_rows<ak::half>(o, pool)
                                                 : all_rows<float>(o, pool);
    if (o.json) print_json(o, rows);
    else print_table(o, rows);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
  return 0;
}
