#pragma once
// decoder: the minimal dense decoder around attnkit's attention layers, loaded from a
// checkpoint (io/safetensors.hpp + io/hf_config.hpp; optional component, needs nlohmann/json):
//   h = embed(tokens)
//   per layer: h += attention(RMSNorm(h)); h += down(silu(gate(n)) * up(n)), n = RMSNorm(h)
//   logits = lm_head(RMSNorm(h))
// with the attention of each layer a gqa_layer (Llama, Mistral, Qwen2, Qwen3) or an mla_layer
// (DeepSeek-V2/V3) over a cache of float, bf16 or f16 (decoder_options). Weights stay in the mapped
// checkpoint where they are f32 (zero copy) and are converted to float once otherwise. Not
// thread-safe: one decoder per thread of control (the executor parallelises inside each call).
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "../cache/dense_cache.hpp"
#include "../cache/latent_cache.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/linear.hpp"
#include "../core/rmsnorm.hpp"
#include "../core/view.hpp"
#include "../io/hf_config.hpp"
#include "../io/safetensors.hpp"
#include "../layers/gqa_layer.hpp"
#include "../layers/mla_layer.hpp"

namespace attnkit::model {

/// Where a call's time went: the attention layers (projections, RoPE, cache, kernel) and the
/// rest (embedding, norms, MLPs, lm_head). Accumulates over calls.
struct time_split {
  double attention_s = 0;  ///< seconds in the attention layers
  double other_s = 0;      ///< seconds in everything else
};

/// The storage of the decoder's KV caches: float, or bf16 / f16 (half the bytes; each cached value
/// rounded once, when appended: docs/integration.md, "Storage types and their accuracy").
enum class cache_storage { f32, bf16, f16 };

/// How the decoder's attention keeps and reads its past: the caches' storage and the arithmetic
/// of the products over bf16 caches (core/options.hpp; the layers' configs take it).
struct decoder_options {
  cache_storage storage = cache_storage::f32;  ///< what make_caches makes
  product_math products = product_math::f32;   ///< every attention layer's products
};

/// A dense decoder-only model (embedding, per layer RMSNorm + attention of any variant the
/// checkpoint holds + RMSNorm + SwiGLU MLP, final norm, lm_head) loaded from a Hugging Face
/// checkpoint; forward, next-token NLL and per-layer hooks for conversion calibration.
class decoder {
 public:
  /// One layer's cache: dense (GQA families) or latent (MLA), of any storage.
  using cache = std::variant<dense_cache<float>, latent_cache<float>, dense_cache<bf16>,
                             latent_cache<bf16>, dense_cache<half>, latent_cache<half>>;
  /// Called with each layer's attention input (the normed hidden state) [T, D].
  using observer = std::function<void(std::int64_t layer, matrix_view<const float> x)>;

  /// The weight named `name` (transformers' names) with the given shape; when absent, throws,
  /// or returns an empty tensor if `optional`.
  using tensor_source = std::function<io::float_tensor(
      const std::string& name, const std::vector<std::int64_t>& shape, bool optional)>;

  /// A checkpoint folder: config.json + model.safetensors or a sharded index.
  static decoder load(const std::filesystem::path& dir, const decoder_options& options = {}) {
    auto ckpt = std::make_shared<io::checkpoint>(dir);
    return decoder(
        io::read_model_config(dir),
        [ckpt](const std::string& name, const std::vector<std::int64_t>& shape, bool optional) {
          return optional ? ckpt->load_optional(name, shape) : ckpt->load(name, shape);
        },
        options);
  }

  /// Weights from any source (a checkpoint, a conversion in memory, synthetic ones). The
  /// decoder keeps the source, and with it whatever borrowed tensors point into.
  decoder(io::model_config cfg, tensor_source source, const decoder_options& options = {})
      : cfg_(std::move(cfg)), source_(std::move(source)), options_(options) {
    const std::int64_t d = cfg_.hidden_size, v = cfg_.vocab_size, f = cfg_.intermediate_size;
    embed_ = keep("model.embed_tokens.weight", {v, d});
    final_norm_ = keep("model.norm.weight", {d});
    lm_head_ = cfg_.tie_word_embeddings ? -1 : keep("lm_head.weight", {v, d});
    for (std::int64_t i = 0; i < cfg_.layers; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      layer_weights w;
      w.input_norm = keep(p + "input_layernorm.weight", {d});
      w.post_norm = keep(p + "post_attention_layernorm.weight", {d});
      w.gate = keep(p + "mlp.gate_proj.weight", {f, d});
      w.up = keep(p + "mlp.up_proj.weight", {f, d});
      w.down = keep(p + "mlp.down_proj.weight", {d, f});
      if (cfg_.mlp_bias) {
        w.gate_b = keep(p + "mlp.gate_proj.bias", {f});
        w.up_b = keep(p + "mlp.up_proj.bias", {f});
        w.down_b = keep(p + "mlp.down_proj.bias", {d});
      }
      layers_.push_back(w);
      if (cfg_.is_mla())
        attention_.emplace_back(
            make_mla(p + "self_attn.", with_options(cfg_.mla[static_cast<std::size_t>(i)])));
      else
        attention_.emplace_back(
            make_gqa(p + "self_attn.", with_options(cfg_.gqa[static_cast<std::size_t>(i)])));
    }
  }

  const io::model_config& config() const { return cfg_; }  ///< what config.json said
  const decoder_options& options() const { return options_; }  ///< caches' storage, products

  /// One cache per layer of options().storage, for `capacity` tokens.
  std::vector<cache> make_caches(std::int64_t capacity) const {
    std::vector<cache> out;
    for (std::int64_t l = 0; l < cfg_.layers; ++l) out.push_back(make_cache(l, capacity));
    return out;
  }
  /// The cache of layer l alone (a caller running one layer at a time).
  cache make_cache(std::int64_t l, std::int64_t capacity) const {
    ::attnkit::detail::require(l >= 0 && l < cfg_.layers, "decoder::make_cache: layer ", l, " outside [0, ",
                               cfg_.layers, ")");
    return std::visit(
        [&](const auto& a) {
          switch (options_.storage) {
            case cache_storage::f32:
              return cache(a.template make_cache<float>(capacity));
            case cache_storage::bf16:
              return cache(a.template make_cache<bf16>(capacity));
            case cache_storage::f16:
              return cache(a.template make_cache<half>(capacity));
          }
          ::attnkit::detail::throw_invalid("decoder_options: storage ",
                                           static_cast<int>(options_.storage),
                                           " is none of f32, bf16, f16");
        },
        attention_[static_cast<std::size_t>(l)]);
  }
  /// KV-cache elements per token summed over the layers (what the cache holds).
  std::int64_t cache_elements_per_token() const {
    std::int64_t n = 0;
    for (const auto& c : cfg_.gqa) n += c.kv_heads * (c.head_dim + (c.v_head_dim ? c.v_head_dim : c.head_dim));
    for (const auto& c : cfg_.mla) n += c.latent_dim + c.rope_heads * c.rope_dim;
    return n;
  }

  /// Runs tokens [T] at positions [T] through the model, appending them to `caches` (one per
  /// layer, from make_caches). logits: [T, vocab] (every token) or [1, vocab] (the last only).
  template <class Exec = serial_executor>
  void forward(std::span<const std::int32_t> tokens, std::span<const std::int64_t> positions,
               std::vector<cache>& caches, matrix_view<float> logits, Exec&& exec = Exec{},
               const observer& observe = {}, time_split* time = nullptr) {
    using ::attnkit::detail::require;
    const std::int64_t t = static_cast<std::int64_t>(tokens.size()), d = cfg_.hidden_size,
                       v = cfg_.vocab_size;
    require(t > 0 && static_cast<std::int64_t>(positions.size()) == t, "decoder::forward: ", t,
            " tokens but ", positions.size(), " positions");
    require(static_cast<std::int64_t>(caches.size()) == cfg_.layers, "decoder::forward: ",
            caches.size(), " caches for ", cfg_.layers, " layers");
    require(logits.extent(1) == v && (logits.extent(0) == t || logits.extent(0) == 1),
            "decoder::forward: logits must be [T=", t, " or 1, vocab=", v, "], got [",
            logits.extent(0), ", ", logits.extent(1), "]");
    using clock = std::chrono::steady_clock;
    auto since = [](clock::time_point t0) { return std::chrono::duration<double>(clock::now() - t0).count(); };
    const auto t0 = clock::now();
    embed(tokens, h_);
    if (time) time->other_s += since(t0);
    for (std::int64_t l = 0; l < cfg_.layers; ++l)
      run_layer(l, positions, caches[static_cast<std::size_t>(l)], exec, observe, time);
    const auto t1 = clock::now();
    const std::int64_t rows = logits.extent(0), first = t - rows;
    n_.resize(rows, d);
    for (std::int64_t i = 0; i < rows; ++i) n_.row(i) = h_.row(first + i);
    norm(n_, tensor(final_norm_).span(), n_);
    auto lm = as_eigen(tensor(lm_head_ >= 0 ? lm_head_ : embed_).matrix(), "lm_head");
    auto out = as_eigen(logits, "decoder::forward: logits");
    ::attnkit::detail::linear(const_map(n_), lm, {}, out, exec);
    if (time) time->other_s += since(t1);
  }

  /// h [T, D] = the embeddings of tokens (checked against the vocabulary).
  void embed(std::span<const std::int32_t> tokens, row_matrix<float>& h) const {
    const std::int64_t t = static_cast<std::int64_t>(tokens.size()), d = cfg_.hidden_size;
    h.resize(t, d);
    const float* e = tensor(embed_).data();
    for (std::int64_t i = 0; i < t; ++i) {
      const auto tok = tokens[static_cast<std::size_t>(i)];
      ::attnkit::detail::require(tok >= 0 && tok < cfg_.vocab_size, "decoder: token ", i, " is ", tok,
                                 ", outside [0, vocab=", cfg_.vocab_size, ")");
      std::copy_n(e + static_cast<std::int64_t>(tok) * d, d, h.row(i).data());
    }
  }

  /// Runs layer l on the hidden states h [T, D] in place (h += attention(norm h), then the
  /// MLP), appending to that layer's cache; `observe` sees the attention input. What a caller
  /// that streams the model a layer at a time (a converter's calibration pass) needs.
  template <class Exec = serial_executor>
  void forward_layer(std::int64_t l, row_matrix<float>& h, std::span<const std::int64_t> positions, cache& c,
                     Exec&& exec = Exec{}, const observer& observe = {}, time_split* time = nullptr) {
    ::attnkit::detail::require(l >= 0 && l < cfg_.layers, "decoder::forward_layer: layer ", l,
                               " outside [0, ", cfg_.layers, ")");
    ::attnkit::detail::require(h.cols() == cfg_.hidden_size && static_cast<std::int64_t>(positions.size()) == h.rows(),
                               "decoder::forward_layer: h is [", h.rows(), ", ", h.cols(), "] for ",
                               positions.size(), " positions and D=", cfg_.hidden_size);
    h_.swap(h);
    run_layer(l, positions, c, exec, observe, time);
    h_.swap(h);
  }

  /// Sum of next-token negative log-likelihoods (nats) of one sequence and how many tokens it
  /// predicts (T - 1), its tokens fed through fresh caches in prefill chunks of `chunk` tokens
  /// (0: all at once).
  template <class Exec = serial_executor>
  std::pair<double, std::int64_t> nll(std::span<const std::int32_t> tokens, Exec&& exec = Exec{},
                                      std::int64_t chunk = 0, time_split* time = nullptr) {
    const std::int64_t t = static_cast<std::int64_t>(tokens.size()), v = cfg_.vocab_size;
    ::attnkit::detail::require(t >= 2, "decoder::nll: a sequence needs >= 2 tokens, got ", t);
    if (chunk <= 0) chunk = t;
    auto caches = make_caches(t);
    std::vector<std::int64_t> pos(static_cast<std::size_t>(t));
    for (std::int64_t i = 0; i < t; ++i) pos[static_cast<std::size_t>(i)] = i;
    row_matrix<float> logits;
    double sum = 0;
    for (std::int64_t c0 = 0; c0 < t; c0 += chunk) {
      const std::int64_t n = std::min(chunk, t - c0);
      logits.resize(n, v);
      forward(tokens.subspan(static_cast<std::size_t>(c0), static_cast<std::size_t>(n)),
              std::span<const std::int64_t>(pos).subspan(static_cast<std::size_t>(c0), static_cast<std::size_t>(n)),
              caches, matrix_view<float>(logits.data(), {n, v}), exec, {}, time);
      for (std::int64_t i = 0; i < n && c0 + i + 1 < t; ++i)
        sum += -log_softmax_at(logits.row(i), tokens[static_cast<std::size_t>(c0 + i + 1)]);
    }
    return {sum, t - 1};
  }

 private:
  struct layer_weights {
    std::int64_t input_norm = -1, post_norm = -1, gate = -1, up = -1, down = -1, gate_b = -1,
                 up_b = -1, down_b = -1;
  };
  using attention_layer = std::variant<gqa_layer, mla_layer>;

  /// Loads a tensor into the decoder's store; returns its index there.
  std::int64_t keep(const std::string& name, std::vector<std::int64_t> shape, bool optional = false) {
    auto loaded = source_(name, shape, optional);
    if (optional && loaded.empty()) return -1;
    tensors_.push_back(std::move(loaded));
    const auto& t = tensors_.back();
    ::attnkit::detail::require(t.shape() == shape, "decoder: tensor '", name, "' has shape ",
                               io::checkpoint::shape_string(t.shape()), " but ",
                               io::checkpoint::shape_string(shape), " was expected");
    return static_cast<std::int64_t>(tensors_.size()) - 1;
  }
  const io::float_tensor& tensor(std::int64_t i) const { return tensors_[static_cast<std::size_t>(i)]; }
  std::span<const float> span_or_empty(std::int64_t i) const {
    return i < 0 ? std::span<const float>{} : tensor(i).span();
  }
  matrix_view<const float> matrix_or_empty(std::int64_t i) const {
    return i < 0 ? matrix_view<const float>{} : tensor(i).matrix();
  }

  /// A layer's config (from config.json) with the decoder's products.
  template <class Config>
  Config with_options(Config c) const {
    c.products = options_.products;
    return c;
  }

  gqa_layer make_gqa(const std::string& p, const gqa_config& c) {
    const std::int64_t d = c.model_dim, h = c.heads, hkv = c.kv_heads, dq = c.head_dim,
                       dv = c.v_head_dim ? c.v_head_dim : c.head_dim;
    const std::int64_t q = keep(p + "q_proj.weight", {h * dq, d}), k = keep(p + "k_proj.weight", {hkv * dq, d}),
                       v = keep(p + "v_proj.weight", {hkv * dv, d}), o = keep(p + "o_proj.weight", {d, h * dv});
    std::int64_t qb = -1, kb = -1, vb = -1, ob = -1, qn = -1, kn = -1;
    if (cfg_.qkv_bias) {
      qb = keep(p + "q_proj.bias", {h * dq});
      kb = keep(p + "k_proj.bias", {hkv * dq});
      vb = keep(p + "v_proj.bias", {hkv * dv});
    }
    if (cfg_.o_bias) ob = keep(p + "o_proj.bias", {d});
    if (cfg_.qk_norm) {
      qn = keep(p + "q_norm.weight", {dq});
      kn = keep(p + "k_norm.weight", {dq});
    }
    return gqa_layer(c, {.q_proj = tensor(q).matrix(), .k_proj = tensor(k).matrix(),
                         .v_proj = tensor(v).matrix(), .o_proj = tensor(o).matrix(),
                         .q_proj_bias = span_or_empty(qb), .k_proj_bias = span_or_empty(kb),
                         .v_proj_bias = span_or_empty(vb), .o_proj_bias = span_or_empty(ob),
                         .q_norm = span_or_empty(qn), .k_norm = span_or_empty(kn)});
  }

  /// DeepSeek's tensors; a checkpoint in attnkit's format has exactly the optional ones its
  /// conversion made (biases, latent norm, q/k rope norms), a stock one those its config names.
  mla_layer make_mla(const std::string& p, const mla_config& c) {
    const std::int64_t d = c.model_dim, h = c.heads, dqk = c.nope_dim + c.rope_dim,
                       r = c.q_lora_rank, dc = c.latent_dim, kva = dc + c.rope_heads * c.rope_dim;
    const bool any = cfg_.attnkit_format;
    auto opt = [&](const std::string& name, std::vector<std::int64_t> shape, bool wanted) {
      return span_or_empty(any || wanted ? keep(p + name, std::move(shape), any) : -1);
    };
    mla_weights w;
    if (r > 0) {
      w.q_a_proj = tensor(keep(p + "q_a_proj.weight", {r, d})).matrix();
      w.q_a_layernorm = tensor(keep(p + "q_a_layernorm.weight", {r})).span();
      w.q_b_proj = tensor(keep(p + "q_b_proj.weight", {h * dqk, r})).matrix();
      w.q_a_proj_bias = opt("q_a_proj.bias", {r}, cfg_.qkv_bias);
    } else {
      w.q_proj = tensor(keep(p + "q_proj.weight", {h * dqk, d})).matrix();
      w.q_proj_bias = opt("q_proj.bias", {h * dqk}, false);
    }
    w.kv_a_proj_with_mqa = tensor(keep(p + "kv_a_proj_with_mqa.weight", {kva, d})).matrix();
    w.kv_a_proj_bias = opt("kv_a_proj_with_mqa.bias", {kva}, cfg_.qkv_bias);
    w.kv_a_layernorm = any ? opt("kv_a_layernorm.weight", {dc}, false)
                           : tensor(keep(p + "kv_a_layernorm.weight", {dc})).span();
    w.kv_b_proj = tensor(keep(p + "kv_b_proj.weight", {h * (c.nope_dim + c.v_head_dim), dc})).matrix();
    w.kv_b_proj_bias = opt("kv_b_proj.bias", {h * (c.nope_dim + c.v_head_dim)}, false);
    w.o_proj = tensor(keep(p + "o_proj.weight", {d, h * c.v_head_dim})).matrix();
    w.o_proj_bias = opt("o_proj.bias", {d}, cfg_.o_bias);
    w.q_rope_norm = opt("q_rope_norm.weight", {c.rope_dim}, false);
    w.k_rope_norm = opt("k_rope_norm.weight", {c.rope_dim}, false);
    return mla_layer(c, w);
  }

  static matrix_view<const float> view_of(const row_matrix<float>& m) {
    return matrix_view<const float>(m.data(), {m.rows(), m.cols()});
  }
  static matrix_view<float> mut_view_of(row_matrix<float>& m) {
    return matrix_view<float>(m.data(), {m.rows(), m.cols()});
  }
  static ::attnkit::detail::row_map<const float> const_map(const row_matrix<float>& m) {
    return {m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols())};
  }
  static ::attnkit::detail::row_map<float> map(row_matrix<float>& m) {
    return {m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols())};
  }
  void norm(const row_matrix<float>& in, std::span<const float> w, row_matrix<float>& out) const {
    if (&in != &out) out = in;
    for (std::int64_t i = 0; i < out.rows(); ++i) rms_norm(out.row(i).data(), out.cols(), w, cfg_.rms_eps);
  }
  /// h_ += attention_l(norm h_); h_ += mlp_l(norm h_).
  template <class Exec>
  void run_layer(std::int64_t l, std::span<const std::int64_t> positions, cache& c, Exec& exec,
                 const observer& observe, time_split* time) {
    using clock = std::chrono::steady_clock;
    const auto& w = layers_[static_cast<std::size_t>(l)];
    const auto t0 = clock::now();
    norm(h_, tensor(w.input_norm).span(), n_);
    if (observe) observe(l, view_of(n_));
    a_.resize(h_.rows(), h_.cols());
    const auto t1 = clock::now();
    std::visit(
        [&](auto& layer, auto& kv) {
          using L = std::decay_t<decltype(layer)>;
          using C = std::decay_t<decltype(kv)>;
          if constexpr (std::is_same_v<L, gqa_layer> ==
                        std::is_same_v<C, dense_cache<typename C::storage_type>>)
            layer.forward(view_of(n_), positions, kv, mut_view_of(a_), exec);
          else
            ::attnkit::detail::throw_invalid(
                "decoder: the cache of layer ", l,
                " does not fit its attention (make_caches makes the right ones)");
        },
        attention_[static_cast<std::size_t>(l)], c);
    const auto t2 = clock::now();
    h_ += a_;
    norm(h_, tensor(w.post_norm).span(), n_);
    mlp(w, exec);
    h_ += a_;
    if (time) {
      time->attention_s += std::chrono::duration<double>(t2 - t1).count();
      time->other_s += std::chrono::duration<double>(t1 - t0).count() +
                       std::chrono::duration<double>(clock::now() - t2).count();
    }
  }

  /// a_ = down(silu(gate(n_)) * up(n_)).
  template <class Exec>
  void mlp(const layer_weights& w, Exec& exec) {
    const std::int64_t t = n_.rows(), f = cfg_.intermediate_size;
    g_.resize(t, f);
    u_.resize(t, f);
    ::attnkit::detail::linear(const_map(n_), as_eigen(tensor(w.gate).matrix(), "gate_proj"), span_or_empty(w.gate_b), map(g_), exec);
    ::attnkit::detail::linear(const_map(n_), as_eigen(tensor(w.up).matrix(), "up_proj"), span_or_empty(w.up_b), map(u_), exec);
    g_ = (g_.array() / (1.f + (-g_.array()).exp()) * u_.array()).matrix();
    ::attnkit::detail::linear(const_map(g_), as_eigen(tensor(w.down).matrix(), "down_proj"), span_or_empty(w.down_b), map(a_), exec);
  }
  template <class Row>
  static double log_softmax_at(const Row& row, std::int32_t target) {
    double m = -INFINITY;
    for (Eigen::Index j = 0; j < row.size(); ++j) m = std::max(m, static_cast<double>(row(j)));
    double s = 0;
    for (Eigen::Index j = 0; j < row.size(); ++j) s += std::exp(static_cast<double>(row(j)) - m);
    return static_cast<double>(row(target)) - m - std::log(s);
  }

  io::model_config cfg_;
  tensor_source source_;
  decoder_options options_;
  std::vector<io::float_tensor> tensors_;  // every weight used, borrowed or converted
  std::int64_t embed_ = -1, final_norm_ = -1, lm_head_ = -1;
  std::vector<layer_weights> layers_;
  std::vector<attention_layer> attention_;
  row_matrix<float> h_, n_, a_, g_, u_;  // [T, D] x3, [T, F] x2 scratch
};

}  // namespace attnkit::model
