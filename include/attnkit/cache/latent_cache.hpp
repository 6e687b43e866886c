#pragma once
// latent_cache<S>: the KV cache of MLA. Per token: the latent c [latent_dim] (after the optional
// RMSNorm) and the roped key part k_rope [rope_heads, rope_dim], in storage type S, plus the
// token's position. rope_heads is 1 for DeepSeek; MHA2MLA and the exact GQA conversion use one
// rope key per KV-head group.
//
// Layout: one row per token, [c | k_rope_0 | ... | k_rope_{n-1}] (row width latent_dim +
// rope_heads * rope_dim), so the absorbed MLA kernel reads one contiguous row per token for both
// its keys ([c ; k_rope]) and its values (a view of the same row's c: never a second copy).
#include <cstdint>
#include <memory>
#include <utility>
#include <limits>
#include <span>

#include "../core/aligned_buffer.hpp"
#include "../core/error.hpp"
#include "../core/simd.hpp"
#include "../core/storage.hpp"
#include "../core/view.hpp"
#include "kv_cache.hpp"
#include "kv_view.hpp"

namespace attnkit {

/// Geometry of a latent_cache (MLA); validated at construction.
struct latent_cache_config {
  std::int64_t latent_dim = 0;  ///< d_c (kv_lora_rank)
  std::int64_t rope_dim = 0;    ///< d_R (qk_rope_head_dim); 0 allowed (no decoupled rope key)
  std::int64_t rope_heads = 1;  ///< n_rope_heads
  std::int64_t capacity = 0;    ///< tokens the cache can hold; fixed at construction.
};

/// Tokens to append: c [T, latent_dim] and roped k_rope [T, rope_heads, rope_dim] (any strides).
struct latent_append {
  matrix_view<const float> c;  ///< latents [T, latent_dim], already normalised (kv_a_layernorm).
  tensor3_view<const float> k_rope;         ///< roped decoupled keys [T, rope_heads, rope_dim].
  std::span<const std::int64_t> positions;  ///< the tokens' absolute positions [T].
};

/// KV cache of MLA in storage type S: one row [c (latent_dim) | k_rope (rope_heads x rope_dim)] per
/// token plus its position. Owning (allocated once) or over engine memory.
template <storage_type S>
class latent_cache {
 public:
  using storage_type = S;             ///< the element type of the rows.
  using append_type = latent_append;  ///< what append() takes.

  /// Owning cache: allocates capacity rows of row_width() elements now, never later.
  explicit latent_cache(const latent_cache_config& cfg) : cfg_(validated(cfg)) {
    owned_rows_ = detail::aligned_alloc_array<S>(
        detail::checked_mul(cfg_.capacity, row_width(), "latent_cache: capacity x row width"));
    owned_pos_ = detail::aligned_alloc_array<std::int64_t>(cfg_.capacity);
    rows_ = owned_rows_.get();
    pos_ = owned_pos_.get();
  }
  /// Non-owning: rows [capacity][latent_dim + rope_heads * rope_dim], positions [capacity].
  latent_cache(const latent_cache_config& cfg, S* rows, std::int64_t* positions,
               std::int64_t size = 0)
      : cfg_(validated(cfg)), rows_(rows), pos_(positions), size_(size) {
    detail::require(rows && positions, "latent_cache: rows and positions must be non-null");
    detail::require(size >= 0 && size <= cfg_.capacity, "latent_cache: size=", size,
                    " must be in [0, capacity=", cfg_.capacity, "]");
  }
  /// Moving leaves the source empty with capacity 0 (its appends throw), not a second handle
  /// on the memory the new owner now holds.
  latent_cache(latent_cache&& o) noexcept
      : cfg_(o.cfg_),
        owned_rows_(std::move(o.owned_rows_)),
        owned_pos_(std::move(o.owned_pos_)),
        rows_(std::exchange(o.rows_, nullptr)),
        pos_(std::exchange(o.pos_, nullptr)),
        size_(std::exchange(o.size_, 0)) {
    o.cfg_.capacity = 0;
  }
  /// Move assignment: the source is left empty with capacity 0.
  latent_cache& operator=(latent_cache&& o) noexcept {
    if (this != &o) {
      this->~latent_cache();
      std::construct_at(this, std::move(o));
    }
    return *this;
  }

  const latent_cache_config& config() const { return cfg_; }   ///< The geometry.
  std::int64_t latent_dim() const { return cfg_.latent_dim; }  ///< d_c.
  std::int64_t rope_dim() const { return cfg_.rope_dim; }      ///< d_R.
  std::int64_t rope_heads() const { return cfg_.rope_heads; }  ///< rope keys per token.
  /// elements per token row: latent_dim + rope_heads rope_dim.
  std::int64_t row_width() const { return cfg_.latent_dim + cfg_.rope_heads * cfg_.rope_dim; }
  std::int64_t size() const { return size_; }              ///< tokens held.
  std::int64_t capacity() const { return cfg_.capacity; }  ///< tokens the cache can hold.
  /// Bytes one token occupies: row_width() sizeof(S).
  std::int64_t bytes_per_token() const {
    return row_width() * static_cast<std::int64_t>(sizeof(S));
  }
  /// The positions of the held tokens [size()].
  std::span<const std::int64_t> positions() const {
    return {pos_, static_cast<std::size_t>(size_)};
  }
  /// Row t: rows() + t * row_width(); c first, then the rope keys.
  const S* rows() const { return rows_; }
  /// What the kernels read: one KV head whose keys are the rows and whose values are their c.
  kv_view<S> view() const {
    return kv_view<S>::latent(rows_, row_width(), cfg_.latent_dim, row_width(), positions());
  }

  /// Appends T tokens (rounded to S); throws attnkit::invalid_argument on a shape mismatch or when
  /// T exceeds capacity() - size(), leaving the cache unchanged.
  void append(const latent_append& a) {
    const std::int64_t t = static_cast<std::int64_t>(a.positions.size());
    detail::require_extents(a.c, {t, cfg_.latent_dim}, "latent_cache::append: c");
    detail::require_extents(a.k_rope, {t, cfg_.rope_heads, cfg_.rope_dim},
                            "latent_cache::append: k_rope");
    detail::require(t <= cfg_.capacity - size_, "latent_cache::append: appending ", t,
                    " tokens to size=", size_, " exceeds capacity=", cfg_.capacity);
    const std::int64_t w = row_width();
    for (std::int64_t i = 0; i < t; ++i) {
      S* row = rows_ + (size_ + i) * w;
      for (std::int64_t c = 0; c < cfg_.latent_dim; ++c) row[c] = from_float<S>(a.c(i, c));
      for (std::int64_t h = 0; h < cfg_.rope_heads; ++h)
        for (std::int64_t c = 0; c < cfg_.rope_dim; ++c)
          row[cfg_.latent_dim + h * cfg_.rope_dim + c] = from_float<S>(a.k_rope(i, h, c));
      pos_[size_ + i] = a.positions[static_cast<std::size_t>(i)];
    }
    size_ += t;
  }
  /// Appends c [T, latent_dim] and k_rope [T, rope_heads, rope_dim] at `positions` [T].
  void append(matrix_view<const float> c, tensor3_view<const float> k_rope,
              std::span<const std::int64_t> positions) {
    append(latent_append{c, k_rope, positions});
  }
  /// Keeps the first n tokens; n in [0, size()].
  void truncate(std::int64_t n) {
    detail::require(n >= 0 && n <= size_, "latent_cache::truncate: n=", n,
                    " must be in [0, size=", size_, "]");
    size_ = n;
  }
  void clear() { size_ = 0; }  ///< Forgets every token; capacity and memory stay.

 private:
  static latent_cache_config validated(const latent_cache_config& c) {
    detail::require(c.latent_dim > 0, "latent_cache: latent_dim must be > 0, got ", c.latent_dim);
    detail::require(c.rope_dim >= 0, "latent_cache: rope_dim must be >= 0, got ", c.rope_dim);
    detail::require(c.rope_heads >= 1, "latent_cache: rope_heads must be >= 1, got ", c.rope_heads);
    detail::require(c.capacity >= 0, "latent_cache: capacity must be >= 0, got ", c.capacity);
    (void)detail::checked_mul(c.rope_heads, c.rope_dim, "latent_cache: rope_heads x rope_dim");
    detail::require(
        c.rope_heads * c.rope_dim <= std::numeric_limits<std::int64_t>::max() - c.latent_dim,
        "latent_cache: row width overflows int64");
    return c;
  }

  latent_cache_config cfg_;
  std::unique_ptr<S[], detail::aligned_free> owned_rows_;
  std::unique_ptr<std::int64_t[], detail::aligned_free> owned_pos_;
  S* rows_ = nullptr;
  std::int64_t* pos_ = nullptr;
  std::int64_t size_ = 0;
};

static_assert(kv_cache<latent_cache<float>>);

}  // namespace attnkit
