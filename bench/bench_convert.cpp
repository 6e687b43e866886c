// Conversion cost and what it buys, on the Llama-3-8B layer geometry (D 4096, H 32, H_kv 8, d 128):
//   BM_transmla_conversion: gqa_to_mla_transmla with 32768 calibration tokens, TransMLA's
//     defaults (qk_mqa_dim 64, kv_lora_rank 512) and F = 4 (what TransMLA ships for Llama-3-8B),
//     no held-out measurement (the conversion alone). Target: < 10 s on 2 threads.
//   BM_mha2mla_conversion: gqa_to_mla_mha2mla to the same 576 elements per token (2-norm on 8 of
//     128 rotary dims per KV head = 64 rope dims, joint SVD to d_c 512).
//   Decode of the converted layer (attend_latent, H 32 over 512 + 64) vs the original GQA decode
//     at T = 16k, same run, with the machine's roofline.
// The synthetic layer and activations (convert/synthetic.hpp) are made once, outside the timing.
#include <attnkit/attnkit.hpp>

#include "gqa_decode.hpp"
#include "mla_decode.hpp"
#include "roofline.hpp"

namespace {
namespace ak = attnkit;
namespace cv = attnkit::convert;
using namespace attnkit::bench;

struct llama_data {
  ak::gqa_config cfg{
      .model_dim = 4096, .heads = 32, .kv_heads = 8, .head_dim = 128, .rope = {.theta = 500000.0}};
  cv::synthetic::layer layer = cv::synthetic::make_layer(cfg, 1, 256.0);
  ak::row_matrix<float> calib;
  llama_data() {
    std::mt19937_64 rng(2);
    calib = cv::synthetic::activations(rng, 32768, cfg.model_dim, 512, 64.0);
  }
};
const llama_data& data() {
  static const llama_data d;
  return d;
}

void report(benchmark::State& state, const cv::conversion_result& r) {
  for (std::size_t i = 0; i < r.steps.size(); ++i)
    state.counters["step" + std::to_string(i + 1) + "_s"] = r.steps[i].seconds;
  state.counters["kv_elements"] = static_cast<double>(r.steps.back().kv_elements_after);
  state.counters["calibration_tokens"] = static_cast<double>(data().calib.rows());
  state.SetLabel(r.steps.back().step);
}

void BM_transmla_conversion(benchmark::State& state) {
  const auto& d = data();
  ak::thread_pool pool(static_cast<int>(state.range(0)));
  const ak::row_matrix<float> none(0, d.cfg.model_dim);
  for (auto _ : state) {
    const auto r =
        cv::gqa_to_mla_transmla(d.cfg, d.layer.weights(), ak::view_of(d.calib), ak::view_of(none),
                                {.qk_mqa_dim = 64, .kv_lora_rank = 512, .freqfold = 4}, pool);
    report(state, r);
  }
}

void BM_mha2mla_conversion(benchmark::State& state) {
  const auto& d = data();
  ak::thread_pool pool(static_cast<int>(state.range(0)));
  const ak::row_matrix<float> none(0, d.cfg.model_dim);
  for (auto _ : state) {
    const auto r = cv::gqa_to_mla_mha2mla(
        d.cfg, d.layer.weights(), ak::view_of(d.calib), ak::view_of(none),
        {.rope_dim = 8, .selection = cv::rope_selection::two_norm, .latent_dim = 512}, pool);
    report(state, r);
  }
}

}  // namespace

BENCHMARK(BM_transmla_conversion)
    ->Arg(2)
    ->ArgNames({"threads"})
    ->Iterations(1)
    ->UseRealTime()
    ->Unit(benchmark::kSecond);
BENCHMARK(BM_mha2mla_conversion)
    ->Arg(2)
    ->ArgNames({"threads"})
    ->Iterations(1)
    ->UseRealTime()
    ->Unit(benchmark::kSecond);
BENCHMARK_TEMPLATE(BM_mla_absorbed_decode, float)
    ->Args({32, 16384, 2})
    ->ArgNames({"H", "T", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_gqa_decode, float)
    ->Args({16384, 2})
    ->ArgNames({"T", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

BENCHMARK_MAIN();
