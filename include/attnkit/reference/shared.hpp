#pragma once
// A double-precision shared-attention stack (Liao & Vargas, arXiv 2407.12866), written for
// clarity: every layer sees the whole sequence at once (causal on positions); a full layer
// computes its weights P = softmax(Q K^T scale + mask) and y = W_o (P V); a follower takes the
// weights of its donor and y = W_o (P_donor W_v x). The residual stream is x += y per layer.
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <vector>

#include "attention.hpp"

namespace attnkit::reference {

/// One layer of the reference shared-attention stack: a full layer (heads set) or a follower
/// (donor >= 0, v_proj set).
struct shared_layer {
  /// A full layer: its per-head Q, K, V of the tokens x at positions (gqa_heads,
  /// mla_materialise, tpa_heads); empty for a follower.
  std::function<attention_heads(const matrix&, std::span<const std::int64_t>)> heads{};
  std::int64_t query_heads = 0;           ///< H
  std::int64_t kv_heads = 0;              ///< H_kv (a follower's value heads)
  double scale = 1;                       ///< full layers
  std::optional<std::int64_t> window{};   ///< full layers
  std::int64_t donor = -1;                ///< followers: the layer whose weights they reuse
  matrix v_proj{};                        ///< followers: [H_kv d_v, D]
  vector v_bias{};                        ///< followers: [H_kv d_v] or empty
  matrix o_proj{};                        ///< [D, H d_v]
  vector o_bias{};                        ///< [D] or empty
};

/// x [T, D] after the stack: x += y_i for every layer i in order.
inline matrix shared_stack_forward(matrix x, std::span<const std::int64_t> positions,
                                   const std::vector<shared_layer>& layers) {
  std::vector<matrix> weights(layers.size());  // each full layer's P [T * H, T]
  for (std::size_t i = 0; i < layers.size(); ++i) {
    const shared_layer& l = layers[i];
    matrix out;
    if (l.heads) {
      const attention_heads a = l.heads(x, positions);
      attention_rules rules;
      rules.window = l.window;
      weights[i] = attention_weights(a.q, positions, a.k, positions, l.query_heads, l.kv_heads,
                                     l.scale, rules);
      out = weighted_values(weights[i], a.v, l.query_heads, l.kv_heads);
    } else {
      matrix v = x * l.v_proj.transpose();
      if (l.v_bias.size()) v.rowwise() += l.v_bias.transpose();
      out = weighted_values(weights[static_cast<std::size_t>(l.donor)], v, l.query_heads,
                            l.kv_heads);
    }
    matrix y = out * l.o_proj.transpose();
    if (l.o_bias.size()) y.rowwise() += l.o_bias.transpose();
    x += y;
  }
  return x;
}

}  // namespace attnkit::reference
