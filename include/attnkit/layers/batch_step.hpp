#pragma once
// What the layers' forward_batch share: appending a step's tokens to every sequence's cache
// with all-or-nothing semantics, and the batch's views of those caches.
#include <cstdint>
#include <span>
#include <vector>

#include "../kernels/batch_driver.hpp"

namespace attnkit::detail {

/// Appends sequence s's rows (q_indptr) to *caches[s] through append(cache, rows), then runs
/// attend(); if anything throws, every cache appended to is rolled back to its size before the
/// call and the exception goes on.
template <class Cache, class Append, class Attend>
void append_batch(std::span<Cache*> caches, std::span<const std::int64_t> q_indptr,
                  Append&& append, Attend&& attend) {
  std::size_t done = 0;
  try {
    for (; done < caches.size(); ++done)
      append(*caches[done], rows_of(q_indptr, static_cast<std::int64_t>(done)));
    attend();
  } catch (...) {
    for (std::size_t s = 0; s < done; ++s)
      caches[s]->truncate(caches[s]->size() - rows_of(q_indptr, static_cast<std::int64_t>(s)).size());
    throw;
  }
}

/// Checks every sequence's cache before a batch step changes any: not null, not another
/// sequence's too, room for its tokens, and geometry(view) (which throws on a mismatch).
template <class Cache, class Geometry>
void validate_batch_caches(const char* who, std::span<Cache*> caches,
                           std::span<const std::int64_t> q_indptr, Geometry&& geometry) {
  const auto n = static_cast<std::int64_t>(caches.size());
  for_each_sequence(who, n, [&](std::int64_t s) {
    const Cache* c = caches[static_cast<std::size_t>(s)];
    require(c != nullptr, "the cache is a null pointer");
    geometry(c->view());
    const std::int64_t add = rows_of(q_indptr, s).size();
    require(add <= c->capacity() - c->size(), "appending ", add, " tokens to size=", c->size(),
            " exceeds capacity=", c->capacity());
    for (std::int64_t u = s + 1; u < n; ++u)
      require(caches[static_cast<std::size_t>(u)] != c, "the same cache is also sequence ", u);
  });
}

/// The caches' views (view_of(cache), by default cache.view()) in batch order, in `views`
/// (reused across calls: no allocation once it has grown to the batch).
template <class View, class Cache, class ViewOf>
std::span<const View> views_of(std::span<Cache*> caches, std::vector<View>& views,
                               ViewOf&& view_of) {
  views.clear();
  for (const Cache* c : caches) views.push_back(view_of(*c));
  return views;
}
template <class View, class Cache>
std::span<const View> views_of(std::span<Cache*> caches, std::vector<View>& views) {
  return views_of(caches, views, [](const Cache& c) { return c.view(); });
}

}  // namespace attnkit::detail
