#pragma once
// Rotary position embedding with explicit positions, two pair layouts, a partial rotary
// dimension and explicit per-pair frequency-index tables (optionally one per head).
//
// Pair p (0 <= p < rotary_dim/2) rotates coordinates (i, j):
//   half_split  (Hugging Face Llama/NeoX): i = p,     j = p + rotary_dim/2
//   interleaved (GPT-J, Meta Llama, DeepSeek): i = 2p, j = 2p + 1
// by the angle pos * theta^(-2 f / frequency_dim), where f = table[p] (default f = p) and
// frequency_dim defaults to rotary_dim:  x_i' = x_i cos - x_j sin,  x_j' = x_j cos + x_i sin.
// Coordinates at or beyond rotary_dim are left unchanged.
//   * MHA2MLA keeps a subset of a head's frequencies: table = the kept indices, frequency_dim
//     = the original head dim.
//   * TransMLA keeps every C-th frequency; the exact GQA->MLA conversion tiles one head's
//     table g times: both are tables.
#include <cmath>
#include <cstdint>
#include <vector>

#include "error.hpp"

namespace attnkit {

enum class rope_layout { half_split, interleaved };

inline const char* to_string(rope_layout l) {
  return l == rope_layout::half_split ? "half_split" : "interleaved";
}

struct rope_config {
  double theta = 10000.0;
  rope_layout layout = rope_layout::half_split;
  std::int64_t rotary_dim = 0;     ///< rotated leading coordinates; 0 = the whole head
  std::int64_t frequency_dim = 0;  ///< the d in theta^(-2f/d); 0 = rotary_dim
  /// Frequency index per pair: empty (f = p), one table for all heads, or one table per head.
  std::vector<std::vector<std::int64_t>> frequency_index{};
};

/// RoPE for heads of a fixed width, validated once; apply() is check-free.
class rope {
 public:
  rope() = default;
  /// head_dim: width of the vectors rotated; heads: how many heads a per-head table must cover.
  rope(const rope_config& cfg, std::int64_t head_dim, std::int64_t heads = 1)
      : layout_(cfg.layout), head_dim_(head_dim) {
    using detail::require;
    rotary_dim_ = cfg.rotary_dim == 0 ? head_dim : cfg.rotary_dim;
    require(head_dim > 0, "rope: head_dim must be > 0, got ", head_dim);
    require(rotary_dim_ > 0 && rotary_dim_ <= head_dim,
            "rope: rotary_dim must be in [1, head_dim=", head_dim, "], got ", rotary_dim_);
    require(rotary_dim_ % 2 == 0, "rope: rotary_dim must be even, got ", rotary_dim_);
    require(cfg.theta > 0 && std::isfinite(cfg.theta), "rope: theta must be finite and > 0, got ",
            cfg.theta);
    const std::int64_t fdim = cfg.frequency_dim == 0 ? rotary_dim_ : cfg.frequency_dim;
    require(fdim > 0, "rope: frequency_dim must be > 0, got ", cfg.frequency_dim);
    pairs_ = rotary_dim_ / 2;
    const auto& tab = cfg.frequency_index;
    require(tab.size() <= 1 || static_cast<std::int64_t>(tab.size()) == heads,
            "rope: frequency_index must hold 0, 1 or heads=", heads, " tables, got ", tab.size());
    tables_ = tab.empty() ? 1 : static_cast<std::int64_t>(tab.size());
    inv_freq_.resize(static_cast<std::size_t>(tables_ * pairs_));
    for (std::int64_t h = 0; h < tables_; ++h) {
      if (!tab.empty())
        require(static_cast<std::int64_t>(tab[static_cast<std::size_t>(h)].size()) == pairs_,
                "rope: frequency_index[", h, "] has ", tab[static_cast<std::size_t>(h)].size(),
                " entries but rotary_dim/2=", pairs_, " pairs");
      for (std::int64_t p = 0; p < pairs_; ++p) {
        const std::int64_t f =
            tab.empty() ? p : tab[static_cast<std::size_t>(h)][static_cast<std::size_t>(p)];
        require(f >= 0 && 2 * f < fdim, "rope: frequency_index[", h, "][", p, "]=", f,
                " must be in [0, frequency_dim/2=", fdim / 2, ")");
        inv_freq_[static_cast<std::size_t>(h * pairs_ + p)] =
            std::pow(cfg.theta, -2.0 * static_cast<double>(f) / static_cast<double>(fdim));
      }
    }
  }

  std::int64_t head_dim() const { return head_dim_; }
  std::int64_t rotary_dim() const { return rotary_dim_; }
  rope_layout layout() const { return layout_; }
  /// The angular frequency of pair p of head h (per-head tables) or of the shared table.
  double inv_freq(std::int64_t p, std::int64_t head = 0) const {
    return inv_freq_[static_cast<std::size_t>((tables_ == 1 ? 0 : head) * pairs_ + p)];
  }

  /// Rotates x[head_dim] (element stride 1) in place for token position pos, head `head`.
  /// Angles are formed in double so that large positions (500k+) keep float accuracy.
  template <class T>
  void apply(T* x, std::int64_t pos, std::int64_t head = 0) const {
    const double* f = inv_freq_.data() + (tables_ == 1 ? 0 : head) * pairs_;
    const std::int64_t half = pairs_;
    for (std::int64_t p = 0; p < pairs_; ++p) {
      const double a = static_cast<double>(pos) * f[p];
      const double c = std::cos(a), s = std::sin(a);
      const std::int64_t i = layout_ == rope_layout::half_split ? p : 2 * p;
      const std::int64_t j = layout_ == rope_layout::half_split ? p + half : 2 * p + 1;
      const double xi = static_cast<double>(x[i]), xj = static_cast<double>(x[j]);
      x[i] = static_cast<T>(xi * c - xj * s);
      x[j] = static_cast<T>(xj * c + xi * s);
    }
  }

 private:
  rope_layout layout_ = rope_layout::half_split;
  std::int64_t head_dim_ = 0, rotary_dim_ = 0, pairs_ = 0, tables_ = 1;
  std::vector<double> inv_freq_;
};

}  // namespace attnkit
