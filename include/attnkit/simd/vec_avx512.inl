// The float vector of the AVX-512 target: 16 lanes, masks in k registers. Included by
// simd/targets.hpp inside namespace attnkit::detail::simd_avx512 under the target's attributes.

struct V {
  static constexpr int lanes = 16;
  static constexpr bool mask_registers = true;  // masked loads/stores as cheap as plain ones
  static constexpr bool pairs = true;     // bf16 rows widened as (even, odd) columns
  static constexpr int score_keys = 4;    // keys x 4 query rows of the score block
  static constexpr int pv_vectors = 4;    // value columns per pv chunk, in vectors
  static constexpr bool value_block_l1 = false;
  static constexpr int gemm_mr = 8, gemm_nv = 2, narrow_mr = 16;  // GEMM micro-tile
  using vec = __m512;
  using mask = __mmask16;

  /// The first n lanes (n may be <= 0 or >= lanes).
  static mask first(std::int64_t n) {
    return n >= 16 ? static_cast<__mmask16>(0xFFFF)
                   : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1u);
  }
  static vec zero() { return _mm512_setzero_ps(); }
  static vec set1(float x) { return _mm512_set1_ps(x); }
  /// Keeps x in a register: without it the compiler folds a loaded operand into every FMA
  /// that uses it, re-reading memory once per use (a score block's query vectors meet 4 keys).
  static void hold(vec& x) { __asm__("" : "+v"(x)); }
  static vec load(const float* p) { return _mm512_loadu_ps(p); }
  static vec load(mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  /// Masked-off lanes are `fill`.
  static vec load_or(mask m, const float* p, float fill) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), m, p);
  }
  static void store(float* p, vec x) { _mm512_storeu_ps(p, x); }
  static void store(mask m, float* p, vec x) { _mm512_mask_storeu_ps(p, m, x); }

  /// 16 elements of storage type S widened to float (masked lanes read nothing and are 0).
  template <storage_type S>
  static vec load_as_float(const S* p) {
    if constexpr (std::same_as<S, float>) {
      return _mm512_loadu_ps(p);
    } else if constexpr (std::same_as<S, bf16>) {  // bf16 -> f32 is a 16-bit left shift
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    } else {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
  }
  template <storage_type S>
  static vec load_as_float(mask m, const S* p) {
    if constexpr (std::same_as<S, float>) {
      return _mm512_maskz_loadu_ps(m, p);
    } else if constexpr (std::same_as<S, bf16>) {
      const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    } else {
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
    }
  }
  /// x rounded to bf16 (to nearest even, a NaN kept quiet with its sign) into p's first lanes
  /// (m): the bit arithmetic of the scalar conversion, so every target writes the same bits.
  static void store_bf16(mask m, bf16* p, vec x) {
    const __m512i b = _mm512_castps_si512(x), high = _mm512_srli_epi32(b, 16);
    const __m512i bias =
        _mm512_add_epi32(_mm512_and_si512(high, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7FFF));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, bias), 16);
    r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), high,
                             _mm512_set1_epi32(0x40));
    _mm512_mask_cvtepi32_storeu_epi16(p, m, r);
  }
  /// 32 bf16 as two vectors without a cross-lane shuffle: each dword holds an (even, odd) pair;
  /// << 16 gives the even columns, masking the low half the odd ones.
  static void load_bf16_pairs(const bf16* p, vec& even, vec& odd) {
    __m512i raw = _mm512_loadu_si512(p);
    // Kept in a register: else GCC folds the load into both the shift and the and, and the
    // score and P V loops (short of load slots beside their FMAs) read every line twice.
    __asm__("" : "+v"(raw));
    even = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
    odd = _mm512_castsi512_ps(
        _mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }

  /// 32 floats as their even and odd columns (the order of load_bf16_pairs), and back.
  static void split_pairs(const float* p, vec& even, vec& odd) {
    const __m512 a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
    const __m512i i = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    even = _mm512_permutex2var_ps(a, i, b);
    odd = _mm512_permutex2var_ps(a, _mm512_add_epi32(i, _mm512_set1_epi32(1)), b);
  }
  static void join_pairs(float* p, vec even, vec odd) {
    const __m512i i = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    _mm512_storeu_ps(p, _mm512_permutex2var_ps(even, i, odd));
    _mm512_storeu_ps(p + 16,
                     _mm512_permutex2var_ps(even, _mm512_add_epi32(i, _mm512_set1_epi32(8)), odd));
  }

  static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static vec sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  /// vmaxps: b where either lane is NaN (the hot loops' plain max; see max_nan).
  static vec max(vec a, vec b) { return _mm512_maskz_max_ps(0xFFFF, a, b); }
  /// max(a, b), NaN if either lane is NaN.
  static vec max_nan(vec a, vec b) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), max(a, b), a);
  }
  /// x, with y where x == -inf.
  static vec replace_neg_inf(vec x, vec y) {
    return _mm512_mask_blend_ps(
        _mm512_cmp_ps_mask(x, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ),
        x, y);
  }
  /// a + b on the lanes of m, a elsewhere.
  static vec add_masked(mask m, vec a, vec b) { return _mm512_mask_add_ps(a, m, a, b); }

  // GCC 12's _mm512_reduce_*_ps and unmasked shuffles pass _mm512_undefined_ps() through, which
  // trips -Wuninitialized in every includer built with -Wall (GCC bug 105593); the zero-masked
  // ("maskz", all lanes on) forms do not.
  /// x[i] <- column i of the 16 x 16 matrix of 32-bit words whose row r is x[r].
  static void transpose_words(__m512i* x) {
    __m512i a[16], b[16];
    ATTNKIT_UNROLL
    for (int k = 0; k < 8; ++k) {  // per 128-bit lane: (r0 c0, r1 c0, r0 c1, r1 c1) ...
      a[2 * k] = _mm512_maskz_unpacklo_epi32(0xFFFF, x[2 * k], x[2 * k + 1]);
      a[2 * k + 1] = _mm512_maskz_unpackhi_epi32(0xFFFF, x[2 * k], x[2 * k + 1]);
    }
    ATTNKIT_UNROLL
    for (int k = 0; k < 4; ++k) {  // b[4k + j], lane L: column 4L + j of rows 4k .. 4k + 3
      b[4 * k] = _mm512_maskz_unpacklo_epi64(0xFF, a[4 * k], a[4 * k + 2]);
      b[4 * k + 1] = _mm512_maskz_unpackhi_epi64(0xFF, a[4 * k], a[4 * k + 2]);
      b[4 * k + 2] = _mm512_maskz_unpacklo_epi64(0xFF, a[4 * k + 1], a[4 * k + 3]);
      b[4 * k + 3] = _mm512_maskz_unpackhi_epi64(0xFF, a[4 * k + 1], a[4 * k + 3]);
    }
    ATTNKIT_UNROLL
    for (int j = 0; j < 4; ++j) {  // column 4L + j: lane L of b[j], b[4 + j], b[8 + j], b[12 + j]
      const __m512i u01 = _mm512_maskz_shuffle_i32x4(0xFFFF, b[j], b[4 + j], 0x44),
                    v01 = _mm512_maskz_shuffle_i32x4(0xFFFF, b[8 + j], b[12 + j], 0x44),
                    u23 = _mm512_maskz_shuffle_i32x4(0xFFFF, b[j], b[4 + j], 0xEE),
                    v23 = _mm512_maskz_shuffle_i32x4(0xFFFF, b[8 + j], b[12 + j], 0xEE);
      x[j] = _mm512_maskz_shuffle_i32x4(0xFFFF, u01, v01, 0x88);
      x[4 + j] = _mm512_maskz_shuffle_i32x4(0xFFFF, u01, v01, 0xDD);
      x[8 + j] = _mm512_maskz_shuffle_i32x4(0xFFFF, u23, v23, 0x88);
      x[12 + j] = _mm512_maskz_shuffle_i32x4(0xFFFF, u23, v23, 0xDD);
    }
  }
  /// x[0, 16) transposed in place (lane i of x[k] <-> lane k of x[i]).
  static void transpose(vec* x) {
    __m512i w[16];
    ATTNKIT_UNROLL
    for (int i = 0; i < 16; ++i) w[i] = _mm512_castps_si512(x[i]);
    transpose_words(w);
    ATTNKIT_UNROLL
    for (int i = 0; i < 16; ++i) x[i] = _mm512_castsi512_ps(w[i]);
  }
  static float hsum(vec x) {
    x = _mm512_add_ps(x, _mm512_maskz_shuffle_f32x4(0xFFFF, x, x, _MM_SHUFFLE(1, 0, 3, 2)));
    x = _mm512_add_ps(x, _mm512_maskz_shuffle_f32x4(0xFFFF, x, x, _MM_SHUFFLE(2, 3, 0, 1)));
    x = _mm512_add_ps(x, _mm512_maskz_shuffle_ps(0xFFFF, x, x, _MM_SHUFFLE(1, 0, 3, 2)));
    x = _mm512_add_ps(x, _mm512_maskz_shuffle_ps(0xFFFF, x, x, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm512_cvtss_f32(x);
  }
  /// Horizontal max, NaN if any lane is NaN.
  static float hmax_nan(vec x) {
    x = max_nan(x, _mm512_maskz_shuffle_f32x4(0xFFFF, x, x, _MM_SHUFFLE(1, 0, 3, 2)));
    x = max_nan(x, _mm512_maskz_shuffle_f32x4(0xFFFF, x, x, _MM_SHUFFLE(2, 3, 0, 1)));
    x = max_nan(x, _mm512_maskz_shuffle_ps(0xFFFF, x, x, _MM_SHUFFLE(1, 0, 3, 2)));
    x = max_nan(x, _mm512_maskz_shuffle_ps(0xFFFF, x, x, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm512_cvtss_f32(x);
  }
  /// Lane i = the sum of x[i]'s lanes, for x[0, 16). A tree of lane-halving shuffles on pairs
  /// (45 operations for the 16 sums); its lanes come out in the order `idx`, an involution, so
  /// reading the inputs in that order puts sum i in lane i.
  ATTNKIT_INLINE static vec sums(const vec* x) {
    constexpr int idx[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
    vec a[8], b[4], c[2];
    // Unrolled, x[idx[i]] names registers; as loops GCC 12 stored x and read it back through idx.
    ATTNKIT_UNROLL
    for (int i = 0; i < 8; ++i)  // 256-bit halves: y_i in the low half, y_{i+8} in the high
      a[i] = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(0xFFFF, x[idx[i]], x[idx[i + 8]], 0x44),
                           _mm512_maskz_shuffle_f32x4(0xFFFF, x[idx[i]], x[idx[i + 8]], 0xEE));
    ATTNKIT_UNROLL
    for (int i = 0; i < 4; ++i)  // 128-bit chunks: y_i, y_{i+8}, y_{i+4}, y_{i+12}
      b[i] = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(0xFFFF, a[i], a[i + 4], 0x88),
                           _mm512_maskz_shuffle_f32x4(0xFFFF, a[i], a[i + 4], 0xDD));
    ATTNKIT_UNROLL
    for (int i = 0; i < 2; ++i)  // pairs of lanes
      c[i] = _mm512_add_ps(_mm512_maskz_shuffle_ps(0xFFFF, b[i], b[i + 2], 0x44),
                           _mm512_maskz_shuffle_ps(0xFFFF, b[i], b[i + 2], 0xEE));
    return _mm512_add_ps(_mm512_maskz_shuffle_ps(0xFFFF, c[0], c[1], 0x88),
                         _mm512_maskz_shuffle_ps(0xFFFF, c[0], c[1], 0xDD));
  }

  static vec fnmadd(vec a, vec b, vec c) { return _mm512_fnmadd_ps(a, b, c); }
  // exp (kernels.inl): no clamp: every argument the kernels exponentiate is at most 0 (a score
  // less its row's max, or an LSE) or NaN, and vscalefps takes any n, so only the lanes below
  // ln(FLT_MIN) (-inf among them, whose r is NaN) need a value, the 0 exp_scale gives them.
  static vec exp_clamp(vec x) { return x; }
  /// p 2^n, 0 where x < ln(FLT_MIN) (NaN kept): the masked lanes never form a subnormal.
  static vec exp_scale(vec p, vec n, vec x) {
    return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_NLT_UQ), p,
                                  n);
  }
};
