#pragma once
// The KV-cache concept every cache models and every kernel is written against.
//
// A cache holds, for each of size() tokens, an explicit int64 position and the cache type's
// own per-token payload (dense: roped K and V per KV head; latent: c and k_rope; factorized:
// the TPA factors; value-only: V). append() takes that payload type, so one concept covers
// all four models:
//   size(), capacity(), bytes_per_token(), positions(), truncate(n), clear(),
//   append(const C::append_type&)
// Appending past capacity throws attnkit::invalid_argument and leaves the cache unchanged;
// truncate(n) rolls back to the first n tokens (e.g. rejected speculative tokens).
#include <concepts>
#include <cstdint>
#include <span>

namespace attnkit {

template <class C>
concept kv_cache = requires(C& c, const C& cc, std::int64_t n, const typename C::append_type& payload) {
  typename C::storage_type;
  typename C::append_type;
  { cc.size() } -> std::convertible_to<std::int64_t>;
  { cc.capacity() } -> std::convertible_to<std::int64_t>;
  { cc.bytes_per_token() } -> std::convertible_to<std::int64_t>;
  { cc.positions() } -> std::convertible_to<std::span<const std::int64_t>>;
  c.truncate(n);
  c.clear();
  c.append(payload);
};

}  // namespace attnkit
