#pragma once
// paged_cache<S, Layout>: one sequence's KV cache in pages of a page_pool, for every cache type
// (Layout: paged_dense, paged_latent, paged_factors, paged_values). A model of the kv_cache
// concept like the contiguous caches: the same append payloads, positions, truncate, and a view
// the kernels read (a paged kv_view / factor_view / value_view, runs ending at page ends).
//
// Pages come from the pool as the sequence grows and go back on truncate, clear and
// destruction. fork(n) starts a sequence that shares the first n tokens' pages (a common prefix
// written once); a sequence about to write into a page another one also holds copies it first
// (copy on write), so sharing never changes what the other sequence reads. A call that throws
// (bad payload, no free page) changes nothing.
//
// Page layouts (each page holds page_size tokens; [a][b] is row-major):
//   paged_dense    K [H_kv][page_size][d_qk], then V [H_kv][page_size][d_v]
//   paged_latent   rows [page_size][d_c + rope_heads d_R] ([c ; k_rope] per token)
//   paged_factors  A_K [page_size][R_K H], B_K [page_size][R_K d], A_V [page_size][R_V H],
//                  B_V [page_size][R_V d_v]
//   paged_values   V [H_kv][page_size][d_v]
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/simd.hpp"
#include "../core/storage.hpp"
#include "../core/view.hpp"
#include "dense_cache.hpp"
#include "factorized_cache.hpp"
#include "kv_cache.hpp"
#include "kv_view.hpp"
#include "latent_cache.hpp"
#include "page_pool.hpp"
#include "value_cache.hpp"

namespace attnkit {

namespace detail {
/// Token i of src [T, rows, cols] (any strides) as rows x cols contiguous elements of S.
template <storage_type S>
void write_token(const tensor3_view<const float>& src, std::int64_t i, S* dst) {
  for (std::int64_t r = 0; r < src.extent(1); ++r)
    from_float_strided(&src(i, r, 0), src.stride(2), dst + r * src.extent(2), src.extent(2));
}
}  // namespace detail

/// GQA family: roped K and V per KV head.
struct paged_dense {
  using append_type = dense_append;  ///< what paged_cache::append() takes
  std::int64_t kv_heads = 0;         ///< KV heads H_kv
  std::int64_t head_dim = 0;         ///< key width d_qk
  std::int64_t v_head_dim = 0;       ///< value width d_v; 0 = head_dim

  /// Resolves defaults and checks the geometry (attnkit::invalid_argument).
  void validate() {
    if (v_head_dim == 0) v_head_dim = head_dim;
    detail::require(kv_heads > 0 && head_dim > 0 && v_head_dim > 0,
                    "paged_dense: kv_heads, head_dim and v_head_dim must be > 0, got ", kv_heads,
                    ", ", head_dim, ", ", v_head_dim);
  }
  /// Elements of S one token occupies in a page.
  std::int64_t token_elements() const { return kv_heads * (head_dim + v_head_dim); }
  /// Checks the shapes of a T-token append before anything is written.
  void check(const append_type& a, std::int64_t t) const {
    detail::require_extents(a.k, {t, kv_heads, head_dim}, "paged_cache::append: k");
    detail::require_extents(a.v, {t, kv_heads, v_head_dim}, "paged_cache::append: v");
  }
  /// Writes token i of `a` into slot `slot` of a page of ps tokens starting at `page`.
  template <storage_type S>
  void write(S* page, std::int64_t ps, std::int64_t slot, const append_type& a,
             std::int64_t i) const {
    S* v = page + kv_heads * ps * head_dim;
    for (std::int64_t j = 0; j < kv_heads; ++j) {
      detail::from_float_strided(&a.k(i, j, 0), a.k.stride(2), page + (j * ps + slot) * head_dim,
                                 head_dim);
      detail::from_float_strided(&a.v(i, j, 0), a.v.stride(2), v + (j * ps + slot) * v_head_dim,
                                 v_head_dim);
    }
  }
  /// The kernels\' view of a sequence: its page table `t` over the pool (page 0 at `pool`).
  template <storage_type S>
  kv_view<S> view(const S* pool, std::int64_t page_stride, std::int64_t num_pages,
                  const page_table& t, std::span<const std::int64_t> pos) const {
    const std::int64_t ps = t.page_size;
    return kv_view<S>::paged({pool, ps * head_dim, head_dim, head_dim, page_stride},
                             {pool + kv_heads * ps * head_dim, ps * v_head_dim, v_head_dim,
                              v_head_dim, page_stride},
                             kv_heads, t, num_pages, pos);
  }
};

/// MLA: the latent c and the roped k_rope of each token, one row.
struct paged_latent {
  using append_type = latent_append;  ///< what paged_cache::append() takes
  std::int64_t latent_dim = 0;        ///< d_c
  std::int64_t rope_dim = 0;          ///< d_R (0: no decoupled rope key)
  std::int64_t rope_heads = 1;        ///< rope keys per token

  /// Resolves defaults and checks the geometry (attnkit::invalid_argument).
  void validate() const {
    detail::require(latent_dim > 0 && rope_dim >= 0 && rope_heads >= 1,
                    "paged_latent: need latent_dim > 0, rope_dim >= 0, rope_heads >= 1; got ",
                    latent_dim, ", ", rope_dim, ", ", rope_heads);
  }
  /// Elements of S one token occupies in a page.
  std::int64_t token_elements() const { return latent_dim + rope_heads * rope_dim; }
  /// Checks the shapes of a T-token append before anything is written.
  void check(const append_type& a, std::int64_t t) const {
    detail::require_extents(a.c, {t, latent_dim}, "paged_cache::append: c");
    detail::require_extents(a.k_rope, {t, rope_heads, rope_dim}, "paged_cache::append: k_rope");
  }
  /// Writes token i of `a` into slot `slot` of a page of ps tokens starting at `page`.
  template <storage_type S>
  void write(S* page, std::int64_t /*ps*/, std::int64_t slot, const append_type& a,
             std::int64_t i) const {
    S* row = page + slot * token_elements();
    detail::from_float_strided(&a.c(i, 0), a.c.stride(1), row, latent_dim);
    if (rope_dim > 0) detail::write_token(a.k_rope, i, row + latent_dim);
  }
  /// The kernels\' view of a sequence: its page table `t` over the pool (page 0 at `pool`).
  template <storage_type S>
  kv_view<S> view(const S* pool, std::int64_t page_stride, std::int64_t num_pages,
                  const page_table& t, std::span<const std::int64_t> pos) const {
    const std::int64_t w = token_elements();
    return kv_view<S>::paged_latent(pool, w, page_stride, latent_dim, w, t, num_pages, pos);
  }
};

/// TPA: the four factors of each token.
struct paged_factors {
  using append_type = factorized_append;  ///< what paged_cache::append() takes
  std::int64_t heads = 0;                 ///< heads H
  std::int64_t head_dim = 0;              ///< key width d
  std::int64_t v_head_dim = 0;            ///< value width; 0 = head_dim
  std::int64_t k_rank = 0;                ///< R_K
  std::int64_t v_rank = 0;                ///< R_V
  std::optional<float> k_scale{};         ///< default 1/k_rank (T6)
  std::optional<float> v_scale{};         ///< default 1/v_rank (T6)

  /// Resolves defaults and checks the geometry (attnkit::invalid_argument).
  void validate() {
    if (v_head_dim == 0) v_head_dim = head_dim;
    if (!k_scale && k_rank > 0) k_scale = 1.f / static_cast<float>(k_rank);
    if (!v_scale && v_rank > 0) v_scale = 1.f / static_cast<float>(v_rank);
    detail::require(heads > 0 && head_dim > 0 && v_head_dim > 0 && k_rank > 0 && v_rank > 0,
                    "paged_factors: heads, head_dim, v_head_dim, k_rank, v_rank must be > 0, got ",
                    heads, ", ", head_dim, ", ", v_head_dim, ", ", k_rank, ", ", v_rank);
    detail::require(std::isfinite(*k_scale) && std::isfinite(*v_scale),
                    "paged_factors: k_scale and v_scale must be finite, got ", *k_scale, " and ",
                    *v_scale);
  }
  /// Elements per token of A_K, B_K, A_V, B_V.
  std::int64_t width(int f) const {
    const std::int64_t w[4] = {k_rank * heads, k_rank * head_dim, v_rank * heads,
                               v_rank * v_head_dim};
    return w[f];
  }
  /// Elements of S one token occupies in a page.
  std::int64_t token_elements() const { return width(0) + width(1) + width(2) + width(3); }
  /// Checks the shapes of a T-token append before anything is written.
  void check(const append_type& a, std::int64_t t) const {
    detail::require_extents(a.a_k, {t, k_rank, heads}, "paged_cache::append: a_k");
    detail::require_extents(a.b_k, {t, k_rank, head_dim}, "paged_cache::append: b_k");
    detail::require_extents(a.a_v, {t, v_rank, heads}, "paged_cache::append: a_v");
    detail::require_extents(a.b_v, {t, v_rank, v_head_dim}, "paged_cache::append: b_v");
  }
  /// Writes token i of `a` into slot `slot` of a page of ps tokens starting at `page`.
  template <storage_type S>
  void write(S* page, std::int64_t ps, std::int64_t slot, const append_type& a,
             std::int64_t i) const {
    const tensor3_view<const float>* src[4] = {&a.a_k, &a.b_k, &a.a_v, &a.b_v};
    for (int f = 0; f < 4; ++f) {
      detail::write_token(*src[f], i, page + slot * width(f));
      page += ps * width(f);  // the next factor's block of the page
    }
  }
  /// The kernels\' view of a sequence: its page table `t` over the pool (page 0 at `pool`).
  template <storage_type S>
  factor_view<S> view(const S* pool, std::int64_t page_stride, std::int64_t num_pages,
                      const page_table& t, std::span<const std::int64_t> pos) const {
    const std::int64_t ps = t.page_size;
    t.validate("paged_factors::view", static_cast<std::int64_t>(pos.size()), num_pages);
    const S* f[4];
    for (int i = 0; i < 4; ++i) f[i] = pool, pool += ps * width(i);
    return {heads, head_dim, v_head_dim, k_rank, v_rank, *k_scale, *v_scale, f[0], f[1], f[2],
            f[3],  pos,      t,          page_stride, num_pages};
  }
};

/// Shared-attention followers: V per KV head.
struct paged_values {
  using append_type = value_append;  ///< what paged_cache::append() takes
  std::int64_t kv_heads = 0;         ///< KV heads H_kv
  std::int64_t v_head_dim = 0;       ///< value width d_v

  /// Resolves defaults and checks the geometry (attnkit::invalid_argument).
  void validate() const {
    detail::require(kv_heads > 0 && v_head_dim > 0,
                    "paged_values: kv_heads and v_head_dim must be > 0, got ", kv_heads, ", ",
                    v_head_dim);
  }
  /// Elements of S one token occupies in a page.
  std::int64_t token_elements() const { return kv_heads * v_head_dim; }
  /// Checks the shapes of a T-token append before anything is written.
  void check(const append_type& a, std::int64_t t) const {
    detail::require_extents(a.v, {t, kv_heads, v_head_dim}, "paged_cache::append: v");
  }
  /// Writes token i of `a` into slot `slot` of a page of ps tokens starting at `page`.
  template <storage_type S>
  void write(S* page, std::int64_t ps, std::int64_t slot, const append_type& a,
             std::int64_t i) const {
    for (std::int64_t j = 0; j < kv_heads; ++j)
      detail::from_float_strided(&a.v(i, j, 0), a.v.stride(2), page + (j * ps + slot) * v_head_dim,
                                 v_head_dim);
  }
  /// The kernels\' view of a sequence: its page table `t` over the pool (page 0 at `pool`).
  template <storage_type S>
  value_view<S> view(const S* pool, std::int64_t page_stride, std::int64_t num_pages,
                     const page_table& t, std::span<const std::int64_t> pos) const {
    return value_view<S>::paged({pool, t.page_size * v_head_dim, v_head_dim, v_head_dim,
                                 page_stride},
                                kv_heads, t, num_pages, pos);
  }
};

/// One sequence's KV cache in pages of a `page_pool<S>`, for every cache type (Layout: paged_dense,
/// paged_latent, paged_factors, paged_values); a model of the kv_cache concept with copy-on-write
/// prefix sharing (fork). See the file comment for the page layouts.
template <storage_type S, class Layout>
class paged_cache {
 public:
  using storage_type = S;                            ///< the element type of the pages.
  using append_type = typename Layout::append_type;  ///< the layout's append payload.
  using layout_type = Layout;                        ///< the page layout.

  /// An empty sequence over `pool`, whose token_elements must be the layout's.
  paged_cache(page_pool<S>& pool, Layout layout) : pool_(&pool), layout_(validated(layout)) {
    detail::require(pool.token_elements() == layout_.token_elements(), "paged_cache: the pool's ",
                    pool.token_elements(), " elements per token differ from the layout's ",
                    layout_.token_elements());
  }
  paged_cache(const paged_cache&) = delete;
  paged_cache& operator=(const paged_cache&) = delete;
  /// Moving leaves the source empty (and still usable on its pool).
  paged_cache(paged_cache&& o) noexcept
      : pool_(o.pool_),
        layout_(o.layout_),
        pages_(std::exchange(o.pages_, {})),
        pos_(std::exchange(o.pos_, {})) {}
  /// Move assignment: releases this sequence's pages, then takes the source's.
  paged_cache& operator=(paged_cache&& o) noexcept {
    if (this != &o) {
      clear();
      pool_ = o.pool_, layout_ = o.layout_;
      pages_ = std::exchange(o.pages_, {});
      pos_ = std::exchange(o.pos_, {});
    }
    return *this;
  }
  ~paged_cache() { clear(); }

  const Layout& layout() const { return layout_; }  ///< The page layout (geometry).
  page_pool<S>& pool() const { return *pool_; }     ///< The pool the pages come from.
  std::int64_t size() const { return static_cast<std::int64_t>(pos_.size()); }  ///< tokens held.
  /// Tokens it can hold without another sequence freeing pages: the room in its last page
  /// (when that page is its own) plus every free page of the pool.
  std::int64_t capacity() const {
    const std::int64_t ps = pool_->page_size();
    return size() + (own_room() ? ps - size() % ps : 0) + pool_->free_pages() * ps;
  }
  /// Bytes one token occupies in its page: token_elements() sizeof(S).
  std::int64_t bytes_per_token() const {
    return layout_.token_elements() * static_cast<std::int64_t>(sizeof(S));
  }
  /// the positions of the held tokens [size()].
  std::span<const std::int64_t> positions() const { return pos_; }
  /// The sequence's page table (block table): page i holds tokens [i page_size, (i+1) page_size).
  std::span<const std::int32_t> pages() const { return pages_; }
  /// The page table in the form the views take.
  page_table table() const { return {pages_, pool_->page_size()}; }
  /// What the kernels read: a paged `kv_view<S>`, `factor_view<S>` or `value_view<S>` (by layout).
  auto view() const {
    return layout_.view(static_cast<const S*>(pool_->data()), pool_->page_stride(),
                        pool_->num_pages(), table(), positions());
  }

  /// Reserves room for `tokens` tokens in its own bookkeeping (no pages): appends up to there
  /// then allocate nothing but pages.
  void reserve(std::int64_t tokens) {
    detail::require(tokens >= 0, "paged_cache::reserve: tokens must be >= 0, got ", tokens);
    pos_.reserve(static_cast<std::size_t>(tokens));
    pages_.reserve(static_cast<std::size_t>(tokens / pool_->page_size() + 1));
  }

  /// Appends T tokens, allocating pages as needed (copying a shared last page first); throws
  /// attnkit::invalid_argument on a shape mismatch or when the pool runs out of pages, leaving the
  /// cache and the pool unchanged.
  void append(const append_type& a) {
    const auto t = static_cast<std::int64_t>(a.positions.size());
    layout_.check(a, t);
    const std::int64_t ps = pool_->page_size(), n = size();
    const std::int64_t total_pages = (n + t + ps - 1) / ps;
    const bool copy_last = t > 0 && n % ps != 0 && pool_->ref_count(pages_.back()) > 1;
    const std::int64_t fresh = total_pages - static_cast<std::int64_t>(pages_.size());
    detail::require(fresh + copy_last <= pool_->free_pages(), "paged_cache::append: appending ", t,
                    " tokens to size=", n, " needs ", fresh + copy_last, " free pages, the pool has ",
                    pool_->free_pages());
    pos_.reserve(static_cast<std::size_t>(n + t));  // may throw: before any change
    pages_.reserve(static_cast<std::size_t>(total_pages));
    if (copy_last) {  // the shared last page becomes this sequence's own copy
      const std::int32_t mine = pool_->allocate();
      std::copy_n(pool_->page_data(pages_.back()), pool_->page_stride(), pool_->page_data(mine));
      pool_->release(pages_.back());
      pages_.back() = mine;
    }
    for (std::int64_t i = 0; i < fresh; ++i) pages_.push_back(pool_->allocate());
    for (std::int64_t i = 0; i < t; ++i) {
      const std::int64_t tok = n + i;
      layout_.write(pool_->page_data(pages_[static_cast<std::size_t>(tok / ps)]), ps, tok % ps, a,
                    i);
      pos_.push_back(a.positions[static_cast<std::size_t>(i)]);
    }
  }

  /// Rolls back to the first n tokens, returning pages no longer used to the pool.
  void truncate(std::int64_t n) {
    detail::require(n >= 0 && n <= size(), "paged_cache::truncate: n=", n, " must be in [0, size=",
                    size(), "]");
    const std::int64_t keep = (n + pool_->page_size() - 1) / pool_->page_size();
    while (static_cast<std::int64_t>(pages_.size()) > keep) {
      pool_->release(pages_.back());
      pages_.pop_back();
    }
    pos_.resize(static_cast<std::size_t>(n));
  }
  /// Releases every page (truncate(0)).
  void clear() {
    if (pool_) truncate(0);
  }

  /// A new sequence sharing this one's first n tokens (their pages are retained, not copied).
  paged_cache fork(std::int64_t n) const {
    detail::require(n >= 0 && n <= size(), "paged_cache::fork: n=", n, " must be in [0, size=",
                    size(), "]");
    paged_cache f(*pool_, layout_);
    const std::int64_t keep = (n + pool_->page_size() - 1) / pool_->page_size();
    f.pages_.assign(pages_.begin(), pages_.begin() + keep);
    f.pos_.assign(pos_.begin(), pos_.begin() + n);
    for (const std::int32_t p : f.pages_) pool_->retain(p);
    return f;
  }
  /// A new sequence sharing all of this one's tokens.
  paged_cache fork() const { return fork(size()); }

 private:
  static Layout validated(Layout l) {
    l.validate();
    return l;
  }
  /// Its last page is partly filled and its own.
  bool own_room() const {
    return size() % pool_->page_size() != 0 && pool_->ref_count(pages_.back()) == 1;
  }

  page_pool<S>* pool_;
  Layout layout_;
  std::vector<std::int32_t> pages_;   // [ceil(size / page_size)]
  std::vector<std::int64_t> pos_;     // [size]
};

static_assert(kv_cache<paged_cache<float, paged_dense>>);
static_assert(kv_cache<paged_cache<float, paged_latent>>);
static_assert(kv_cache<paged_cache<float, paged_factors>>);
static_assert(kv_cache<paged_cache<float, paged_values>>);

}  // namespace attnkit
