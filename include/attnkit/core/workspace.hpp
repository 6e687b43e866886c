#pragma once
// attention_workspace: scratch memory reused across attention calls, so a steady-state decode
// step does not allocate. One call at a time per workspace; without one, a call allocates its own.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

namespace attnkit {

namespace detail {
struct workspace_access;

/// std::allocator's contract, 64-byte aligned: the kernels' scratch buffers start on cache lines
/// (a vector load or AMX tile row that straddles two lines reads both).
template <class T>
struct cache_line_allocator {
  using value_type = T;
  static constexpr std::align_val_t alignment{64};
  cache_line_allocator() = default;
  template <class U>
  cache_line_allocator(const cache_line_allocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), alignment)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, alignment); }
  friend bool operator==(const cache_line_allocator&, const cache_line_allocator&) { return true; }
};
template <class T>
using scratch_vector = std::vector<T, cache_line_allocator<T>>;
}  // namespace detail

/// Scratch memory reused across attention calls (see the file comment); pass the same one to
/// every call of a decode loop and a steady-state step allocates nothing.
class attention_workspace {
 public:
  attention_workspace() = default;
  /// Bytes currently held (grows to the largest call's need, never shrinks).
  std::size_t bytes() const {
    std::size_t n = (partial_.size() + query_.size() + lse_.size()) * sizeof(float) +
                    counts_.size() * sizeof(std::int64_t);
    for (const auto& w : workers_)
      n += w.floats.size() * sizeof(float) + w.ints.size() * sizeof(std::int64_t);
    return n;
  }

 private:
  friend struct detail::workspace_access;
  struct worker {
    detail::scratch_vector<float> floats;
    std::vector<std::int64_t> ints;
  };
  std::vector<worker> workers_;
  detail::scratch_vector<float> partial_, query_, lse_;
  std::vector<std::int64_t> counts_;
};

namespace detail {
/// The kernels' view of a workspace: sized buffers, grown before the parallel region so that
/// workers never allocate.
struct workspace_access {
  static void reserve_workers(attention_workspace& ws, std::size_t n, std::size_t floats,
                              std::size_t ints) {
    if (ws.workers_.size() < n) ws.workers_.resize(n);
    for (std::size_t w = 0; w < n; ++w) {
      auto& wk = ws.workers_[w];
      if (wk.floats.size() < floats) wk.floats.resize(floats);
      if (wk.ints.size() < ints) wk.ints.resize(ints);
    }
  }
  static float* worker_floats(attention_workspace& ws, std::size_t w) {
    return ws.workers_[w].floats.data();
  }
  static std::int64_t* worker_ints(attention_workspace& ws, std::size_t w) {
    return ws.workers_[w].ints.data();
  }
  /// Per-call partial states of the key splits.
  static float* partial(attention_workspace& ws, std::size_t floats) {
    if (ws.partial_.size() < floats) ws.partial_.resize(floats);
    return ws.partial_.data();
  }
  /// Per-call counters of finished key splits, one per (query tile, head group), zeroed.
  static std::int64_t* split_counts(attention_workspace& ws, std::size_t n) {
    if (ws.counts_.size() < n) ws.counts_.resize(n);
    std::fill(ws.counts_.begin(), ws.counts_.begin() + static_cast<std::ptrdiff_t>(n), 0);
    return ws.counts_.data();
  }
  /// Per-call query staging (e.g. MLA's [q_latent ; q_rope] rows).
  static float* query(attention_workspace& ws, std::size_t floats) {
    if (ws.query_.size() < floats) ws.query_.resize(floats);
    return ws.query_.data();
  }
  /// Per-call row LSE [Tq][H] when the caller asked for the weights but not the LSE.
  static float* lse(attention_workspace& ws, std::size_t floats) {
    if (ws.lse_.size() < floats) ws.lse_.resize(floats);
    return ws.lse_.data();
  }
};
}  // namespace detail

}  // namespace attnkit
