#pragma once
// Register-blocked micro-kernels for the streaming (decode / short chunk) path:
//   scores:  S[r][t] = sum_c Q[r][c] * K[t][c]   (rows of Q: all query heads of a KV group)
//   pv:      O[r][c] += sum_t P[r][t] * V[t][c]
// K and V are read in their storage type and widened to float in registers, so bf16/f16
// caches are never converted in memory. Blocks of RB query rows x 4 keys (scores) or
// RB rows x 64 value columns (pv) live in zmm registers; out-of-range rows and keys are
// clamped to the last valid one (computed, then discarded) so there is one code path.
#include <algorithm>
#include <cstdint>

#include "../core/simd.hpp"

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

namespace attnkit::detail {

/// The software-prefetch stream a kernel's inner loop drives: step() runs once per iteration and
/// may issue one prefetch, so a caller's prefetches spread evenly over the work instead of
/// queueing up in bursts (a burst fills the core's miss buffers and stalls it; spread, the same
/// lines arrive while the FMAs run). no_prefetch is the default: it issues nothing.
struct no_prefetch {
  void step() {}
};

/// Prefetches the cache line at p into L2 (T1); a no-op where the compiler has no builtin.
inline void prefetch_line(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 2);
#else
  (void)p;
#endif
}

#if ATTNKIT_HAS_AVX512

/// Software prefetch into L2, this many bytes of rows ahead. One core streaming K/V rows from
/// DRAM while it computes needs more misses in flight than its hardware prefetchers issue; 64 KiB
/// ahead brought K+V streaming close to a plain read (docs/benchmarks.md, GQA decode).
#ifndef ATTNKIT_PREFETCH_BYTES
#define ATTNKIT_PREFETCH_BYTES 65536
#endif
inline std::int64_t prefetch_rows(std::int64_t row_bytes) {
  return std::max<std::int64_t>(4, ATTNKIT_PREFETCH_BYTES / std::max<std::int64_t>(row_bytes, 1));
}

template <class S>
inline void prefetch_row(const S* row, std::int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(row);
  for (std::int64_t b = 0; b < bytes; b += 64) prefetch_line(p + b);
}

/// [sum(a), sum(b), sum(c), sum(d)].
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(0xFFFF, a, b, 0x44),
                                  _mm512_maskz_shuffle_f32x4(0xFFFF, a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(0xFFFF, c, d, 0x44),
                                  _mm512_maskz_shuffle_f32x4(0xFFFF, c, d, 0xEE));
  __m512 u = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(0xFFFF, ab, cd, 0x88),
                           _mm512_maskz_shuffle_f32x4(0xFFFF, ab, cd, 0xDD));
  u = _mm512_add_ps(u, _mm512_maskz_shuffle_ps(0xFFFF, u, u, _MM_SHUFFLE(2, 3, 0, 1)));
  u = _mm512_add_ps(u, _mm512_maskz_shuffle_ps(0xFFFF, u, u, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm512_castps512_ps128(_mm512_maskz_permutexvar_ps(
      0xFFFF, _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), u));
}

/// bf16 rows are widened 32 at a time without a cross-lane shuffle: one 512-bit load holds
/// 16 dwords, each an (even, odd) pair of bf16; `<< 16` gives the even elements as floats
/// (bf16_even) and masking the low half gives the odd ones (bf16_odd). The float operands they meet
/// (the query tile and the output accumulator) are stored in the same order: within every full
/// group of 32 columns, the 16 even columns first, then the 16 odd ones (see permute_pairs).
inline __m512 bf16_even(__m512i raw) { return _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16)); }
inline __m512 bf16_odd(__m512i raw) {
  return _mm512_castsi512_ps(
      _mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

template <int RB, storage_type S, class Prefetch>
inline void scores_block(const float* q, std::int64_t q_stride, std::int64_t rows, const S* k,
                         std::int64_t k_stride, std::int64_t keys, std::int64_t d, float* s,
                         std::int64_t s_stride, bool prefetch_k, Prefetch& pf) {
  const float* qr[RB];
  ATTNKIT_UNROLL
  for (int r = 0; r < RB; ++r) qr[r] = q + std::min<std::int64_t>(r, rows - 1) * q_stride;
  const __mmask16 tail = lane_mask(d % 16);
  const std::int64_t d_full = d - d % 16;
  const std::int64_t row_bytes = k_stride * static_cast<std::int64_t>(sizeof(S)),
                     ahead = prefetch_rows(row_bytes);
  for (std::int64_t t0 = 0; t0 < keys; t0 += 4) {
    const S* kr[4];
    ATTNKIT_UNROLL
    for (int u = 0; u < 4; ++u) kr[u] = k + std::min<std::int64_t>(t0 + u, keys - 1) * k_stride;
    ATTNKIT_UNROLL
    for (int u = 0; u < 4 && prefetch_k; ++u)
      prefetch_row(k + (t0 + u + ahead) * k_stride, d * static_cast<std::int64_t>(sizeof(S)));
    __m512 acc[RB][4];
    ATTNKIT_UNROLL
    for (int r = 0; r < RB; ++r) {
      ATTNKIT_UNROLL
      for (int u = 0; u < 4; ++u) acc[r][u] = _mm512_setzero_ps();
    }
    std::int64_t c0 = 0;
    if constexpr (std::same_as<S, bf16>) {
      for (; c0 + 32 <= d; c0 += 32) {
        __m512 ke[4], ko[4];
        pf.step();
        ATTNKIT_UNROLL
        for (int u = 0; u < 4; ++u) {
          const __m512i raw = _mm512_loadu_si512(kr[u] + c0);
          ke[u] = bf16_even(raw);
          ko[u] = bf16_odd(raw);
        }
        ATTNKIT_UNROLL
        for (int r = 0; r < RB; ++r) {
          const __m512 qe = _mm512_loadu_ps(qr[r] + c0), qo = _mm512_loadu_ps(qr[r] + c0 + 16);
          ATTNKIT_UNROLL
          for (int u = 0; u < 4; ++u)
            acc[r][u] = _mm512_fmadd_ps(qo, ko[u], _mm512_fmadd_ps(qe, ke[u], acc[r][u]));
        }
      }
    }
    for (std::int64_t c = c0; c < d_full; c += 16) {
      pf.step();
      __m512 kv[4];
      ATTNKIT_UNROLL
      for (int u = 0; u < 4; ++u) kv[u] = load16(kr[u] + c);
      ATTNKIT_UNROLL
      for (int r = 0; r < RB; ++r) {
        const __m512 qv = _mm512_loadu_ps(qr[r] + c);
        ATTNKIT_UNROLL
        for (int u = 0; u < 4; ++u) acc[r][u] = _mm512_fmadd_ps(qv, kv[u], acc[r][u]);
      }
    }
    if (d_full < d) {
      __m512 kv[4];
      ATTNKIT_UNROLL
      for (int u = 0; u < 4; ++u) kv[u] = load16(kr[u] + d_full, tail);
      ATTNKIT_UNROLL
      for (int r = 0; r < RB; ++r) {
        const __m512 qv = _mm512_maskz_loadu_ps(tail, qr[r] + d_full);
        ATTNKIT_UNROLL
        for (int u = 0; u < 4; ++u) acc[r][u] = _mm512_fmadd_ps(qv, kv[u], acc[r][u]);
      }
    }
    const __mmask8 kmask = static_cast<__mmask8>((1u << std::min<std::int64_t>(4, keys - t0)) - 1u);
    // Constant trip count with a guard (not `r < rows` in the loop condition): a runtime bound
    // makes GCC keep acc[][] in memory and store it on every iteration of the hot loop.
    ATTNKIT_UNROLL
    for (int r = 0; r < RB; ++r)
      if (r < rows)
        _mm_mask_storeu_ps(s + r * s_stride + t0, kmask,
                           reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
  }
}

/// Row pointers of an RB-row block of P and O; rows past `rows` repeat the last valid one
/// (computed, never stored), so every block size runs one code path.
template <int RB>
struct pv_rows {
  const float* p[RB];
  float* o[RB];
  pv_rows(const float* pb, std::int64_t p_stride, float* ob, std::int64_t o_stride,
          std::int64_t rows) {
    ATTNKIT_UNROLL
    for (int r = 0; r < RB; ++r) {
      const std::int64_t rr = std::min<std::int64_t>(r, rows - 1);
      p[r] = pb + rr * p_stride;
      o[r] = ob + rr * o_stride;
    }
  }
};

template <int RB, bool Full, storage_type S>
inline void pv_chunk(const float* p, std::int64_t p_stride, std::int64_t rows, const S* v,
                     std::int64_t v_stride, std::int64_t keys, std::int64_t width, float* o,
                     std::int64_t o_stride, bool prefetch_v) {
  __mmask16 m[4];
  ATTNKIT_UNROLL
  for (int i = 0; i < 4; ++i) m[i] = lane_mask(std::max<std::int64_t>(0, width - 16 * i));
  const pv_rows<RB> rw(p, p_stride, o, o_stride, rows);
  const std::int64_t ahead =
      prefetch_v ? prefetch_rows(v_stride * static_cast<std::int64_t>(sizeof(S))) : 0;
  __m512 acc[RB][4];
  ATTNKIT_UNROLL
  for (int r = 0; r < RB; ++r) {
    ATTNKIT_UNROLL
    for (int i = 0; i < 4; ++i)
      acc[r][i] =
          Full ? _mm512_loadu_ps(rw.o[r] + 16 * i) : _mm512_maskz_loadu_ps(m[i], rw.o[r] + 16 * i);
  }
  for (std::int64_t t = 0; t < keys; ++t) {
    const S* vr = v + t * v_stride;
    if (ahead) prefetch_row(vr + ahead * v_stride, width * static_cast<std::int64_t>(sizeof(S)));
    __m512 vv[4];
    ATTNKIT_UNROLL
    for (int i = 0; i < 4; ++i) vv[i] = Full ? load16(vr + 16 * i) : load16(vr + 16 * i, m[i]);
    ATTNKIT_UNROLL
    for (int r = 0; r < RB; ++r) {
      const __m512 pv = _mm512_set1_ps(rw.p[r][t]);
      ATTNKIT_UNROLL
      for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_fmadd_ps(pv, vv[i], acc[r][i]);
    }
  }
  ATTNKIT_UNROLL
  for (int r = 0; r < RB; ++r) {  // constant trip count: see scores_block
    ATTNKIT_UNROLL
    for (int i = 0; i < 4; ++i) {
      if (r >= rows) break;
      if (Full)
        _mm512_storeu_ps(rw.o[r] + 16 * i, acc[r][i]);
      else
        _mm512_mask_storeu_ps(rw.o[r] + 16 * i, m[i], acc[r][i]);
    }
  }
}

/// pv for NG full groups of 32 bf16 columns in paired order (see bf16_even).
template <int RB, int NG>
inline void pv_chunk_bf16_pairs(const float* p, std::int64_t p_stride, std::int64_t rows,
                                const bf16* v, std::int64_t v_stride, std::int64_t keys, float* o,
                                std::int64_t o_stride, bool prefetch_v) {
  const std::int64_t ahead =
      prefetch_v ? prefetch_rows(v_stride * static_cast<std::int64_t>(sizeof(bf16))) : 0;
  const pv_rows<RB> rw(p, p_stride, o, o_stride, rows);
  __m512 acc[RB][2 * NG];
  ATTNKIT_UNROLL
  for (int r = 0; r < RB; ++r) {
    ATTNKIT_UNROLL
    for (int i = 0; i < 2 * NG; ++i) acc[r][i] = _mm512_loadu_ps(rw.o[r] + 16 * i);
  }
  for (std::int64_t t = 0; t < keys; ++t) {
    const bf16* vr = v + t * v_stride;
    if (ahead) prefetch_row(vr + ahead * v_stride, 64 * NG);
    __m512 vv[2 * NG];
    ATTNKIT_UNROLL
    for (int g = 0; g < NG; ++g) {
      const __m512i raw = _mm512_loadu_si512(vr + 32 * g);
      vv[2 * g] = bf16_even(raw);
      vv[2 * g + 1] = bf16_odd(raw);
    }
    ATTNKIT_UNROLL
    for (int r = 0; r < RB; ++r) {
      const __m512 pv = _mm512_set1_ps(rw.p[r][t]);
      ATTNKIT_UNROLL
      for (int i = 0; i < 2 * NG; ++i) acc[r][i] = _mm512_fmadd_ps(pv, vv[i], acc[r][i]);
    }
  }
  ATTNKIT_UNROLL
  for (int r = 0; r < RB; ++r) {  // constant trip count: see scores_block
    ATTNKIT_UNROLL
    for (int i = 0; i < 2 * NG; ++i)
      if (r < rows) _mm512_storeu_ps(rw.o[r] + 16 * i, acc[r][i]);
  }
}

template <int RB, storage_type S>
inline void pv_block(const float* p, std::int64_t p_stride, std::int64_t rows, const S* v,
                     std::int64_t v_stride, std::int64_t keys, std::int64_t dv, float* o,
                     std::int64_t o_stride, bool prefetch_v) {
  std::int64_t c = 0;
  if constexpr (std::same_as<S, bf16>) {
    for (; c + 64 <= dv; c += 64)
      pv_chunk_bf16_pairs<RB, 2>(p, p_stride, rows, v + c, v_stride, keys, o + c, o_stride,
                                 prefetch_v);
    if (c + 32 <= dv) {
      pv_chunk_bf16_pairs<RB, 1>(p, p_stride, rows, v + c, v_stride, keys, o + c, o_stride,
                                 prefetch_v);
      c += 32;
    }
  }
  for (; c + 64 <= dv; c += 64)
    pv_chunk<RB, true>(p, p_stride, rows, v + c, v_stride, keys, 64, o + c, o_stride, prefetch_v);
  if (c < dv)
    pv_chunk<RB, false>(p, p_stride, rows, v + c, v_stride, keys, dv - c, o + c, o_stride,
                        prefetch_v);
}

#endif  // ATTNKIT_HAS_AVX512

/// S[rows][keys] = Q K^T for a block (streaming path). prefetch_k: prefetch the K rows
/// ATTNKIT_PREFETCH_BYTES ahead; pf: a caller's prefetch stream, stepped once per inner
/// iteration. Portable fallback: plain loops.
template <storage_type S, class Prefetch = no_prefetch>
inline void scores(const float* q, std::int64_t q_stride, std::int64_t rows, const S* k,
                   std::int64_t k_stride, std::int64_t keys, std::int64_t d, float* s,
                   std::int64_t s_stride, bool prefetch_k = true, Prefetch&& pf = {}) {
#if ATTNKIT_HAS_AVX512
  std::int64_t r = 0;
  for (; rows - r >= 3; r += 4)  // 3 leftover rows also take a 4-row block (one clamped row)
    scores_block<4>(q + r * q_stride, q_stride, std::min<std::int64_t>(4, rows - r), k, k_stride,
                    keys, d, s + r * s_stride, s_stride, prefetch_k, pf);
  if (rows - r == 2)
    scores_block<2>(q + r * q_stride, q_stride, 2, k, k_stride, keys, d, s + r * s_stride, s_stride,
                    prefetch_k, pf);
  if (rows - r == 1)
    scores_block<1>(q + r * q_stride, q_stride, 1, k, k_stride, keys, d, s + r * s_stride, s_stride,
                    prefetch_k, pf);
#else
  (void)prefetch_k;
  (void)pf;
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t t = 0; t < keys; ++t) {
      float acc = 0.f;
      for (std::int64_t c = 0; c < d; ++c)
        acc += q[r * q_stride + c] * static_cast<float>(k[t * k_stride + c]);
      s[r * s_stride + t] = acc;
    }
#endif
}

/// O[rows][dv] += P[rows][keys] V[keys][dv] (streaming path). prefetch_v: prefetch the V rows
/// ATTNKIT_PREFETCH_BYTES ahead (off where the rows ahead are not the next ones: paged views).
template <storage_type S>
inline void accumulate_pv(const float* p, std::int64_t p_stride, std::int64_t rows, const S* v,
                          std::int64_t v_stride, std::int64_t keys, std::int64_t dv, float* o,
                          std::int64_t o_stride, bool prefetch_v = true) {
#if ATTNKIT_HAS_AVX512
  if (rows == 1) {
    pv_block<1>(p, p_stride, 1, v, v_stride, keys, dv, o, o_stride, prefetch_v);
    return;
  }
  if (rows == 2) {
    pv_block<2>(p, p_stride, 2, v, v_stride, keys, dv, o, o_stride, prefetch_v);
    return;
  }
  for (std::int64_t r = 0; r < rows; r += 4)
    pv_block<4>(p + r * p_stride, p_stride, std::min<std::int64_t>(4, rows - r), v, v_stride, keys,
                dv, o + r * o_stride, o_stride, prefetch_v);
#else
  (void)prefetch_v;
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t t = 0; t < keys; ++t) {
      const float pt = p[r * p_stride + t];
      for (std::int64_t c = 0; c < dv; ++c)
        o[r * o_stride + c] += pt * static_cast<float>(v[t * v_stride + c]);
    }
#endif
}

/// True when the streaming kernels read S in paired order (bf16 with AVX-512): the query
/// tile and output accumulator then hold every full group of 32 columns as (evens, odds).
template <storage_type S>
constexpr bool paired_columns = std::same_as<S, bf16>&& ATTNKIT_HAS_AVX512;

/// Natural -> paired order in place, for the first floor(n/32)*32 columns.
inline void permute_pairs(float* x, std::int64_t n) {
  float tmp[32];
  for (std::int64_t c = 0; c + 32 <= n; c += 32) {
    for (int j = 0; j < 16; ++j) {
      tmp[j] = x[c + 2 * j];
      tmp[16 + j] = x[c + 2 * j + 1];
    }
    std::copy(tmp, tmp + 32, x + c);
  }
}
/// Paired -> natural order in place.
inline void unpermute_pairs(float* x, std::int64_t n) {
  float tmp[32];
  for (std::int64_t c = 0; c + 32 <= n; c += 32) {
    for (int j = 0; j < 16; ++j) {
      tmp[2 * j] = x[c + j];
      tmp[2 * j + 1] = x[c + 16 + j];
    }
    std::copy(tmp, tmp + 32, x + c);
  }
}

}  // namespace attnkit::detail
