#pragma once
// The micro-kernels of every target, and the calls that run them on the active one.
// simd/kernels.inl is written once against a float vector V; this header compiles it once per
// target of the includer's architecture, each copy in its own namespace (simd_scalar,
// simd_avx2, simd_avx512, simd_neon) under that target's instruction-set attributes (GCC:
// `#pragma GCC target`; clang: `#pragma clang attribute`), so no -march flag is needed and
// nothing compiled for one target leaks into code the others run. The detail:: functions at the
// end switch on active_target() (core/cpu.hpp) once per call; each call does a tile's worth of
// work, so the switch costs nothing measurable.
//
// Everything the target copies use is included or defined before the first copy: a header
// first included inside a target region would compile its inline functions for that target.
#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "../core/cpu.hpp"
#include "../core/storage.hpp"

#if ATTNKIT_X86_TARGETS
#include <immintrin.h>
#endif
#if ATTNKIT_NEON_TARGET
#include <arm_neon.h>
#endif

// Full unrolling of the register-block loops must happen before GCC decides where the
// accumulator arrays live: otherwise it keeps acc[][] in memory and stores it on every
// iteration of the hot loop (seen with a prefetch in the loop body; docs/benchmarks.md).
#if defined(__clang__)
#define ATTNKIT_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define ATTNKIT_UNROLL _Pragma("GCC unroll 16")
#else
#define ATTNKIT_UNROLL
#endif

// The small pieces of a register-blocked kernel (a step, a reduction) must be inlined into its
// loop: in a large translation unit GCC may leave them calls, and the register block spills.
// ATTNKIT_NOINLINE: a loop kept out of its caller's body, where inlining it made the caller
// spill (see exp_shift_sum).
#if defined(__GNUC__)
#define ATTNKIT_INLINE inline __attribute__((always_inline))
#define ATTNKIT_NOINLINE inline __attribute__((noinline))
#else
#define ATTNKIT_INLINE inline
#define ATTNKIT_NOINLINE inline
#endif

/// Software prefetch into L2, this many bytes of rows ahead. One core streaming K/V rows from
/// DRAM while it computes needs more misses in flight than its hardware prefetchers issue; 64 KiB
/// ahead brought K+V streaming close to a plain read (docs/benchmarks.md, GQA decode).
#ifndef ATTNKIT_PREFETCH_BYTES
#define ATTNKIT_PREFETCH_BYTES 65536
#endif

namespace attnkit::detail {

/// The software-prefetch stream a kernel's inner loop drives: step() runs once per iteration and
/// may issue one prefetch, so a caller's prefetches spread evenly over the work instead of
/// queueing up in bursts (a burst fills the core's miss buffers and stalls it; spread, the same
/// lines arrive while the FMAs run). no_prefetch is the default: it issues nothing.
struct no_prefetch {
  void step() {}
};

/// The cache level a prefetch brings its line into.
enum class cache_level { l1, l2 };
/// Prefetches the cache line at p into L2 (T1), or into L1 (T0) for Into = cache_level::l1; a
/// no-op where the compiler has neither the instruction nor a builtin. An asm statement on x86-64
/// and AArch64: GCC 12's dead-code elimination deletes some __builtin_prefetch calls whose
/// addresses come from a local array of row pointers, as the streaming score block's do (its K
/// rows went unprefetched without a warning; docs/benchmarks.md), and a volatile asm is never
/// deleted.
template <cache_level Into = cache_level::l2>
inline void prefetch_line(const void* p) {
  constexpr bool l1 = Into == cache_level::l1;
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
  if constexpr (l1)
    __asm__ volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
  else
    __asm__ volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#elif (defined(__GNUC__) || defined(__clang__)) && defined(__aarch64__)
  if constexpr (l1)
    __asm__ volatile("prfm pldl1keep, [%0]" : : "r"(p));
  else
    __asm__ volatile("prfm pldl2keep, [%0]" : : "r"(p));
#elif defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, l1 ? 3 : 2);
#else
  (void)p, (void)l1;
#endif
}
/// A prefetch stream (see no_prefetch) of byte ranges' lines into L1, a line per step: a
/// streaming decode step's value block while the block's scores run, so that its P V, which
/// follows, reads L1 (the rows were requested into L2 a prefetch distance before). The block is
/// one range in a contiguous cache, one per page it spans in a paged one; a block over more
/// than `capacity` pages is not brought in. Issued on targets with V::value_block_l1 only:
/// AVX2, where it was measured faster (docs/benchmarks.md), whose P V chunks update 8
/// accumulators, one FMA chain each per key, so a value load from L2 holds up the chains; on
/// AVX-512 (16 accumulators) no gain was shown.
struct l1_range_prefetch {
  static constexpr int capacity = 16;
  const char* next = nullptr;    // the line the next step issues, in the range being issued
  const char* end = nullptr;     // that range's end
  int count = 0;                 // ranges added; -1 past capacity (the stream then issues nothing)
  int taken = 0;                 // ranges started
  const char* begins[capacity];  // [count]: the line holding each range's first byte
  const char* ends[capacity];    // [count]
  void add(const void* begin, const void* range_end) {
    if (count < 0) return;
    if (count == capacity) {
      count = -1, next = end = nullptr;
      return;
    }
    const char* b = static_cast<const char*>(begin);
    begins[count] = b - (reinterpret_cast<std::uintptr_t>(b) & 63);
    ends[count++] = static_cast<const char*>(range_end);
  }
  void step() {
    if (next >= end) {
      if (taken >= count) return;
      next = begins[taken], end = ends[taken], ++taken;
    }
    prefetch_line<cache_level::l1>(next);
    next += 64;
  }
};
inline std::int64_t prefetch_rows(std::int64_t row_bytes) {
  return std::max<std::int64_t>(4, ATTNKIT_PREFETCH_BYTES / std::max<std::int64_t>(row_bytes, 1));
}
/// The lines of `bytes` > 0 bytes from row. A loop that always takes its first line: the per-key
/// P V chunks call it for half a line, and a loop that may take none compiled to a dozen
/// instructions of setup around the one prefetch (GCC 12).
template <class S>
inline void prefetch_row(const S* row, std::int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(row);
  std::int64_t b = 0;
  do {
    prefetch_line(p + b);
    b += 64;
  } while (b < bytes);
}

/// n rounded up to whole 16-row (or 16-column) AMX tiles, or to whole 32-deep ones.
constexpr std::int64_t round16(std::int64_t n) { return (n + 15) / 16 * 16; }
constexpr std::int64_t round32(std::int64_t n) { return (n + 31) / 32 * 32; }

/// A key block's rows in groups of 16 keys for the AMX kernels of a single row tile: group i's
/// rows at base[i] + r * stride[i] (bf16 elements; r < 16, in the last group r < keys % 16 when
/// keys is no multiple of 16), each group in place or gathered where its rows cross pages.
struct amx_key_groups {
  static constexpr int capacity = 16;  // keys <= 256
  const bf16* base[capacity];
  std::int64_t stride[capacity];
  std::int64_t keys = 0;
};

/// One float operand of AMX tile products as n bf16 parts (f32 products on AMX:
/// gqa_products::split_parts): the A operand repeats a_stride of its elements apart, or the B
/// operand b_stride of its elements apart, the other loaded once for all the parts (stride 0);
/// every part is multiplied into the same C tiles.
struct amx_parts {
  int n = 1;
  std::int64_t a_stride = 0, b_stride = 0;
};

/// A prefetch stream (see no_prefetch) over the byte ranges a kernel's next key block will read:
/// step() issues the current range's next cache line, or (once per range) moves to the next
/// range, which the Ranges object given to start() yields through `next(begin, end)` until it
/// returns false. Kernels start it on their next block as they begin a block, so each line is
/// issued about a block's time before it is read: spread over the block's work, the DRAM reads
/// overlap it. One type for every kind of ranges (reached through a function pointer once per
/// range), so the GEMM tiles it is stepped in are compiled once for all of them.
class range_prefetcher {
 public:
  /// Issues every line left of the previous ranges, then starts on `ranges` (stored in `slot`,
  /// which outlives the stream's use).
  template <class Ranges>
  void start(Ranges& slot, const Ranges& ranges) {
    finish();
    slot = ranges;
    ranges_ = &slot, more_ = true;
    next_range_ = [](void* r, const char*& b, const char*& e) {
      return static_cast<Ranges*>(r)->next(b, e);
    };
  }
  void step() {
    if (next_ < end_) {
      prefetch_line(next_);
      next_ += 64;
    } else if (more_) {
      advance();
    }
  }
  /// Every line not yet issued.
  void finish() {
    for (;;) {
      for (; next_ < end_; next_ += 64) prefetch_line(next_);
      if (!more_) return;
      advance();
    }
  }

 private:
  void advance() {
    const char *b = nullptr, *e = nullptr;
    more_ = next_range_(ranges_, b, e);
    if (!more_) return;
    // From the line that holds b, so the range's last partial line is issued too.
    next_ = b - (reinterpret_cast<std::uintptr_t>(b) & 63), end_ = e;
  }
  void* ranges_ = nullptr;
  bool (*next_range_)(void*, const char*&, const char*&) = nullptr;
  const char *next_ = nullptr, *end_ = nullptr;
  bool more_ = false;
};

/// The K or V rows t = 0, 1, ... of a block that a streaming micro-kernel reads: one run at a
/// fixed stride, prefetching the row `ahead` rows on while it reads row t (ahead 0: none) ...
template <class S>
struct strided_rows {
  using element = S;
  const S* base;
  std::int64_t stride;
  std::int64_t ahead = 0;
  const S* row(std::int64_t t) const { return base + t * stride; }
  const S* ahead_row(std::int64_t t) const { return base + (t + ahead) * stride; }
  bool prefetches() const { return ahead != 0; }
  strided_rows without_prefetch() const { return {base, stride, 0}; }
};
/// ... or rows found through a list of pointers (a block spanning pages: one kernel call for the
/// whole block), each moved by `offset` elements (another KV head of the same pages),
/// prefetching ahead[t] + offset while reading rows[t] + offset (ahead null: none).
template <class S>
struct listed_rows {
  using element = S;
  const S* const* rows;             // [keys]
  const S* const* ahead = nullptr;  // [keys] or null
  std::int64_t offset = 0;
  const S* row(std::int64_t t) const { return rows[t] + offset; }
  const S* ahead_row(std::int64_t t) const { return ahead[t] + offset; }
  bool prefetches() const { return ahead != nullptr; }
  listed_rows without_prefetch() const { return {rows, nullptr, offset}; }
};

/// TPA's head combination (tpa_score_rows): A_Q [q_rank][heads_padded] (scaled, zero past
/// heads), D[r][(s, u)] = dots[r * dots_stride + (s * k_rank + u) * dots_key_stride] (row form:
/// key stride 1; column form D^T: stride 1 along r), A_K rows of the block [keys][k_rank]
/// [heads]; out: scores [keys][heads_padded], block_max [heads_padded].
template <storage_type S>
struct tpa_scores {
  const float* a_q;
  const float* dots;
  std::int64_t dots_stride, dots_key_stride;
  const S* a_k;
  std::int64_t keys, heads, heads_padded, k_rank, q_rank;
  float* scores;
  float* block_max;
};
/// TPA's value weights out[(s, v) * out_stride + h] = p[s][h] A_V(s)[v, h], A_V rows
/// [keys][v_rank][heads].
template <storage_type S>
struct tpa_weights {
  const S* a_v;
  std::int64_t heads, v_rank;
  float* out;
  std::int64_t out_stride;
};

}  // namespace attnkit::detail

// ---- the target copies ----

#if ATTNKIT_SCALAR_TARGET
namespace attnkit::detail::simd_scalar {
#include "vec_scalar.inl"
#include "kernels.inl"
}  // namespace attnkit::detail::simd_scalar
#endif

#if ATTNKIT_AVX2_TARGET || ATTNKIT_AVX512_TARGET
// The code between ATTNKIT_TARGET_BEGIN("isa,...") and ATTNKIT_TARGET_END() is compiled for
// those instruction sets (functions only: clang applies the attribute to functions, not lambdas).
#define ATTNKIT_PRAGMA(...) _Pragma(#__VA_ARGS__)
#if defined(__clang__)
#define ATTNKIT_TARGET_BEGIN(isa) \
  ATTNKIT_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define ATTNKIT_TARGET_END() ATTNKIT_PRAGMA(clang attribute pop)
#else
// GCC 12 reports the AVX-512 intrinsics' own `__Y = __Y` as maybe-uninitialized at -O1 / -Og
// (GCC bug 105593): silenced here, so that includers building with -Wall -Werror are not hit.
// clang-format off
#define ATTNKIT_TARGET_BEGIN(isa)                                  \
  ATTNKIT_PRAGMA(GCC push_options) ATTNKIT_PRAGMA(GCC target(isa)) \
  ATTNKIT_PRAGMA(GCC diagnostic push)                              \
  ATTNKIT_PRAGMA(GCC diagnostic ignored "-Wmaybe-uninitialized")
// clang-format on
#define ATTNKIT_TARGET_END() ATTNKIT_PRAGMA(GCC diagnostic pop) ATTNKIT_PRAGMA(GCC pop_options)
#endif
#if ATTNKIT_AVX2_TARGET
ATTNKIT_TARGET_BEGIN("avx2,fma,f16c")
namespace attnkit::detail::simd_avx2 {
#include "vec_avx2.inl"
#include "kernels.inl"
}  // namespace attnkit::detail::simd_avx2
ATTNKIT_TARGET_END()
#endif

#if ATTNKIT_AVX512_TARGET
ATTNKIT_TARGET_BEGIN("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
namespace attnkit::detail::simd_avx512 {
#include "vec_avx512.inl"
#include "kernels.inl"
}  // namespace attnkit::detail::simd_avx512
ATTNKIT_TARGET_END()

// Not targets of their own: the avx512 target's bf16 products, run where the CPU has them.
ATTNKIT_TARGET_BEGIN("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
namespace attnkit::detail::simd_avx512_bf16 {
#include "vec_avx512.inl"
#include "bf16_dot.inl"
}  // namespace attnkit::detail::simd_avx512_bf16
ATTNKIT_TARGET_END()

ATTNKIT_TARGET_BEGIN(
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")
namespace attnkit::detail::simd_amx {
#include "vec_avx512.inl"
#include "bf16_dot.inl"
#include "amx.inl"
}  // namespace attnkit::detail::simd_amx
ATTNKIT_TARGET_END()
#endif  // ATTNKIT_AVX512_TARGET
#undef ATTNKIT_TARGET_BEGIN
#undef ATTNKIT_TARGET_END
#undef ATTNKIT_PRAGMA
#endif  // ATTNKIT_AVX2_TARGET || ATTNKIT_AVX512_TARGET

#if ATTNKIT_NEON_TARGET  // baseline on AArch64: no attributes needed
namespace attnkit::detail::simd_neon {
#include "vec_neon.inl"
#include "kernels.inl"
}  // namespace attnkit::detail::simd_neon
#endif

// ---- dispatch ----

// The first compiled of scalar, avx512, avx2, neon is the default (under
// ATTNKIT_STATIC_TARGET_ONLY the only one); every other compiled target has a case.
#if ATTNKIT_SCALAR_TARGET
#define ATTNKIT_SIMD_DEFAULT simd_scalar
#elif ATTNKIT_AVX512_TARGET
#define ATTNKIT_SIMD_DEFAULT simd_avx512
#elif ATTNKIT_AVX2_TARGET
#define ATTNKIT_SIMD_DEFAULT simd_avx2
#else
#define ATTNKIT_SIMD_DEFAULT simd_neon
#endif
#if ATTNKIT_AVX512_TARGET && ATTNKIT_SCALAR_TARGET
#define ATTNKIT_SIMD_AVX512_CASE(...)  \
  case ::attnkit::simd_target::avx512: \
    return simd_avx512::__VA_ARGS__;
#else
#define ATTNKIT_SIMD_AVX512_CASE(...)
#endif
#if ATTNKIT_AVX2_TARGET && (ATTNKIT_SCALAR_TARGET || ATTNKIT_AVX512_TARGET)
#define ATTNKIT_SIMD_AVX2_CASE(...)  \
  case ::attnkit::simd_target::avx2: \
    return simd_avx2::__VA_ARGS__;
#else
#define ATTNKIT_SIMD_AVX2_CASE(...)
#endif
#if ATTNKIT_NEON_TARGET && ATTNKIT_SCALAR_TARGET
#define ATTNKIT_SIMD_NEON_CASE(...)  \
  case ::attnkit::simd_target::neon: \
    return simd_neon::__VA_ARGS__;
#else
#define ATTNKIT_SIMD_NEON_CASE(...)
#endif
/// `return <target namespace>::call` for the active target.
#define ATTNKIT_SIMD_DISPATCH(...)              \
  switch (::attnkit::active_target()) {         \
    ATTNKIT_SIMD_AVX512_CASE(__VA_ARGS__)       \
    ATTNKIT_SIMD_AVX2_CASE(__VA_ARGS__)         \
    ATTNKIT_SIMD_NEON_CASE(__VA_ARGS__)         \
    default:                                    \
      return ATTNKIT_SIMD_DEFAULT::__VA_ARGS__; \
  }

namespace attnkit::detail {

/// The active target's vector width in floats (1: scalar).
inline int simd_lanes() { ATTNKIT_SIMD_DISPATCH(L) }

/// Whether the active target runs the GEMM tiles itself (else: Eigen's GEMM, compiled for the
/// includer's baseline) and picks the streaming micro-kernels for small tiles.
inline bool simd_vector_target() { return active_target() != simd_target::scalar; }

/// Columns per (even, odd) group in which the streaming kernels read bf16 rows, 0 for natural
/// order: the query tile and output accumulator of a bf16 streaming pass are held that way.
inline std::int64_t bf16_pair_group() { ATTNKIT_SIMD_DISPATCH(pair_group) }

/// Natural -> paired order (ToPaired) or back, in place, for the first floor(n / group) * group
/// columns: each group as its group / 2 even columns, then its odd ones. The active target's
/// group (2 lanes: the order its bf16 kernels read) in vectors; any other even group up to 64
/// in scalars (a std::copy of a run-time size there was a memmove call per group, which short
/// decodes paid per query and output row: docs/benchmarks.md).
template <bool ToPaired>
inline void reorder_pairs(float* x, std::int64_t n, std::int64_t group) {
  if (group == 0) return;
  if (group == 2 * simd_lanes()) {
    ATTNKIT_SIMD_DISPATCH(reorder_pair_groups<ToPaired>(x, n))
  }
  float tmp[64];
  const std::int64_t half = group / 2;
  for (std::int64_t c = 0; c + group <= n; c += group) {
    for (std::int64_t j = 0; j < half; ++j) {
      if constexpr (ToPaired)
        tmp[j] = x[c + 2 * j], tmp[half + j] = x[c + 2 * j + 1];
      else
        tmp[2 * j] = x[c + j], tmp[2 * j + 1] = x[c + half + j];
    }
    for (std::int64_t j = 0; j < group; ++j) x[c + j] = tmp[j];
  }
}
/// Natural -> paired order in place (reorder_pairs).
inline void permute_pairs(float* x, std::int64_t n, std::int64_t group) {
  reorder_pairs<true>(x, n, group);
}
/// Paired -> natural order in place.
inline void unpermute_pairs(float* x, std::int64_t n, std::int64_t group) {
  reorder_pairs<false>(x, n, group);
}

/// n elements of storage type S to float.
template <storage_type S>
inline void to_float_row(const S* src, float* dst, std::int64_t n) {
  ATTNKIT_SIMD_DISPATCH(to_float_row(src, dst, n))
}

/// s[i] = exp(s[i] - shift) in place; returns the sum. exp(-inf) is 0.
inline float exp_shift_sum(float* s, std::int64_t n, float shift) {
  ATTNKIT_SIMD_DISPATCH(exp_shift_sum(s, n, shift))
}

/// dst[i] = src[i] * a.
inline void scale_row_to(const float* src, float* dst, std::int64_t n, float a) {
  ATTNKIT_SIMD_DISPATCH(scale_row_to(src, dst, n, a))
}

/// dst[i] = src[i] * a rounded to bf16 (to nearest even).
inline void scale_row_to(const float* src, bf16* dst, std::int64_t n, float a) {
  ATTNKIT_SIMD_DISPATCH(scale_row_to(src, dst, n, a))
}

/// a[i] = a[i] * fa + b[i] * fb.
inline void scale_add_row(float* a, float fa, const float* b, float fb, std::int64_t n) {
  ATTNKIT_SIMD_DISPATCH(scale_add_row(a, fa, b, fb, n))
}

/// dst[c * ld + i] = rows[i][c] * scale for i < n, c < cols.
inline void transpose_scaled(const float* const* rows, std::int64_t n, std::int64_t cols,
                             float scale, float* dst, std::int64_t ld) {
  ATTNKIT_SIMD_DISPATCH(transpose_scaled(rows, n, cols, scale, dst, ld))
}

/// x[i] = value.
inline void fill_row(float* x, std::int64_t n, float value) {
  ATTNKIT_SIMD_DISPATCH(fill_row(x, n, value))
}

/// Whether some x[i] is inf or NaN.
inline bool any_non_finite(const float* x, std::int64_t n) {
  ATTNKIT_SIMD_DISPATCH(any_non_finite(x, n))
}

/// Row form of the online softmax over rows r < rows of the block s[r * ld + t], t < n: the
/// probabilities exp(s - max') in place, the running max / sum updated, alpha[r] = the factor
/// row r's accumulator must be rescaled by (see softmax_absorb_row, core/softmax.hpp).
inline void softmax_rows(float* s, std::int64_t ld, std::int64_t rows, std::int64_t n,
                         float* state_max, float* state_sum, float* alpha) {
  ATTNKIT_SIMD_DISPATCH(softmax_rows(s, ld, rows, n, state_max, state_sum, alpha))
}

/// S[rows][keys] = Q K^T for a block (streaming path); the query rows in paired order for bf16
/// (bf16_pair_group). prefetch_k: prefetch the K rows ATTNKIT_PREFETCH_BYTES ahead; pf: a
/// caller's prefetch stream, stepped once per inner iteration.
template <storage_type S, class Prefetch = no_prefetch>
inline void scores(const float* q, std::int64_t q_stride, std::int64_t rows, const S* k,
                   std::int64_t k_stride, std::int64_t keys, std::int64_t d, float* s,
                   std::int64_t s_stride, bool prefetch_k = true, Prefetch&& pf = {}) {
  const strided_rows<S> kr{
      k, k_stride, prefetch_k ? prefetch_rows(k_stride * static_cast<std::int64_t>(sizeof(S))) : 0};
  ATTNKIT_SIMD_DISPATCH(scores(q, q_stride, rows, kr, keys, d, s, s_stride, pf))
}
/// The same over K rows found through pointers (a block that spans pages).
template <storage_type S, class Prefetch = no_prefetch>
inline void scores(const float* q, std::int64_t q_stride, std::int64_t rows,
                   const listed_rows<S>& k, std::int64_t keys, std::int64_t d, float* s,
                   std::int64_t s_stride, Prefetch&& pf = {}) {
  ATTNKIT_SIMD_DISPATCH(scores(q, q_stride, rows, k, keys, d, s, s_stride, pf))
}

/// S^T[keys][rows] (s[t * ld + r]) = K Q^T for a block's K rows k (strided_rows or listed_rows,
/// any storage type) read in place by the streaming score block (4 query rows x V::score_keys
/// keys, bf16 as pairs: the query rows in paired order), written in the column form the GEMM
/// tiles' softmax reads; pf is stepped once per inner iteration.
template <class Rows, class Prefetch>
inline void scores_columns(const float* q, std::int64_t q_stride, std::int64_t rows, const Rows& k,
                           std::int64_t keys, std::int64_t d, float* s, std::int64_t ld,
                           Prefetch& pf) {
  ATTNKIT_SIMD_DISPATCH(scores<true>(q, q_stride, rows, k, keys, d, s, ld, pf))
}

/// O[m][dv] += P V for P in column form (p[t * m + h]: key t, query row h < m) and value rows v
/// (strided_rows or listed_rows, any storage type) read in place: each value vector is widened
/// in a register once per tile of query rows, so a block is never written out as float. O in
/// natural column order; pf is stepped once per key of each tile.
template <class Rows, class Prefetch>
inline void pv_columns(const float* p, std::int64_t m, const Rows& v, std::int64_t keys,
                       std::int64_t dv, float* o, std::int64_t ldo, Prefetch& pf) {
  ATTNKIT_SIMD_DISPATCH(pv_columns(p, m, v, keys, dv, o, ldo, pf))
}

/// O[rows][dv] += P[rows][keys] V[keys][dv] (streaming path; O in paired order for bf16).
/// prefetch_v: prefetch the V rows ATTNKIT_PREFETCH_BYTES ahead (off where the rows ahead are not
/// the next ones).
template <storage_type S>
inline void accumulate_pv(const float* p, std::int64_t p_stride, std::int64_t rows, const S* v,
                          std::int64_t v_stride, std::int64_t keys, std::int64_t dv, float* o,
                          std::int64_t o_stride, bool prefetch_v = true) {
  const strided_rows<S> vr{
      v, v_stride, prefetch_v ? prefetch_rows(v_stride * static_cast<std::int64_t>(sizeof(S))) : 0};
  ATTNKIT_SIMD_DISPATCH(accumulate_pv(p, p_stride, rows, vr, keys, dv, o, o_stride))
}
/// The same over V rows found through pointers (a block that spans pages).
template <storage_type S>
inline void accumulate_pv(const float* p, std::int64_t p_stride, std::int64_t rows,
                          const listed_rows<S>& v, std::int64_t keys, std::int64_t dv, float* o,
                          std::int64_t o_stride) {
  ATTNKIT_SIMD_DISPATCH(accumulate_pv(p, p_stride, rows, v, keys, dv, o, o_stride))
}

/// C[rows, cols] (+)= A B, with A(i, k) = a[i * a_rs + k * a_cs] (any strides: every element is
/// broadcast) and B(k, j) = b[k * b_rs + j] (unit column stride), C row-major (ldc). Each column
/// strip of B is packed into contiguous L1-sized panels (a few hundred depth steps) that the row
/// blocks of A then stream past; each C element is still one FMA chain over k in order. pf is
/// stepped once per depth step.
/// RowStep > 0 promises a_rs == RowStep (1: adjacent rows), which
/// the tiles then address from one pointer; 0: any a_rs (adjacent rows are found at run time).
template <bool Accumulate, int RowStep = 0, class Prefetch = no_prefetch>
inline void gemm_bcast(std::int64_t rows, std::int64_t cols, std::int64_t depth, const float* a,
                       std::int64_t a_rs, std::int64_t a_cs, const float* b, std::int64_t b_rs,
                       float* c, std::int64_t ldc, Prefetch&& pf = {}) {
  ATTNKIT_SIMD_DISPATCH(
      gemm_bcast<Accumulate, RowStep>(rows, cols, depth, a, a_rs, a_cs, b, b_rs, c, ldc, pf))
}

/// Column form of the online softmax over the tile st[t * ld + r] (keys t, rows r): the
/// probabilities written back into st, or (weights given) into TPA's value weights; the running
/// max / sum updated; alpha[r] = the accumulator rescale factor of row r. block_max, when given,
/// is each row's max over the block. coarse_exp: the probabilities written back by vexp_coarse
/// (relative error < 6e-5), for products that round them to bf16 next.
template <storage_type S = float>
inline void softmax_columns(float* st, std::int64_t ld, std::int64_t keys, std::int64_t rows,
                            float* state_max, float* state_sum, float* alpha,
                            const float* block_max = nullptr,
                            const tpa_weights<S>* weights = nullptr, bool coarse_exp = false) {
  ATTNKIT_SIMD_DISPATCH(softmax_columns(st, ld, keys, rows, state_max, state_sum, alpha, block_max,
                                        weights, coarse_exp))
}

/// Column form: st[t * ld + r] <- exp(st[t * ld + r] - lse[r]) (0 where lse[r] is -inf).
inline void exp_given_columns(float* st, std::int64_t ld, std::int64_t keys, std::int64_t rows,
                              const float* lse) {
  ATTNKIT_SIMD_DISPATCH(exp_given_columns(st, ld, keys, rows, lse))
}

// ---- bf16 products (product_math::bf16; only where bf16_products_available()) ----

/// dst[k][i] = (x[2k][i], x[2k + 1][i]) as bf16 pairs (one 32-bit word, the even row in the low
/// half) for the rows x[t] = rows[t], t < n, i < cols: float rows rounded to bf16 (nearest even),
/// bf16 rows copied; an odd last row pairs with 0. dst: [ceil(n / 2)][dst_stride] words.
template <class T>
inline void pack_row_pairs(const T* const* rows, std::int64_t n, std::int64_t cols,
                           std::uint32_t* dst, std::int64_t dst_stride) {
#if ATTNKIT_AVX512_TARGET
  simd_avx512_bf16::pack_row_pairs(rows, n, cols, dst, dst_stride);
#else
  (void)rows, (void)n, (void)cols, (void)dst, (void)dst_stride;
  std::abort();  // unreachable: bf16_products_available() is false
#endif
}

/// pack_row_pairs over the rows row(t), t < n (a callable), listed 64 at a time.
template <class T, class Row>
inline void pack_row_pairs_of(Row&& row, std::int64_t n, std::int64_t cols, std::uint32_t* dst,
                              std::int64_t dst_stride) {
  const T* rows[64];
  for (std::int64_t t0 = 0; t0 < n; t0 += 64) {
    const std::int64_t c = std::min<std::int64_t>(64, n - t0);
    for (std::int64_t i = 0; i < c; ++i) rows[i] = row(t0 + i);
    pack_row_pairs(rows, c, cols, dst + t0 / 2 * dst_stride, dst_stride);
  }
}

/// Q^T as bf16 pairs: dst[k * ld + r] = (bf16(scale x_r[2k]), bf16(scale x_r[2k + 1])) for the
/// rows x_r = rows[r], r < n <= 16, k < pairs; rows n .. width - 1 (width <= 16) stored as 0.
/// part > 0: of what the first `part` roundings of scale x_r to bf16 leave (bf16_residual), so
/// parts 0, 1, 2 sum to scale x_r exactly.
inline void pack_query_pairs(const float* const* rows, std::int64_t n, std::int64_t pairs,
                             float scale, std::int64_t width, std::uint32_t* dst, std::int64_t ld,
                             int part = 0) {
#if ATTNKIT_AVX512_TARGET
  simd_avx512_bf16::pack_query_pairs(rows, n, pairs, scale, width, dst, ld, part);
#else
  (void)rows, (void)n, (void)pairs, (void)scale, (void)width, (void)dst, (void)ld, (void)part;
  std::abort();  // unreachable: bf16_products_available() is false
#endif
}

/// C[rows][cols] (+)= A B with bf16 pairs for elements, float sums: A's pair (i, k) is the word
/// at a + i * a_rs + k * a_cs (in bf16 elements: a row of bf16 has its pairs at a_cs = 2),
/// B's pair (k, j) = b[k * b_rs + j], k < pairs.
template <bool Accumulate>
inline void gemm_pairs(std::int64_t rows, std::int64_t cols, std::int64_t pairs, const bf16* a,
                       std::int64_t a_rs, std::int64_t a_cs, const std::uint32_t* b,
                       std::int64_t b_rs, float* c, std::int64_t ldc) {
#if ATTNKIT_AVX512_TARGET
  simd_avx512_bf16::gemm_pairs<Accumulate>(rows, cols, pairs, a, a_rs, a_cs, b, b_rs, c, ldc);
#else
  (void)rows, (void)cols, (void)pairs, (void)a, (void)a_rs, (void)a_cs, (void)b, (void)b_rs,
      (void)c, (void)ldc;
  std::abort();  // unreachable: bf16_products_available() is false
#endif
}

/// vdpbf16ps (bf16_dot_available()): S[rows][keys] = Q K^T for the streaming path's query rows
/// as bf16 pairs in natural column order (row r's pair k at q[r * q_stride + k]) against bf16 K
/// rows (strided_rows or listed_rows) read in place, d a multiple of 32; the K rows ahead
/// prefetched where k prefetches.
template <class Rows>
inline void stream_pair_scores(const std::uint32_t* q, std::int64_t q_stride, std::int64_t rows,
                               const Rows& k, std::int64_t keys, std::int64_t d, float* s,
                               std::int64_t s_stride) {
#if ATTNKIT_AVX512_TARGET
  simd_avx512_bf16::stream_pair_scores(q, q_stride, rows, k, keys, d, s, s_stride);
#else
  (void)q, (void)q_stride, (void)rows, (void)k, (void)keys, (void)d, (void)s, (void)s_stride;
  std::abort();  // unreachable: bf16_products_available() is false
#endif
}

/// vdpbf16ps (bf16_dot_available()): O[rows][dv] += P V for the streaming path with the
/// probabilities rounded to bf16 and two keys' bf16 value rows (strided_rows or listed_rows) per
/// product, read in place; O in the paired order of accumulate_pv, dv a multiple of 32.
template <class Rows>
inline void stream_pair_pv(const float* p, std::int64_t p_stride, std::int64_t rows, const Rows& v,
                           std::int64_t keys, std::int64_t dv, float* o, std::int64_t o_stride) {
#if ATTNKIT_AVX512_TARGET
  simd_avx512_bf16::stream_pair_pv(p, p_stride, rows, v, keys, dv, o, o_stride);
#else
  (void)p, (void)p_stride, (void)rows, (void)v, (void)keys, (void)dv, (void)o, (void)o_stride;
  std::abort();  // unreachable: bf16_products_available() is false
#endif
}

/// AMX (bf16_amx_available()): C[rows][cols] (+)= A B on tiles, A rows of `depth` bf16 at
/// a + i * a_stride, B pair rows at b + k * ldb (words), C rows c + i * ldc; cols a multiple of
/// 16, depth of 32; no row past `rows` is read or written.
template <bool Accumulate>
inline void amx_gemm(std::int64_t rows, std::int64_t cols, std::int64_t depth, const bf16* a,
                     std::int64_t a_stride, const std::uint32_t* b, std::int64_t ldb, float* c,
                     std::int64_t ldc, const amx_parts& parts = {}) {
#if ATTNKIT_AVX512_TARGET
  simd_amx::amx_gemm<Accumulate>(rows, cols, depth, a, a_stride, b, ldb, c, ldc, parts);
#else
  (void)rows, (void)cols, (void)depth, (void)a, (void)a_stride, (void)b, (void)ldb, (void)c,
      (void)ldc, (void)parts;
  std::abort();  // unreachable: bf16_amx_available() is false
#endif
}

/// AMX: a row tile's scores S^T [k.keys][16] against 16-key groups k (in place), B = Q^T's pairs
/// [depth / 2][16] words, or the sum of parts.n such (parts.b_stride words apart); depth a
/// multiple of 32. pf (optional): stepped pf_steps times per 32 of depth.
inline void amx_group_scores(const amx_key_groups& k, std::int64_t depth, const std::uint32_t* qp,
                             float* s, range_prefetcher* pf, int pf_steps,
                             const amx_parts& parts = {}) {
#if ATTNKIT_AVX512_TARGET
  simd_amx::amx_group_scores(k, depth, qp, s, pf, pf_steps, parts);
#else
  (void)k, (void)depth, (void)qp, (void)s, (void)pf, (void)pf_steps, (void)parts;
  std::abort();  // unreachable: bf16_amx_available() is false
#endif
}

/// AMX: a row tile's probabilities for amx_pv_rows, [keys rounded up to 16 / 16][2][16][16]
/// words, from the column tile x[t] = src + t * ld (t < keys, 16 rows each), as `parts`
/// bf16_residual parts (as pack_query_pairs) part_stride words apart.
inline void pack_probability_halves(const float* src, std::int64_t ld, std::int64_t keys,
                                    std::uint32_t* halves, int parts, std::int64_t part_stride) {
#if ATTNKIT_AVX512_TARGET
  simd_amx::pack_probability_halves(src, ld, keys, halves, parts, part_stride);
#else
  (void)src, (void)ld, (void)keys, (void)halves, (void)parts, (void)part_stride;
  std::abort();  // unreachable: bf16_amx_available() is false
#endif
}

/// AMX: O[rows][dv] += P V for rows <= 16 with the value rows of 16-key groups v read in place;
/// O's 32-column groups held as even columns, then odd (permute_pairs, group 32); dv a multiple
/// of 32; P the sum of parts.n halves (parts.a_stride words apart). pf (optional): stepped
/// pf_steps times per group and 64 columns.
inline void amx_pv_rows(std::int64_t rows, std::int64_t dv, const std::uint32_t* halves,
                        const amx_key_groups& v, float* acc, std::int64_t ldacc,
                        range_prefetcher* pf, int pf_steps, const amx_parts& parts = {}) {
#if ATTNKIT_AVX512_TARGET
  simd_amx::amx_pv_rows(rows, dv, halves, v, acc, ldacc, pf, pf_steps, parts);
#else
  (void)rows, (void)dv, (void)halves, (void)v, (void)acc, (void)ldacc, (void)pf, (void)pf_steps,
      (void)parts;
  std::abort();  // unreachable: bf16_amx_available() is false
#endif
}

/// AMX: P's rows as bf16 pairs of keys, dst[r * dst_stride + k] = (x[2k][r], x[2k + 1][r]), from
/// the column tile x[t] = src + t * ld (t < keys; later keys 0), r < rows rounded up to 16
/// (columns past `rows` not read, their rows 0), k < pairs (a multiple of 16); x's
/// bf16_residual parts 0 .. parts - 1 at dst + p * part_stride (words), as pack_query_pairs'.
inline void pack_pairs_transposed(const float* src, std::int64_t ld, std::int64_t keys,
                                  std::int64_t rows, std::int64_t pairs, std::uint32_t* dst,
                                  std::int64_t dst_stride, int parts = 1,
                                  std::int64_t part_stride = 0) {
#if ATTNKIT_AVX512_TARGET
  simd_amx::pack_pairs_transposed(src, ld, keys, rows, pairs, dst, dst_stride, parts, part_stride);
#else
  (void)src, (void)ld, (void)keys, (void)rows, (void)pairs, (void)dst, (void)dst_stride,
      (void)parts, (void)part_stride;
  std::abort();  // unreachable: bf16_amx_available() is false
#endif
}

/// AMX: P's rows as bf16, dst[r * dst_stride + c] = bf16(x_r[c]), from the row tile x_r = src +
/// r * ld, r < rows, c < cols (a multiple of 32; columns from `keys` on 0); x's bf16_residual
/// parts 0 .. parts - 1 at dst + p * part_stride (bf16 elements).
inline void pack_rows_bf16(const float* src, std::int64_t ld, std::int64_t rows, std::int64_t keys,
                           std::int64_t cols, bf16* dst, std::int64_t dst_stride, int parts = 1,
                           std::int64_t part_stride = 0) {
#if ATTNKIT_AVX512_TARGET
  simd_amx::pack_rows_bf16(src, ld, rows, keys, cols, dst, dst_stride, parts, part_stride);
#else
  (void)src, (void)ld, (void)rows, (void)keys, (void)cols, (void)dst, (void)dst_stride, (void)parts,
      (void)part_stride;
  std::abort();  // unreachable: bf16_amx_available() is false
#endif
}

/// TPA's scores of a key block and their max per head (kernels/tpa.hpp).
template <storage_type S, class Prefetch>
inline void tpa_score_rows(const tpa_scores<S>& p, Prefetch& pf) {
  ATTNKIT_SIMD_DISPATCH(tpa_score_rows(p, pf))
}

}  // namespace attnkit::detail
