// attnkit-convert: converts the attention of a GQA checkpoint (Llama, Mistral, Qwen2, Qwen3) to
// MLA, exactly or compressed the TransMLA / MHA2MLA ways, one layer at a time:
//   calibration inputs of layer l = its attention inputs when the model itself runs on the
//   calibration tokens (the hidden states of every calibration sequence are carried from layer
//   to layer by the original model), or Gaussian ones (--synthetic-calibration N);
//   convert, measure each step's output error on held-out inputs, write, free.
// Output: `attnkit` (any layout the library runs; attnkit-run loads it) or `deepseek-v3` (what
// stock transformers DeepseekV3ForCausalLM loads unchanged: one rope key with DeepSeek's table,
// dense MLPs, and a kv_a_layernorm, which stock loaders always apply: its weight is fitted on the
// calibration latents and the error that costs is reported). The whole model's evaluation NLL is
// measured before and on the written checkpoint, as attnkit-run would load it.
#include <attnkit/attnkit.hpp>
#include <attnkit/model/decoder.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <random>
#include <regex>
#include <string>
#include <vector>

#include "tool_common.hpp"

namespace ak = attnkit;
namespace cv = attnkit::convert;
namespace io = attnkit::io;
namespace fs = std::filesystem;

namespace {

const char* usage =
    "usage: attnkit-convert IN_DIR OUT_DIR --method exact|transmla|mha2mla [options]\n"
    "  --format F            attnkit (default) | deepseek-v3 (stock DeepseekV3ForCausalLM)\n"
    "  --dtype T             bf16 | f32 | f16 of the written tensors (default: the source's)\n"
    "exact:    --layout grouped|deepseek   (default grouped: one rope key per KV head)\n"
    "transmla: --qk-mqa-dim N (64)  --kv-lora-rank N (512)  --freqfold N (0 = auto)\n"
    "          --balance-kv-ratio X (1)  --damping X (PCA damping, 0.01)\n"
    "mha2mla:  --rope-dim N (16)  --selection high|low|uniform|2-norm (2-norm)\n"
    "          --svd joint|split (joint)  --latent-dim N (0 = no SVD step)  --uniform-start N (0)\n"
    "calibration and evaluation (the model runs on its own tokens):\n"
    "  --tokens FILE         token file (default IN_DIR/data.bin)\n"
    "  --format-tokens F     bytes | u32 (default bytes when vocab <= 256)\n"
    "  --row-length N        tokens per sequence (512)\n"
    "  --calibration-rows A:B  (0:64)     --eval-rows A:B  (64:80)\n"
    "  --synthetic-calibration N  Gaussian calibration inputs, N tokens per layer (no model\n"
    "                        run, no NLL: a checkpoint with attention tensors only works)\n"
    "  --heldout N           held-out tokens for the per-layer error (512)\n"
    "  --max-nll-increase X  exit 3 when the written checkpoint's NLL exceeds the source's by\n"
    "                        more than X (a gate for conversion pipelines)\n"
    "  --max-nll-change X    exit 3 when it differs from the source's by more than X either\n"
    "                        way (what an exact conversion must keep)\n"
    "  --threads N           worker threads (default: all)\n"
    "  --json                the report as JSON on stdout\n"
    "  --overwrite           replace OUT_DIR if it exists\n";

struct options {
  fs::path in, out;
  std::string method, format = "attnkit", dtype, layout = "grouped";
  cv::transmla_options transmla;
  cv::mha2mla_options mha2mla;
  fs::path tokens;
  std::string token_format;
  std::int64_t row_length = 512, cal_begin = 0, cal_end = 64, eval_begin = 64, eval_end = 80;
  std::int64_t synthetic = 0, heldout = 512;
  double max_nll_increase = INFINITY, max_nll_change = INFINITY;
  int threads = 0;
  bool json = false, overwrite = false;
};

std::pair<std::int64_t, std::int64_t> parse_range(tools::arg_reader& a) {
  const std::string flag = a.current(), v = a.value();
  const auto colon = v.find(':');
  if (colon == std::string::npos) a.fail(flag + " needs A:B, got '" + v + "'");
  const auto lo = tools::parse_integer(flag, v.substr(0, colon), 0);
  return {lo, tools::parse_integer(flag, v.substr(colon + 1), lo + 1)};
}

options parse(int argc, char** argv) {
  options o;
  tools::arg_reader a("attnkit-convert", argc, argv);
  std::vector<std::string> pos;
  while (a.next()) {
    if (a.is("--method")) o.method = a.value();
    else if (a.is("--format")) o.format = a.value();
    else if (a.is("--dtype")) o.dtype = a.value();
    else if (a.is("--layout")) o.layout = a.value();
    else if (a.is("--qk-mqa-dim")) o.transmla.qk_mqa_dim = a.integer(2);
    else if (a.is("--kv-lora-rank")) o.transmla.kv_lora_rank = a.integer(1);
    else if (a.is("--freqfold")) o.transmla.freqfold = a.integer(0);
    else if (a.is("--balance-kv-ratio")) o.transmla.balance_kv_ratio = a.number();
    else if (a.is("--damping")) o.transmla.damping = a.number();
    else if (a.is("--uniform-start")) o.mha2mla.uniform_start = a.integer(0);
    else if (a.is("--rope-dim")) o.mha2mla.rope_dim = a.integer(2);
    else if (a.is("--latent-dim")) o.mha2mla.latent_dim = a.integer(0);
    else if (a.is("--selection")) {
      const auto v = a.value();
      if (v == "high") o.mha2mla.selection = cv::rope_selection::high;
      else if (v == "low") o.mha2mla.selection = cv::rope_selection::low;
      else if (v == "uniform") o.mha2mla.selection = cv::rope_selection::uniform;
      else if (v == "2-norm") o.mha2mla.selection = cv::rope_selection::two_norm;
      else a.fail("--selection must be high, low, uniform or 2-norm, got '" + v + "'");
    } else if (a.is("--svd")) {
      const auto v = a.value();
      if (v != "joint" && v != "split") a.fail("--svd must be joint or split, got '" + v + "'");
      o.mha2mla.svd = v == "joint" ? cv::svd_mode::joint : cv::svd_mode::split;
    } else if (a.is("--tokens")) o.tokens = a.value();
    else if (a.is("--format-tokens")) o.token_format = a.value();
    else if (a.is("--row-length")) o.row_length = a.integer(2);
    else if (a.is("--calibration-rows")) std::tie(o.cal_begin, o.cal_end) = parse_range(a);
    else if (a.is("--eval-rows")) std::tie(o.eval_begin, o.eval_end) = parse_range(a);
    else if (a.is("--synthetic-calibration")) o.synthetic = a.integer(1);
    else if (a.is("--heldout")) o.heldout = a.integer(1);
    else if (a.is("--max-nll-increase")) o.max_nll_increase = a.number();
    else if (a.is("--max-nll-change")) o.max_nll_change = a.number();
    else if (a.is("--threads")) o.threads = static_cast<int>(a.integer(1, 1024));
    else if (a.is("--json")) o.json = true;
    else if (a.is("--overwrite")) o.overwrite = true;
    else if (a.positional()) pos.push_back(a.current());
    else a.unknown(usage);
  }
  if (pos.size() != 2) a.fail(std::string("needs IN_DIR and OUT_DIR\n") + usage);
  o.in = pos[0], o.out = pos[1];
  if (o.method != "exact" && o.method != "transmla" && o.method != "mha2mla")
    a.fail("--method must be exact, transmla or mha2mla, got '" + o.method + "'\n" + usage);
  if (o.format != "attnkit" && o.format != "deepseek-v3")
    a.fail("--format must be attnkit or deepseek-v3, got '" + o.format + "'");
  if (o.layout != "grouped" && o.layout != "deepseek")
    a.fail("--layout must be grouped or deepseek, got '" + o.layout + "'");
  if (!o.dtype.empty() && o.dtype != "bf16" && o.dtype != "f32" && o.dtype != "f16")
    a.fail("--dtype must be bf16, f32 or f16, got '" + o.dtype + "'");
  if (fs::exists(o.out) && fs::exists(o.in)) {
    const auto in = fs::canonical(o.in), out = fs::canonical(o.out);
    if (in == out || std::mismatch(out.begin(), out.end(), in.begin(), in.end()).first == out.end())
      a.fail("OUT_DIR '" + o.out.string() + "' is IN_DIR or holds it");
  }
  if (fs::exists(o.out) && !fs::is_empty(o.out) && !o.overwrite)
    a.fail("OUT_DIR '" + o.out.string() + "' exists and is not empty (--overwrite replaces it)");
  return o;
}

std::vector<std::vector<std::int32_t>> token_rows(const options& o, std::int64_t vocab) {
  const fs::path file = o.tokens.empty() ? o.in / "data.bin" : o.tokens;
  ak::detail::require(fs::exists(file), "attnkit-convert: no token file '", file.string(),
                      "' (give --tokens, or --synthetic-calibration N)");
  auto rows = tools::read_token_rows(file, o.token_format, o.row_length, vocab);
  for (auto [lo, hi, name] : {std::tuple{o.cal_begin, o.cal_end, "--calibration-rows"},
                              std::tuple{o.eval_begin, o.eval_end, "--eval-rows"}})
    ak::detail::require(hi <= static_cast<std::int64_t>(rows.size()), "attnkit-convert: ", name, " ", lo, ":", hi,
                        " outside the ", rows.size(), " sequences of ", o.row_length, " tokens in '", file.string(), "'");
  return rows;
}

/// The GQA attention weights of one layer, as float tensors kept alive with their views.
struct gqa_tensors {
  std::vector<io::float_tensor> keep;
  ak::gqa_weights w;
};
gqa_tensors load_gqa(const io::checkpoint& ck, const io::model_config& m, std::int64_t l) {
  const auto& c = m.gqa[static_cast<std::size_t>(l)];
  const std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
  const std::int64_t d = c.model_dim, h = c.heads, hkv = c.kv_heads, dq = c.head_dim;
  gqa_tensors t;
  t.keep.reserve(10);
  auto take = [&](const std::string& name, std::vector<std::int64_t> shape) -> const io::float_tensor& {
    t.keep.push_back(ck.load(p + name, shape));
    return t.keep.back();
  };
  t.w.q_proj = take("q_proj.weight", {h * dq, d}).matrix();
  t.w.k_proj = take("k_proj.weight", {hkv * dq, d}).matrix();
  t.w.v_proj = take("v_proj.weight", {hkv * dq, d}).matrix();
  t.w.o_proj = take("o_proj.weight", {d, h * dq}).matrix();
  if (m.qkv_bias) {
    t.w.q_proj_bias = take("q_proj.bias", {h * dq}).span();
    t.w.k_proj_bias = take("k_proj.bias", {hkv * dq}).span();
    t.w.v_proj_bias = take("v_proj.bias", {hkv * dq}).span();
  }
  if (m.o_bias) t.w.o_proj_bias = take("o_proj.bias", {d}).span();
  if (m.qk_norm) {
    t.w.q_norm = take("q_norm.weight", {dq}).span();
    t.w.k_norm = take("k_norm.weight", {dq}).span();
  }
  for (const auto& name : ck.names())  // converted to float (or borrowed, read again if needed)
    if (name.rfind(p, 0) == 0) ck.release(name);
  return t;
}

/// Why a converted layer cannot be a stock DeepSeek-V3 layer, or empty.
std::string stock_refusal(const cv::mla_checkpoint& m) {
  if (m.config.rope_heads != 1)
    return "it has " + std::to_string(m.config.rope_heads) + " rope keys (stock DeepSeek has one)";
  if (!m.q_rope_norm.empty() || !m.k_rope_norm.empty()) return "it has q/k rope norms (a QK-norm source)";
  if (!m.q_proj_bias.empty()) return "it has a q_proj bias (stock DeepSeek's q_proj has none)";
  if (!m.kv_b_proj_bias.empty()) return "it has a kv_b_proj bias (stock DeepSeek's kv_b_proj has none)";
  if (m.config.rope.scaling.type != ak::rope_scaling_type::none)
    return std::string("its RoPE has ") + ak::to_string(m.config.rope.scaling.type) + " scaling";
  if (m.config.window) return "it has a sliding window";
  const float stock = 1.f / std::sqrt(static_cast<float>(m.config.nope_dim + m.config.rope_dim));
  if (m.config.scale && std::abs(*m.config.scale - stock) > 1e-6f * stock)
    return "its softmax scale is not 1/sqrt(qk_head_dim)";
  return {};
}

/// The stock DeepSeek form of a converted layer: DeepSeek's RoPE table for d_R (a layer whose
/// table differs changes function: the report shows it) and a latent RMSNorm whose weight a
/// (one value) best keeps the latent: min_a sum_t ||c_t - a c_t / r_t||^2, r_t = rms(c_t).
cv::mla_checkpoint to_stock(cv::mla_checkpoint m, ak::matrix_view<const float> x, bool& table_changed) {
  auto& r = m.config.rope;
  const std::int64_t dr = m.config.rope_dim;
  table_changed = !(r.layout == ak::rope_layout::interleaved && r.frequency_index.empty() &&
                    (r.frequency_dim == 0 || r.frequency_dim == dr) && (r.rotary_dim == 0 || r.rotary_dim == dr));
  r = ak::rope_config{.theta = r.theta, .layout = ak::rope_layout::interleaved};
  m.config.scale.reset();
  m.config.rms_eps = 1e-6f;  // stock kv_a_layernorm's eps
  const std::int64_t dc = m.config.latent_dim;
  const auto xm = ak::as_eigen(x);
  const Eigen::MatrixXf lat = xm * m.kv_a_proj_with_mqa.topRows(dc).transpose();
  double num = 0, den = 0;
  for (Eigen::Index t = 0; t < lat.rows(); ++t) {
    Eigen::VectorXd c = lat.row(t).cast<double>().transpose();
    if (!m.kv_a_proj_bias.empty())
      for (std::int64_t i = 0; i < dc; ++i) c[i] += m.kv_a_proj_bias[static_cast<std::size_t>(i)];
    const double n2 = c.squaredNorm(), rt = std::sqrt(n2 / static_cast<double>(dc) + 1e-6);
    num += n2 / rt, den += n2 / (rt * rt);
  }
  m.kv_a_layernorm.assign(static_cast<std::size_t>(dc), den > 0 ? static_cast<float>(num / den) : 1.f);
  return m;
}

io::dtype dtype_named(const std::string& s) {
  return s == "bf16" ? io::dtype::bf16 : s == "f16" ? io::dtype::f16 : io::dtype::f32;
}

struct layer_report {
  std::int64_t layer;
  std::vector<cv::conversion_report> steps;
};

double eval_nll(ak::model::decoder& dec, const std::vector<std::vector<std::int32_t>>& rows, std::int64_t lo,
                std::int64_t hi, ak::thread_pool& pool) {
  double sum = 0;
  std::int64_t n = 0;
  for (std::int64_t r = lo; r < hi; ++r) {
    const auto [s, c] = dec.nll(rows[static_cast<std::size_t>(r)], pool);
    sum += s, n += c;
  }
  return sum / static_cast<double>(n);
}

}  // namespace

int main(int argc, char** argv) {
  return tools::run_main([&] {
    const options o = parse(argc, argv);
    const auto t_start = std::chrono::steady_clock::now();
    ak::thread_pool pool(o.threads > 0 ? o.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
    const io::model_config cfg = io::read_model_config(o.in);
    ak::detail::require(!cfg.is_mla(), "attnkit-convert: '", o.in.string(), "' is already MLA (", io::to_string(cfg.family),
                        "); the conversions take GQA models");
    const io::checkpoint ck(o.in);
    const std::string p0 = "model.layers.0.self_attn.q_proj.weight";
    const io::dtype out_type = !o.dtype.empty() ? dtype_named(o.dtype) : ck.info(p0).type == io::dtype::f32 ? io::dtype::f32
                                                                       : ck.info(p0).type;
    const bool synthetic = o.synthetic > 0;

    // The model runs on its tokens unless calibration is synthetic.
    std::unique_ptr<ak::model::decoder> src;
    std::vector<std::vector<std::int32_t>> rows;
    std::vector<ak::row_matrix<float>> hidden;  // [calibration rows + 1 held-out][T, D]
    double nll_before = NAN;
    std::int64_t cal_tokens = o.synthetic;
    if (!synthetic) {
      src = std::make_unique<ak::model::decoder>(ak::model::decoder::load(o.in));
      rows = token_rows(o, cfg.vocab_size);
      std::fprintf(stderr, "attnkit-convert: NLL of the source on rows %lld:%lld ...\n",
                   static_cast<long long>(o.eval_begin), static_cast<long long>(o.eval_end));
      nll_before = eval_nll(*src, rows, o.eval_begin, o.eval_end, pool);
      for (std::int64_t r = o.cal_begin; r < o.cal_end; ++r) src->embed(rows[static_cast<std::size_t>(r)], hidden.emplace_back());
      src->embed(rows[static_cast<std::size_t>(o.eval_begin)], hidden.emplace_back());  // held-out sequence
      cal_tokens = (o.cal_end - o.cal_begin) * o.row_length;
    }
    const std::int64_t d = cfg.hidden_size;
    std::vector<std::int64_t> positions(static_cast<std::size_t>(o.row_length));
    for (std::int64_t i = 0; i < o.row_length; ++i) positions[static_cast<std::size_t>(i)] = i;

    if (o.overwrite) fs::remove_all(o.out);
    io::checkpoint_writer writer(o.out, 500'000'000ull);  // memory: one shard
    nlohmann::json layers_json = nlohmann::json::array();
    std::vector<layer_report> reports;
    std::int64_t latent_dim = 0, rope_dim = 0, nope_dim = 0, v_dim = 0;
    ak::row_matrix<float> cal, heldout;  // [N, D], [T_heldout, D]
    std::mt19937_64 rng(11);
    std::normal_distribution<float> normal;
    for (std::int64_t l = 0; l < cfg.layers; ++l) {
      const auto t_layer = std::chrono::steady_clock::now();
      // Layer l's attention inputs: observed while the original model carries the hidden
      // states through layer l (or Gaussian ones).
      if (synthetic) {
        cal.resize(o.synthetic, d);
        heldout.resize(std::min(o.heldout, o.synthetic), d);
        for (std::int64_t i = 0; i < cal.size(); ++i) cal.data()[i] = normal(rng);
        for (std::int64_t i = 0; i < heldout.size(); ++i) heldout.data()[i] = normal(rng);
      } else {
        cal.resize(cal_tokens, d);
        for (std::size_t r = 0; r < hidden.size(); ++r) {
          auto cache = src->make_cache(l, o.row_length);
          const bool held = r + 1 == hidden.size();
          src->forward_layer(l, hidden[r], positions, cache, pool,
                             [&](std::int64_t, ak::matrix_view<const float> x) {
                               const auto xm = ak::as_eigen(x);
                               if (held) heldout = xm.topRows(std::min(o.heldout, xm.rows()));
                               else cal.middleRows(static_cast<std::int64_t>(r) * o.row_length, o.row_length) = xm;
                             });
        }
      }
      const auto g = load_gqa(ck, cfg, l);
      const auto& gcfg = cfg.gqa[static_cast<std::size_t>(l)];
      ak::gqa_layer gqa(gcfg, g.w);
      const ak::matrix_view<const float> calv(cal.data(), {cal.rows(), d}), hov(heldout.data(), {heldout.rows(), d});
      cv::conversion_result res;
      if (o.method == "exact") {
        auto [m, rep] = cv::gqa_to_mla_exact(gcfg, g.w, o.layout == "grouped" ? cv::mla_layout::grouped_rope
                                                                            : cv::mla_layout::deepseek);
        rep.rel_error = cv::detail::held_out_error(gqa, m, hov);
        res.checkpoint = std::move(m);
        res.steps.push_back(rep);
      } else if (o.method == "transmla") {
        res = cv::gqa_to_mla_transmla(gcfg, g.w, calv, hov, o.transmla, pool);
      } else {
        res = cv::gqa_to_mla_mha2mla(gcfg, g.w, calv, hov, o.mha2mla, pool);
      }
      auto m = std::move(res.checkpoint);
      if (o.format == "deepseek-v3") {
        const std::string why = stock_refusal(m);
        ak::detail::require(why.empty(), "attnkit-convert: layer ", l, " cannot be written as stock DeepSeek-V3: ", why,
                            "; use --format attnkit (or --method transmla, which makes DeepSeek's shapes)");
        const auto t_fit = std::chrono::steady_clock::now();
        bool table_changed = false;
        m = to_stock(std::move(m), calv, table_changed);
        res.steps.push_back({std::string("stock DeepSeek-V3 form (fitted latent RMSNorm") +
                                 (table_changed ? ", DeepSeek's RoPE table" : "") + ")",
                             res.steps.back().kv_elements_after, res.steps.back().kv_elements_after,
                             cv::detail::held_out_error(gqa, m, hov), tools::seconds_since(t_fit)});
      }
      // The layer's tensors, DeepSeek's names.
      const std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
      auto put = [&](const std::string& name, const auto& data, std::vector<std::int64_t> shape) {
        if (data.size() == 0) return;
        writer.add(p + name, std::span<const float>(data.data(), static_cast<std::size_t>(data.size())), std::move(shape),
                   out_type);
      };
      const auto& mc = m.config;
      const std::int64_t kva = mc.latent_dim + mc.rope_heads * mc.rope_dim;
      put("q_proj.weight", m.q_proj, {m.q_proj.rows(), m.q_proj.cols()});
      put("q_proj.bias", m.q_proj_bias, {static_cast<std::int64_t>(m.q_proj_bias.size())});
      put("kv_a_proj_with_mqa.weight", m.kv_a_proj_with_mqa, {kva, d});
      put("kv_a_layernorm.weight", m.kv_a_layernorm, {mc.latent_dim});
      put("kv_b_proj.weight", m.kv_b_proj, {m.kv_b_proj.rows(), m.kv_b_proj.cols()});
      put("kv_b_proj.bias", m.kv_b_proj_bias, {static_cast<std::int64_t>(m.kv_b_proj_bias.size())});
      put("o_proj.weight", m.o_proj, {d, m.o_proj.cols()});
      put("q_rope_norm.weight", m.q_rope_norm, {mc.rope_dim});
      put("k_rope_norm.weight", m.k_rope_norm, {mc.rope_dim});
      if (o.format == "deepseek-v3" && (!m.kv_a_proj_bias.empty() || !m.o_proj_bias.empty())) {
        // Stock attention_bias puts biases on both kv_a_proj_with_mqa and o_proj.
        std::vector<float> kv_b = m.kv_a_proj_bias, o_b = m.o_proj_bias;
        kv_b.resize(static_cast<std::size_t>(kva), 0.f);
        o_b.resize(static_cast<std::size_t>(d), 0.f);
        put("kv_a_proj_with_mqa.bias", kv_b, {kva});
        put("o_proj.bias", o_b, {d});
      } else {
        put("kv_a_proj_with_mqa.bias", m.kv_a_proj_bias, {kva});
        put("o_proj.bias", m.o_proj_bias, {d});
      }
      layers_json.push_back(io::to_json(mc));
      latent_dim = mc.latent_dim, rope_dim = mc.rope_dim, nope_dim = mc.nope_dim, v_dim = mc.v_head_dim;
      reports.push_back({l, res.steps});
      const auto& last = res.steps.back();
      std::fprintf(stderr, "  layer %lld/%lld  KV %lld -> %lld elements/token  held-out error %.3g  %.1f s\n",
                   static_cast<long long>(l + 1), static_cast<long long>(cfg.layers),
                   static_cast<long long>(res.steps.front().kv_elements_before),
                   static_cast<long long>(last.kv_elements_after), last.rel_error, tools::seconds_since(t_layer));
    }
    hidden.clear();
    cal.resize(0, 0);

    // Everything but the attention, copied through in its own dtype.
    const std::regex attention(R"(model\.layers\.\d+\.self_attn\..*)");
    for (const auto& name : ck.names()) {
      if (std::regex_match(name, attention)) continue;
      const auto info = ck.info(name);
      const auto t = ck.load(name);
      const io::dtype type = info.type == io::dtype::f64 ? io::dtype::f32 : info.type;
      writer.add(name, t.span(), t.shape(), type);
      ck.release(name);
    }
    writer.finish();

    // config.json: the source's with the attention described (attnkit), or a stock DeepSeek-V3.
    std::ifstream src_cfg(o.in / "config.json");
    nlohmann::ordered_json out_cfg = nlohmann::ordered_json::parse(src_cfg);
    const double rms_eps = out_cfg.value("rms_norm_eps", 1e-6);
    if (o.format == "attnkit") {
      out_cfg["attnkit"] = {{"attention", "mla"}, {"method", o.method}, {"layers", layers_json}};
    } else {
      const auto& r = cfg.gqa[0].rope;
      out_cfg = {{"architectures", {"DeepseekV3ForCausalLM"}},
                 {"model_type", "deepseek_v3"},
                 {"vocab_size", cfg.vocab_size},
                 {"hidden_size", d},
                 {"intermediate_size", cfg.intermediate_size},
                 {"moe_intermediate_size", cfg.intermediate_size},
                 {"num_hidden_layers", cfg.layers},
                 {"first_k_dense_replace", cfg.layers},  // every MLP dense
                 {"num_attention_heads", cfg.gqa[0].heads},
                 {"num_key_value_heads", cfg.gqa[0].heads},
                 {"q_lora_rank", nullptr},
                 {"kv_lora_rank", latent_dim},
                 {"qk_rope_head_dim", rope_dim},
                 {"qk_nope_head_dim", nope_dim},
                 {"v_head_dim", v_dim},
                 {"hidden_act", "silu"},
                 {"max_position_embeddings", cfg.max_position_embeddings},
                 {"rms_norm_eps", rms_eps},
                 {"tie_word_embeddings", cfg.tie_word_embeddings},
                 {"attention_bias", cfg.qkv_bias || cfg.o_bias},
                 {"rope_interleave", true},
                 {"rope_parameters", {{"rope_type", "default"}, {"rope_theta", r.theta}}},
                 {"dtype", out_type == io::dtype::bf16 ? "bfloat16" : out_type == io::dtype::f16 ? "float16" : "float32"}};
    }
    std::ofstream(o.out / "config.json") << out_cfg.dump(2) << "\n";
    if (fs::exists(o.in / "data.bin") && o.tokens.empty()) fs::copy_file(o.in / "data.bin", o.out / "data.bin");

    // The written checkpoint, loaded as attnkit-run (and, for deepseek-v3, transformers) would.
    double nll_after = NAN;
    if (!synthetic) {
      std::fprintf(stderr, "attnkit-convert: NLL of the written checkpoint ...\n");
      auto after = ak::model::decoder::load(o.out);
      nll_after = eval_nll(after, rows, o.eval_begin, o.eval_end, pool);
    }

    const double total_s = tools::seconds_since(t_start);
    if (o.json) {
      nlohmann::ordered_json j = {{"in", o.in.string()}, {"out", o.out.string()}, {"method", o.method},
                                  {"format", o.format},  {"calibration_tokens_per_layer", cal_tokens}};
      j["layers"] = nlohmann::json::array();
      for (const auto& lr : reports) {
        nlohmann::ordered_json steps = nlohmann::json::array();
        for (const auto& s : lr.steps)
          steps.push_back({{"step", s.step}, {"kv_elements_before", s.kv_elements_before},
                           {"kv_elements_after", s.kv_elements_after},
                           {"heldout_rel_error", std::isfinite(s.rel_error) ? nlohmann::json(s.rel_error) : nlohmann::json()},
                           {"seconds", s.seconds}});
        j["layers"].push_back({{"layer", lr.layer}, {"steps", steps}});
      }
      j["nll_before"] = std::isfinite(nll_before) ? nlohmann::json(nll_before) : nlohmann::json();
      j["nll_after"] = std::isfinite(nll_after) ? nlohmann::json(nll_after) : nlohmann::json();
      j["seconds"] = total_s;
      std::cout << j.dump(2) << "\n";
    } else {
      std::printf("%-6s %-64s %10s %10s %12s %8s\n", "layer", "step", "KV before", "KV after", "held-out err", "s");
      for (const auto& lr : reports)
        for (const auto& s : lr.steps)
          std::printf("%-6lld %-64s %10lld %10lld %12.4g %8.2f\n", static_cast<long long>(lr.layer), s.step.c_str(),
                      static_cast<long long>(s.kv_elements_before), static_cast<long long>(s.kv_elements_after),
                      s.rel_error, s.seconds);
      if (!synthetic)
        std::printf("evaluation NLL (rows %lld:%lld): before %.6f  after %.6f  (%+.6f)\n",
                    static_cast<long long>(o.eval_begin), static_cast<long long>(o.eval_end), nll_before, nll_after,
                    nll_after - nll_before);
      std::printf("written to %s in %.1f s\n", o.out.string().c_str(), total_s);
    }
    const double change = nll_after - nll_before;
    if (!synthetic && !(change <= o.max_nll_increase && std::abs(change) <= o.max_nll_change)) {
      std::fprintf(stderr, "attnkit-convert: the NLL changed by %+.3g, past --max-nll-increase %.3g / --max-nll-change %.3g\n",
                   change, o.max_nll_increase, o.max_nll_change);
      std::exit(3);
    }
  });
}
