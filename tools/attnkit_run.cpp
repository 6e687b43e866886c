// attnkit-run: runs a checkpoint (Hugging Face folder or one written by attnkit-convert) through
// attnkit's dense decoder: mean next-token negative log-likelihood on a token file, prefill and
// decode speed, and where the time goes (attention layers vs. the rest).
#include <attnkit/model/decoder.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "tool_common.hpp"

namespace ak = attnkit;
namespace fs = std::filesystem;

namespace {

const char* usage =
    "usage: attnkit-run MODEL_DIR [options]\n"
    "       attnkit-run --synthetic llama3-8b [--layers N] [options]\n"
    "  MODEL_DIR         config.json + model.safetensors (or a sharded index)\n"
    "  --tokens FILE     token file (default MODEL_DIR/data.bin when present)\n"
    "  --format F        bytes (one token per byte) | u32 (little-endian uint32 ids);\n"
    "                    default bytes when vocab <= 256, else u32\n"
    "  --row-length N    tokens per sequence (default: the whole file is one sequence)\n"
    "  --rows A:B        evaluate sequences [A, B) (default all)\n"
    "  --chunk N         prefill chunk in tokens (0 = a sequence at once)\n"
    "  --decode N        then time N single-token decode steps after a prompt (default 0)\n"
    "  --prompt N        prompt tokens before the decode steps (default 512)\n"
    "  --threads N       worker threads (default: all hardware threads)\n"
    "  --cache S         KV-cache storage: f32 (default) | bf16 | f16\n"
    "  --products P      f32 (default) | bf16: over a bf16 cache, queries and probabilities\n"
    "                    rounded to bf16 too, on AMX tiles or vdpbf16ps where the CPU has them\n"
    "  --synthetic S     random weights of shape S instead of a checkpoint: llama3-8b\n"
    "  --layers N        layers of the synthetic model (default 4)\n"
    "  --json            machine-readable summary on stdout\n";

struct options {
  fs::path model;
  fs::path tokens;
  std::string format;
  std::int64_t row_length = 0, row_begin = 0, row_end = -1, chunk = 0, decode = 0, prompt = 512;
  int threads = 0;
  std::string synthetic;
  std::int64_t layers = 4;
  ak::model::decoder_options decoder;
  std::string cache = "f32", products = "f32";
  bool json = false;
};

options parse(int argc, char** argv) {
  options o;
  tools::arg_reader a("attnkit-run", argc, argv);
  while (a.next()) {
    if (a.is("--tokens")) o.tokens = a.value();
    else if (a.is("--format")) o.format = a.value();
    else if (a.is("--row-length")) o.row_length = a.integer(1);
    else if (a.is("--rows")) {
      const std::string v = a.value();
      const auto colon = v.find(':');
      if (colon == std::string::npos) a.fail("--rows needs A:B, got '" + v + "'");
      o.row_begin = tools::parse_integer("--rows", v.substr(0, colon), 0);
      o.row_end = tools::parse_integer("--rows", v.substr(colon + 1), o.row_begin + 1);
    } else if (a.is("--chunk")) o.chunk = a.integer(0);
    else if (a.is("--decode")) o.decode = a.integer(0);
    else if (a.is("--prompt")) o.prompt = a.integer(1);
    else if (a.is("--threads")) o.threads = static_cast<int>(a.integer(1, 1024));
    else if (a.is("--cache")) {
      o.cache = a.value();
      if (o.cache == "bf16")
        o.decoder.storage = ak::model::cache_storage::bf16;
      else if (o.cache == "f16")
        o.decoder.storage = ak::model::cache_storage::f16;
      else if (o.cache != "f32")
        a.fail("--cache must be f32, bf16 or f16, got '" + o.cache + "'");
    } else if (a.is("--products")) {
      o.products = a.value();
      if (o.products == "bf16")
        o.decoder.products = ak::product_math::bf16;
      else if (o.products != "f32")
        a.fail("--products must be f32 or bf16, got '" + o.products + "'");
    } else if (a.is("--synthetic"))
      o.synthetic = a.value();
    else if (a.is("--layers")) o.layers = a.integer(1, 1024);
    else if (a.is("--json")) o.json = true;
    else if (a.positional() && o.model.empty()) o.model = a.current();
    else a.unknown(usage);
  }
  if (o.model.empty() == o.synthetic.empty())
    a.fail(std::string("give either MODEL_DIR or --synthetic\n") + usage);
  return o;
}

/// Llama-3-8B's shapes (D 4096, H 32, H_kv 8, d 128, F 14336, vocab 128256, theta 5e5 with the
/// llama3 scaling) with `layers` layers and random weights (N(0, 0.02), norms 1).
ak::model::decoder synthetic_llama3_8b(std::int64_t layers, const ak::model::decoder_options& opt) {
  ak::io::model_config c;
  c.family = ak::io::model_family::llama;
  c.vocab_size = 128256, c.hidden_size = 4096, c.intermediate_size = 14336, c.layers = layers;
  c.max_position_embeddings = 131072, c.rms_eps = 1e-5f;
  ak::gqa_config g{.model_dim = 4096, .heads = 32, .kv_heads = 8, .head_dim = 128};
  g.rope = {.theta = 500000.0,
            .scaling = {.type = ak::rope_scaling_type::llama3, .factor = 8.0, .original_context = 8192}};
  c.gqa.assign(static_cast<std::size_t>(layers), g);
  return ak::model::decoder(
      c,
      [](const std::string& name, const std::vector<std::int64_t>& shape, bool) {
        std::int64_t n = 1;
        for (auto e : shape) n *= e;
        std::vector<float> w(static_cast<std::size_t>(n), 1.f);
        if (shape.size() == 2) {
          std::mt19937_64 rng(std::hash<std::string>{}(name));
          std::normal_distribution<float> normal(0.f, 0.02f);
          for (auto& x : w) x = normal(rng);
        }
        return ak::io::float_tensor(shape, std::move(w));
      },
      opt);
}

/// Sequences of token ids from the file (or random ones for a synthetic model).
std::vector<std::vector<std::int32_t>> read_tokens(const options& o, std::int64_t vocab) {
  fs::path file = o.tokens;
  if (file.empty() && !o.model.empty() && fs::exists(o.model / "data.bin")) file = o.model / "data.bin";
  if (!file.empty()) return tools::read_token_rows(file, o.format, o.row_length, vocab);
  std::mt19937_64 rng(7);
  std::vector<std::int32_t> row(static_cast<std::size_t>(std::max<std::int64_t>(o.row_length, o.prompt + o.decode + 1)));
  for (auto& t : row) t = static_cast<std::int32_t>(rng() % static_cast<std::uint64_t>(vocab));
  return {row};
}

}  // namespace

int main(int argc, char** argv) {
  return tools::run_main([&] {
    const options o = parse(argc, argv);
    ak::thread_pool pool(o.threads > 0 ? o.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
    const auto t_load = std::chrono::steady_clock::now();
    auto dec = o.synthetic.empty() ? ak::model::decoder::load(o.model, o.decoder)
               : o.synthetic == "llama3-8b"
                   ? synthetic_llama3_8b(o.layers, o.decoder)
                   : throw ak::invalid_argument(
                         "attnkit-run: --synthetic must be llama3-8b, got '" + o.synthetic + "'");
    const double load_s = tools::seconds_since(t_load);
    const auto& cfg = dec.config();
    const auto rows = read_tokens(o, cfg.vocab_size);
    const std::int64_t end = o.row_end < 0 ? static_cast<std::int64_t>(rows.size()) : o.row_end;
    ak::detail::require(o.row_begin < end && end <= static_cast<std::int64_t>(rows.size()),
                        "attnkit-run: --rows ", o.row_begin, ":", end, " outside the ", rows.size(),
                        " sequences of the token file");
    std::fprintf(stderr, "attnkit-run: %s, %lld layers, D %lld, vocab %lld, %lld KV elements/token, loaded in %.2f s\n",
                 o.synthetic.empty() ? ak::io::to_string(cfg.family) : o.synthetic.c_str(),
                 static_cast<long long>(cfg.layers), static_cast<long long>(cfg.hidden_size),
                 static_cast<long long>(cfg.vocab_size), static_cast<long long>(dec.cache_elements_per_token()), load_s);

    // Evaluation: every sequence through fresh caches.
    ak::model::time_split prefill_time;
    double nll = 0;
    std::int64_t predicted = 0, fed = 0;
    const bool evaluate = o.synthetic.empty() || o.decode == 0;
    if (evaluate) {
      for (std::int64_t r = o.row_begin; r < end; ++r) {
        const auto [sum, count] = dec.nll(rows[static_cast<std::size_t>(r)], pool, o.chunk, &prefill_time);
        nll += sum, predicted += count, fed += static_cast<std::int64_t>(rows[static_cast<std::size_t>(r)].size());
        const double s = prefill_time.attention_s + prefill_time.other_s;
        std::fprintf(stderr, "\r  sequence %lld/%lld  NLL %.6f  prefill %.0f tokens/s   ",
                     static_cast<long long>(r - o.row_begin + 1), static_cast<long long>(end - o.row_begin),
                     nll / static_cast<double>(predicted), static_cast<double>(fed) / s);
      }
      std::fprintf(stderr, "\n");
    }

    // Decode: a prompt, then single-token steps (teacher-forced from the sequence).
    ak::model::time_split decode_time;
    std::int64_t steps = 0;
    if (o.decode > 0) {
      const auto& seq = rows[static_cast<std::size_t>(o.row_begin)];
      const std::int64_t prompt = std::min<std::int64_t>(o.prompt, static_cast<std::int64_t>(seq.size()) - 1);
      auto caches = dec.make_caches(prompt + o.decode);
      std::vector<std::int64_t> pos(static_cast<std::size_t>(prompt));
      for (std::int64_t i = 0; i < prompt; ++i) pos[static_cast<std::size_t>(i)] = i;
      ak::row_matrix<float> logits(1, cfg.vocab_size);
      const ak::matrix_view<float> out(logits.data(), {1, cfg.vocab_size});
      dec.forward(std::span(seq).first(static_cast<std::size_t>(prompt)), pos, caches, out, pool);
      for (std::int64_t s = 0; s < o.decode; ++s) {
        const std::int32_t tok = seq[static_cast<std::size_t>((prompt + s) % static_cast<std::int64_t>(seq.size()))];
        const std::int64_t p = prompt + s;
        dec.forward(std::span(&tok, 1), std::span(&p, 1), caches, out, pool, {}, &decode_time);
        ++steps;
        if ((s + 1) % 8 == 0 || s + 1 == o.decode)
          std::fprintf(stderr, "\r  decode step %lld/%lld  %.2f tokens/s   ", static_cast<long long>(s + 1),
                       static_cast<long long>(o.decode),
                       static_cast<double>(steps) / (decode_time.attention_s + decode_time.other_s));
      }
      std::fprintf(stderr, "\n");
    }

    const double prefill_s = prefill_time.attention_s + prefill_time.other_s;
    const double decode_s = decode_time.attention_s + decode_time.other_s;
    tools::summary out;
    out.add("model", o.synthetic.empty() ? o.model.string() : "synthetic " + o.synthetic);
    out.add("family", ak::io::to_string(cfg.family));
    out.add("layers", cfg.layers);
    out.add("threads", static_cast<std::int64_t>(pool.concurrency()));
    out.add("kv_elements_per_token", dec.cache_elements_per_token());
    out.add("cache", o.cache);
    out.add("products", o.products);
    if (evaluate) {
      out.add("sequences", end - o.row_begin);
      out.add("predicted_tokens", predicted);
      out.add("mean_nll", nll / static_cast<double>(predicted), 9);
      out.add("prefill_tokens_per_s", static_cast<double>(fed) / prefill_s, 1);
      out.add("prefill_attention_share", prefill_time.attention_s / prefill_s, 3);
    }
    if (steps > 0) {
      out.add("decode_steps", steps);
      out.add("decode_context", std::min<std::int64_t>(o.prompt, static_cast<std::int64_t>(rows[static_cast<std::size_t>(o.row_begin)].size()) - 1) + steps);
      out.add("decode_tokens_per_s", static_cast<double>(steps) / decode_s, 2);
      out.add("decode_attention_share", decode_time.attention_s / decode_s, 3);
    }
    out.print(std::cout, o.json);
  });
}
