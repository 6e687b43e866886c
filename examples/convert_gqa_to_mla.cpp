// convert_gqa_to_mla: every conversion step on one GQA layer, with its report.
//   1. make a GQA layer and calibration / held-out activations with decaying spectra
//      (attnkit::convert::synthetic; a real user loads a checkpoint and records activations);
//   2. exact GQA -> MLA in both layouts (same function, same cache);
//   3. TransMLA: RoRoPE + FreqFold, partial RoPE, balanced joint PCA to kv_lora_rank;
//   4. MHA2MLA: partial RoPE (2-norm), joint SVD to a latent of the same cache size;
//   5. decode with the compressed layer from its 576-element latent cache.
// Every report prints KV elements per token before/after, the relative Frobenius error of the
// layer output on held-out tokens and the step's time.
//   convert_gqa_to_mla [--model-dim D --heads H --kv-heads G --head-dim d --calibration N
//                       --heldout T --qk-mqa-dim r --kv-lora-rank c --freqfold F --threads n]
// Defaults: the Llama-3-8B layer geometry, 32768 calibration tokens, the TransMLA defaults
// (qk_mqa_dim 64, kv_lora_rank 512, F = 4 as TransMLA ships for Llama-3-8B).
#include <attnkit/attnkit.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <numeric>
#include <string>

namespace ak = attnkit;
namespace cv = attnkit::convert;

namespace {

void print(const cv::conversion_report& r) {
  std::printf("  %-78s KV/token %5lld -> %5lld  held-out rel. error %.3e  %.2f s\n", r.step.c_str(),
              static_cast<long long>(r.kv_elements_before),
              static_cast<long long>(r.kv_elements_after), r.rel_error, r.seconds);
}

std::map<std::string, std::int64_t> parse(int argc, char** argv) {
  std::map<std::string, std::int64_t> o{
      {"--model-dim", 4096},    {"--heads", 32},    {"--kv-heads", 8},    {"--head-dim", 128},
      {"--calibration", 32768}, {"--heldout", 256}, {"--qk-mqa-dim", 64}, {"--kv-lora-rank", 512},
      {"--freqfold", 4},        {"--threads", 2}};
  for (int i = 1; i < argc; i += 2) {
    if (!o.count(argv[i]) || i + 1 >= argc)
      throw ak::invalid_argument(
          std::string("convert_gqa_to_mla: unknown flag or missing value: ") + argv[i]);
    char* end = nullptr;
    const long long v = std::strtoll(argv[i + 1], &end, 10);
    if (*end || v < 0)
      throw ak::invalid_argument(std::string(argv[i]) + " needs a non-negative integer, got " +
                                 argv[i + 1]);
    o[argv[i]] = v;
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) try {
  auto o = parse(argc, argv);
  const ak::gqa_config cfg{.model_dim = o["--model-dim"],
                           .heads = o["--heads"],
                           .kv_heads = o["--kv-heads"],
                           .head_dim = o["--head-dim"],
                           .rope = {.theta = 500000.0}};
  ak::thread_pool pool(static_cast<int>(o["--threads"]));
  auto t0 = std::chrono::steady_clock::now();
  // 1. Synthetic layer and activations (decaying spectra; see convert/synthetic.hpp).
  const auto layer = cv::synthetic::make_layer(cfg, 1, cfg.model_dim / 16.0, /*biases=*/false);
  std::mt19937_64 rng(2);
  const std::int64_t subspace = std::min<std::int64_t>(cfg.model_dim, 512);
  const auto calib =
      cv::synthetic::activations(rng, o["--calibration"], cfg.model_dim, subspace, subspace / 8.0);
  const auto heldout =
      cv::synthetic::activations(rng, o["--heldout"], cfg.model_dim, subspace, subspace / 8.0);
  std::printf(
      "GQA layer D=%lld H=%lld H_kv=%lld d=%lld (KV %lld elements/token); %lld calibration and "
      "%lld held-out "
      "tokens (made in %.1f s)\n",
      (long long)cfg.model_dim, (long long)cfg.heads, (long long)cfg.kv_heads,
      (long long)cfg.head_dim, (long long)(2 * cfg.kv_heads * cfg.head_dim),
      (long long)calib.rows(), (long long)heldout.rows(),
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  ak::gqa_layer gqa(cfg, layer.weights());
  std::vector<std::int64_t> pos(static_cast<std::size_t>(heldout.rows()));
  std::iota(pos.begin(), pos.end(), std::int64_t{0});

  // 2. Exact conversion: the latent is the GQA cache.
  std::printf("\n[exact] GQA -> MLA, identity I1\n");
  for (auto layout : {cv::mla_layout::grouped_rope, cv::mla_layout::deepseek}) {
    if (layout == cv::mla_layout::deepseek &&
        cfg.heads * cfg.kv_heads * cfg.head_dim * cfg.model_dim > (1ll << 26)) {
      std::printf(
          "  (DeepSeek layout skipped at this size: its absorbed q_proj is H x H_kv d x D)\n");
      continue;
    }
    t0 = std::chrono::steady_clock::now();
    auto [ckpt, rep] = cv::gqa_to_mla_exact(cfg, layer.weights(), layout);
    rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ak::mla_layer mla(ckpt.config, ckpt.weights());
    rep.rel_error = cv::output_rel_error(gqa, mla, ak::view_of(heldout), pos);
    print(rep);
  }

  // 3. TransMLA to kv_lora_rank + qk_mqa_dim.
  std::printf("\n[TransMLA] RoRoPE + FreqFold -> partial RoPE -> balanced K/V + joint PCA\n");
  const cv::transmla_options topt{.qk_mqa_dim = o["--qk-mqa-dim"],
                                  .kv_lora_rank = o["--kv-lora-rank"],
                                  .freqfold = o["--freqfold"]};
  t0 = std::chrono::steady_clock::now();
  const auto trans = cv::gqa_to_mla_transmla(cfg, layer.weights(), ak::view_of(calib),
                                             ak::view_of(heldout), topt, pool);
  for (const auto& r : trans.steps) print(r);
  std::printf("  total %.2f s including the held-out measurements\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());

  // 4. MHA2MLA to the same cache size: rope_dim per KV head r with H_kv r = qk_mqa_dim.
  const std::int64_t r = std::max<std::int64_t>(2, o["--qk-mqa-dim"] / cfg.kv_heads / 2 * 2);
  std::printf("\n[MHA2MLA] partial RoPE (2-norm, %lld dims per KV head) -> joint SVD\n",
              (long long)r);
  t0 = std::chrono::steady_clock::now();
  const auto m2m = cv::gqa_to_mla_mha2mla(
      cfg, layer.weights(), ak::view_of(calib), ak::view_of(heldout),
      {.rope_dim = r, .selection = cv::rope_selection::two_norm, .latent_dim = o["--kv-lora-rank"]},
      pool);
  for (const auto& s : m2m.steps) print(s);
  std::printf("  total %.2f s including the held-out measurements\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());

  // 5. Decode with the TransMLA layer from its latent cache (absorbed path).
  ak::mla_layer mla(trans.checkpoint.config, trans.checkpoint.weights());
  auto cache = mla.make_cache<float>(heldout.rows());
  ak::row_matrix<float> y(heldout.rows(), cfg.model_dim);
  for (std::int64_t t = 0; t < heldout.rows(); ++t)
    mla.forward(
        ak::matrix_view<const float>(heldout.data() + t * cfg.model_dim, {1, cfg.model_dim}),
        std::span(pos).subspan(static_cast<std::size_t>(t), 1), cache,
        ak::matrix_view<float>(y.data() + t * cfg.model_dim, {1, cfg.model_dim}), pool,
        ak::mla_path::absorbed);
  std::printf(
      "\ndecoded %lld tokens with the TransMLA layer: latent cache %lld bytes/token (GQA float: "
      "%lld)\n",
      (long long)heldout.rows(), (long long)cache.bytes_per_token(),
      (long long)(2 * cfg.kv_heads * cfg.head_dim * 4));
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 1;
}
