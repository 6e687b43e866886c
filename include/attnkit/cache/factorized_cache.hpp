#pragma once
// factorized_cache<S>: the KV cache of TPA (Tensor Product Attention, T6). Per token it holds the
// factors, never K and V themselves: A_K [k_rank, heads], B_K [k_rank, head_dim] (roped),
// A_V [v_rank, heads], B_V [v_rank, v_head_dim], in storage type S, plus the token's position:
//   K[h] = k_scale * sum_r A_K[r, h] B_K[r],   V[h] = v_scale * sum_r A_V[r, h] B_V[r].
// Layout: four arrays [capacity][rank][width], so the B rows of a block of tokens are one
// uniformly strided run (what the score micro-kernel streams) and the A entries of one rank
// are contiguous across heads (what the per-key head combination vectorises over). The cache
// owns its memory or wraps four arrays and a position array the engine owns.
#include <cmath>
#include <cstdint>
#include <memory>
#include <utility>
#include <optional>
#include <span>

#include "../core/aligned_buffer.hpp"
#include "../core/error.hpp"
#include "../core/storage.hpp"
#include "../core/view.hpp"
#include "kv_cache.hpp"
#include "kv_view.hpp"

namespace attnkit {

/// Geometry of a factorized_cache (TPA, T6); validated at construction.
struct factorized_cache_config {
  std::int64_t heads = 0;       ///< query heads H (the A factors' width).
  std::int64_t head_dim = 0;    ///< key width d per head (the B_K factors' width).
  std::int64_t v_head_dim = 0;  ///< 0 = head_dim
  std::int64_t k_rank = 0;      ///< key rank R_K.
  std::int64_t v_rank = 0;      ///< value rank R_V.
  std::int64_t capacity = 0;    ///< tokens the cache can hold; fixed at construction.
  std::optional<float> k_scale{};  ///< default 1/k_rank (T6)
  std::optional<float> v_scale{};  ///< default 1/v_rank (T6)
};

/// Tokens to append: a_k [T, k_rank, heads], b_k [T, k_rank, head_dim] (roped), a_v [T, v_rank,
/// heads], b_v [T, v_rank, v_head_dim] (any strides).
struct factorized_append {
  tensor3_view<const float> a_k;            ///< key head weights [T, k_rank, heads]
  tensor3_view<const float> b_k;            ///< key factors [T, k_rank, head_dim], roped
  tensor3_view<const float> a_v;            ///< value head weights [T, v_rank, heads]
  tensor3_view<const float> b_v;            ///< value factors [T, v_rank, v_head_dim]
  std::span<const std::int64_t> positions;  ///< the tokens' absolute positions [T]
};

/// KV cache of TPA in storage type S: per token the factors A_K [k_rank, heads], B_K [k_rank,
/// head_dim], A_V [v_rank, heads], B_V [v_rank, v_head_dim] and the position, never K and V. Owning
/// or over engine memory; see the file comment for the layout.
template <storage_type S>
class factorized_cache {
 public:
  using storage_type = S;                 ///< the element type of the stored factors.
  using append_type = factorized_append;  ///< what append() takes.

  /// Owning cache: allocates capacity tokens of all four factors now, never later.
  explicit factorized_cache(const factorized_cache_config& cfg) : cfg_(validated(cfg)) {
    for (int i = 0; i < 4; ++i) {
      owned_[i] = detail::aligned_alloc_array<S>(elements_[i]);
      f_[i] = owned_[i].get();
    }
    owned_pos_ = detail::aligned_alloc_array<std::int64_t>(cfg_.capacity);
    pos_ = owned_pos_.get();
  }
  /// Non-owning: a_k [capacity][k_rank][heads], b_k [capacity][k_rank][head_dim],
  /// a_v [capacity][v_rank][heads], b_v [capacity][v_rank][v_head_dim], positions [capacity];
  /// `size` tokens already valid.
  factorized_cache(const factorized_cache_config& cfg, S* a_k, S* b_k, S* a_v, S* b_v,
                   std::int64_t* positions, std::int64_t size = 0)
      : cfg_(validated(cfg)), f_{a_k, b_k, a_v, b_v}, pos_(positions), size_(size) {
    detail::require(a_k && b_k && a_v && b_v && positions,
                    "factorized_cache: a_k, b_k, a_v, b_v and positions must be non-null");
    detail::require(size >= 0 && size <= cfg_.capacity, "factorized_cache: size=", size,
                    " must be in [0, capacity=", cfg_.capacity, "]");
  }
  /// Moving leaves the source empty with capacity 0 (its appends throw), not a second handle
  /// on the memory the new owner now holds.
  factorized_cache(factorized_cache&& o) noexcept
      : cfg_(o.cfg_),
        owned_pos_(std::move(o.owned_pos_)),
        pos_(std::exchange(o.pos_, nullptr)),
        size_(std::exchange(o.size_, 0)) {
    o.cfg_.capacity = 0;
    for (int i = 0; i < 4; ++i) {
      per_token_[i] = o.per_token_[i], elements_[i] = o.elements_[i];
      owned_[i] = std::move(o.owned_[i]);
      f_[i] = std::exchange(o.f_[i], nullptr);
    }
  }
  /// Move assignment: the source is left empty with capacity 0.
  factorized_cache& operator=(factorized_cache&& o) noexcept {
    if (this != &o) {
      this->~factorized_cache();
      std::construct_at(this, std::move(o));
    }
    return *this;
  }

  /// The geometry, defaults resolved.
  const factorized_cache_config& config() const { return cfg_; }
  std::int64_t heads() const { return cfg_.heads; }            ///< heads H.
  std::int64_t head_dim() const { return cfg_.head_dim; }      ///< key width per head.
  std::int64_t v_head_dim() const { return cfg_.v_head_dim; }  ///< value width per head.
  std::int64_t k_rank() const { return cfg_.k_rank; }          ///< key rank R_K.
  std::int64_t v_rank() const { return cfg_.v_rank; }          ///< value rank R_V.
  float k_scale() const { return *cfg_.k_scale; }          ///< K = k_scale sum_r A_K[r, h] B_K[r].
  float v_scale() const { return *cfg_.v_scale; }          ///< V = v_scale sum_r A_V[r, h] B_V[r].
  std::int64_t size() const { return size_; }              ///< tokens held.
  std::int64_t capacity() const { return cfg_.capacity; }  ///< tokens the cache can hold.
  /// Bytes one token occupies: (k_rank (heads + head_dim) + v_rank (heads + v_head_dim)) sizeof(S).
  std::int64_t bytes_per_token() const {
    return (cfg_.k_rank * (cfg_.heads + cfg_.head_dim) +
            cfg_.v_rank * (cfg_.heads + cfg_.v_head_dim)) *
           static_cast<std::int64_t>(sizeof(S));
  }
  /// The positions of the held tokens [size()].
  std::span<const std::int64_t> positions() const {
    return {pos_, static_cast<std::size_t>(size_)};
  }
  /// What attend_factorized() reads: the four factor arrays and the positions.
  factor_view<S> view() const {
    return {cfg_.heads, cfg_.head_dim, cfg_.v_head_dim, cfg_.k_rank, cfg_.v_rank, k_scale(),
            v_scale(),  f_[0],         f_[1],           f_[2],       f_[3],       positions()};
  }

  /// Appends T tokens' factors (rounded to S); throws attnkit::invalid_argument on a shape mismatch
  /// or when T exceeds capacity() - size(), leaving the cache unchanged.
  void append(const factorized_append& a) {
    const std::int64_t t = static_cast<std::int64_t>(a.positions.size());
    const std::int64_t h = cfg_.heads, rk = cfg_.k_rank, rv = cfg_.v_rank;
    detail::require_extents(a.a_k, {t, rk, h}, "factorized_cache::append: a_k");
    detail::require_extents(a.b_k, {t, rk, cfg_.head_dim}, "factorized_cache::append: b_k");
    detail::require_extents(a.a_v, {t, rv, h}, "factorized_cache::append: a_v");
    detail::require_extents(a.b_v, {t, rv, cfg_.v_head_dim}, "factorized_cache::append: b_v");
    detail::require(t <= cfg_.capacity - size_, "factorized_cache::append: appending ", t,
                    " tokens to size=", size_, " exceeds capacity=", cfg_.capacity);
    const tensor3_view<const float>* src[4] = {&a.a_k, &a.b_k, &a.a_v, &a.b_v};
    for (std::int64_t i = 0; i < t; ++i) {
      const std::int64_t row = size_ + i;
      for (int f = 0; f < 4; ++f) copy(*src[f], i, f_[f] + row * per_token_[f]);
      pos_[row] = a.positions[static_cast<std::size_t>(i)];
    }
    size_ += t;
  }
  /// Keeps the first n tokens; n in [0, size()].
  void truncate(std::int64_t n) {
    detail::require(n >= 0 && n <= size_, "factorized_cache::truncate: n=", n,
                    " must be in [0, size=", size_, "]");
    size_ = n;
  }
  void clear() { size_ = 0; }  ///< Forgets every token; capacity and memory stay.

 private:
  static void copy(const tensor3_view<const float>& src, std::int64_t t, S* dst) {
    for (std::int64_t r = 0; r < src.extent(1); ++r)
      for (std::int64_t c = 0; c < src.extent(2); ++c) *dst++ = from_float<S>(src(t, r, c));
  }
  factorized_cache_config validated(factorized_cache_config c) {
    using detail::require;
    if (c.v_head_dim == 0) c.v_head_dim = c.head_dim;
    require(c.heads > 0, "factorized_cache: heads must be > 0, got ", c.heads);
    require(c.head_dim > 0 && c.v_head_dim > 0,
            "factorized_cache: head_dim and v_head_dim must be > 0, got ", c.head_dim, ", ",
            c.v_head_dim);
    require(c.k_rank > 0, "factorized_cache: k_rank must be > 0, got ", c.k_rank);
    require(c.v_rank > 0, "factorized_cache: v_rank must be > 0, got ", c.v_rank);
    require(c.capacity >= 0, "factorized_cache: capacity must be >= 0, got ", c.capacity);
    if (!c.k_scale) c.k_scale = 1.f / static_cast<float>(c.k_rank);
    if (!c.v_scale) c.v_scale = 1.f / static_cast<float>(c.v_rank);
    require(std::isfinite(*c.k_scale) && std::isfinite(*c.v_scale),
            "factorized_cache: k_scale and v_scale must be ", "finite, got ", *c.k_scale, " and ",
            *c.v_scale);
    const std::int64_t widths[4][2] = {
        {c.k_rank, c.heads}, {c.k_rank, c.head_dim}, {c.v_rank, c.heads}, {c.v_rank, c.v_head_dim}};
    for (int f = 0; f < 4; ++f) {
      per_token_[f] =
          detail::checked_mul(widths[f][0], widths[f][1], "factorized_cache: rank x width");
      elements_[f] = detail::checked_mul(c.capacity, per_token_[f],
                                         "factorized_cache: capacity x rank x width");
    }
    return c;
  }

  // Declared before cfg_: validated() sets them while cfg_ is initialised. A_K, B_K, A_V, B_V.
  std::int64_t per_token_[4] = {}, elements_[4] = {};
  factorized_cache_config cfg_;
  std::unique_ptr<S[], detail::aligned_free> owned_[4];
  std::unique_ptr<std::int64_t[], detail::aligned_free> owned_pos_;
  S* f_[4] = {};
  std::int64_t* pos_ = nullptr;
  std::int64_t size_ = 0;
};

static_assert(kv_cache<factorized_cache<float>>);

}  // namespace attnkit
