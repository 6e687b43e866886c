// bf16 products on AMX tiles (Sapphire, Emerald, Granite Rapids): tdpbf16ps multiplies a
// 16 x 32 tile of bf16 A rows by a 16 x 16 tile of B pairs (VNNI layout: row k holds the pairs of
// depth 2k, 2k + 1 for 16 columns) into 16 x 16 floats, 8192 products per instruction. Included by
// simd/targets.hpp inside namespace attnkit::detail::simd_amx, after vec_avx512.inl and
// bf16_dot.inl, under the AVX-512 attributes plus avx512bf16, amx-tile and amx-bf16.
//
// tmm0-3 accumulate a 2 x 2 block of C tiles, tmm4-5 hold A, tmm6-7 hold B, all 16 rows x 64
// bytes, except for a last partial row tile (amx_gemm) and in the kernels of a single row tile
// (amx_group_scores, amx_pv_rows), whose C and A tiles have the tile's rows and whose last keys
// shorten A's rows and B's columns. The configuration is loaded at each call (the tile state
// belongs to the thread, and other code on it may configure its own) and released after.

/// The compiler does not see the tile loads and stores access memory (GCC's intrinsics are asm
/// statements without memory operands): the buffers packed before a load must be written first,
/// and the stores done before the caller reads.
inline void amx_memory_barrier() { __asm__ volatile("" ::: "memory"); }

/// tmm0-5 (C and A) of `rows` rows, tmm6-7 (B) of `b_rows`; rows of 64 bytes, tmm4-5's of
/// `a_bytes`. The default is every tile 16 x 64. Loading a configuration zeroes every tile.
inline void amx_configure(int rows = 16, int a_bytes = 64, int b_rows = 16) {
  alignas(64) unsigned char cfg[64] = {};
  cfg[0] = 1;  // palette 1
  for (int t = 0; t < 8; ++t) {
    cfg[16 + 2 * t] = static_cast<unsigned char>(t == 4 || t == 5 ? a_bytes : 64);  // bytes per
    cfg[48 + t] = static_cast<unsigned char>(t < 6 ? rows : b_rows);  // row (uint16 LE), rows
  }
  // Not _tile_loadconfig: GCC's tells the compiler it reads 8 bytes of cfg, which then may drop
  // the stores of the rest (an invalid configuration faults).
  __asm__ volatile("ldtilecfg %0" ::"m"(*reinterpret_cast<const unsigned char(*)[64]>(cfg)));
}

/// pf->step() `steps` times (a narrow tile's prefetch stream, spread over its tile products).
inline void amx_prefetch(range_prefetcher* pf, int steps) {
  if (pf)
    for (int s = 0; s < steps; ++s) pf->step();
}

/// An R x C block of 16 x 16 C tiles (R, C in {1, 2}) over `depth` (a multiple of 32): A rows at
/// a + i * a_stride (bf16 elements), B pair rows at b + k * ldb (words), C rows at c + i * ldc;
/// each of the parts' A or B operands (amx_parts) multiplied in at every step of depth.
template <int R, int C>
inline void amx_block(const bf16* a, std::int64_t a_stride, const std::uint32_t* b,
                      std::int64_t ldb, float* c, std::int64_t ldc, std::int64_t depth,
                      bool accumulate, const amx_parts& parts) {
  const std::int64_t as = a_stride * 2, bs = ldb * 4, cs = ldc * 4;
  amx_memory_barrier();
  if (accumulate) {
    _tile_loadd(0, c, cs);
    if constexpr (C > 1) _tile_loadd(1, c + 16, cs);
    if constexpr (R > 1) _tile_loadd(2, c + 16 * ldc, cs);
    if constexpr (R > 1 && C > 1) _tile_loadd(3, c + 16 * ldc + 16, cs);
  } else {
    _tile_zero(0);
    if constexpr (C > 1) _tile_zero(1);
    if constexpr (R > 1) _tile_zero(2);
    if constexpr (R > 1 && C > 1) _tile_zero(3);
  }
  for (std::int64_t k = 0; k < depth; k += 32)
    for (int p = 0; p < parts.n; ++p) {
      if (p == 0 || parts.a_stride != 0) {
        const bf16* ap = a + p * parts.a_stride + k;
        _tile_loadd(4, ap, as);
        if constexpr (R > 1) _tile_loadd(5, ap + 16 * a_stride, as);
      }
      if (p == 0 || parts.b_stride != 0) {
        const std::uint32_t* bp = b + p * parts.b_stride + k / 2 * ldb;
        _tile_loadd(6, bp, bs);
        if constexpr (C > 1) _tile_loadd(7, bp + 16, bs);
      }
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (C > 1) _tile_dpbf16ps(1, 4, 7);
      if constexpr (R > 1) _tile_dpbf16ps(2, 5, 6);
      if constexpr (R > 1 && C > 1) _tile_dpbf16ps(3, 5, 7);
    }
  _tile_stored(0, c, cs);
  if constexpr (C > 1) _tile_stored(1, c + 16, cs);
  if constexpr (R > 1) _tile_stored(2, c + 16 * ldc, cs);
  if constexpr (R > 1 && C > 1) _tile_stored(3, c + 16 * ldc + 16, cs);
}

/// R row tiles (R in {1, 2}) of A rows at a against every column of B, 32 at a time (cols a
/// multiple of 16): C rows at c.
template <int R>
inline void amx_row_tiles(std::int64_t cols, std::int64_t depth, const bf16* a,
                          std::int64_t a_stride, const std::uint32_t* b, std::int64_t ldb, float* c,
                          std::int64_t ldc, bool accumulate, const amx_parts& parts) {
  std::int64_t j0 = 0;
  for (; j0 + 32 <= cols; j0 += 32)
    amx_block<R, 2>(a, a_stride, b + j0, ldb, c + j0, ldc, depth, accumulate, parts);
  if (j0 < cols) amx_block<R, 1>(a, a_stride, b + j0, ldb, c + j0, ldc, depth, accumulate, parts);
}

/// C[rows][cols] (+)= A B on tiles: A rows of `depth` bf16 at a + i * a_stride (i < rows), B pair
/// rows b + k * ldb (k < depth / 2), C rows c + i * ldc. cols a multiple of 16, depth of 32. The
/// last rows (rows % 16) run under a configuration of that many rows, so no row past `rows` is
/// read or written. A or B as several parts: amx_parts.
template <bool Accumulate>
inline void amx_gemm(std::int64_t rows, std::int64_t cols, std::int64_t depth, const bf16* a,
                     std::int64_t a_stride, const std::uint32_t* b, std::int64_t ldb, float* c,
                     std::int64_t ldc, const amx_parts& parts) {
  const std::int64_t full = rows / 16 * 16;
  if (full > 0) amx_configure();
  std::int64_t i0 = 0;
  for (; i0 + 32 <= full; i0 += 32)
    amx_row_tiles<2>(cols, depth, a + i0 * a_stride, a_stride, b, ldb, c + i0 * ldc, ldc,
                     Accumulate, parts);
  if (i0 < full) {
    amx_row_tiles<1>(cols, depth, a + i0 * a_stride, a_stride, b, ldb, c + i0 * ldc, ldc,
                     Accumulate, parts);
    i0 += 16;
  }
  if (i0 < rows) {
    amx_configure(static_cast<int>(rows - i0));
    amx_row_tiles<1>(cols, depth, a + i0 * a_stride, a_stride, b, ldb, c + i0 * ldc, ldc,
                     Accumulate, parts);
  }
  amx_memory_barrier();  // the C tiles stored before the caller reads them
  _tile_release();
}

/// dst[r * dst_stride + k] = (x[2k][r], x[2k + 1][r]) as bf16 pairs (the AMX A operand of O += P V
/// from the column tile P^T) for the float rows x[t] = src + t * ld: t < keys (later keys are 0),
/// r < rows rounded up to 16 (columns past `rows` are not read: their pairs are 0), k < pairs (a
/// multiple of 16); bf16_residual's parts 0 .. parts - 1 of x at dst + p * part_stride. One part:
/// each 16 x 16 block of pairs transposed as words; several: each block of even keys and of odd
/// keys transposed once as floats, the parts then taken row by row, each the last one's residual.
inline void pack_pairs_transposed(const float* src, std::int64_t ld, std::int64_t keys,
                                  std::int64_t rows, std::int64_t pairs, std::uint32_t* dst,
                                  std::int64_t dst_stride, int parts, std::int64_t part_stride) {
  for (std::int64_t r0 = 0; r0 < rows; r0 += 16)
    for (std::int64_t k0 = 0; k0 < pairs; k0 += 16) {
      const __mmask16 m = V::first(rows - r0);
      auto key = [&](std::int64_t t) {  // key t of rows r0 .. r0 + 15
        return t < keys ? _mm512_maskz_loadu_ps(m, src + t * ld + r0) : _mm512_setzero_ps();
      };
      if (parts == 1) {
        __m512i w[16];  // w[i]: the pairs k0 + i of rows r0 .. r0 + 15; transposed, row r0 + i's
        for (int i = 0; i < 16; ++i) {
          const std::int64_t t = 2 * (k0 + i);
          w[i] = _mm512_or_si512(bf16_bits(key(t)), _mm512_slli_epi32(bf16_bits(key(t + 1)), 16));
        }
        V::transpose_words(w);
        for (int r = 0; r < 16; ++r) _mm512_storeu_si512(dst + (r0 + r) * dst_stride + k0, w[r]);
        continue;
      }
      __m512 even[16], odd[16];  // keys 2 (k0 + i) and 2 (k0 + i) + 1; transposed, row r0 + i's
      for (int i = 0; i < 16; ++i) {
        even[i] = key(2 * (k0 + i));
        odd[i] = key(2 * (k0 + i) + 1);
      }
      V::transpose(even);
      V::transpose(odd);
      for (int r = 0; r < 16; ++r) {
        __m512 e = even[r], o = odd[r];
        std::uint32_t* d = dst + (r0 + r) * dst_stride + k0;
        for (int p = 0; p < parts; ++p) {
          const __m512i be = bf16_bits(e), bo = bf16_bits(o);
          _mm512_storeu_si512(d + p * part_stride, _mm512_or_si512(be, _mm512_slli_epi32(bo, 16)));
          e = _mm512_sub_ps(e, _mm512_castsi512_ps(_mm512_slli_epi32(be, 16)));
          o = _mm512_sub_ps(o, _mm512_castsi512_ps(_mm512_slli_epi32(bo, 16)));
        }
      }
    }
}

/// dst[r * dst_stride + c] = bf16(x_r[c]) (the AMX A operand of O += P V from the row tile P)
/// for the float rows x_r = src + r * ld, r < rows, c < cols (a multiple of 32; columns from
/// `keys` on are 0); x's bf16_residual parts 0 .. parts - 1 at dst + p * part_stride.
inline void pack_rows_bf16(const float* src, std::int64_t ld, std::int64_t rows, std::int64_t keys,
                           std::int64_t cols, bf16* dst, std::int64_t dst_stride, int parts,
                           std::int64_t part_stride) {
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; c += 32) {
      const float* x = src + r * ld + c;
      __m512 lo = _mm512_maskz_loadu_ps(V::first(keys - c), x);
      __m512 hi = _mm512_maskz_loadu_ps(V::first(keys - c - 16), x + 16);
      for (int p = 0; p < parts; ++p) {
        _mm512_storeu_si512(dst + p * part_stride + r * dst_stride + c,
                            reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
        lo = bf16_residual(lo, 1), hi = bf16_residual(hi, 1);
      }
    }
}

/// A row tile's scores against 16-key groups, S^T[t][r] = sum_d K[t][d] Q[r][d] for t < k.keys:
/// A tiles the groups' key rows in place, B = Q^T's pairs qp [depth / 2][16] words, C = s
/// [k.keys][16]; Q^T as parts.n such B operands (parts.b_stride words apart) multiplied by the A
/// tiles loaded once. The last group (keys % 16 rows) runs under its own tile configuration, so
/// no row past k.keys is read. pf (optional): stepped pf_steps times per 32 of depth.
inline void amx_group_scores(const amx_key_groups& k, std::int64_t depth, const std::uint32_t* qp,
                             float* s, range_prefetcher* pf, int pf_steps, const amx_parts& parts) {
  const int full = static_cast<int>(k.keys / 16), groups = static_cast<int>((k.keys + 15) / 16);
  amx_memory_barrier();
  if (full > 0) amx_configure();
  for (int g = 0, step; g < groups; g += step) {
    if (g == full) amx_configure(static_cast<int>(k.keys - 16 * full), 64, 16);  // the last keys
    const bool two = g + 1 < full;  // two whole groups, or one (whole or the last)
    step = two ? 2 : 1;
    _tile_zero(0);
    if (two) _tile_zero(2);
    for (std::int64_t d = 0; d < depth; d += 32) {
      _tile_loadd(4, k.base[g] + d, k.stride[g] * 2);
      if (two) _tile_loadd(5, k.base[g + 1] + d, k.stride[g + 1] * 2);
      for (int p = 0; p < parts.n; ++p) {
        _tile_loadd(6, qp + p * parts.b_stride + d / 2 * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (two) _tile_dpbf16ps(2, 5, 6);
      }
      amx_prefetch(pf, pf_steps);
    }
    _tile_stored(0, s + g * 256, 64);
    if (two) _tile_stored(2, s + (g + 1) * 256, 64);
  }
  amx_memory_barrier();  // the C tiles stored before the caller reads them
  _tile_release();
}

/// P's rows for amx_pv_rows from the column tile x[t] = src + t * ld (t < keys; later keys 0):
/// per 16 keys k0, [2][16][16] words at halves + k0 * 32: row r's (bf16(x[k0 + i][r]), 0) for
/// i < 16, then the same with the probability in the high half; bf16_residual's parts 0 .. parts
/// - 1 of the probabilities at halves + p * part_stride. Each 16 x 16 block is transposed once as
/// floats and its parts taken row by row, each the last one's residual.
inline void pack_probability_halves(const float* src, std::int64_t ld, std::int64_t keys,
                                    std::uint32_t* halves, int parts, std::int64_t part_stride) {
  for (std::int64_t k0 = 0; k0 < keys; k0 += 16) {
    __m512 x[16];  // x[i]: key k0 + i's probabilities of rows 0 .. 15; transposed, row i's
    for (int i = 0; i < 16; ++i)
      x[i] = k0 + i < keys ? _mm512_loadu_ps(src + (k0 + i) * ld) : _mm512_setzero_ps();
    V::transpose(x);
    for (int r = 0; r < 16; ++r) {
      __m512 e = x[r];
      for (int p = 0; p < parts; ++p) {
        const __m512i w = bf16_bits(e), high = _mm512_slli_epi32(w, 16);
        std::uint32_t* dst = halves + p * part_stride + k0 * 32 + r * 16;
        _mm512_storeu_si512(dst, w);
        _mm512_storeu_si512(dst + 256, high);
        e = _mm512_sub_ps(e, _mm512_castsi512_ps(high));
      }
    }
  }
}

/// One pass of amx_pv_rows over the value groups [g0, g1) (the configured B rows each).
inline void amx_pv_pass(std::int64_t dv, int g0, int g1, const std::uint32_t* halves,
                        const amx_key_groups& v, float* acc, std::int64_t ldacc,
                        range_prefetcher* pf, int pf_steps, const amx_parts& parts) {
  const std::int64_t cs = ldacc * 4;
  for (std::int64_t c0 = 0; c0 < dv; c0 += 64) {
    const bool two = c0 + 64 <= dv;  // two 32-column groups, or the last single one
    float* c = acc + c0;
    _tile_loadd(0, c, cs);
    _tile_loadd(1, c + 16, cs);
    if (two) {
      _tile_loadd(2, c + 32, cs);
      _tile_loadd(3, c + 48, cs);
    }
    for (int g = g0; g < g1; ++g) {
      const bf16* vr = v.base[g] + c0;
      const std::int64_t vs = v.stride[g] * 2;
      _tile_loadd(6, vr, vs);
      if (two) _tile_loadd(7, vr + 32, vs);
      for (int p = 0; p < parts.n; ++p) {  // the value rows loaded once for every part of P
        const std::uint32_t* h = halves + p * parts.a_stride + g * 512;
        _tile_loadd(4, h, 64);        // (p, 0): the even columns
        _tile_loadd(5, h + 256, 64);  // (0, p): the odd columns
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        if (two) {
          _tile_dpbf16ps(2, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      amx_prefetch(pf, pf_steps);
    }
    _tile_stored(0, c, cs);
    _tile_stored(1, c + 16, cs);
    if (two) {
      _tile_stored(2, c + 32, cs);
      _tile_stored(3, c + 48, cs);
    }
  }
}

/// O[rows][dv] += P V for one tile of rows <= 16, with the value rows of 16-key groups read in
/// place (v: the groups' bf16 rows); dv a multiple of 32; halves from pack_probability_halves.
/// Each tile product takes a group's value rows as they lie for its B tile (adjacent columns are
/// its pairs) against P's rows with each probability in one half of its pair and 0 in the other,
/// so a 32-column group's even columns collect in one C tile and its odd columns in another: acc
/// holds each group as its 16 even columns, then its 16 odd ones (permute_pairs' order, group
/// 32). Half the products are zeros; a single row tile saves the pairing of V's rows by key,
/// which costs it more than its products. The last group (keys % 16 rows) runs under its own
/// tile configuration, so no row past v.keys is read. P as parts.n such halves (parts.a_stride
/// words apart) against the value tiles loaded once. pf (optional): stepped per group and 64
/// columns.
inline void amx_pv_rows(std::int64_t rows, std::int64_t dv, const std::uint32_t* halves,
                        const amx_key_groups& v, float* acc, std::int64_t ldacc,
                        range_prefetcher* pf, int pf_steps, const amx_parts& parts) {
  const int full = static_cast<int>(v.keys / 16), r = static_cast<int>(rows);
  amx_memory_barrier();
  if (full > 0) {
    amx_configure(r, 64, 16);
    amx_pv_pass(dv, 0, full, halves, v, acc, ldacc, pf, pf_steps, parts);
  }
  if (v.keys > 16 * full) {
    const int n = static_cast<int>(v.keys - 16 * full);
    amx_configure(r, 4 * n, n);
    amx_pv_pass(dv, full, full + 1, halves, v, acc, ldacc, pf, pf_steps, parts);
  }
  amx_memory_barrier();  // the C tiles stored before the caller reads them
  _tile_release();
}
