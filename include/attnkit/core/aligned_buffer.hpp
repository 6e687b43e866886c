#pragma once
// Aligned, overflow-checked allocation for caches and benchmarks. Buffers of 2 MiB and more are
// 2 MiB-aligned and, on Linux, advised to use transparent huge pages: a decode step streams the
// whole cache, and 4 KiB pages cost a TLB miss every 4 KiB.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "error.hpp"

namespace attnkit::detail {

constexpr std::size_t huge_page_bytes = std::size_t{2} << 20;
inline std::size_t cache_alignment(std::size_t bytes) {
  return bytes >= huge_page_bytes ? huge_page_bytes : 64;
}

struct aligned_free {
  std::size_t alignment = 64;
  void operator()(void* p) const { ::operator delete[](p, std::align_val_t{alignment}); }
};

/// n elements of T, 64-byte (or 2 MiB) aligned, uninitialised; n is checked against the byte size
/// the platform can address.
template <class T>
std::unique_ptr<T[], aligned_free> aligned_alloc_array(std::int64_t n) {
  require(n >= 0 && static_cast<std::uint64_t>(n) <=
                        std::numeric_limits<std::size_t>::max() / sizeof(T) / 2,
          "allocation of ", n, " elements of ", sizeof(T), " bytes is impossible");
  std::size_t bytes = static_cast<std::size_t>(std::max<std::int64_t>(n, 1)) * sizeof(T);
  const std::size_t align = cache_alignment(bytes);
  bytes = (bytes + align - 1) / align * align;
  void* p = ::operator new[](bytes, std::align_val_t{align});
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (align == huge_page_bytes) ::madvise(p, bytes, MADV_HUGEPAGE);  // a hint; failure is harmless
#endif
  return std::unique_ptr<T[], aligned_free>(static_cast<T*>(p), aligned_free{align});
}

}  // namespace attnkit::detail
