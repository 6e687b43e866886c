#pragma once
// dense_cache<S>: the KV cache of MHA, GQA and MQA. Per token: roped K [kv_heads, head_dim]
// and V [kv_heads, v_head_dim] in storage type S, plus the token's position.
//
// Layout: head-major, K as [kv_heads][capacity][head_dim] and V as
// [kv_heads][capacity][v_head_dim], so a decode step streams each KV head's rows contiguously. The
// cache either owns its memory (allocated once, 64-byte aligned, at construction) or wraps buffers
// the engine owns.
#include <cstdint>
#include <memory>
#include <utility>
#include <span>

#include "../core/aligned_buffer.hpp"
#include "../core/error.hpp"
#include "../core/simd.hpp"
#include "../core/storage.hpp"
#include "../core/view.hpp"
#include "kv_cache.hpp"
#include "kv_view.hpp"

namespace attnkit {

/// Geometry of a dense_cache; validated at construction (every extent positive).
struct dense_cache_config {
  std::int64_t kv_heads = 0;    ///< KV heads H_kv (H for MHA, 1 for MQA).
  std::int64_t head_dim = 0;    ///< key width d_qk per head.
  std::int64_t v_head_dim = 0;  ///< 0 = head_dim
  std::int64_t capacity = 0;    ///< tokens the cache can hold; fixed at construction.
};

/// Tokens to append: K and V already roped, token-major [T, kv_heads, dim] (any strides).
struct dense_append {
  tensor3_view<const float> k;              ///< roped keys [T, kv_heads, head_dim].
  tensor3_view<const float> v;              ///< values [T, kv_heads, v_head_dim].
  std::span<const std::int64_t> positions;  ///< the tokens' absolute positions [T].
};

/// KV cache of MHA, GQA and MQA in storage type S (float, bf16, half): per KV head, K [capacity,
/// head_dim] and V [capacity, v_head_dim] rows plus each token's position. Owning or over engine
/// memory; see the file comment for the layout.
template <storage_type S>
class dense_cache {
 public:
  using storage_type = S;            ///< the element type of the stored rows.
  using append_type = dense_append;  ///< what append() takes.

  /// Owning cache: allocates kv_heads * capacity * (head_dim + v_head_dim) elements now, never
  /// later.
  explicit dense_cache(const dense_cache_config& cfg) : cfg_(validated(cfg)) {
    owned_k_ = detail::aligned_alloc_array<S>(k_elements_);
    owned_v_ = detail::aligned_alloc_array<S>(v_elements_);
    owned_pos_ = detail::aligned_alloc_array<std::int64_t>(cfg_.capacity);
    k_ = owned_k_.get();
    v_ = owned_v_.get();
    pos_ = owned_pos_.get();
  }

  /// Non-owning cache over engine memory: k [kv_heads][capacity][head_dim], v
  /// [kv_heads][capacity][v_head_dim], positions [capacity]; `size` tokens already valid.
  dense_cache(const dense_cache_config& cfg, S* k, S* v, std::int64_t* positions,
              std::int64_t size = 0)
      : cfg_(validated(cfg)), k_(k), v_(v), pos_(positions), size_(size) {
    detail::require(k && v && positions, "dense_cache: k, v and positions must be non-null");
    detail::require(size >= 0 && size <= cfg_.capacity, "dense_cache: size=", size,
                    " must be in [0, capacity=", cfg_.capacity, "]");
  }

  /// Moving leaves the source empty with capacity 0 (its appends throw), not a second handle
  /// on the memory the new owner now holds.
  dense_cache(dense_cache&& o) noexcept
      : k_elements_(o.k_elements_),
        v_elements_(o.v_elements_),
        cfg_(o.cfg_),
        owned_k_(std::move(o.owned_k_)),
        owned_v_(std::move(o.owned_v_)),
        owned_pos_(std::move(o.owned_pos_)),
        k_(std::exchange(o.k_, nullptr)),
        v_(std::exchange(o.v_, nullptr)),
        pos_(std::exchange(o.pos_, nullptr)),
        size_(std::exchange(o.size_, 0)) {
    o.cfg_.capacity = 0;
  }
  /// Move assignment: as the move constructor, the source is left empty with capacity 0.
  dense_cache& operator=(dense_cache&& o) noexcept {
    if (this != &o) {
      this->~dense_cache();
      std::construct_at(this, std::move(o));
    }
    return *this;
  }

  const dense_cache_config& config() const { return cfg_; }  ///< The geometry, v_head_dim resolved.
  std::int64_t kv_heads() const { return cfg_.kv_heads; }    ///< KV heads H_kv.
  std::int64_t head_dim() const { return cfg_.head_dim; }    ///< key width per head.
  std::int64_t v_head_dim() const { return cfg_.v_head_dim; }  ///< value width per head.
  std::int64_t size() const { return size_; }                  ///< tokens held.
  std::int64_t capacity() const { return cfg_.capacity; }      ///< tokens the cache can hold.
  /// Bytes one token occupies in the cache: kv_heads (head_dim + v_head_dim) sizeof(S).
  std::int64_t bytes_per_token() const {
    return cfg_.kv_heads * (cfg_.head_dim + cfg_.v_head_dim) * static_cast<std::int64_t>(sizeof(S));
  }
  /// The positions of the held tokens [size()].
  std::span<const std::int64_t> positions() const {
    return {pos_, static_cast<std::size_t>(size_)};
  }

  /// What the kernels read: key row t of head j at k + (j * capacity + t) * head_dim, likewise V.
  kv_view<S> view() const {
    return kv_view<S>({k_, cfg_.capacity * cfg_.head_dim, cfg_.head_dim, cfg_.head_dim},
                      {v_, cfg_.capacity * cfg_.v_head_dim, cfg_.v_head_dim, cfg_.v_head_dim},
                      cfg_.kv_heads, positions());
  }

  /// Appends T tokens (rounded to S) after the held ones; throws attnkit::invalid_argument on a
  /// shape mismatch or when T exceeds capacity() - size(), leaving the cache unchanged.
  void append(const dense_append& a) {
    const std::int64_t t = static_cast<std::int64_t>(a.positions.size());
    detail::require_extents(a.k, {t, cfg_.kv_heads, cfg_.head_dim}, "dense_cache::append: k");
    detail::require_extents(a.v, {t, cfg_.kv_heads, cfg_.v_head_dim}, "dense_cache::append: v");
    detail::require(t <= cfg_.capacity - size_, "dense_cache::append: appending ", t,
                    " tokens to size=", size_, " exceeds capacity=", cfg_.capacity);
    for (std::int64_t i = 0; i < t; ++i) {
      const std::int64_t row = size_ + i;
      for (std::int64_t j = 0; j < cfg_.kv_heads; ++j) {
        detail::from_float_strided(&a.k(i, j, 0), a.k.stride(2), k_ + (j * cfg_.capacity + row) * cfg_.head_dim,
              cfg_.head_dim);
        detail::from_float_strided(&a.v(i, j, 0), a.v.stride(2), v_ + (j * cfg_.capacity + row) * cfg_.v_head_dim,
              cfg_.v_head_dim);
      }
      pos_[row] = a.positions[static_cast<std::size_t>(i)];
    }
    size_ += t;
  }
  /// Appends k [T, kv_heads, head_dim] and v [T, kv_heads, v_head_dim] at `positions` [T]; as
  /// append(const dense_append&).
  void append(tensor3_view<const float> k, tensor3_view<const float> v,
              std::span<const std::int64_t> positions) {
    append(dense_append{k, v, positions});
  }

  /// Keeps the first n tokens (speculative decoding rollback); n in [0, size()].
  void truncate(std::int64_t n) {
    detail::require(n >= 0 && n <= size_, "dense_cache::truncate: n=", n,
                    " must be in [0, size=", size_, "]");
    size_ = n;
  }
  void clear() { size_ = 0; }  ///< Forgets every token; capacity and memory stay.

 private:
  dense_cache_config validated(dense_cache_config c) {
    if (c.v_head_dim == 0) c.v_head_dim = c.head_dim;
    detail::require(c.kv_heads > 0, "dense_cache: kv_heads must be > 0, got ", c.kv_heads);
    detail::require(c.head_dim > 0, "dense_cache: head_dim must be > 0, got ", c.head_dim);
    detail::require(c.v_head_dim > 0, "dense_cache: v_head_dim must be > 0, got ", c.v_head_dim);
    detail::require(c.capacity >= 0, "dense_cache: capacity must be >= 0, got ", c.capacity);
    const std::int64_t rows =
        detail::checked_mul(c.kv_heads, c.capacity, "dense_cache: kv_heads x capacity");
    k_elements_ = detail::checked_mul(rows, c.head_dim,
                                      "dense_cache: K elements (kv_heads x capacity x head_dim)");
    v_elements_ = detail::checked_mul(rows, c.v_head_dim,
                                      "dense_cache: V elements (kv_heads x capacity x v_head_dim)");
    return c;
  }

  // Declared before cfg_: validated() sets them while cfg_ is initialised.
  std::int64_t k_elements_ = 0, v_elements_ = 0;
  dense_cache_config cfg_;
  std::unique_ptr<S[], detail::aligned_free> owned_k_, owned_v_;
  std::unique_ptr<std::int64_t[], detail::aligned_free> owned_pos_;
  S* k_ = nullptr;
  S* v_ = nullptr;
  std::int64_t* pos_ = nullptr;
  std::int64_t size_ = 0;
};

static_assert(kv_cache<dense_cache<float>>);

}  // namespace attnkit
