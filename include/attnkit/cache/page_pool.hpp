#pragma once
// page_pool<S>: fixed-size pages of KV memory for paged caches (cache/paged_cache.hpp), with a
// free list and per-page reference counts so that several sequences can share pages (a common
// prefix written once, forks, beam search). A page holds page_size tokens of one cache type's
// per-token payload (page_stride = page_size x token_elements elements); how the payload is laid
// out inside a page is the paged cache's. The pool owns its memory or wraps the engine's.
//
// Not thread-safe: an engine's scheduler allocates and frees between steps; the kernels only
// read pages through views.
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <vector>

#include "../core/aligned_buffer.hpp"
#include "../core/error.hpp"
#include "../core/storage.hpp"

namespace attnkit {

/// Size of a page_pool; validated at construction.
struct page_pool_config {
  std::int64_t num_pages = 0;       ///< pages in the pool, < 2^31 (int32 page indices).
  std::int64_t page_size = 0;       ///< tokens per page
  std::int64_t token_elements = 0;  ///< elements of S per token (the cache type's payload)
};

/// Fixed-size pages of KV memory in storage type S with a free list and per-page reference counts
/// (see the file comment). Not thread-safe.
template <storage_type S>
class page_pool {
 public:
  using storage_type = S;  ///< the element type of the pages.

  /// Owning pool: num_pages x page_size x token_elements elements, allocated now.
  explicit page_pool(const page_pool_config& cfg) : cfg_(validated(cfg, "page_pool")) {
    owned_ = detail::aligned_alloc_array<S>(elements_);
    data_ = owned_.get();
    init_pages();
  }
  /// Pool over engine memory of `elements` elements: a whole number of pages, num_pages of them.
  page_pool(const page_pool_config& cfg, S* data, std::int64_t elements)
      : cfg_(validated(cfg, "page_pool")), data_(data) {
    detail::require(data != nullptr || elements_ == 0, "page_pool: data is a null pointer");
    detail::require(elements == elements_, "page_pool: the memory holds ", elements,
                    " elements but num_pages=", cfg_.num_pages, " pages of page_size=",
                    cfg_.page_size, " tokens x ", cfg_.token_elements, " elements need ",
                    elements_);
    init_pages();
  }
  page_pool(const page_pool&) = delete;
  page_pool& operator=(const page_pool&) = delete;

  const page_pool_config& config() const { return cfg_; }              ///< The pool's size.
  std::int64_t num_pages() const { return cfg_.num_pages; }            ///< pages in the pool.
  std::int64_t page_size() const { return cfg_.page_size; }            ///< tokens per page.
  std::int64_t token_elements() const { return cfg_.token_elements; }  ///< elements of S per token.
  /// Elements from one page to the next.
  std::int64_t page_stride() const { return cfg_.page_size * cfg_.token_elements; }
  /// pages not held by any sequence.
  std::int64_t free_pages() const { return static_cast<std::int64_t>(free_.size()); }
  /// page 0's first element; page p starts at data() + p page_stride().
  S* data() { return data_; }
  const S* data() const { return data_; }  ///< page 0's first element.
  /// page p's first element [page_size x token_elements]; p is checked against the pool.
  S* page_data(std::int32_t p) { return data_ + checked(p, "page_data") * page_stride(); }
  /// page p's first element; p is checked against the pool.
  const S* page_data(std::int32_t p) const {
    return data_ + checked(p, "page_data") * page_stride();
  }

  /// A free page, with reference count 1; attnkit::invalid_argument when none is left.
  std::int32_t allocate() {
    detail::require(!free_.empty(), "page_pool::allocate: no free page (all ", cfg_.num_pages,
                    " pages in use)");
    const std::int32_t p = free_.back();
    free_.pop_back();
    refs_[static_cast<std::size_t>(p)] = 1;
    return p;
  }
  /// One more sequence holds page p.
  void retain(std::int32_t p) {
    detail::require(refs_[static_cast<std::size_t>(checked(p, "retain"))] > 0,
                    "page_pool::retain: page ", p, " is free");
    ++refs_[static_cast<std::size_t>(p)];
  }
  /// One sequence lets page p go; the last one frees it.
  void release(std::int32_t p) {
    auto& r = refs_[static_cast<std::size_t>(checked(p, "release"))];
    detail::require(r > 0, "page_pool::release: page ", p, " is already free");
    if (--r == 0) free_.push_back(p);
  }
  /// sequences holding page p (0: free).
  std::int32_t ref_count(std::int32_t p) const {
    return refs_[static_cast<std::size_t>(checked(p, "ref_count"))];
  }

 private:
  static page_pool_config validated(const page_pool_config& c, const char* who) {
    detail::require(c.num_pages >= 0 && c.num_pages <= std::numeric_limits<std::int32_t>::max(), who, ": num_pages=", c.num_pages,
                    " must be in [0, 2^31) (page indices are int32, as in vLLM's block tables)");
    detail::require(c.page_size > 0, who, ": page_size must be > 0, got ", c.page_size);
    detail::require(c.token_elements > 0, who, ": token_elements must be > 0, got ",
                    c.token_elements);
    return c;
  }
  std::int64_t checked(std::int32_t p, const char* what) const {
    detail::require(p >= 0 && p < cfg_.num_pages, "page_pool::", what, ": page ", p,
                    " is outside [0, ", cfg_.num_pages, ")");
    return p;
  }
  void init_pages() {
    refs_.assign(static_cast<std::size_t>(cfg_.num_pages), 0);
    free_.reserve(static_cast<std::size_t>(cfg_.num_pages));
    // Lowest pages first out of the free list.
    for (std::int64_t p = cfg_.num_pages; p-- > 0;) free_.push_back(static_cast<std::int32_t>(p));
  }

  // Initialised after cfg_ (declaration order), before the constructor bodies use it.
  page_pool_config cfg_;
  std::int64_t elements_ = detail::checked_mul(
      cfg_.num_pages, detail::checked_mul(cfg_.page_size, cfg_.token_elements, "page_pool: page size"),
      "page_pool: elements (num_pages x page_size x token_elements)");
  std::unique_ptr<S[], detail::aligned_free> owned_;
  S* data_ = nullptr;
  std::vector<std::int32_t> refs_;  // [num_pages]
  std::vector<std::int32_t> free_;  // free page indices, the next to hand out last
};

}  // namespace attnkit
