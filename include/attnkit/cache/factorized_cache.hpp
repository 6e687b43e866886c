#pragma once
// factorized_cache<S>: the KV cache of TPA (Tensor Product Attention, T6). Per token it holds the
// factors, never K and V themselves: A_K [k_rank, heads], B_K [k_rank, qk_dim] (roped),
// A_V [v_rank, heads], B_V [v_rank, v_dim], in storage type S, plus the token's position:
//   K[h] = k_scale * sum_r A_K[r, h] B_K[r],   V[h] = v_scale * sum_r A_V[r, h] B_V[r].
// Layout: four arrays [capacity][rank][width], so the B rows of a block of tokens are one
// uniformly strided run (what the score micro-kernel streams) and the A entries of one rank
// are contiguous across heads (what the per-key head combination vectorises over).
#include <cstdint>
#include <span>

#include "../core/error.hpp"
#include "../core/storage.hpp"
#include "../core/view.hpp"
#include "dense_cache.hpp"
#include "kv_cache.hpp"

namespace attnkit {

struct factorized_cache_config {
  std::int64_t heads = 0;
  std::int64_t qk_dim = 0;
  std::int64_t v_dim = 0;  ///< 0 = qk_dim
  std::int64_t k_rank = 0;
  std::int64_t v_rank = 0;
  std::int64_t capacity = 0;
};

/// Tokens to append: a_k [T, k_rank, heads], b_k [T, k_rank, qk_dim] (roped), a_v [T, v_rank,
/// heads], b_v [T, v_rank, v_dim] (any strides).
struct factorized_append {
  tensor3_view<const float> a_k, b_k, a_v, b_v;
  std::span<const std::int64_t> positions;
};

template <storage_type S>
class factorized_cache {
 public:
  using storage_type = S;
  using append_type = factorized_append;

  explicit factorized_cache(const factorized_cache_config& cfg) : cfg_(validated(cfg)) {
    const std::int64_t cap = cfg_.capacity;
    a_k_ = detail::aligned_alloc_array<S>(cap * cfg_.k_rank * cfg_.heads);
    b_k_ = detail::aligned_alloc_array<S>(cap * cfg_.k_rank * cfg_.qk_dim);
    a_v_ = detail::aligned_alloc_array<S>(cap * cfg_.v_rank * cfg_.heads);
    b_v_ = detail::aligned_alloc_array<S>(cap * cfg_.v_rank * cfg_.v_dim);
    pos_ = detail::aligned_alloc_array<std::int64_t>(cap);
  }
  factorized_cache(factorized_cache&&) noexcept = default;
  factorized_cache& operator=(factorized_cache&&) noexcept = default;

  const factorized_cache_config& config() const { return cfg_; }
  std::int64_t heads() const { return cfg_.heads; }
  std::int64_t qk_dim() const { return cfg_.qk_dim; }
  std::int64_t v_dim() const { return cfg_.v_dim; }
  std::int64_t k_rank() const { return cfg_.k_rank; }
  std::int64_t v_rank() const { return cfg_.v_rank; }
  std::int64_t size() const { return size_; }
  std::int64_t capacity() const { return cfg_.capacity; }
  std::int64_t bytes_per_token() const {
    return (cfg_.k_rank * (cfg_.heads + cfg_.qk_dim) + cfg_.v_rank * (cfg_.heads + cfg_.v_dim)) *
           static_cast<std::int64_t>(sizeof(S));
  }
  std::span<const std::int64_t> positions() const { return {pos_.get(), static_cast<std::size_t>(size_)}; }
  /// Token t's factors: a_k() + t * k_rank * heads, b_k() + t * k_rank * qk_dim, etc.
  const S* a_k() const { return a_k_.get(); }
  const S* b_k() const { return b_k_.get(); }
  const S* a_v() const { return a_v_.get(); }
  const S* b_v() const { return b_v_.get(); }

  void append(const factorized_append& a) {
    const std::int64_t t = static_cast<std::int64_t>(a.positions.size());
    const std::int64_t h = cfg_.heads, rk = cfg_.k_rank, rv = cfg_.v_rank;
    detail::require_extents(a.a_k, {t, rk, h}, "factorized_cache::append: a_k");
    detail::require_extents(a.b_k, {t, rk, cfg_.qk_dim}, "factorized_cache::append: b_k");
    detail::require_extents(a.a_v, {t, rv, h}, "factorized_cache::append: a_v");
    detail::require_extents(a.b_v, {t, rv, cfg_.v_dim}, "factorized_cache::append: b_v");
    detail::require(size_ + t <= cfg_.capacity, "factorized_cache::append: appending ", t, " tokens to size=", size_,
                    " exceeds capacity=", cfg_.capacity);
    for (std::int64_t i = 0; i < t; ++i) {
      const std::int64_t row = size_ + i;
      copy(a.a_k, i, a_k_.get() + row * rk * h);
      copy(a.b_k, i, b_k_.get() + row * rk * cfg_.qk_dim);
      copy(a.a_v, i, a_v_.get() + row * rv * h);
      copy(a.b_v, i, b_v_.get() + row * rv * cfg_.v_dim);
      pos_[row] = a.positions[static_cast<std::size_t>(i)];
    }
    size_ += t;
  }
  void truncate(std::int64_t n) {
    detail::require(n >= 0 && n <= size_, "factorized_cache::truncate: n=", n, " must be in [0, size=", size_, "]");
    size_ = n;
  }
  void clear() { size_ = 0; }

 private:
  static void copy(const tensor3_view<const float>& src, std::int64_t t, S* dst) {
    for (std::int64_t r = 0; r < src.extent(1); ++r)
      for (std::int64_t c = 0; c < src.extent(2); ++c) *dst++ = from_float<S>(src(t, r, c));
  }
  static factorized_cache_config validated(factorized_cache_config c) {
    if (c.v_dim == 0) c.v_dim = c.qk_dim;
    detail::require(c.heads > 0, "factorized_cache: heads must be > 0, got ", c.heads);
    detail::require(c.qk_dim > 0 && c.v_dim > 0, "factorized_cache: qk_dim and v_dim must be > 0, got ", c.qk_dim, ", ",
                    c.v_dim);
    detail::require(c.k_rank > 0, "factorized_cache: k_rank must be > 0, got ", c.k_rank);
    detail::require(c.v_rank > 0, "factorized_cache: v_rank must be > 0, got ", c.v_rank);
    detail::require(c.capacity >= 0, "factorized_cache: capacity must be >= 0, got ", c.capacity);
    return c;
  }

  factorized_cache_config cfg_;
  std::unique_ptr<S[], detail::aligned_free> a_k_, b_k_, a_v_, b_v_;
  std::unique_ptr<std::int64_t[], detail::aligned_free> pos_;
  std::int64_t size_ = 0;
};

static_assert(kv_cache<factorized_cache<float>>);

}  // namespace attnkit
