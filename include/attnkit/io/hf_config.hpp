#pragma once
// Hugging Face config.json of the decoder families attnkit runs, in the transformers 4.x
// spelling (rope_theta, rope_scaling {type | rope_type, ...}, partial_rotary_factor at the top
// level) and the 5.x one (rope_parameters {rope_type, rope_theta, ...}), mapped onto attnkit's
// layer configs. Optional component (nlohmann/json).
//   llama, mistral:  GQA; attention_bias (Llama) on q/k/v/o; mlp_bias (Llama); sliding windows
//   qwen2:           GQA with q/k/v biases (o_proj none)
//   qwen3:           GQA with QK-norm (per-head RMSNorm of q and k before RoPE)
//   deepseek_v2/v3:  MLA (q-LoRA optional, latent RMSNorm); dense MLP layers only; YaRN with
//                    DeepSeek's mscale rule (rope factor on the rope parts, mscale(s,
//                    mscale_all_dim)^2 on the softmax scale)
// Anything else (another model_type, an activation other than SiLU, a MoE layer, a RoPE type
// attnkit lacks) is an attnkit::invalid_argument naming the file and the field.
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "../core/error.hpp"
#include "../core/rope.hpp"
#include "../layers/gqa_layer.hpp"
#include "../layers/mla_layer.hpp"

namespace attnkit::io {

/// The checkpoint families config.json's model_type names.
enum class model_family { llama, mistral, qwen2, qwen3, deepseek_v2, deepseek_v3 };

/// model_type as config.json spells it.
inline const char* to_string(model_family f) {
  constexpr const char* names[] = {"llama", "mistral", "qwen2", "qwen3", "deepseek_v2", "deepseek_v3"};
  return names[static_cast<int>(f)];
}

/// What a dense decoder needs to know about a checkpoint.
struct model_config {
  model_family family = model_family::llama;  ///< from config.json's model_type
  std::int64_t vocab_size = 0;                ///< V: rows of the embedding and lm_head
  std::int64_t hidden_size = 0;               ///< D
  std::int64_t intermediate_size = 0;         ///< the SwiGLU MLP's width
  std::int64_t layers = 0;                    ///< decoder layers
  std::int64_t max_position_embeddings = 0;   ///< as the checkpoint states it
  float rms_eps = 1e-6f;                      ///< every RMSNorm's epsilon
  bool tie_word_embeddings = false;           ///< lm_head is the embedding
  bool mlp_bias = false;                      ///< the MLP projections have biases
  /// GQA families: q/k/v biases, o_proj bias, QK-norm. MLA: biases of q_a/kv_a/o (attention_bias).
  bool qkv_bias = false;
  bool o_bias = false;   ///< o_proj has a bias
  bool qk_norm = false;  ///< per-head RMSNorm of q and k (Qwen3)
  /// One attention config per layer (GQA families: windows may differ per layer).
  std::vector<gqa_config> gqa;
  std::vector<mla_config> mla;  ///< one per layer for MLA families (then gqa is empty)
  /// A checkpoint written by attnkit-convert in its own format (config.json's "attnkit" block):
  /// MLA layers of any layout the library runs, optional tensors present or not (biases, the
  /// latent norm, q/k rope norms) as the conversion made them.
  bool attnkit_format = false;
  bool is_mla() const { return !mla.empty(); }  ///< the layers are MLA (DeepSeek families)
};

/// rope_config and mla_config as JSON (the "attnkit" block of a converted checkpoint).
/// A rope_config as the JSON attnkit-convert writes into config.json's "attnkit" block.
inline nlohmann::json to_json(const rope_config& r) {
  const auto& s = r.scaling;
  nlohmann::json j = {{"theta", r.theta},
                      {"layout", to_string(r.layout)},
                      {"rotary_dim", r.rotary_dim},
                      {"frequency_dim", r.frequency_dim},
                      {"frequency_index", r.frequency_index},
                      {"scaling",
                       {{"type", to_string(s.type)},
                        {"factor", s.factor},
                        {"original_context", s.original_context},
                        {"beta_fast", s.beta_fast},
                        {"beta_slow", s.beta_slow},
                        {"truncate", s.truncate},
                        {"mscale", s.mscale},
                        {"mscale_all_dim", s.mscale_all_dim},
                        {"low_freq_factor", s.low_freq_factor},
                        {"high_freq_factor", s.high_freq_factor}}}};
  if (s.attention_factor) j["scaling"]["attention_factor"] = *s.attention_factor;
  return j;
}
/// An mla_config as the JSON attnkit-convert writes into config.json's "attnkit" block.
inline nlohmann::json to_json(const mla_config& c) {
  nlohmann::json j = {{"model_dim", c.model_dim}, {"heads", c.heads},         {"q_lora_rank", c.q_lora_rank},
                      {"latent_dim", c.latent_dim}, {"nope_dim", c.nope_dim},   {"rope_dim", c.rope_dim},
                      {"v_head_dim", c.v_head_dim}, {"rope_heads", c.rope_heads}, {"rope", to_json(c.rope)},
                      {"rms_eps", c.rms_eps},       {"mscale", c.mscale}};
  if (c.scale) j["scale"] = *c.scale;
  if (c.window) j["window"] = *c.window;
  return j;
}

namespace detail {

using ::attnkit::detail::require;
using ::attnkit::detail::throw_invalid;

/// Reads config fields, naming the file in every error.
struct config_reader {
  const nlohmann::json& j;
  std::string source;

  bool has(const char* key) const { return j.contains(key) && !j[key].is_null(); }
  template <class T>
  T get(const char* key) const {
    require(has(key), "config '", source, "': required field '", key, "' is missing");
    return as<T>(j[key], key);
  }
  template <class T>
  T get(const char* key, T fallback) const {
    return has(key) ? as<T>(j[key], key) : fallback;
  }
  template <class T>
  T as(const nlohmann::json& v, const char* key) const {
    if constexpr (std::is_same_v<T, bool>) {
      require(v.is_boolean(), "config '", source, "': field '", key, "' must be a boolean, got ", v.dump());
    } else if constexpr (std::is_integral_v<T>) {
      require(v.is_number_integer(), "config '", source, "': field '", key,
              "' must be an integer, got ", v.dump());
    } else if constexpr (std::is_floating_point_v<T>) {
      require(v.is_number(), "config '", source, "': field '", key, "' must be a number, got ", v.dump());
    } else {
      require(v.is_string(), "config '", source, "': field '", key, "' must be a string, got ", v.dump());
    }
    return v.get<T>();
  }
  std::int64_t positive(const char* key) const {
    const auto v = get<std::int64_t>(key);
    require(v > 0, "config '", source, "': field '", key, "' must be > 0, got ", v);
    return v;
  }
};

/// rope_config of a head of `head_dim` from either spelling.
inline rope_config parse_rope(const config_reader& c, std::int64_t head_dim, rope_layout layout) {
  rope_config r;
  r.layout = layout;
  const nlohmann::json empty = nlohmann::json::object();
  const nlohmann::json* params = &empty;
  if (c.has("rope_parameters")) params = &c.j["rope_parameters"];       // 5.x
  else if (c.has("rope_scaling")) params = &c.j["rope_scaling"];        // 4.x
  require(params->is_object(), "config '", c.source, "': rope parameters must be an object, got ",
          params->dump());
  const config_reader p{*params, c.source + " (rope parameters)"};
  r.theta = p.get<double>("rope_theta", c.get<double>("rope_theta", 10000.0));
  const double partial = p.get<double>("partial_rotary_factor", c.get<double>("partial_rotary_factor", 1.0));
  require(partial > 0 && partial <= 1, "config '", c.source, "': partial_rotary_factor must be in (0, 1], got ",
          partial);
  r.rotary_dim = static_cast<std::int64_t>(static_cast<double>(head_dim) * partial);
  const std::string type = p.get<std::string>("rope_type", p.get<std::string>("type", "default"));
  auto& s = r.scaling;
  const std::int64_t max_pos = c.get<std::int64_t>("max_position_embeddings", 0);
  if (type == "default") return r;
  if (type == "linear") {
    s.type = rope_scaling_type::linear;
    s.factor = p.get<double>("factor");
  } else if (type == "dynamic") {
    s.type = rope_scaling_type::dynamic_ntk;
    s.factor = p.get<double>("factor");
    s.original_context = max_pos;  // transformers grows past max_position_embeddings
  } else if (type == "yarn") {
    s.type = rope_scaling_type::yarn;
    // transformers: a top-level original_max_position_embeddings wins over the rope dict's.
    s.original_context = c.get<std::int64_t>(
        "original_max_position_embeddings", p.get<std::int64_t>("original_max_position_embeddings", max_pos));
    s.factor = p.has("factor") ? p.get<double>("factor")
                               : static_cast<double>(max_pos) / static_cast<double>(s.original_context);
    if (p.has("attention_factor")) s.attention_factor = p.get<double>("attention_factor");
    s.beta_fast = p.get<double>("beta_fast", 32.0);
    s.beta_slow = p.get<double>("beta_slow", 1.0);
    s.mscale = p.get<double>("mscale", 0.0);
    s.mscale_all_dim = p.get<double>("mscale_all_dim", 0.0);
    s.truncate = p.get<bool>("truncate", true);
  } else if (type == "llama3") {
    s.type = rope_scaling_type::llama3;
    s.factor = p.get<double>("factor");
    s.low_freq_factor = p.get<double>("low_freq_factor");
    s.high_freq_factor = p.get<double>("high_freq_factor");
    s.original_context = p.get<std::int64_t>("original_max_position_embeddings");
  } else {
    throw_invalid("config '", c.source, "': rope type '", type,
                  "' is not supported (default, linear, dynamic, yarn, llama3 are)");
  }
  try {
    (void)rope(r, head_dim);  // validates the scaling now
  } catch (const invalid_argument& e) {
    throw_invalid("config '", c.source, "': ", std::string(e.what()).substr(std::string("attnkit: ").size()));
  }
  return r;
}

/// The sliding window of layer i, if any (layer_types, else the family's rule).
inline std::optional<std::int64_t> window_of(const config_reader& c, model_family f, std::int64_t i) {
  if (!c.has("sliding_window")) return std::nullopt;
  const auto w = c.get<std::int64_t>("sliding_window");
  require(w >= 1, "config '", c.source, "': sliding_window must be >= 1, got ", w);
  if (c.has("layer_types")) {
    const auto& lt = c.j["layer_types"];
    require(lt.is_array() && lt.size() > static_cast<std::size_t>(i) && lt[i].is_string(),
            "config '", c.source, "': layer_types must list a type for every layer");
    return lt[i].get<std::string>() == "sliding_attention" ? std::optional(w) : std::nullopt;
  }
  if (f == model_family::mistral) return w;
  if (f == model_family::qwen2 || f == model_family::qwen3)
    return c.get<bool>("use_sliding_window", false) && i >= c.get<std::int64_t>("max_window_layers", 0)
               ? std::optional(w)
               : std::nullopt;
  return std::nullopt;
}

inline rope_config rope_from_json(const config_reader& c) {
  rope_config r;
  r.theta = c.get<double>("theta");
  const auto layout = c.get<std::string>("layout");
  require(layout == "half_split" || layout == "interleaved", "config '", c.source,
          "': rope layout must be half_split or interleaved, got '", layout, "'");
  r.layout = layout == "half_split" ? rope_layout::half_split : rope_layout::interleaved;
  r.rotary_dim = c.get<std::int64_t>("rotary_dim", 0);
  r.frequency_dim = c.get<std::int64_t>("frequency_dim", 0);
  if (c.has("frequency_index")) {
    try {
      r.frequency_index = c.j["frequency_index"].get<std::vector<std::vector<std::int64_t>>>();
    } catch (const nlohmann::json::exception&) {
      throw_invalid("config '", c.source, "': frequency_index must be a list of integer lists");
    }
  }
  if (c.has("scaling")) {
    const config_reader s{c.j["scaling"], c.source};
    const auto type = s.get<std::string>("type", "none");
    bool known = false;
    for (auto t : {rope_scaling_type::none, rope_scaling_type::linear, rope_scaling_type::dynamic_ntk,
                   rope_scaling_type::yarn, rope_scaling_type::llama3})
      if (type == to_string(t)) r.scaling.type = t, known = true;
    require(known, "config '", c.source, "': unknown rope scaling type '", type, "'");
    auto& o = r.scaling;
    o.factor = s.get<double>("factor", 1.0);
    o.original_context = s.get<std::int64_t>("original_context", 0);
    o.beta_fast = s.get<double>("beta_fast", 32.0);
    o.beta_slow = s.get<double>("beta_slow", 1.0);
    o.truncate = s.get<bool>("truncate", true);
    if (s.has("attention_factor")) o.attention_factor = s.get<double>("attention_factor");
    o.mscale = s.get<double>("mscale", 0.0);
    o.mscale_all_dim = s.get<double>("mscale_all_dim", 0.0);
    o.low_freq_factor = s.get<double>("low_freq_factor", 1.0);
    o.high_freq_factor = s.get<double>("high_freq_factor", 4.0);
  }
  return r;
}

inline mla_config mla_from_json(const config_reader& c) {
  mla_config m;
  m.model_dim = c.positive("model_dim");
  m.heads = c.positive("heads");
  m.q_lora_rank = c.get<std::int64_t>("q_lora_rank", 0);
  m.latent_dim = c.get<std::int64_t>("latent_dim");
  m.nope_dim = c.get<std::int64_t>("nope_dim");
  m.rope_dim = c.get<std::int64_t>("rope_dim");
  m.v_head_dim = c.positive("v_head_dim");
  m.rope_heads = c.get<std::int64_t>("rope_heads", 1);
  require(c.has("rope"), "config '", c.source, "': an attnkit layer needs a 'rope' object");
  m.rope = rope_from_json(config_reader{c.j["rope"], c.source});
  m.rms_eps = static_cast<float>(c.get<double>("rms_eps", 1e-6));
  m.mscale = static_cast<float>(c.get<double>("mscale", 1.0));
  if (c.has("scale")) m.scale = static_cast<float>(c.get<double>("scale"));
  if (c.has("window")) m.window = c.get<std::int64_t>("window");
  return m;
}

}  // namespace detail

/// Parses a config.json document; `source` names it in errors.
inline model_config parse_model_config(const nlohmann::json& j, const std::string& source) {
  using detail::require;
  require(j.is_object(), "config '", source, "' is not a JSON object");
  const detail::config_reader c{j, source};
  const std::string type = c.get<std::string>("model_type");
  model_config m;
  if (type == "llama") m.family = model_family::llama;
  else if (type == "mistral") m.family = model_family::mistral;
  else if (type == "qwen2") m.family = model_family::qwen2;
  else if (type == "qwen3") m.family = model_family::qwen3;
  else if (type == "deepseek_v2") m.family = model_family::deepseek_v2;
  else if (type == "deepseek_v3") m.family = model_family::deepseek_v3;
  else
    detail::throw_invalid("config '", source, "': model_type '", type,
                          "' is not supported (llama, mistral, qwen2, qwen3, deepseek_v2, deepseek_v3 are)");
  const std::string act = c.get<std::string>("hidden_act", "silu");
  require(act == "silu", "config '", source, "': hidden_act '", act, "' is not supported (silu is)");
  m.vocab_size = c.positive("vocab_size");
  m.hidden_size = c.positive("hidden_size");
  m.intermediate_size = c.positive("intermediate_size");
  m.layers = c.positive("num_hidden_layers");
  m.max_position_embeddings = c.get<std::int64_t>("max_position_embeddings", 0);
  m.rms_eps = static_cast<float>(c.get<double>("rms_norm_eps", 1e-6));
  m.tie_word_embeddings = c.get<bool>("tie_word_embeddings", false);
  m.mlp_bias = c.get<bool>("mlp_bias", false);
  const std::int64_t heads = c.positive("num_attention_heads");
  const bool attention_bias = c.get<bool>("attention_bias", false);

  if (c.has("attnkit")) {  // converted by attnkit-convert: MLA layers described in full
    const detail::config_reader a{j["attnkit"], source + " (attnkit)"};
    require(a.get<std::string>("attention") == "mla", "config '", source,
            "': attnkit.attention must be 'mla'");
    require(a.has("layers") && a.j["layers"].is_array() &&
                a.j["layers"].size() == static_cast<std::size_t>(m.layers),
            "config '", source, "': attnkit.layers must list one layer per hidden layer (", m.layers, ")");
    for (std::size_t i = 0; i < a.j["layers"].size(); ++i) {
      const detail::config_reader l{a.j["layers"][i], source + " (attnkit layer " + std::to_string(i) + ")"};
      m.mla.push_back(detail::mla_from_json(l));  // validated when the layer is built
    }
    m.attnkit_format = true;
    return m;
  }

  if (m.family == model_family::deepseek_v2 || m.family == model_family::deepseek_v3) {
    // Dense MLP layers only: MoE layers (index >= first_k_dense_replace, every moe_layer_freq)
    // need expert routing that this runner does not have.
    if (c.has("n_routed_experts")) {
      const auto dense = c.get<std::int64_t>("first_k_dense_replace", 0);
      require(dense >= m.layers, "config '", source, "': layers ", dense, "..", m.layers - 1,
              " are mixture-of-experts (first_k_dense_replace=", dense,
              "); only dense MLP layers are supported (first_k_dense_replace >= num_hidden_layers)");
    }
    m.qkv_bias = m.o_bias = attention_bias;
    mla_config a;
    a.model_dim = m.hidden_size;
    a.heads = heads;
    a.q_lora_rank = c.get<std::int64_t>("q_lora_rank", 0);
    a.latent_dim = c.positive("kv_lora_rank");
    a.nope_dim = c.positive("qk_nope_head_dim");
    a.rope_dim = c.positive("qk_rope_head_dim");
    a.v_head_dim = c.positive("v_head_dim");
    a.rms_eps = 1e-6f;  // transformers builds q_a_layernorm and kv_a_layernorm with the default eps
    const bool interleave = m.family == model_family::deepseek_v2 || c.get<bool>("rope_interleave", true);
    a.rope = detail::parse_rope(c, a.rope_dim, interleave ? rope_layout::interleaved : rope_layout::half_split);
    a.mscale = static_cast<float>(std::sqrt(deepseek_softmax_mscale(a.rope.scaling)));
    m.mla.assign(static_cast<std::size_t>(m.layers), a);
    return m;
  }

  gqa_config g;
  g.model_dim = m.hidden_size;
  g.heads = heads;
  g.kv_heads = c.get<std::int64_t>("num_key_value_heads", heads);
  require(g.kv_heads > 0 && heads % g.kv_heads == 0, "config '", source, "': num_attention_heads=",
          heads, " must be a multiple of num_key_value_heads=", g.kv_heads);
  g.head_dim = c.get<std::int64_t>("head_dim", m.hidden_size / heads);
  require(g.head_dim > 0, "config '", source, "': head_dim must be > 0, got ", g.head_dim);
  g.rms_eps = m.rms_eps;
  g.rope = detail::parse_rope(c, g.head_dim, rope_layout::half_split);
  switch (m.family) {
    case model_family::qwen2: m.qkv_bias = true; break;
    case model_family::llama:
    case model_family::qwen3: m.qkv_bias = m.o_bias = attention_bias; break;
    default: break;
  }
  m.qk_norm = m.family == model_family::qwen3;
  for (std::int64_t i = 0; i < m.layers; ++i) {
    g.window = detail::window_of(c, m.family, i);
    m.gqa.push_back(g);
  }
  return m;
}

/// Reads and parses dir/config.json (or the file itself).
inline model_config read_model_config(const std::filesystem::path& path) {
  const auto file = std::filesystem::is_directory(path) ? path / "config.json" : path;
  std::ifstream in(file);
  ::attnkit::detail::require(in.good(), "config '", file.string(), "' cannot be opened");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    ::attnkit::detail::throw_invalid("config '", file.string(), "' is not valid JSON (", e.what(), ")");
  }
  return parse_model_config(j, file.string());
}

}  // namespace attnkit::io
