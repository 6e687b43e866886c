// Writes a Llama-shaped checkpoint with random bf16 attention weights (q/k/v/o, N(0, 0.02)) and
// no other tensors: the input of the model-scale conversion benchmark (scripts/bench_convert_model.sh),
// which converts it with Gaussian calibration inputs.
//   make_synthetic_checkpoint OUT_DIR LAYERS [D H H_KV HEAD_DIM]   (default: Llama-3-8B, 32 layers)
#include <attnkit/io/safetensors.hpp>

#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: make_synthetic_checkpoint OUT_DIR LAYERS [D H H_KV HEAD_DIM]\n");
    return 2;
  }
  const std::string out = argv[1];
  const long layers = std::stol(argv[2]);
  const long d = argc > 3 ? std::stol(argv[3]) : 4096, h = argc > 4 ? std::stol(argv[4]) : 32,
             hkv = argc > 5 ? std::stol(argv[5]) : 8, dh = argc > 6 ? std::stol(argv[6]) : 128;
  attnkit::io::checkpoint_writer w(out, 1'000'000'000ull);
  std::mt19937_64 rng(5);
  std::normal_distribution<float> normal(0.f, 0.02f);
  std::vector<float> buf;
  auto add = [&](const std::string& name, long rows, long cols) {
    buf.resize(static_cast<std::size_t>(rows * cols));
    for (auto& x : buf) x = normal(rng);
    w.add(name, buf, {rows, cols}, attnkit::io::dtype::bf16);
  };
  for (long l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
    add(p + "q_proj.weight", h * dh, d);
    add(p + "k_proj.weight", hkv * dh, d);
    add(p + "v_proj.weight", hkv * dh, d);
    add(p + "o_proj.weight", d, h * dh);
    std::fprintf(stderr, "\r  layer %ld/%ld", l + 1, layers);
  }
  w.finish();
  std::ofstream(out + "/config.json")
      << "{\"model_type\": \"llama\", \"vocab_size\": 128256, \"hidden_size\": " << d
      << ", \"intermediate_size\": 14336, \"num_hidden_layers\": " << layers << ", \"num_attention_heads\": " << h
      << ", \"num_key_value_heads\": " << hkv << ", \"head_dim\": " << dh
      << ", \"max_position_embeddings\": 131072, \"rms_norm_eps\": 1e-05, \"rope_parameters\": {\"rope_type\": "
         "\"llama3\", \"rope_theta\": 500000.0, \"factor\": 8.0, \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, "
         "\"original_max_position_embeddings\": 8192}}\n";
  std::fprintf(stderr, "\nwrote %s\n", out.c_str());
}
