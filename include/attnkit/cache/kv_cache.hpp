#pragma once
// The KV-cache concept every cache models, and what kernels and layers accept.
//
// A cache holds, for each of size() tokens, an explicit int64 position and the cache type's
// own per-token payload (dense: roped K and V per KV head; latent: c and k_rope; factorized:
// the TPA factors; value-only: V). append() takes that payload type, and view() exports what
// the kernels read (cache/kv_view.hpp), so one concept covers every model:
//   size(), capacity(), bytes_per_token(), positions(), truncate(n), clear(),
//   append(const C::append_type&), view()
// Appending past capacity throws attnkit::invalid_argument and leaves the cache unchanged;
// truncate(n) rolls back to the first n tokens (e.g. rejected speculative tokens).
#include <concepts>
#include <cstdint>
#include <span>

#include "kv_view.hpp"

namespace attnkit {

/// The KV-cache concept (see the file comment): positions, payload appends that throw without
/// changing anything, truncate/clear, and view() for the kernels.
template <class C>
concept kv_cache = requires(C& c, const C& cc, std::int64_t n,
                            const typename C::append_type& payload) {
  typename C::storage_type;
  typename C::append_type;
  { cc.size() } -> std::convertible_to<std::int64_t>;
  { cc.capacity() } -> std::convertible_to<std::int64_t>;
  { cc.bytes_per_token() } -> std::convertible_to<std::int64_t>;
  { cc.positions() } -> std::convertible_to<std::span<const std::int64_t>>;
  cc.view();
  c.truncate(n);
  c.clear();
  c.append(payload);
};

/// A cache whose view is View (`kv_view<S>` or `factor_view<S>`): what a kernel over View accepts.
template <class C, class View>
concept cache_with_view = kv_cache<C> && requires(const C& c) {
  { c.view() } -> std::same_as<View>;
};

/// A cache that appends Payload: what a layer producing Payload accepts.
template <class C, class Payload>
concept cache_for = kv_cache<C> && std::same_as<typename C::append_type, Payload>;

namespace detail {
/// Runs f; if it throws, rolls `cache` back to its first `size` tokens and rethrows: a layer's
/// call that appended and then failed changes nothing.
template <class Cache, class F>
void undo_on_throw(Cache& cache, std::int64_t size, F&& f) {
  try {
    f();
  } catch (...) {
    cache.truncate(size);
    throw;
  }
}
}  // namespace detail

}  // namespace attnkit
