#pragma once
// Register-blocked GEMM and column-wise online softmax for the prefill ("gemm") tiles on
// AVX-512. The score tile is computed transposed, S^T[key][query] = K Q^T, so that:
//   * both products have a row-major "B" operand read as vectors with no packing: the query
//     tile transposed once per item (Q^T [d, M]) and the cached V rows themselves;
//   * the online softmax runs down the columns, vectorised across 16 queries at a time.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../core/simd.hpp"
#include "microkernels.hpp"

namespace attnkit::detail {

#if ATTNKIT_HAS_AVX512

/// One MR x 16*NV micro-tile of C (+)= A B at rows [i0, i0 + MR) (clamped to the last row; the
/// clamped rows are computed, then discarded) and columns [j0, j0 + 16 NV) under masks mk.
/// UnitRows: A's rows are adjacent (a_rs == 1) and the tile is full, so the MR broadcasts of a
/// step read one pointer at constant offsets instead of MR pointers (which spill when inlined:
/// the TPA value GEMM ran ~15% slower that way).
template <bool Accumulate, int MR, int NV, bool UnitRows, class Prefetch>
inline void gemm_bcast_tile(std::int64_t i0, std::int64_t j0, const __mmask16* mk, std::int64_t rows, std::int64_t depth,
                            const float* a, std::int64_t a_rs, std::int64_t a_cs, const float* b, std::int64_t b_rs, float* c,
                            std::int64_t ldc, Prefetch& pf) {
  const float* ar[MR];
  ATTNKIT_UNROLL
  for (int r = 0; r < MR; ++r) ar[r] = UnitRows ? a + i0 + r : a + std::min<std::int64_t>(i0 + r, rows - 1) * a_rs;
  __m512 acc[MR][NV];
  ATTNKIT_UNROLL
  for (int r = 0; r < MR; ++r) {
    float* cr = c + std::min<std::int64_t>(i0 + r, rows - 1) * ldc + j0;
    ATTNKIT_UNROLL
    for (int v = 0; v < NV; ++v) acc[r][v] = Accumulate ? _mm512_maskz_loadu_ps(mk[v], cr + 16 * v) : _mm512_setzero_ps();
  }
  const float* bk = b + j0;
  const float* ak = a + i0;
  for (std::int64_t k = 0; k < depth; ++k, bk += b_rs) {
    pf.step();
    __m512 bv[NV];
    ATTNKIT_UNROLL
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_maskz_loadu_ps(mk[v], bk + 16 * v);
    ATTNKIT_UNROLL
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(UnitRows ? ak[r] : ar[r][k * a_cs]);
      ATTNKIT_UNROLL
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
    if constexpr (UnitRows) ak += a_cs;
  }
  ATTNKIT_UNROLL
  for (int r = 0; r < MR; ++r) {
    if (i0 + r >= rows) break;
    float* cr = c + (i0 + r) * ldc + j0;
    ATTNKIT_UNROLL
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(cr + 16 * v, mk[v], acc[r][v]);
  }
}

/// Rows [i0, rows) of A with adjacent rows (a_rs == 1): full MR-row tiles, then the remainder
/// in tiles of MR/2, MR/4, ... rows, so a ragged edge (34 heads = 4 x 8 + 2) costs what it
/// computes instead of a whole clamped tile.
template <bool Accumulate, int MR, int NV, class Prefetch>
inline void gemm_bcast_unit_rows(std::int64_t i0, std::int64_t j0, const __mmask16* mk, std::int64_t rows,
                                 std::int64_t depth, const float* a, std::int64_t a_cs, const float* b, std::int64_t b_rs,
                                 float* c, std::int64_t ldc, Prefetch& pf) {
  for (; i0 + MR <= rows; i0 += MR)
    gemm_bcast_tile<Accumulate, MR, NV, true>(i0, j0, mk, rows, depth, a, 1, a_cs, b, b_rs, c, ldc, pf);
  if constexpr (MR > 1)
    if (i0 < rows) gemm_bcast_unit_rows<Accumulate, MR / 2, NV>(i0, j0, mk, rows, depth, a, a_cs, b, b_rs, c, ldc, pf);
}

/// C[rows, cols] (+)= A B, with A(i, k) = a[i * a_rs + k * a_cs] (any strides: every element is
/// broadcast) and B(k, j) = b[k * b_rs + j] (unit column stride), C row-major (ldc).
/// Micro-tile: MR rows x 16*NV columns in MR*NV zmm accumulators; the B panel stays in L1 while
/// the row blocks of A stream past it. pf (see no_prefetch) is stepped once per depth step.
template <bool Accumulate, int MR, int NV, class Prefetch>
inline void gemm_bcast_tiles(std::int64_t rows, std::int64_t cols, std::int64_t depth, const float* a, std::int64_t a_rs,
                             std::int64_t a_cs, const float* b, std::int64_t b_rs, float* c, std::int64_t ldc,
                             Prefetch& pf) {
  for (std::int64_t j0 = 0; j0 < cols; j0 += 16 * NV) {
    __mmask16 mk[NV];
    ATTNKIT_UNROLL
    for (int v = 0; v < NV; ++v) mk[v] = lane_mask(std::max<std::int64_t>(0, cols - j0 - 16 * v));
    if (a_rs == 1) {
      gemm_bcast_unit_rows<Accumulate, MR, NV>(0, j0, mk, rows, depth, a, a_cs, b, b_rs, c, ldc, pf);
      continue;
    }
    for (std::int64_t i0 = 0; i0 < rows; i0 += MR)
      gemm_bcast_tile<Accumulate, MR, NV, false>(i0, j0, mk, rows, depth, a, a_rs, a_cs, b, b_rs, c, ldc, pf);
  }
}

/// 8 x 32 tiles, or 16 x 16 when C is at most 16 columns wide (e.g. the 16 query heads of an
/// MLA decode step), so narrow products do not compute half-empty vectors.
template <bool Accumulate, class Prefetch = no_prefetch>
inline void gemm_bcast(std::int64_t rows, std::int64_t cols, std::int64_t depth, const float* a, std::int64_t a_rs,
                       std::int64_t a_cs, const float* b, std::int64_t b_rs, float* c, std::int64_t ldc,
                       Prefetch&& pf = {}) {
  if (cols <= 16) gemm_bcast_tiles<Accumulate, 16, 1>(rows, cols, depth, a, a_rs, a_cs, b, b_rs, c, ldc, pf);
  else gemm_bcast_tiles<Accumulate, 8, 2>(rows, cols, depth, a, a_rs, a_cs, b, b_rs, c, ldc, pf);
}

/// Online-softmax update for a transposed score block st[keys][ld] (queries along the row):
/// per query m, max'_m = max(max_m, max_t st[t][m]) (block_max: that column max when the caller
/// has it, else nullptr); sum is rescaled and increased; alpha[m] = exp(max_m - max'_m) is the
/// factor for the accumulator (0 while a column has seen only masked keys, whose probabilities
/// are exactly 0). on_p(t, m0, p, mask) receives the probabilities exp(st - max') of key t for
/// queries m0..m0+15.
template <class OnP>
inline void softmax_columns(const float* st, std::int64_t ld, std::int64_t keys, std::int64_t queries, const float* block_max,
                            float* max, float* sum, float* alpha, OnP&& on_p) {
  const __m512 ninf = _mm512_set1_ps(neg_inf);
  for (std::int64_t m0 = 0; m0 < queries; m0 += 16) {
    const __mmask16 mm = lane_mask(queries - m0);
    __m512 colmax = ninf;
    if (block_max) colmax = _mm512_mask_loadu_ps(ninf, mm, block_max + m0);
    else
      for (std::int64_t t = 0; t < keys; ++t) colmax = _mm512_max_ps(colmax, _mm512_maskz_loadu_ps(mm, st + t * ld + m0));
    const __m512 old = _mm512_mask_loadu_ps(ninf, mm, max + m0);
    const __m512 mx = _mm512_max_ps(old, colmax);
    const __m512 shift = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mx, ninf, _CMP_EQ_OQ), mx, _mm512_setzero_ps());
    const __m512 a = exp16(_mm512_sub_ps(old, shift));  // exp(-inf - finite) = 0
    __m512 colsum = _mm512_setzero_ps();
    for (std::int64_t t = 0; t < keys; ++t) {
      const __m512 p = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mm, st + t * ld + m0), shift));
      on_p(t, m0, p, mm);
      colsum = _mm512_add_ps(colsum, p);
    }
    _mm512_mask_storeu_ps(sum + m0, mm, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mm, sum + m0), a, colsum));
    _mm512_mask_storeu_ps(max + m0, mm, mx);
    _mm512_mask_storeu_ps(alpha + m0, mm, a);
  }
}

/// softmax_columns with the probabilities written back into st.
inline void softmax_absorb_columns(float* st, std::int64_t ld, std::int64_t keys, std::int64_t queries, float* max,
                                   float* sum, float* alpha) {
  softmax_columns(st, ld, keys, queries, nullptr, max, sum, alpha,
                  [&](std::int64_t t, std::int64_t m0, __m512 p, __mmask16 mm) { _mm512_mask_storeu_ps(st + t * ld + m0, mm, p); });
}

#else  // portable versions: the same contracts in plain loops

template <bool Accumulate, class Prefetch = no_prefetch>
inline void gemm_bcast(std::int64_t rows, std::int64_t cols, std::int64_t depth, const float* a, std::int64_t a_rs,
                       std::int64_t a_cs, const float* b, std::int64_t b_rs, float* c, std::int64_t ldc,
                       Prefetch&& pf = {}) {
  for (std::int64_t i = 0; i < rows; ++i) {
    float* cr = c + i * ldc;
    if (!Accumulate) std::fill(cr, cr + cols, 0.f);
    for (std::int64_t k = 0; k < depth; ++k) {
      pf.step();
      const float av = a[i * a_rs + k * a_cs];
      const float* bk = b + k * b_rs;
      for (std::int64_t j = 0; j < cols; ++j) cr[j] += av * bk[j];
    }
  }
}

template <class OnP>
inline void softmax_columns(const float* st, std::int64_t ld, std::int64_t keys, std::int64_t queries, const float* block_max,
                            float* max, float* sum, float* alpha, OnP&& on_p) {
  for (std::int64_t m = 0; m < queries; ++m) {
    float colmax = neg_inf;
    if (block_max) colmax = block_max[m];
    else
      for (std::int64_t t = 0; t < keys; ++t) colmax = std::max(colmax, st[t * ld + m]);
    const float mx = std::max(max[m], colmax), shift = mx == neg_inf ? 0.f : mx;
    const float a = std::exp(max[m] - shift);
    float colsum = 0.f;
    for (std::int64_t t = 0; t < keys; ++t) {
      const float p = std::exp(st[t * ld + m] - shift);
      on_p(t, m, p);
      colsum += p;
    }
    sum[m] = sum[m] * a + colsum;
    max[m] = mx;
    alpha[m] = a;
  }
}

inline void softmax_absorb_columns(float* st, std::int64_t ld, std::int64_t keys, std::int64_t queries, float* max,
                                   float* sum, float* alpha) {
  softmax_columns(st, ld, keys, queries, nullptr, max, sum, alpha,
                  [&](std::int64_t t, std::int64_t m, float p) { st[t * ld + m] = p; });
}

#endif  // ATTNKIT_HAS_AVX512

}  // namespace attnkit::detail
