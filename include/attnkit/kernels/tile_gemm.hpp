#pragma once
// Register-blocked GEMM and column-wise online softmax for the prefill ("gemm") tiles on
// AVX-512. The score tile is computed transposed, S^T[key][query] = K Q^T, so that:
//   * both products have a row-major "B" operand read as vectors with no packing: the query
//     tile transposed once per item (Q^T [d, M]) and the cached V rows themselves;
//   * the online softmax runs down the columns, vectorised across 16 queries at a time.
#include <algorithm>
#include <cstdint>

#include "../core/simd.hpp"
#include "microkernels.hpp"

namespace attnkit::detail {

#if ATTNKIT_HAS_AVX512

/// C[rows, cols] (+)= A B, with A(i, k) = a[i * a_rs + k * a_cs] (any strides: every element is
/// broadcast) and B(k, j) = b[k * b_rs + j] (unit column stride), C row-major (ldc).
/// Micro-tile: 8 rows x 32 columns in 16 zmm accumulators; the 32-column B panel stays in L1
/// while the row blocks of A stream past it.
template <bool Accumulate>
inline void gemm_bcast(std::int64_t rows, std::int64_t cols, std::int64_t depth, const float* a, std::int64_t a_rs,
                       std::int64_t a_cs, const float* b, std::int64_t b_rs, float* c, std::int64_t ldc) {
  constexpr int MR = 8;
  for (std::int64_t j0 = 0; j0 < cols; j0 += 32) {
    const __mmask16 m0 = lane_mask(cols - j0), m1 = lane_mask(std::max<std::int64_t>(0, cols - j0 - 16));
    for (std::int64_t i0 = 0; i0 < rows; i0 += MR) {
      const float* ar[MR];
      ATTNKIT_UNROLL
      for (int r = 0; r < MR; ++r) ar[r] = a + std::min<std::int64_t>(i0 + r, rows - 1) * a_rs;
      __m512 acc[MR][2];
      ATTNKIT_UNROLL
      for (int r = 0; r < MR; ++r) {
        float* cr = c + std::min<std::int64_t>(i0 + r, rows - 1) * ldc + j0;
        acc[r][0] = Accumulate ? _mm512_maskz_loadu_ps(m0, cr) : _mm512_setzero_ps();
        acc[r][1] = Accumulate ? _mm512_maskz_loadu_ps(m1, cr + 16) : _mm512_setzero_ps();
      }
      const float* bk = b + j0;
      for (std::int64_t k = 0; k < depth; ++k, bk += b_rs) {
        const __m512 b0 = _mm512_maskz_loadu_ps(m0, bk), b1 = _mm512_maskz_loadu_ps(m1, bk + 16);
        const std::int64_t ak = k * a_cs;
        ATTNKIT_UNROLL
        for (int r = 0; r < MR; ++r) {
          const __m512 av = _mm512_set1_ps(ar[r][ak]);
          acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
        }
      }
      ATTNKIT_UNROLL
      for (int r = 0; r < MR; ++r) {
        if (i0 + r >= rows) break;
        float* cr = c + (i0 + r) * ldc + j0;
        _mm512_mask_storeu_ps(cr, m0, acc[r][0]);
        _mm512_mask_storeu_ps(cr + 16, m1, acc[r][1]);
      }
    }
  }
}

/// Online-softmax update for a transposed score block st[keys][ld] (queries along the row):
/// per query m, max'_m = max(max_m, max_t st[t][m]); st becomes exp(st - max'); sum is
/// rescaled and increased; alpha[m] = exp(max_m - max'_m) is the factor for the accumulator
/// (0 while a column has seen only masked keys, whose probabilities are exactly 0).
inline void softmax_absorb_columns(float* st, std::int64_t ld, std::int64_t keys, std::int64_t queries, float* max,
                                   float* sum, float* alpha) {
  const __m512 ninf = _mm512_set1_ps(neg_inf);
  for (std::int64_t m0 = 0; m0 < queries; m0 += 16) {
    const __mmask16 mm = lane_mask(queries - m0);
    __m512 colmax = ninf;
    for (std::int64_t t = 0; t < keys; ++t) colmax = _mm512_max_ps(colmax, _mm512_maskz_loadu_ps(mm, st + t * ld + m0));
    const __m512 old = _mm512_mask_loadu_ps(ninf, mm, max + m0);
    const __m512 mx = _mm512_max_ps(old, colmax);
    const __m512 shift = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mx, ninf, _CMP_EQ_OQ), mx, _mm512_setzero_ps());
    const __m512 a = exp16(_mm512_sub_ps(old, shift));  // exp(-inf - finite) = 0
    __m512 colsum = _mm512_setzero_ps();
    for (std::int64_t t = 0; t < keys; ++t) {
      float* row = st + t * ld + m0;
      const __m512 p = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mm, row), shift));
      _mm512_mask_storeu_ps(row, mm, p);
      colsum = _mm512_add_ps(colsum, p);
    }
    _mm512_mask_storeu_ps(sum + m0, mm, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mm, sum + m0), a, colsum));
    _mm512_mask_storeu_ps(max + m0, mm, mx);
    _mm512_mask_storeu_ps(alpha + m0, mm, a);
  }
}

#endif  // ATTNKIT_HAS_AVX512

}  // namespace attnkit::detail
