// RoPE scaling against transformers: for every scaling type (default, linear, dynamic NTK below
// and past its context, YaRN with Qwen's, explicit and DeepSeek's attention factors and without
// truncation, llama3), the config parsed as a checkpoint's config.json gives transformers'
// inv_freq, attention scaling and cos/sin (tests/data/rope_reference.json, transformers 5.17,
// scripts/hf_reference.py).
#include <attnkit/io/hf_config.hpp>

#include <cmath>
#include <fstream>
#include <numbers>
#include <string>
#include <vector>

#include "catch_compat.hpp"
#include "checkpoint_util.hpp"

namespace ak = attnkit;
namespace io = attnkit::io;

TEST_CASE("rope scaling: every type equals transformers' frequencies, factor and cos/sin") {
  std::ifstream in(source_path("tests/data/rope_reference.json"));
  const auto doc = nlohmann::json::parse(in);
  REQUIRE(doc["cases"].size() == 9);
  for (const auto& c : doc["cases"]) {
    const std::string name = c["name"].get<std::string>();
    CAPTURE(name);
    // The case as a config.json (fields a test model needs added).
    nlohmann::json cfg = {{"model_type", c["model_type"]}, {"vocab_size", 8}, {"intermediate_size", 8},
                          {"num_hidden_layers", 1}, {"hidden_size", 128}, {"num_attention_heads", 2},
                          {"max_position_embeddings", c["max_position_embeddings"]},
                          {"rope_parameters", c["rope_parameters"]}};
    if (c["model_type"] == "deepseek_v3")
      cfg.update({{"kv_lora_rank", 64}, {"qk_rope_head_dim", 64}, {"qk_nope_head_dim", 64}, {"v_head_dim", 64}});
    const auto m = io::parse_model_config(cfg, name);
    const ak::rope_config rc = m.is_mla() ? m.mla[0].rope : m.gqa[0].rope;
    const std::int64_t dim = c["dim"].get<std::int64_t>(), pairs = dim / 2;
    ak::rope r(rc, dim);
    r.fit_length(c["sequence_length"].get<std::int64_t>());

    // transformers forms inv_freq in float32 (base ** (2i/n) and the scalings): its relative
    // error is a few units of round-off times ln(theta) (the exponent's rounding).
    const double u = 0x1p-24, rel = u * (8 + 2 * std::log(rc.theta));
    for (std::int64_t p = 0; p < pairs; ++p) {
      const double want = c["inv_freq"][static_cast<std::size_t>(p)].get<double>();
      CAPTURE(p, want, r.inv_freq(p));
      CHECK(std::abs(r.inv_freq(p) - want) <= rel * want);
    }
    const double m_want = c["attention_scaling"].get<double>();
    CHECK(r.attention_factor() == Approx(m_want).epsilon(1e-12));

    // Rotating the unit vector of pair p's first coordinate gives (m cos, m sin) of its angle
    // (half-split: coordinates p and p + n/2; interleaved: 2p and 2p + 1).
    for (std::size_t k = 0; k < c["positions"].size(); ++k) {
      const std::int64_t pos = c["positions"][k].get<std::int64_t>();
      for (std::int64_t p = 0; p < pairs; ++p) {
        std::vector<float> x(static_cast<std::size_t>(dim), 0.f);
        const bool half = rc.layout == ak::rope_layout::half_split;
        const std::size_t i = static_cast<std::size_t>(half ? p : 2 * p), j = static_cast<std::size_t>(half ? p + pairs : 2 * p + 1);
        x[i] = 1.f;
        r.apply(x.data(), pos);
        // transformers' angle pos * inv_freq is float32: its error grows with the angle.
        const double angle = static_cast<double>(pos) * r.inv_freq(p);
        const double tol = m_want * (angle * (rel + 2 * u) + 4 * u);
        CAPTURE(pos, p, tol);
        CHECK(std::abs(x[i] - c["cos"][k][static_cast<std::size_t>(p)].get<double>()) <= tol);
        CHECK(std::abs(x[j] - c["sin"][k][static_cast<std::size_t>(p)].get<double>()) <= tol);
      }
    }
  }
}

TEST_CASE("rope scaling: dynamic NTK grows and resets as transformers' dynamic_rope_update") {
  const ak::rope_config cfg{.theta = 10000.0,
                            .scaling = {.type = ak::rope_scaling_type::dynamic_ntk, .factor = 2.0, .original_context = 64}};
  ak::rope r(cfg, 32);
  const double base = r.inv_freq(3);
  CHECK(base == Approx(std::pow(10000.0, -6.0 / 32)).epsilon(1e-14));
  r.fit_length(64);  // within the original context: unchanged
  CHECK(r.inv_freq(3) == base);
  r.fit_length(200);
  const double theta200 = 10000.0 * std::pow(2.0 * 200 / 64 - 1.0, 32.0 / 30.0);
  CHECK(r.inv_freq(3) == Approx(std::pow(theta200, -6.0 / 32)).epsilon(1e-14));
  r.fit_length(100);  // shorter but past the context: keeps the longest seen
  CHECK(r.inv_freq(3) == Approx(std::pow(theta200, -6.0 / 32)).epsilon(1e-14));
  r.fit_length(10);  // back inside the context: the unscaled frequencies
  CHECK(r.inv_freq(3) == base);
  const std::vector<std::int64_t> positions{3, 150, 7};
  r.fit_positions(positions);
  const double theta151 = 10000.0 * std::pow(2.0 * 151 / 64 - 1.0, 32.0 / 30.0);
  CHECK(r.inv_freq(3) == Approx(std::pow(theta151, -6.0 / 32)).epsilon(1e-14));
}

TEST_CASE("rope scaling: invalid parameters are rejected naming the field") {
  using T = ak::rope_scaling_type;
  auto make = [](ak::rope_scaling s) { return ak::rope(ak::rope_config{.scaling = s}, 64); };
  CHECK_THROWS_WITH(make({.type = T::linear, .factor = 0.0}), contains("factor must be finite and > 0"));
  CHECK_THROWS_WITH(make({.type = T::yarn, .factor = 4.0}), contains("original_context must be > 0"));
  CHECK_THROWS_WITH(make({.type = T::yarn, .factor = 4.0, .original_context = 16, .beta_fast = -1}),
                    contains("beta_fast and beta_slow"));
  CHECK_THROWS_WITH(make({.type = T::llama3, .factor = 8.0, .original_context = 16, .low_freq_factor = 4,
                          .high_freq_factor = 1}),
                    contains("low_freq_factor < high_freq_factor"));
  CHECK_THROWS_WITH(make({.type = T::yarn, .factor = 4.0, .original_context = 16, .attention_factor = -2.0}),
                    contains("attention_factor must be finite and > 0"));
  CHECK_THROWS_WITH(ak::rope(ak::rope_config{.scaling = {.type = T::dynamic_ntk, .factor = 2, .original_context = 8}}, 2),
                    contains("frequency_dim > 2"));
}
