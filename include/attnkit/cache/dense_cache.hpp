#pragma once
// dense_cache<S>: the KV cache of MHA, GQA and MQA. Per token: roped K [kv_heads, qk_dim]
// and V [kv_heads, v_dim] in storage type S, plus the token's position.
//
// Layout: head-major, K as [kv_heads][capacity][qk_dim] and V as [kv_heads][capacity][v_dim],
// so a decode step streams each KV head's rows contiguously. The cache either owns its memory
// (allocated once, 64-byte aligned, at construction) or wraps buffers the engine owns.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <span>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../core/error.hpp"
#include "../core/simd.hpp"
#include "../core/storage.hpp"
#include "../core/view.hpp"
#include "kv_cache.hpp"

namespace attnkit {

struct dense_cache_config {
  std::int64_t kv_heads = 0;
  std::int64_t qk_dim = 0;
  std::int64_t v_dim = 0;  ///< 0 = qk_dim
  std::int64_t capacity = 0;
};

/// Tokens to append: K and V already roped, token-major [T, kv_heads, dim] (any strides).
struct dense_append {
  tensor3_view<const float> k;
  tensor3_view<const float> v;
  std::span<const std::int64_t> positions;
};

namespace detail {
/// Buffers of 2 MiB and more are 2 MiB-aligned and, on Linux, advised to use transparent huge
/// pages: a decode step streams the whole cache, and 4 KiB pages cost a TLB miss every 4 KiB.
constexpr std::size_t huge_page_bytes = std::size_t{2} << 20;
inline std::size_t cache_alignment(std::size_t bytes) { return bytes >= huge_page_bytes ? huge_page_bytes : 64; }

struct aligned_free {
  std::size_t alignment = 64;
  void operator()(void* p) const { ::operator delete[](p, std::align_val_t{alignment}); }
};
template <class T>
std::unique_ptr<T[], aligned_free> aligned_alloc_array(std::int64_t n) {
  std::size_t bytes = static_cast<std::size_t>(std::max<std::int64_t>(n, 1)) * sizeof(T);
  const std::size_t align = cache_alignment(bytes);
  bytes = (bytes + align - 1) / align * align;
  void* p = ::operator new[](bytes, std::align_val_t{align});
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (align == huge_page_bytes) ::madvise(p, bytes, MADV_HUGEPAGE);  // a hint; failure is harmless
#endif
  return std::unique_ptr<T[], aligned_free>(static_cast<T*>(p), aligned_free{align});
}
}  // namespace detail

template <storage_type S>
class dense_cache {
 public:
  using storage_type = S;
  using append_type = dense_append;

  /// Owning cache: allocates kv_heads * capacity * (qk_dim + v_dim) elements now, never later.
  explicit dense_cache(const dense_cache_config& cfg) : cfg_(validated(cfg)) {
    const std::int64_t cap = cfg_.capacity;
    owned_k_ = detail::aligned_alloc_array<S>(cfg_.kv_heads * cap * cfg_.qk_dim);
    owned_v_ = detail::aligned_alloc_array<S>(cfg_.kv_heads * cap * cfg_.v_dim);
    owned_pos_ = detail::aligned_alloc_array<std::int64_t>(cap);
    k_ = owned_k_.get();
    v_ = owned_v_.get();
    pos_ = owned_pos_.get();
  }

  /// Non-owning cache over engine memory: k [kv_heads][capacity][qk_dim], v
  /// [kv_heads][capacity][v_dim], positions [capacity]; `size` tokens already valid.
  dense_cache(const dense_cache_config& cfg, S* k, S* v, std::int64_t* positions, std::int64_t size = 0)
      : cfg_(validated(cfg)), k_(k), v_(v), pos_(positions), size_(size) {
    detail::require(k && v && positions, "dense_cache: k, v and positions must be non-null");
    detail::require(size >= 0 && size <= cfg_.capacity, "dense_cache: size=", size, " must be in [0, capacity=",
                    cfg_.capacity, "]");
  }

  dense_cache(dense_cache&&) noexcept = default;
  dense_cache& operator=(dense_cache&&) noexcept = default;

  const dense_cache_config& config() const { return cfg_; }
  std::int64_t kv_heads() const { return cfg_.kv_heads; }
  std::int64_t qk_dim() const { return cfg_.qk_dim; }
  std::int64_t v_dim() const { return cfg_.v_dim; }
  std::int64_t size() const { return size_; }
  std::int64_t capacity() const { return cfg_.capacity; }
  std::int64_t bytes_per_token() const {
    return cfg_.kv_heads * (cfg_.qk_dim + cfg_.v_dim) * static_cast<std::int64_t>(sizeof(S));
  }
  std::span<const std::int64_t> positions() const { return {pos_, static_cast<std::size_t>(size_)}; }

  /// Rows of KV head j: key row t is keys(j) + t * qk_dim, value row t is values(j) + t * v_dim.
  const S* keys(std::int64_t j) const { return k_ + j * cfg_.capacity * cfg_.qk_dim; }
  const S* values(std::int64_t j) const { return v_ + j * cfg_.capacity * cfg_.v_dim; }

  void append(const dense_append& a) {
    const std::int64_t t = static_cast<std::int64_t>(a.positions.size());
    detail::require_extents(a.k, {t, cfg_.kv_heads, cfg_.qk_dim}, "dense_cache::append: k");
    detail::require_extents(a.v, {t, cfg_.kv_heads, cfg_.v_dim}, "dense_cache::append: v");
    detail::require(size_ + t <= cfg_.capacity, "dense_cache::append: appending ", t, " tokens to size=", size_,
                    " exceeds capacity=", cfg_.capacity);
    for (std::int64_t i = 0; i < t; ++i) {
      const std::int64_t row = size_ + i;
      for (std::int64_t j = 0; j < cfg_.kv_heads; ++j) {
        store(&a.k(i, j, 0), a.k.stride(2), k_ + (j * cfg_.capacity + row) * cfg_.qk_dim, cfg_.qk_dim);
        store(&a.v(i, j, 0), a.v.stride(2), v_ + (j * cfg_.capacity + row) * cfg_.v_dim, cfg_.v_dim);
      }
      pos_[row] = a.positions[static_cast<std::size_t>(i)];
    }
    size_ += t;
  }
  void append(tensor3_view<const float> k, tensor3_view<const float> v, std::span<const std::int64_t> positions) {
    append(dense_append{k, v, positions});
  }

  void truncate(std::int64_t n) {
    detail::require(n >= 0 && n <= size_, "dense_cache::truncate: n=", n, " must be in [0, size=", size_, "]");
    size_ = n;
  }
  void clear() { size_ = 0; }

 private:
  static dense_cache_config validated(dense_cache_config c) {
    if (c.v_dim == 0) c.v_dim = c.qk_dim;
    detail::require(c.kv_heads > 0, "dense_cache: kv_heads must be > 0, got ", c.kv_heads);
    detail::require(c.qk_dim > 0, "dense_cache: qk_dim must be > 0, got ", c.qk_dim);
    detail::require(c.v_dim > 0, "dense_cache: v_dim must be > 0, got ", c.v_dim);
    detail::require(c.capacity >= 0, "dense_cache: capacity must be >= 0, got ", c.capacity);
    return c;
  }
  static void store(const float* src, std::int64_t stride, S* dst, std::int64_t n) {
    if (stride == 1) {
      detail::from_float_row(src, dst, n);
    } else {
      for (std::int64_t i = 0; i < n; ++i) dst[i] = from_float<S>(src[i * stride]);
    }
  }

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
