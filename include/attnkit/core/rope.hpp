#pragma once
// Rotary position embedding with explicit positions, two pair layouts, a partial rotary
// dimension, explicit per-pair frequency-index tables (optionally one per head) and the
// context-extension scalings of Hugging Face checkpoints.
//
// Pair p (0 <= p < rotary_dim/2) rotates coordinates (i, j):
//   half_split  (Hugging Face Llama/NeoX): i = p,     j = p + rotary_dim/2
//   interleaved (GPT-J, Meta Llama, DeepSeek): i = 2p, j = 2p + 1
// by the angle pos * w(f), f = table[p] (default f = p), with w(f) = theta^(-2 f / frequency_dim)
// before scaling (frequency_dim defaults to rotary_dim):
//   x_i' = m (x_i cos - x_j sin),  x_j' = m (x_j cos + x_i sin),  m = the attention factor
// (1 except YaRN). Coordinates at or beyond rotary_dim are left unchanged.
//   * MHA2MLA keeps a subset of a head's frequencies: table = the kept indices, frequency_dim
//     = the original head dim.
//   * TransMLA keeps every C-th frequency; the exact GQA->MLA conversion tiles one head's
//     table g times: both are tables.
// Scalings (transformers' modeling_rope_utils formulas, with n = frequency_dim, s = factor,
// L0 = original_context, all evaluated in double):
//   linear:      w(f) / s
//   dynamic_ntk: theta' = theta (s L / L0 - (s - 1))^(n / (n - 2)) once the sequence length L
//                exceeds L0 (fit_length; transformers grows it per call to max position + 1);
//   yarn:        w = w_interp r + w_extrap (1 - r), w_interp = w / s, r(f) = clamp((f - lo) /
//                (hi - lo), 0, 1) with lo, hi the correction dims of beta_fast, beta_slow
//                (floor / ceil unless truncate is off), dim(b) = n ln(L0 / (2 pi b)) / (2 ln
//                theta); m = attention_factor, else 0.1 ln(s) + 1, or DeepSeek's
//                mscale(s, mscale) / mscale(s, mscale_all_dim) when both are given;
//   llama3:      wavelength l = 2 pi / w: l < L0 / high_freq_factor keeps w, l > L0 /
//                low_freq_factor gives w / s, between them w ((1 - a) / s + a) with a =
//                (L0 / l - low) / (high - low).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <optional>
#include <span>
#include <vector>

#include "error.hpp"

namespace attnkit {

/// Pairing of the rotated coordinates: (i, i + d/2) as in Llama (half_split), (2i, 2i + 1) as in
/// GPT-J and DeepSeek checkpoints (interleaved).
enum class rope_layout { half_split, interleaved };

/// "half_split" or "interleaved".
inline const char* to_string(rope_layout l) {
  return l == rope_layout::half_split ? "half_split" : "interleaved";
}

/// Context-extension rule of transformers' rope_scaling.
enum class rope_scaling_type { none, linear, dynamic_ntk, yarn, llama3 };

/// The rule's name as transformers spells it.
inline const char* to_string(rope_scaling_type t) {
  switch (t) {
    case rope_scaling_type::none: return "none";
    case rope_scaling_type::linear: return "linear";
    case rope_scaling_type::dynamic_ntk: return "dynamic_ntk";
    case rope_scaling_type::yarn: return "yarn";
    case rope_scaling_type::llama3: return "llama3";
  }
  return "?";
}

/// Context-extension scaling of the frequencies (transformers' rope_scaling / rope_parameters).
struct rope_scaling {
  rope_scaling_type type = rope_scaling_type::none;  ///< none, linear, dynamic_ntk, yarn, llama3
  double factor = 1.0;                               ///< s: the context extension factor
  /// yarn, llama3: the pretraining context (original_max_position_embeddings); dynamic_ntk:
  /// the length past which the base grows (transformers: max_position_embeddings).
  std::int64_t original_context = 0;
  double beta_fast = 32.0;                   ///< yarn ramp start, in rotations
  double beta_slow = 1.0;                    ///< yarn ramp end, in rotations
  bool truncate = true;                      ///< yarn: floor/ceil the correction dims
  std::optional<double> attention_factor{};  ///< yarn: m, else derived (see above)
  double mscale = 0.0;                       ///< yarn, DeepSeek: 0 = absent
  double mscale_all_dim = 0.0;               ///< yarn, DeepSeek: 0 = absent
  double low_freq_factor = 1.0;              ///< llama3
  double high_freq_factor = 4.0;             ///< llama3
};

/// YaRN's magnitude rule: 0.1 mscale ln(s) + 1 for s > 1, else 1.
inline double yarn_mscale(double factor, double mscale = 1.0) {
  return factor <= 1.0 ? 1.0 : 0.1 * mscale * std::log(factor) + 1.0;
}

/// The factor m that multiplies the rotated coordinates (YaRN only; 1 otherwise).
inline double attention_factor(const rope_scaling& s) {
  if (s.type != rope_scaling_type::yarn) return 1.0;
  if (s.attention_factor) return *s.attention_factor;
  if (s.mscale != 0.0 && s.mscale_all_dim != 0.0)
    return yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim);
  return yarn_mscale(s.factor);
}

/// DeepSeek-V2/V3 also multiply the softmax scale by mscale(s, mscale_all_dim)^2 whenever the
/// checkpoint has a scaling with mscale_all_dim (transformers' yarn_apply_mscale): the factor.
inline double deepseek_softmax_mscale(const rope_scaling& s) {
  if (s.type == rope_scaling_type::none || s.mscale_all_dim == 0.0) return 1.0;
  const double m = yarn_mscale(s.factor, s.mscale_all_dim);
  return m * m;
}

/// RoPE of one layer: base, pairing layout, partial rotation, frequency tables and scaling.
struct rope_config {
  double theta = 10000.0;  ///< the base: frequency f of d rotates by theta^(-2f/d) per position
  rope_layout layout = rope_layout::half_split;  ///< pairs (i, i + d/2) or (2i, 2i + 1)
  std::int64_t rotary_dim = 0;     ///< rotated leading coordinates; 0 = the whole head
  std::int64_t frequency_dim = 0;  ///< the d in theta^(-2f/d); 0 = rotary_dim
  /// Frequency index per pair: empty (f = p), one table for all heads, or one table per head.
  std::vector<std::vector<std::int64_t>> frequency_index{};
  rope_scaling scaling{};  ///< context extension (default none)
};

/// RoPE for heads of a fixed width, validated once; apply() is check-free.
class rope {
 public:
  rope() = default;
  /// head_dim: width of the vectors rotated; heads: how many heads a per-head table must cover.
  rope(const rope_config& cfg, std::int64_t head_dim, std::int64_t heads = 1)
      : layout_(cfg.layout), head_dim_(head_dim), theta_(cfg.theta), scaling_(cfg.scaling) {
    using detail::require;
    rotary_dim_ = cfg.rotary_dim == 0 ? head_dim : cfg.rotary_dim;
    require(head_dim > 0, "rope: head_dim must be > 0, got ", head_dim);
    require(rotary_dim_ > 0 && rotary_dim_ <= head_dim,
            "rope: rotary_dim must be in [1, head_dim=", head_dim, "], got ", rotary_dim_);
    require(rotary_dim_ % 2 == 0, "rope: rotary_dim must be even, got ", rotary_dim_);
    require(cfg.theta > 0 && std::isfinite(cfg.theta), "rope: theta must be finite and > 0, got ",
            cfg.theta);
    fdim_ = cfg.frequency_dim == 0 ? rotary_dim_ : cfg.frequency_dim;
    require(fdim_ > 0, "rope: frequency_dim must be > 0, got ", cfg.frequency_dim);
    validate(scaling_, fdim_);
    pairs_ = rotary_dim_ / 2;
    const auto& tab = cfg.frequency_index;
    require(tab.size() <= 1 || static_cast<std::int64_t>(tab.size()) == heads,
            "rope: frequency_index must hold 0, 1 or heads=", heads, " tables, got ", tab.size());
    tables_ = tab.empty() ? 1 : static_cast<std::int64_t>(tab.size());
    index_.resize(static_cast<std::size_t>(tables_ * pairs_));
    for (std::int64_t h = 0; h < tables_; ++h) {
      if (!tab.empty())
        require(static_cast<std::int64_t>(tab[static_cast<std::size_t>(h)].size()) == pairs_,
                "rope: frequency_index[", h, "] has ", tab[static_cast<std::size_t>(h)].size(),
                " entries but rotary_dim/2=", pairs_, " pairs");
      for (std::int64_t p = 0; p < pairs_; ++p) {
        const std::int64_t f =
            tab.empty() ? p : tab[static_cast<std::size_t>(h)][static_cast<std::size_t>(p)];
        require(f >= 0 && 2 * f < fdim_, "rope: frequency_index[", h, "][", p, "]=", f,
                " must be in [0, frequency_dim/2=", fdim_ / 2, ")");
        index_[static_cast<std::size_t>(h * pairs_ + p)] = f;
      }
    }
    factor_ = ::attnkit::attention_factor(scaling_);
    length_ = scaling_.original_context;
    compute(length_);
  }

  std::int64_t head_dim() const { return head_dim_; }       ///< width of the heads it rotates
  std::int64_t rotary_dim() const { return rotary_dim_; }   ///< rotated leading coordinates
  rope_layout layout() const { return layout_; }            ///< the pairing
  const rope_scaling& scaling() const { return scaling_; }  ///< the frequency scaling
  /// m: the factor on the rotated coordinates (YaRN), so m^2 on their share of every logit.
  double attention_factor() const { return factor_; }
  /// Dynamic NTK only (a no-op otherwise): the frequencies for a call whose largest position
  /// is length - 1, as transformers' dynamic_rope_update keeps them: grown to the longest
  /// length seen past original_context, back to the unscaled ones for a call that fits in it.
  void fit_length(std::int64_t length) {
    if (scaling_.type != rope_scaling_type::dynamic_ntk) return;
    const std::int64_t l0 = scaling_.original_context;
    std::int64_t next = length_;
    if (length > length_) next = length;
    if (length < l0 && length_ > l0) next = l0;
    if (next != length_) compute(next);
  }
  /// fit_length for a call at these positions (its largest + 1).
  void fit_positions(std::span<const std::int64_t> positions) {
    if (scaling_.type != rope_scaling_type::dynamic_ntk || positions.empty()) return;
    fit_length(*std::max_element(positions.begin(), positions.end()) + 1);
  }
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
      const double c = factor_ * std::cos(a), s = factor_ * std::sin(a);
      const std::int64_t i = layout_ == rope_layout::half_split ? p : 2 * p;
      const std::int64_t j = layout_ == rope_layout::half_split ? p + half : 2 * p + 1;
      const double xi = static_cast<double>(x[i]), xj = static_cast<double>(x[j]);
      x[i] = static_cast<T>(xi * c - xj * s);
      x[j] = static_cast<T>(xj * c + xi * s);
    }
  }

 private:
  static void validate(const rope_scaling& s, std::int64_t fdim) {
    using detail::require;
    if (s.type == rope_scaling_type::none) return;
    const char* name = to_string(s.type);
    require(std::isfinite(s.factor) && s.factor > 0, "rope: scaling ", name,
            ": factor must be finite and > 0, got ", s.factor);
    if (s.type == rope_scaling_type::linear) return;
    require(s.original_context > 0, "rope: scaling ", name,
            ": original_context must be > 0, got ", s.original_context);
    if (s.type == rope_scaling_type::dynamic_ntk)
      require(fdim > 2, "rope: scaling dynamic_ntk needs frequency_dim > 2, got ", fdim);
    if (s.type == rope_scaling_type::yarn) {
      require(std::isfinite(s.beta_fast) && std::isfinite(s.beta_slow) && s.beta_fast > 0 &&
                  s.beta_slow > 0,
              "rope: scaling yarn: beta_fast and beta_slow must be finite and > 0, got ",
              s.beta_fast, ", ", s.beta_slow);
      require(!s.attention_factor || (std::isfinite(*s.attention_factor) && *s.attention_factor > 0),
              "rope: scaling yarn: attention_factor must be finite and > 0, got ",
              s.attention_factor.value_or(0.0));
      require(std::isfinite(s.mscale) && std::isfinite(s.mscale_all_dim),
              "rope: scaling yarn: mscale and mscale_all_dim must be finite, got ", s.mscale, ", ",
              s.mscale_all_dim);
      const double m = ::attnkit::attention_factor(s);
      require(m > 0 && std::isfinite(m), "rope: scaling yarn: the attention factor from factor=",
              s.factor, ", mscale=", s.mscale, ", mscale_all_dim=", s.mscale_all_dim, " is ", m);
    }
    if (s.type == rope_scaling_type::llama3)
      require(std::isfinite(s.low_freq_factor) && std::isfinite(s.high_freq_factor) &&
                  s.low_freq_factor > 0 && s.high_freq_factor > s.low_freq_factor,
              "rope: scaling llama3 needs 0 < low_freq_factor < high_freq_factor, got ",
              s.low_freq_factor, ", ", s.high_freq_factor);
  }

  /// The scaled frequency of index f at sequence length `length` (dynamic NTK only).
  double frequency(std::int64_t f, std::int64_t length) const {
    const double n = static_cast<double>(fdim_), s = scaling_.factor;
    const double l0 = static_cast<double>(scaling_.original_context);
    double base = theta_;
    if (scaling_.type == rope_scaling_type::dynamic_ntk && length > scaling_.original_context)
      base *= std::pow(s * static_cast<double>(length) / l0 - (s - 1.0), n / (n - 2.0));
    const double w = std::pow(base, -2.0 * static_cast<double>(f) / n);
    switch (scaling_.type) {
      case rope_scaling_type::none:
      case rope_scaling_type::dynamic_ntk: return w;
      case rope_scaling_type::linear: return w / s;
      case rope_scaling_type::yarn: {
        const auto dim_of = [&](double rotations) {
          return n * std::log(l0 / (rotations * 2.0 * std::numbers::pi)) / (2.0 * std::log(theta_));
        };
        double lo = dim_of(scaling_.beta_fast), hi = dim_of(scaling_.beta_slow);
        if (scaling_.truncate) lo = std::floor(lo), hi = std::ceil(hi);
        lo = std::max(lo, 0.0), hi = std::min(hi, n - 1.0);
        if (lo == hi) hi += 0.001;  // transformers' guard against a zero-width ramp
        const double r = std::clamp((static_cast<double>(f) - lo) / (hi - lo), 0.0, 1.0);
        return w / s * r + w * (1.0 - r);
      }
      case rope_scaling_type::llama3: {
        const double wavelength = 2.0 * std::numbers::pi / w;
        const double lo = scaling_.low_freq_factor, hi = scaling_.high_freq_factor;
        if (wavelength < l0 / hi) return w;
        if (wavelength > l0 / lo) return w / s;
        const double a = (l0 / wavelength - lo) / (hi - lo);
        return (1.0 - a) * w / s + a * w;
      }
    }
    return w;
  }
  void compute(std::int64_t length) {
    length_ = length;
    inv_freq_.resize(index_.size());
    for (std::size_t i = 0; i < index_.size(); ++i) inv_freq_[i] = frequency(index_[i], length);
  }

  rope_layout layout_ = rope_layout::half_split;
  std::int64_t head_dim_ = 0, rotary_dim_ = 0, fdim_ = 0, pairs_ = 0, tables_ = 1, length_ = 0;
  double theta_ = 10000.0, factor_ = 1.0;
  rope_scaling scaling_{};
  std::vector<std::int64_t> index_;  // [tables][pairs] frequency index of each pair
  std::vector<double> inv_freq_;     // [tables][pairs] its scaled angular frequency
};

}  // namespace attnkit
