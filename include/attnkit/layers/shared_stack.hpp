#pragma once
// shared_stack: a stack of attention layers (any mix of GQA-family, MLA and TPA layers) where
// chosen spans of followers reuse the attention weights of the layer before them (Liao &
// Vargas, arXiv 2407.12866; the paper shares layers 23-26 of Llama-2-7B with donor 22).
//
//   layers    std::vector<stack_layer>: gqa_layer, mla_layer, tpa_layer or follower_layer;
//   plan      sharing spans {donor, first, last}: followers first..last read the weights of
//             layer `donor` (donor < first); every follower_layer lies in exactly one span;
//   caches    one per layer (make_caches): dense / latent / factorized for full layers, a
//             value-only cache for followers.
//
// forward(x, positions, caches) runs the whole stack for a block of T tokens over the caller's
// residual stream: x += attn_i(x) for every layer i, then after(i, x) (the caller's MLP, norms
// or logging). Callers that place norms before attention step the stack themselves:
// forward_layer(i, in, positions, caches, out) for i = 0, 1, ... L-1 of each block.
//
// A donor hands its weights on in one of two forms (kernels/shared.hpp), chosen per block:
// materialised (P [T, H, Tk] written by the donor's call, read by each follower: the cheapest
// when it fits) or flash (the donor's LSE [T, H] only; each follower recomputes the donor's
// scores from its roped queries and cache). The automatic rule takes the materialised form when
// P of the block fits in options().materialise_max_bytes (64 MiB by default: every decode step
// and prefill chunks up to T H Tk = 16 M weights), the flash form otherwise; it can be forced
// per call.
#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/options.hpp"
#include "../core/view.hpp"
#include "follower_layer.hpp"
#include "gqa_layer.hpp"
#include "mla_layer.hpp"
#include "tpa_layer.hpp"

namespace attnkit {

/// Any layer a shared_stack may hold.
using stack_layer = std::variant<gqa_layer, mla_layer, tpa_layer, follower_layer>;

/// The cache of any stack_layer, in storage type S.
template <storage_type S>
using stack_cache = std::variant<dense_cache<S>, latent_cache<S>, factorized_cache<S>, value_cache<S>>;

/// Followers first..last (inclusive) reuse the attention weights of layer `donor`.
struct sharing_span {
  std::int64_t donor = 0;  ///< the layer whose attention weights are reused
  std::int64_t first = 0;  ///< first follower, after the donor
  std::int64_t last = 0;   ///< last follower (inclusive)
};

/// How a donor hands its weights to its followers (kernels/shared.hpp).
enum class weights_form { automatic, materialised, flash };

/// Options of a shared_stack.
struct shared_stack_options {
  /// The automatic rule's limit on a donor's materialised weights for one block of tokens.
  std::int64_t materialise_max_bytes = std::int64_t{64} << 20;
};

/// A per-layer callback that does nothing (forward's default).
struct no_layer_callback {
  void operator()(std::int64_t, matrix_view<float>) const {}  ///< ignores layer i's output
};

/// A stack of attention layers (any variant) in which follower layers reuse a donor's attention
/// weights (see the file comment); forward runs the whole stack and routes the donors' weights.
class shared_stack {
 public:
  /// Takes the layers and the sharing plan, checked: spans inside the stack, followers after
  /// their donor, every follower_layer covered, equal model widths.
  shared_stack(std::vector<stack_layer> layers, std::vector<sharing_span> plan,
               shared_stack_options opt = {})
      : layers_(std::move(layers)), plan_(std::move(plan)), opt_(opt) {
    const std::int64_t n = size();
    donor_of_.assign(static_cast<std::size_t>(n), -1);
    slot_of_.assign(static_cast<std::size_t>(n), -1);
    for (std::size_t s = 0; s < plan_.size(); ++s) check_span(plan_[s], static_cast<std::int64_t>(s));
    for (std::int64_t i = 0; i < n; ++i) {
      detail::require(!is_follower(i) || donor_of(i) >= 0, "shared_stack: layer ", i,
                      " is a follower_layer but no sharing span covers it");
      if (i > 0)
        detail::require(model_dim(i) == model_dim(0), "shared_stack: layer ", i, " has model_dim ",
                        model_dim(i), " but layer 0 has ", model_dim(0));
    }
    detail::require(opt_.materialise_max_bytes >= 0,
                    "shared_stack: materialise_max_bytes must be >= 0, got ",
                    opt_.materialise_max_bytes);
  }

  std::int64_t size() const { return static_cast<std::int64_t>(layers_.size()); }  ///< layers
  const stack_layer& layer(std::int64_t i) const { return layers_[index(i)]; }     ///< layer i
  const std::vector<sharing_span>& plan() const { return plan_; }  ///< the sharing spans
  const shared_stack_options& options() const { return opt_; }     ///< the options
  /// The donor whose weights layer i reuses, or -1 for a layer that computes its own.
  std::int64_t donor_of(std::int64_t i) const { return donor_of_[index(i)]; }

  /// One cache per layer, each holding `capacity` tokens.
  template <storage_type S>
  std::vector<stack_cache<S>> make_caches(std::int64_t capacity) const {
    std::vector<stack_cache<S>> caches;
    caches.reserve(layers_.size());
    for (const auto& l : layers_)
      std::visit([&](const auto& layer) { caches.emplace_back(layer.template make_cache<S>(capacity)); },
                 l);
    return caches;
  }
  /// Cache bytes per token of the whole stack with storage type S.
  template <storage_type S>
  std::int64_t bytes_per_token() const {
    std::int64_t bytes = 0;
    for (const auto& c : make_caches<S>(0))
      std::visit([&](const auto& cache) { bytes += cache.bytes_per_token(); }, c);
    return bytes;
  }
  /// The form a donor with H query heads uses for T tokens over Tk keys.
  weights_form form_for(std::int64_t t, std::int64_t heads, std::int64_t keys,
                        weights_form requested = weights_form::automatic) const {
    if (requested != weights_form::automatic) return requested;
    const double bytes = double(t) * double(heads) * double(keys) * sizeof(float);
    return bytes <= double(opt_.materialise_max_bytes) ? weights_form::materialised
                                                       : weights_form::flash;
  }

  /// The whole stack for a block of T tokens: x [T, D] (the residual stream) += attn_i(x) for
  /// i = 0 .. L-1, then after(i, x). Appends the block to every cache.
  template <storage_type S, class Exec = serial_executor, class After = no_layer_callback>
  void forward(matrix_view<float> x, std::span<const std::int64_t> positions,
               std::vector<stack_cache<S>>& caches, Exec&& exec = Exec{},
               weights_form form = weights_form::automatic, After&& after = {}) {
    const std::int64_t t = x.extent(0), d = model_dim(0);
    detail::require_extents(x, {t, d}, "shared_stack::forward: x");
    y_.resize(t, d);
    const matrix_view<float> y(y_.data(), {t, d});
    for (std::int64_t i = 0; i < size(); ++i) {
      forward_layer(i, matrix_view<const float>(x), positions, caches, y, exec, form);
      for (std::int64_t r = 0; r < t; ++r)
        for (std::int64_t c = 0; c < d; ++c) x(r, c) += y(r, c);
      after(i, x);
    }
  }

  /// Layer i alone: out [T, D] = attn_i(in [T, D]), appending the block to caches[i]. Within a
  /// block the layers run in order 0 .. L-1 (a follower reads what its donor computed for the
  /// same block); a call that throws changes no cache.
  template <storage_type S, class Exec = serial_executor>
  void forward_layer(std::int64_t i, matrix_view<const float> in,
                     std::span<const std::int64_t> positions, std::vector<stack_cache<S>>& caches,
                     matrix_view<float> out, Exec&& exec = Exec{},
                     weights_form form = weights_form::automatic) {
    using detail::require;
    require(static_cast<std::int64_t>(caches.size()) == size(), "shared_stack: ", caches.size(),
            " caches for ", size(), " layers");
    index(i);
    const std::int64_t t = in.extent(0);
    require(i == 0 || (i == next_ && t == block_tokens_), "shared_stack: layer ", i,
            " run out of order (T=", t, "); the block's next layer is ", next_, " (T=",
            block_tokens_, "): run layers 0 .. ", size() - 1, " in order for each block");
    if (i == 0) {
      next_ = 0, block_tokens_ = t;
      block_positions_.assign(positions.begin(), positions.end());
    } else {  // a follower weighs its values by its donor's rows: the same tokens, in order
      require(std::equal(positions.begin(), positions.end(), block_positions_.begin(),
                         block_positions_.end()),
              "shared_stack: layer ", i, " is given other positions than layer 0 of its block");
    }
    try {
      run_layer(i, in, positions, caches, out, exec, form);
    } catch (const invalid_argument& e) {  // name the layer: a layer's own messages cannot
      const std::string what = e.what(), prefix = "attnkit: ";
      if (what.rfind(prefix + "shared_stack", 0) == 0) throw;
      detail::throw_invalid("shared_stack: layer ", i, ": ",
                            what.rfind(prefix, 0) == 0 ? what.substr(prefix.size()) : what);
    }
    next_ = i + 1;
  }

 private:
  struct donor_state {
    weights_form form = weights_form::materialised;
    std::int64_t heads = 0, keys = 0;
    product_math products = product_math::f32;  // the donor's, for its followers' P V too
    std::vector<float> weights;  // [T, H, Tk] (materialised)
    std::vector<float> lse;      // [T, H] (flash)
  };

  template <storage_type S, class Exec>
  void run_layer(std::int64_t i, matrix_view<const float> in,
                 std::span<const std::int64_t> positions, std::vector<stack_cache<S>>& caches,
                 matrix_view<float> out, Exec& exec, weights_form form) {
    using detail::require;
    const std::int64_t t = in.extent(0), d = donor_of(i);
    if (d < 0) {
      run_full(i, in, positions, caches, out, exec, form);
    } else {
      donor_state& st = donors_[static_cast<std::size_t>(slot_of_[static_cast<std::size_t>(d)])];
      auto& layer = std::get<follower_layer>(layers_[index(i)]);
      auto* cache = std::get_if<value_cache<S>>(&caches[index(i)]);
      require(cache, "shared_stack: layer ", i, " is a follower and needs a value_cache");
      if (st.form == weights_form::materialised) {
        layer.forward(in, positions, *cache,
                      tensor3_view<const float>(st.weights.data(), {t, st.heads, st.keys}), out,
                      exec, st.products);
      } else {
        const matrix_view<const float> lse(st.lse.data(), {t, st.heads});
        layer.forward(in, positions, *cache, out, exec,
                      [&](const auto& values, tensor3_view<float> o) {
                        with_full_layer(d, caches, [&](auto& donor, auto& donor_cache) {
                          donor.last_scores(donor_cache, [&](const auto& scores) {
                            attend_shared(scores, positions, lse, values, o, donor.options(), exec,
                                          &layer.workspace());
                          });
                        });
                      });
      }
    }
  }

  std::size_t index(std::int64_t i) const {
    detail::require(i >= 0 && i < size(), "shared_stack: layer index ", i, " is not in [0, ",
                    size(), ")");
    return static_cast<std::size_t>(i);
  }
  bool is_follower(std::int64_t i) const {
    return std::holds_alternative<follower_layer>(layers_[index(i)]);
  }
  std::int64_t heads(std::int64_t i) const {
    return std::visit([](const auto& l) { return l.config().heads; }, layers_[index(i)]);
  }
  std::int64_t model_dim(std::int64_t i) const {
    return std::visit([](const auto& l) { return l.config().model_dim; }, layers_[index(i)]);
  }

  void check_span(const sharing_span& sp, std::int64_t s) {
    using detail::require;
    const std::int64_t n = size();
    require(sp.donor >= 0 && sp.donor < n && sp.first >= 0 && sp.last < n && sp.first <= sp.last,
            "shared_stack: span ", s, " {donor ", sp.donor, ", followers ", sp.first, "..",
            sp.last, "} names layers outside [0, ", n, ") or an empty span");
    require(sp.donor < sp.first, "shared_stack: span ", s, " names follower ", sp.first,
            " before (or at) its donor ", sp.donor, "; a donor must precede its followers");
    require(!is_follower(sp.donor), "shared_stack: span ", s, " names layer ", sp.donor,
            " as its donor, but it is a follower_layer (it computes no weights)");
    for (std::int64_t f = sp.first; f <= sp.last; ++f) {
      require(is_follower(f), "shared_stack: span ", s, " covers layer ", f,
              ", which is not a follower_layer");
      require(donor_of_[static_cast<std::size_t>(f)] < 0, "shared_stack: span ", s,
              " overlaps another span at layer ", f, " (already following donor ",
              donor_of_[static_cast<std::size_t>(f)], ")");
      require(heads(f) == heads(sp.donor), "shared_stack: donor ", sp.donor, " has ",
              heads(sp.donor), " query heads but follower ", f, " has ", heads(f));
      donor_of_[static_cast<std::size_t>(f)] = sp.donor;
    }
    if (slot_of_[static_cast<std::size_t>(sp.donor)] < 0) {
      slot_of_[static_cast<std::size_t>(sp.donor)] = static_cast<std::int64_t>(donors_.size());
      donors_.emplace_back();
    }
  }

  /// f(layer, cache) for full layer i and its cache (of the type the layer needs).
  template <storage_type S, class F>
  void with_full_layer(std::int64_t i, std::vector<stack_cache<S>>& caches, F&& f) {
    std::visit(
        [&](auto& layer) {
          using L = std::decay_t<decltype(layer)>;
          if constexpr (!std::same_as<L, follower_layer>) {
            using C = decltype(layer.template make_cache<S>(0));
            C* cache = std::get_if<C>(&caches[index(i)]);
            detail::require(cache, "shared_stack: the cache of layer ", i,
                            " is not of the type its layer needs (use make_caches)");
            f(layer, *cache);
          }
        },
        layers_[index(i)]);
  }

  /// A layer that computes its own weights; a donor also hands them on.
  template <storage_type S, class Exec>
  void run_full(std::int64_t i, matrix_view<const float> in, std::span<const std::int64_t> positions,
                std::vector<stack_cache<S>>& caches, matrix_view<float> out, Exec& exec,
                weights_form form) {
    attention_outputs outputs;
    const std::int64_t slot = slot_of_[index(i)], t = in.extent(0);
    with_full_layer(i, caches, [&](auto& layer, auto& cache) {
      if (slot >= 0) {
        donor_state& st = donors_[static_cast<std::size_t>(slot)];
        st.heads = layer.config().heads;
        st.products = layer.options().products;
        detail::require(t <= cache.capacity() - cache.size(), "shared_stack: appending ", t,
                        " tokens to layer ", i, "'s cache of size=", cache.size(),
                        " exceeds capacity=", cache.capacity());
        st.keys = cache.size() + t;
        st.form = form_for(t, st.heads, st.keys, form);
        if (st.form == weights_form::materialised) {
          const std::int64_t rows = detail::checked_mul(t, st.heads, "shared_stack: weights");
          const auto need = static_cast<std::size_t>(
              detail::checked_mul(rows, st.keys, "shared_stack: weights [T, H, Tk]"));
          // Room for the whole cache (within the byte limit), so that a decode loop whose
          // context grows does not reallocate the weights every few steps.
          if (st.weights.capacity() < need)
            st.weights.reserve(std::max(
                need, static_cast<std::size_t>(std::min<double>(
                          double(rows) * double(cache.capacity()),
                          double(opt_.materialise_max_bytes) / sizeof(float)))));
          st.weights.resize(need);
          outputs.weights = tensor3_view<float>(st.weights.data(), {t, st.heads, st.keys});
        } else {
          st.lse.resize(static_cast<std::size_t>(t * st.heads));
          outputs.lse = matrix_view<float>(st.lse.data(), {t, st.heads});
        }
      }
      using L = std::decay_t<decltype(layer)>;
      if constexpr (std::same_as<L, mla_layer>)
        layer.forward(in, positions, cache, out, exec, mla_path::automatic, outputs);
      else if constexpr (std::same_as<L, tpa_layer>)
        layer.forward(in, positions, cache, out, exec, tpa_path::automatic, outputs);
      else
        layer.forward(in, positions, cache, out, exec, outputs);
    });
  }

  std::vector<stack_layer> layers_;
  std::vector<sharing_span> plan_;
  shared_stack_options opt_;
  std::vector<std::int64_t> donor_of_;  // [L]: -1, or the donor of a follower
  std::vector<std::int64_t> slot_of_;   // [L]: -1, or a donor's index into donors_
  std::vector<donor_state> donors_;
  std::int64_t next_ = 0, block_tokens_ = 0;
  std::vector<std::int64_t> block_positions_;  // [T]: the positions of the block being run
  row_matrix<float> y_;  // [T, D]: one layer's output in forward
};

}  // namespace attnkit
