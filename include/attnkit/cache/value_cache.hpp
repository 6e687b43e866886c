#pragma once
// value_cache<S>: the cache of a shared-attention follower (layers/shared_stack.hpp), the fourth
// model of the kv_cache concept. A follower reuses an earlier layer's attention weights, so it
// keeps no keys: per token, V [kv_heads, v_head_dim] in storage type S and the token's position.
//
// Layout: head-major [kv_heads][capacity][v_head_dim], like dense_cache's V, so a decode step
// streams each KV head's rows contiguously. Owns its memory (allocated once, 64-byte aligned) or
// wraps buffers the engine owns.
#include <cstdint>
#include <memory>
#include <span>
#include <utility>

#include "../core/aligned_buffer.hpp"
#include "../core/error.hpp"
#include "../core/simd.hpp"
#include "../core/storage.hpp"
#include "../core/view.hpp"
#include "kv_cache.hpp"
#include "kv_view.hpp"

namespace attnkit {

/// Geometry of a value_cache; validated at construction.
struct value_cache_config {
  std::int64_t kv_heads = 0;    ///< KV heads H_kv of the donor layer's attention.
  std::int64_t v_head_dim = 0;  ///< value width d_v.
  std::int64_t capacity = 0;    ///< tokens the cache can hold; fixed at construction.
};

/// Tokens to append: V token-major [T, kv_heads, v_head_dim] (any strides) at their positions.
struct value_append {
  tensor3_view<const float> v;              ///< values [T, kv_heads, v_head_dim].
  std::span<const std::int64_t> positions;  ///< the tokens' absolute positions [T].
};

/// Cache of a shared-attention follower in storage type S: per KV head, value rows [capacity,
/// v_head_dim] plus each token's position, no keys (the follower reuses its donor's attention
/// weights). Owning or over engine memory.
template <storage_type S>
class value_cache {
 public:
  using storage_type = S;            ///< the element type of the rows.
  using append_type = value_append;  ///< what append() takes.

  /// Owning cache: allocates kv_heads * capacity * v_head_dim elements now, never later.
  explicit value_cache(const value_cache_config& cfg) : cfg_(validated(cfg)) {
    owned_v_ = detail::aligned_alloc_array<S>(elements_);
    owned_pos_ = detail::aligned_alloc_array<std::int64_t>(cfg_.capacity);
    v_ = owned_v_.get();
    pos_ = owned_pos_.get();
  }
  /// Non-owning cache over engine memory: v [kv_heads][capacity][v_head_dim], positions
  /// [capacity]; `size` tokens already valid.
  value_cache(const value_cache_config& cfg, S* v, std::int64_t* positions, std::int64_t size = 0)
      : cfg_(validated(cfg)), v_(v), pos_(positions), size_(size) {
    detail::require(v && positions, "value_cache: v and positions must be non-null");
    detail::require(size >= 0 && size <= cfg_.capacity, "value_cache: size=", size,
                    " must be in [0, capacity=", cfg_.capacity, "]");
  }
  /// Moving leaves the source empty with capacity 0.
  value_cache(value_cache&& o) noexcept
      : elements_(o.elements_),
        cfg_(o.cfg_),
        owned_v_(std::move(o.owned_v_)),
        owned_pos_(std::move(o.owned_pos_)),
        v_(std::exchange(o.v_, nullptr)),
        pos_(std::exchange(o.pos_, nullptr)),
        size_(std::exchange(o.size_, 0)) {
    o.cfg_.capacity = 0;
  }
  /// Move assignment: the source is left empty with capacity 0.
  value_cache& operator=(value_cache&& o) noexcept {
    if (this != &o) {
      this->~value_cache();
      std::construct_at(this, std::move(o));
    }
    return *this;
  }

  const value_cache_config& config() const { return cfg_; }    ///< The geometry.
  std::int64_t kv_heads() const { return cfg_.kv_heads; }      ///< KV heads H_kv.
  std::int64_t v_head_dim() const { return cfg_.v_head_dim; }  ///< value width d_v.
  std::int64_t size() const { return size_; }                  ///< tokens held.
  std::int64_t capacity() const { return cfg_.capacity; }      ///< tokens the cache can hold.
  /// Bytes one token occupies: kv_heads v_head_dim sizeof(S).
  std::int64_t bytes_per_token() const {
    return cfg_.kv_heads * cfg_.v_head_dim * static_cast<std::int64_t>(sizeof(S));
  }
  /// The positions of the held tokens [size()].
  std::span<const std::int64_t> positions() const {
    return {pos_, static_cast<std::size_t>(size_)};
  }
  /// Row t of head j at v + (j * capacity + t) * v_head_dim.
  value_view<S> view() const {
    return value_view<S>({v_, cfg_.capacity * cfg_.v_head_dim, cfg_.v_head_dim, cfg_.v_head_dim},
                         cfg_.kv_heads, positions());
  }

  /// Appends T tokens' values (rounded to S); throws attnkit::invalid_argument on a shape mismatch
  /// or when T exceeds capacity() - size(), leaving the cache unchanged.
  void append(const value_append& a) {
    const std::int64_t t = static_cast<std::int64_t>(a.positions.size());
    detail::require_extents(a.v, {t, cfg_.kv_heads, cfg_.v_head_dim}, "value_cache::append: v");
    detail::require(t <= cfg_.capacity - size_, "value_cache::append: appending ", t,
                    " tokens to size=", size_, " exceeds capacity=", cfg_.capacity);
    for (std::int64_t i = 0; i < t; ++i) {
      const std::int64_t row = size_ + i;
      for (std::int64_t j = 0; j < cfg_.kv_heads; ++j)
        detail::from_float_strided(&a.v(i, j, 0), a.v.stride(2),
                                   v_ + (j * cfg_.capacity + row) * cfg_.v_head_dim,
                                   cfg_.v_head_dim);
      pos_[row] = a.positions[static_cast<std::size_t>(i)];
    }
    size_ += t;
  }
  /// Appends v [T, kv_heads, v_head_dim] at `positions` [T].
  void append(tensor3_view<const float> v, std::span<const std::int64_t> positions) {
    append(value_append{v, positions});
  }

  /// Keeps the first n tokens; n in [0, size()].
  void truncate(std::int64_t n) {
    detail::require(n >= 0 && n <= size_, "value_cache::truncate: n=", n,
                    " must be in [0, size=", size_, "]");
    size_ = n;
  }
  void clear() { size_ = 0; }  ///< Forgets every token; capacity and memory stay.

 private:
  value_cache_config validated(const value_cache_config& c) {
    detail::require(c.kv_heads > 0, "value_cache: kv_heads must be > 0, got ", c.kv_heads);
    detail::require(c.v_head_dim > 0, "value_cache: v_head_dim must be > 0, got ", c.v_head_dim);
    detail::require(c.capacity >= 0, "value_cache: capacity must be >= 0, got ", c.capacity);
    elements_ = detail::checked_mul(
        detail::checked_mul(c.kv_heads, c.capacity, "value_cache: kv_heads x capacity"),
        c.v_head_dim, "value_cache: elements (kv_heads x capacity x v_head_dim)");
    return c;
  }

  // Declared before cfg_: validated() sets it while cfg_ is initialised.
  std::int64_t elements_ = 0;
  value_cache_config cfg_;
  std::unique_ptr<S[], detail::aligned_free> owned_v_;
  std::unique_ptr<std::int64_t[], detail::aligned_free> owned_pos_;
  S* v_ = nullptr;
  std::int64_t* pos_ = nullptr;
  std::int64_t size_ = 0;
};

static_assert(kv_cache<value_cache<float>>);

}  // namespace attnkit
