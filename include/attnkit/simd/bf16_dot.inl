// bf16 products on AVX-512 BF16: vdpbf16ps multiplies the two bf16 halves of each 32-bit lane of
// its operands exactly and adds both products to a float lane. Included by simd/targets.hpp
// inside namespace attnkit::detail::simd_avx512_bf16, after vec_avx512.inl, under the AVX-512
// attributes plus avx512bf16 (product_math::bf16, core/options.hpp).
//
// A pair is two bf16 in one 32-bit word, the element of even index in the low half. The GEMM
// below is gemm_bcast's (kernels.inl) with pairs for elements: each step broadcasts a pair of A
// and multiplies it into rows of B pairs, so the depth advances two at a time:
//   scores   S^T[t][r] = sum_c K[t][c] Q[r][c]: A = the cache's K rows in place (adjacent
//            columns are already pairs), B = Q^T as pairs [d_qk / 2][rows] (pack_query_pairs)
//   values   O[r][c] += sum_t P[r][t] V[t][c]: A = P^T's rows paired by key [keys / 2][rows]
//            (pack_row_pairs), B = V's rows paired by key [keys / 2][d_v] (pack_row_pairs)
// and the streaming path's (a decode step's few rows) score block (stream_pair_scores: K rows
// in place) and P V (stream_pair_pv: two keys' V rows in place, paired in registers).

/// 16 floats rounded to bf16 (nearest even; NaN stays NaN), each in the low half of a lane.
inline __m512i bf16_bits(__m512 x) {
  return _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
}
inline __m512i bf16_bits(const bf16* p, __mmask16 m) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
}
inline __m512i bf16_bits(const float* p, __mmask16 m) {
  return bf16_bits(_mm512_maskz_loadu_ps(m, p));
}

/// x less its first `part` roundings to bf16: part 0 is x, part 1 x - bf16(x), part 2 part 1 less
/// its own rounding. Each difference is exact, and the three parts rounded to bf16 sum to x (8
/// significant bits each cover a float's 24), so three bf16 products of a float and a bf16 are
/// its float product exactly: f32 products on AMX tiles (gqa_products::split_parts).
inline __m512 bf16_residual(__m512 x, int part) {
  for (int i = 0; i < part; ++i)
    x = _mm512_sub_ps(x, _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(x), 16)));
  return x;
}

/// Q^T as pairs: dst[k * ld + r] = (bf16(scale x_r[2k]), bf16(scale x_r[2k + 1])) for the rows
/// x_r = rows[r], r < n <= 16 (rows n .. width - 1 written as 0), k < pairs; `width` <= 16 words
/// stored per k; of bf16_residual's `part` of scale x_r where part > 0. Each 16-row block is
/// converted row by row and transposed in registers.
inline void pack_query_pairs(const float* const* rows, std::int64_t n, std::int64_t pairs,
                             float scale, std::int64_t width, std::uint32_t* dst, std::int64_t ld,
                             int part = 0) {
  const __m512 vs = _mm512_set1_ps(scale);
  const __mmask16 store = V::first(width);
  for (std::int64_t k0 = 0; k0 < pairs; k0 += 16) {
    const std::int64_t cols = 2 * std::min<std::int64_t>(16, pairs - k0);
    __m512i w[16];  // w[r]: the pairs k0 .. k0 + 15 of row r
    for (std::int64_t r = 0; r < 16; ++r) {
      if (r >= n) {
        w[r] = _mm512_setzero_si512();
        continue;
      }
      const float* x = rows[r] + 2 * k0;
      const __m512 lo =
          bf16_residual(_mm512_mul_ps(vs, _mm512_maskz_loadu_ps(V::first(cols), x)), part);
      const __m512 hi = bf16_residual(
          _mm512_mul_ps(vs, _mm512_maskz_loadu_ps(V::first(cols - 16), x + 16)), part);
      w[r] = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
    }
    V::transpose_words(w);
    for (std::int64_t i = 0; i < cols / 2; ++i)
      _mm512_mask_storeu_epi32(dst + (k0 + i) * ld, store, w[i]);
  }
}

/// dst[k][i] = (x[2k][i], x[2k + 1][i]) as bf16 pairs for rows x[t] = src + t * src_stride,
/// t < rows, i < cols (float rows rounded to bf16, bf16 rows as they are); an odd last row pairs
/// with 0. dst: [ceil(rows / 2)][dst_stride] words.
template <class T>
inline void pack_row_pairs(const T* const* src_rows, std::int64_t rows, std::int64_t cols,
                           std::uint32_t* dst, std::int64_t dst_stride) {
  for (std::int64_t t = 0; t < rows; t += 2) {
    const T* lo = src_rows[t];
    const T* hi = t + 1 < rows ? src_rows[t + 1] : nullptr;
    std::uint32_t* d = dst + (t / 2) * dst_stride;
    for (std::int64_t i = 0; i < cols; i += 16) {
      const __mmask16 m = V::first(cols - i);
      __m512i w = bf16_bits(lo + i, m);
      if (hi) w = _mm512_or_si512(w, _mm512_slli_epi32(bf16_bits(hi + i, m), 16));
      _mm512_mask_storeu_epi32(d + i, m, w);
    }
  }
}

/// How a micro-tile reaches its MR rows of A: `unit` (a_rs == 2: the rows' words adjacent),
/// `strided` (a whole tile at any row stride: MR / 4 base pointers, each reaching its four rows
/// through the addressing modes base + {0, 1, 2, 3} x stride, where a pointer per row would
/// spill), `clamped` (the last, partial tile: a pointer per row, rows past the end repeating
/// the last one).
enum class a_rows { unit, strided, clamped };

/// One MR x 16 NV micro-tile of C (+)= A B over `pairs` depth pairs: A's pair (i, k) is the word
/// at a + i * a_rs + k * a_cs (bf16 elements), B's pair (k, j) is b[k * b_rs + j]. Rows past
/// `rows` (a_rows::clamped) repeat the last one (computed, not stored), columns past `cols` are
/// masked.
template <bool Accumulate, int MR, int NV, a_rows Rows>
inline void dot_tile(std::int64_t i0, std::int64_t j0, std::int64_t rows, std::int64_t cols,
                     std::int64_t pairs, const bf16* a, std::int64_t a_rs, std::int64_t a_cs,
                     const std::uint32_t* b, std::int64_t b_rs, float* c, std::int64_t ldc) {
  static_assert(Rows != a_rows::strided || MR % 4 == 0);
  __mmask16 mk[NV];
  ATTNKIT_UNROLL
  for (int v = 0; v < NV; ++v) mk[v] = V::first(cols - j0 - 16 * v);
  // unit: ar[0], row i0's; strided: ar[q], row i0 + 4 q's, stepped by a_cs; clamped: ar[r].
  constexpr int pointers = Rows == a_rows::unit ? 1 : Rows == a_rows::strided ? MR / 4 : MR;
  const bf16* ar[pointers];
  ATTNKIT_UNROLL
  for (int q = 0; q < pointers; ++q)
    ar[q] = a + (Rows == a_rows::unit      ? 2 * i0
                 : Rows == a_rows::strided ? (i0 + 4 * q) * a_rs
                                           : std::min<std::int64_t>(i0 + q, rows - 1) * a_rs);
  const std::int64_t rs = a_rs, rs3 = 3 * a_rs;
  __m512 acc[MR][NV];
  ATTNKIT_UNROLL
  for (int r = 0; r < MR; ++r) {
    const float* cr = c + std::min<std::int64_t>(i0 + r, rows - 1) * ldc + j0;
    ATTNKIT_UNROLL
    for (int v = 0; v < NV; ++v)
      acc[r][v] = Accumulate ? _mm512_maskz_loadu_ps(mk[v], cr + 16 * v) : _mm512_setzero_ps();
  }
  const std::uint32_t* bk = b + j0;
  for (std::int64_t k = 0; k < pairs; ++k, bk += b_rs) {
    __m512i bv[NV];
    ATTNKIT_UNROLL
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_maskz_loadu_epi32(mk[v], bk + 16 * v);
    ATTNKIT_UNROLL
    for (int r = 0; r < MR; ++r) {
      const bf16* p = Rows == a_rows::unit      ? ar[0] + 2 * r + k * a_cs
                      : Rows == a_rows::clamped ? ar[r % pointers] + k * a_cs
                      : r % 4 == 3              ? ar[r / 4 % pointers] + rs3
                                                : ar[r / 4 % pointers] + (r % 4) * rs;
      // The pair broadcast by the product's memory operand ({1to16}): written with the
      // intrinsics, GCC issues a separate vpbroadcastd per pair, an instruction as costly as the
      // product on Zen 4, where the one-vector-wide tiles take one pair per product.
      // The asm's operand is a local copy: an array element as an asm output makes the whole
      // array addressable, and GCC then keeps every accumulator on the stack.
      ATTNKIT_UNROLL
      for (int v = 0; v < NV; ++v) {
        __m512 x = acc[r][v];
        asm("vdpbf16ps %[a]%{1to16%}, %[b], %[acc]"
            : [acc] "+v"(x)
            : [b] "v"(bv[v]), [a] "m"(*reinterpret_cast<const char(*)[4]>(p)));
        acc[r][v] = x;
      }
    }
    if constexpr (Rows == a_rows::strided) {
      ATTNKIT_UNROLL
      for (int q = 0; q < pointers; ++q) ar[q] += a_cs;
    }
  }
  ATTNKIT_UNROLL
  for (int r = 0; r < MR; ++r) {
    if (i0 + r >= rows) break;
    ATTNKIT_UNROLL
    for (int v = 0; v < NV; ++v)
      _mm512_mask_storeu_ps(c + (i0 + r) * ldc + j0 + 16 * v, mk[v], acc[r][v]);
  }
}

template <bool Accumulate, int MR, int NV>
inline void dot_tiles(std::int64_t rows, std::int64_t cols, std::int64_t pairs, const bf16* a,
                      std::int64_t a_rs, std::int64_t a_cs, const std::uint32_t* b,
                      std::int64_t b_rs, float* c, std::int64_t ldc) {
  for (std::int64_t j0 = 0; j0 < cols; j0 += 16 * NV) {
    std::int64_t i0 = 0;
    if (a_rs == 2) {
      for (; i0 + MR <= rows; i0 += MR)
        dot_tile<Accumulate, MR, NV, a_rows::unit>(i0, j0, rows, cols, pairs, a, 2, a_cs, b, b_rs,
                                                   c, ldc);
    } else {
      for (; i0 + MR <= rows; i0 += MR)
        dot_tile<Accumulate, MR, NV, a_rows::strided>(i0, j0, rows, cols, pairs, a, a_rs, a_cs, b,
                                                      b_rs, c, ldc);
    }
    for (; i0 < rows; i0 += MR)
      dot_tile<Accumulate, MR, NV, a_rows::clamped>(i0, j0, rows, cols, pairs, a, a_rs, a_cs, b,
                                                    b_rs, c, ldc);
  }
}

/// C[rows][cols] (+)= A B over `pairs` depth pairs (see dot_tile; detail::gemm_pairs in
/// simd/targets.hpp). A one vector wide C takes taller tiles, as gemm_bcast does.
template <bool Accumulate>
inline void gemm_pairs(std::int64_t rows, std::int64_t cols, std::int64_t pairs, const bf16* a,
                       std::int64_t a_rs, std::int64_t a_cs, const std::uint32_t* b,
                       std::int64_t b_rs, float* c, std::int64_t ldc) {
  if (cols <= 16)
    dot_tiles<Accumulate, 16, 1>(rows, cols, pairs, a, a_rs, a_cs, b, b_rs, c, ldc);
  else
    dot_tiles<Accumulate, 8, 2>(rows, cols, pairs, a, a_rs, a_cs, b, b_rs, c, ldc);
}

/// The streaming score block on pairs (a decode step's few query rows, product_math::bf16):
/// S[r][t] = sum_c Q[r][c] K[t][c] for rows r < rows of query pairs q (pair k of row r at
/// q[r * q_stride + k]: natural column order) and K rows k (strided_rows / listed_rows of bf16)
/// read in place, d a multiple of 32. Blocks of 4 rows x 4 keys: each vdpbf16ps takes 32 columns
/// of a key, so no key is widened, and the 16 sums are reduced together by V::sums. Rows and
/// keys past the ends are clamped (computed, not stored); each key line ahead is prefetched as
/// its columns are read, as the f32 score block does.
template <class Rows>
inline void stream_pair_scores(const std::uint32_t* q, std::int64_t q_stride, std::int64_t rows,
                               const Rows& k, std::int64_t keys, std::int64_t d, float* s,
                               std::int64_t s_stride) {
  constexpr int RB = 4, KB = 4;
  for (std::int64_t r0 = 0; r0 < rows; r0 += RB) {
    const std::uint32_t* qr[RB];
    ATTNKIT_UNROLL
    for (int r = 0; r < RB; ++r) qr[r] = q + std::min<std::int64_t>(r0 + r, rows - 1) * q_stride;
    const bool k_pf = r0 == 0 && k.prefetches();  // the later row blocks read the same K rows
    for (std::int64_t t0 = 0; t0 < keys; t0 += KB) {
      const bf16* kr[KB];
      const bf16* ka[KB];
      ATTNKIT_UNROLL
      for (int u = 0; u < KB; ++u) {
        const std::int64_t t = std::min<std::int64_t>(t0 + u, keys - 1);
        kr[u] = k.row(t), ka[u] = k_pf ? k.ahead_row(t) : nullptr;
      }
      __m512 acc[KB][RB];
      ATTNKIT_UNROLL
      for (int u = 0; u < KB; ++u) {
        ATTNKIT_UNROLL
        for (int r = 0; r < RB; ++r) acc[u][r] = _mm512_setzero_ps();
      }
      for (std::int64_t c = 0; c < d; c += 32) {
        __m512i kv[KB];
        ATTNKIT_UNROLL
        for (int u = 0; u < KB; ++u) {
          if (k_pf) prefetch_line(ka[u] + c);
          kv[u] = _mm512_loadu_si512(kr[u] + c);
        }
        ATTNKIT_UNROLL
        for (int r = 0; r < RB; ++r) {
          const __m512bh qv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(qr[r] + c / 2));
          ATTNKIT_UNROLL
          for (int u = 0; u < KB; ++u)
            acc[u][r] = _mm512_dpbf16_ps(acc[u][r], qv, reinterpret_cast<__m512bh>(kv[u]));
        }
      }
      __m512 flat[KB * RB];  // key u's RB sums adjacent
      ATTNKIT_UNROLL
      for (int u = 0; u < KB; ++u) {
        ATTNKIT_UNROLL
        for (int r = 0; r < RB; ++r) flat[u * RB + r] = acc[u][r];
      }
      alignas(64) float sum[KB * RB];
      _mm512_store_ps(sum, V::sums(flat));
      // Constant trip counts with guards: a runtime bound in the loop condition makes GCC keep
      // the sums in memory through the hot loop (as in kernels.inl's score block).
      const bool whole = r0 + RB <= rows && t0 + KB <= keys;
      ATTNKIT_UNROLL
      for (int r = 0; r < RB; ++r) {
        ATTNKIT_UNROLL
        for (int u = 0; u < KB; ++u)
          if (whole || (r0 + r < rows && t0 + u < keys))
            s[(r0 + r) * s_stride + t0 + u] = sum[u * RB + r];
      }
    }
  }
}

/// Two keys' rows ra, rb (rb null: a zero row) of NG groups of 32 value columns as pairs, each
/// group's 16 even and 16 odd columns (a shift and a word blend each), added to RB rows'
/// accumulators with the rows' probability pairs pp[r * 32 + k].
template <int RB, int NG>
ATTNKIT_INLINE void pair_pv_step(const bf16* ra, const bf16* rb, const std::uint32_t* pp,
                                 std::int64_t k, __m512 (&acc)[RB][2 * NG]) {
  constexpr __mmask32 high_words = 0xAAAAAAAAu;
  __m512i pair[2 * NG];
  ATTNKIT_UNROLL
  for (int g = 0; g < NG; ++g) {
    const __m512i a = _mm512_loadu_si512(ra + 32 * g);
    const __m512i b = rb ? _mm512_loadu_si512(rb + 32 * g) : _mm512_setzero_si512();
    pair[2 * g] = _mm512_mask_blend_epi16(high_words, a, _mm512_slli_epi32(b, 16));
    pair[2 * g + 1] = _mm512_mask_blend_epi16(high_words, _mm512_srli_epi32(a, 16), b);
  }
  ATTNKIT_UNROLL
  for (int r = 0; r < RB; ++r) {
    const __m512bh pw =
        reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pp[r * 32 + k])));
    ATTNKIT_UNROLL
    for (int i = 0; i < 2 * NG; ++i)
      acc[r][i] = _mm512_dpbf16_ps(acc[r][i], reinterpret_cast<__m512bh>(pair[i]), pw);
  }
}

/// One chunk of NG groups of 32 value columns [c0, c0 + 32 NG) of the streaming P V on pairs
/// (stream_pair_pv) for a block of RB rows and keys [t0, t0 + keys), keys <= 64: pp holds each
/// row's probability pairs ([RB][32] words, zero past the last key). Two keys' value rows make, per
/// group, the pairs of its 16 even and its 16 odd columns (a shift and a word blend each), so
/// one vdpbf16ps adds both keys' products to 16 accumulators in the paired order of the f32
/// kernels (load_bf16_pairs). An odd last key pairs with a zero row.
template <int RB, int NG, class Rows>
inline void pair_pv_chunk(const std::uint32_t* pp, std::int64_t rows, const Rows& v,
                          std::int64_t t0, std::int64_t keys, std::int64_t c0, float* o,
                          std::int64_t o_stride) {
  float* orow[RB];
  __m512 acc[RB][2 * NG];
  ATTNKIT_UNROLL
  for (int r = 0; r < RB; ++r) {
    orow[r] = o + std::min<std::int64_t>(r, rows - 1) * o_stride + c0;
    ATTNKIT_UNROLL
    for (int i = 0; i < 2 * NG; ++i) acc[r][i] = _mm512_loadu_ps(orow[r] + 16 * i);
  }
  const bool pf = v.prefetches();
  std::int64_t t = t0;
  for (; t + 1 < t0 + keys; t += 2) {
    if (pf)
      for (int u = 0; u < 2; ++u)
        for (int g = 0; g < NG; ++g) prefetch_line(v.ahead_row(t + u) + c0 + 32 * g);
    pair_pv_step<RB, NG>(v.row(t) + c0, v.row(t + 1) + c0, pp, (t - t0) / 2, acc);
  }
  if (t < t0 + keys) {
    if (pf)
      for (int g = 0; g < NG; ++g) prefetch_line(v.ahead_row(t) + c0 + 32 * g);
    pair_pv_step<RB, NG>(v.row(t) + c0, nullptr, pp, (t - t0) / 2, acc);
  }
  ATTNKIT_UNROLL
  for (int r = 0; r < RB; ++r) {  // constant trip count: see stream_pair_scores
    ATTNKIT_UNROLL
    for (int i = 0; i < 2 * NG; ++i)
      if (r < rows) _mm512_storeu_ps(orow[r] + 16 * i, acc[r][i]);
  }
}

/// rows <= RB rows of the streaming P V on pairs over keys [0, keys), in key blocks of 64.
template <int RB, class Rows>
inline void pair_pv_rows(const float* p, std::int64_t p_stride, std::int64_t rows, const Rows& v,
                         std::int64_t keys, std::int64_t dv, float* o, std::int64_t o_stride) {
  alignas(64) std::uint32_t pp[RB * 32];  // [RB][32]: a block's probability pairs
  for (std::int64_t t0 = 0; t0 < keys; t0 += 64) {
    const std::int64_t kn = std::min<std::int64_t>(64, keys - t0);
    ATTNKIT_UNROLL
    for (int r = 0; r < RB; ++r) {
      const float* pr = p + std::min<std::int64_t>(r, rows - 1) * p_stride + t0;
      for (std::int64_t k = 0; k < 64; k += 32) {
        const __m512 lo = _mm512_maskz_loadu_ps(V::first(kn - k), pr + k);
        const __m512 hi = _mm512_maskz_loadu_ps(V::first(kn - k - 16), pr + k + 16);
        _mm512_store_si512(pp + r * 32 + k / 2,
                           reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
      }
    }
    std::int64_t c = 0;
    for (; c + 64 <= dv; c += 64) pair_pv_chunk<RB, 2>(pp, rows, v, t0, kn, c, o, o_stride);
    if (c < dv) pair_pv_chunk<RB, 1>(pp, rows, v, t0, kn, c, o, o_stride);
  }
}

/// The streaming P V with bf16 products (product_math::bf16 with stream_pair_scores):
/// O[r][c] += sum_t P[r][t] V[t][c] for rows r < rows, the probabilities rounded to bf16 and
/// each vdpbf16ps taking two keys' values as they are stored (no widening); O in the f32
/// kernels' paired order, d_v a multiple of 32. Rows in blocks of 4 (1 or 2 alone); the later
/// blocks read the value rows the first prefetched.
template <class Rows>
inline void stream_pair_pv(const float* p, std::int64_t p_stride, std::int64_t rows, const Rows& v,
                           std::int64_t keys, std::int64_t dv, float* o, std::int64_t o_stride) {
  if (rows == 1) return pair_pv_rows<1>(p, p_stride, 1, v, keys, dv, o, o_stride);
  if (rows == 2) return pair_pv_rows<2>(p, p_stride, 2, v, keys, dv, o, o_stride);
  const Rows v_again = v.without_prefetch();
  for (std::int64_t r = 0; r < rows; r += 4)
    pair_pv_rows<4>(p + r * p_stride, p_stride, std::min<std::int64_t>(4, rows - r),
                    r == 0 ? v : v_again, keys, dv, o + r * o_stride, o_stride);
}
