#pragma once
// Register-blocked GEMM for the prefill ("gemm") tiles on AVX-512 and TPA's value product.
// The GQA score tile is computed transposed, S^T[key][query] = K Q^T, so that:
//   * both products have a row-major "B" operand read as vectors with no packing: the query
//     tile transposed once per item (Q^T [d, M]) and the cached V rows themselves;
//   * the online softmax runs down the columns (softmax_absorb_columns), vectorised across
//     16 queries at a time.
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
/// the TPA value GEMM ran measurably slower that way; docs/benchmarks.md, TPA).
template <bool Accumulate, int MR, int NV, bool UnitRows, class Prefetch>
inline void gemm_bcast_tile(std::int64_t i0, std::int64_t j0, const __mmask16* mk,
                            std::int64_t rows, std::int64_t depth, const float* a,
                            std::int64_t a_rs, std::int64_t a_cs, const float* b, std::int64_t b_rs,
                            float* c, std::int64_t ldc, Prefetch& pf) {
  const float* ar[MR];
  ATTNKIT_UNROLL
  for (int r = 0; r < MR; ++r)
    ar[r] = UnitRows ? a + i0 + r : a + std::min<std::int64_t>(i0 + r, rows - 1) * a_rs;
  __m512 acc[MR][NV];
  ATTNKIT_UNROLL
  for (int r = 0; r < MR; ++r) {
    float* cr = c + std::min<std::int64_t>(i0 + r, rows - 1) * ldc + j0;
    ATTNKIT_UNROLL
    for (int v = 0; v < NV; ++v)
      acc[r][v] = Accumulate ? _mm512_maskz_loadu_ps(mk[v], cr + 16 * v) : _mm512_setzero_ps();
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
inline void gemm_bcast_unit_rows(std::int64_t i0, std::int64_t j0, const __mmask16* mk,
                                 std::int64_t rows, std::int64_t depth, const float* a,
                                 std::int64_t a_cs, const float* b, std::int64_t b_rs, float* c,
                                 std::int64_t ldc, Prefetch& pf) {
  for (; i0 + MR <= rows; i0 += MR)
    gemm_bcast_tile<Accumulate, MR, NV, true>(i0, j0, mk, rows, depth, a, 1, a_cs, b, b_rs, c, ldc,
                                              pf);
  if constexpr (MR > 1)
    if (i0 < rows)
      gemm_bcast_unit_rows<Accumulate, MR / 2, NV>(i0, j0, mk, rows, depth, a, a_cs, b, b_rs, c,
                                                   ldc, pf);
}

/// C[rows, cols] (+)= A B, with A(i, k) = a[i * a_rs + k * a_cs] (any strides: every element is
/// broadcast) and B(k, j) = b[k * b_rs + j] (unit column stride), C row-major (ldc).
/// Micro-tile: MR rows x 16*NV columns in MR*NV zmm accumulators; the B panel stays in L1 while
/// the row blocks of A stream past it. pf (see no_prefetch) is stepped once per depth step.
template <bool Accumulate, int MR, int NV, class Prefetch>
inline void gemm_bcast_tiles(std::int64_t rows, std::int64_t cols, std::int64_t depth,
                             const float* a, std::int64_t a_rs, std::int64_t a_cs, const float* b,
                             std::int64_t b_rs, float* c, std::int64_t ldc, Prefetch& pf) {
  for (std::int64_t j0 = 0; j0 < cols; j0 += 16 * NV) {
    __mmask16 mk[NV];
    ATTNKIT_UNROLL
    for (int v = 0; v < NV; ++v) mk[v] = lane_mask(std::max<std::int64_t>(0, cols - j0 - 16 * v));
    if (a_rs == 1) {
      gemm_bcast_unit_rows<Accumulate, MR, NV>(0, j0, mk, rows, depth, a, a_cs, b, b_rs, c, ldc,
                                               pf);
      continue;
    }
    for (std::int64_t i0 = 0; i0 < rows; i0 += MR)
      gemm_bcast_tile<Accumulate, MR, NV, false>(i0, j0, mk, rows, depth, a, a_rs, a_cs, b, b_rs, c,
                                                 ldc, pf);
  }
}

/// 8 x 32 tiles, or 16 x 16 when C is at most 16 columns wide (e.g. the 16 query heads of an
/// MLA decode step), so narrow products do not compute half-empty vectors.
template <bool Accumulate, class Prefetch = no_prefetch>
inline void gemm_bcast(std::int64_t rows, std::int64_t cols, std::int64_t depth, const float* a,
                       std::int64_t a_rs, std::int64_t a_cs, const float* b, std::int64_t b_rs,
                       float* c, std::int64_t ldc, Prefetch&& pf = {}) {
  if (cols <= 16)
    gemm_bcast_tiles<Accumulate, 16, 1>(rows, cols, depth, a, a_rs, a_cs, b, b_rs, c, ldc, pf);
  else
    gemm_bcast_tiles<Accumulate, 8, 2>(rows, cols, depth, a, a_rs, a_cs, b, b_rs, c, ldc, pf);
}

#else  // portable versions: the same contracts in plain loops

template <bool Accumulate, class Prefetch = no_prefetch>
inline void gemm_bcast(std::int64_t rows, std::int64_t cols, std::int64_t depth, const float* a,
                       std::int64_t a_rs, std::int64_t a_cs, const float* b, std::int64_t b_rs,
                       float* c, std::int64_t ldc, Prefetch&& pf = {}) {
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

#endif  // ATTNKIT_HAS_AVX512

}  // namespace attnkit::detail
