// The float vector of the AVX2 target (AVX2 + FMA + F16C): 8 lanes; a mask is a lane count,
// turned into a vmaskmov mask where a load or store needs one (16 ymm registers: smaller register
// blocks than AVX-512). Included by simd/targets.hpp inside namespace
// attnkit::detail::simd_avx2 under the target's attributes.

struct V {
  static constexpr int lanes = 8;
  static constexpr bool mask_registers = false;  // masked loads/stores as cheap as plain ones
  static constexpr bool pairs = true;
  static constexpr int score_keys = 2;  // 8 sums + 2 keys' and 1 row's vectors (a pair's half)
  static constexpr int pv_vectors = 2;
  static constexpr bool value_block_l1 = true;  // see l1_range_prefetch (simd/targets.hpp)
  static constexpr int gemm_mr = 6, gemm_nv = 2, narrow_mr = 8;
  using vec = __m256;
  using mask = int;  // lanes [0, mask) are on

  static mask first(std::int64_t n) {
    return n >= 8 ? 8 : n <= 0 ? 0 : static_cast<int>(n);
  }
  static __m256i bits(mask m) {
    static constexpr std::int32_t table[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + 8 - m));
  }
  static vec zero() { return _mm256_setzero_ps(); }
  static vec set1(float x) { return _mm256_set1_ps(x); }
  /// Keeps x in a register: without it the compiler folds a loaded operand into every FMA
  /// that uses it, re-reading memory once per use (a score block's query vectors meet 4 keys).
  static void hold(vec& x) { __asm__("" : "+v"(x)); }
  static vec load(const float* p) { return _mm256_loadu_ps(p); }
  // A whole vector takes the plain instruction: vmaskmovps is microcoded on AMD cores, its store
  // many times a plain store's cost, and most masked calls are whole vectors of a row's body.
  static vec load(mask m, const float* p) {
    return m == lanes ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, bits(m));
  }
  static vec load_or(mask m, const float* p, float fill) {
    if (m == lanes) return _mm256_loadu_ps(p);
    const __m256i b = bits(m);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, b), _mm256_castsi256_ps(b));
  }
  static void store(float* p, vec x) { _mm256_storeu_ps(p, x); }
  /// Lanes [first, first + n) of x to p (n 2, 4 or 8, first a multiple of n) from the register:
  /// a score block's sums, stored whole and copied out in pieces, made each piece's reload wait
  /// on store forwarding.
  static void store_lanes(float* p, vec x, int first, int n) {
    if (n == 8) return _mm256_storeu_ps(p, x);
    const __m128 h = first < 4 ? _mm256_castps256_ps128(x) : _mm256_extractf128_ps(x, 1);
    if (n == 4) return _mm_storeu_ps(p, h);
    if (first % 4 == 0)
      _mm_storel_pi(reinterpret_cast<__m64*>(p), h);
    else
      _mm_storeh_pi(reinterpret_cast<__m64*>(p), h);
  }
  static void store(mask m, float* p, vec x) {
    if (m == lanes)
      _mm256_storeu_ps(p, x);
    else
      _mm256_maskstore_ps(p, bits(m), x);
  }

  template <storage_type S>
  static vec load_as_float(const S* p) {
    if constexpr (std::same_as<S, float>) {
      return _mm256_loadu_ps(p);
    } else if constexpr (std::same_as<S, bf16>) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    } else {
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
  }
  template <storage_type S>
  static vec load_as_float(mask m, const S* p) {
    if constexpr (std::same_as<S, float>) {
      return load(m, p);
    } else {  // no 16-bit masked load: the lanes that exist, through a zeroed copy
      S tmp[8] = {};
      for (int i = 0; i < m; ++i) tmp[i] = p[i];
      return load_as_float(tmp);
    }
  }
  /// x rounded to bf16 into p's first m lanes: see vec_avx512.inl.
  static void store_bf16(mask m, bf16* p, vec x) {
    const __m256i b = _mm256_castps_si256(x), high = _mm256_srli_epi32(b, 16);
    const __m256i bias =
        _mm256_add_epi32(_mm256_and_si256(high, _mm256_set1_epi32(1)), _mm256_set1_epi32(0x7FFF));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, bias), 16);
    r = _mm256_blendv_epi8(r, _mm256_or_si256(high, _mm256_set1_epi32(0x40)),
                           _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    if (m == lanes) return _mm_storeu_si128(reinterpret_cast<__m128i*>(p), w);
    alignas(16) std::uint16_t t[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(t), w);
    std::memcpy(p, t, static_cast<std::size_t>(m) * sizeof(bf16));
  }
  /// 16 bf16 as (even, odd) columns: see vec_avx512.inl.
  static void load_bf16_pairs(const bf16* p, vec& even, vec& odd) {
    __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    __asm__("" : "+v"(raw));  // one load, not one per use: see vec_avx512.inl
    even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    odd = _mm256_castsi256_ps(
        _mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }

  /// 16 floats as their even and odd columns (the order of load_bf16_pairs), and back.
  static void split_pairs(const float* p, vec& even, vec& odd) {
    const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
    // Per 128-bit lane (a0 a2 b0 b2 | a4 a6 b4 b6); then the 64-bit pairs in order 0 2 1 3.
    even = _mm256_castpd_ps(
        _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))),
                              _MM_SHUFFLE(3, 1, 2, 0)));
    odd = _mm256_castpd_ps(
        _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))),
                              _MM_SHUFFLE(3, 1, 2, 0)));
  }
  static void join_pairs(float* p, vec even, vec odd) {
    const __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);
    _mm256_storeu_ps(p, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(p + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }

  static vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  static vec sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  static vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static vec fnmadd(vec a, vec b, vec c) { return _mm256_fnmadd_ps(a, b, c); }
  static vec max(vec a, vec b) { return _mm256_max_ps(a, b); }
  static vec max_nan(vec a, vec b) {
    return _mm256_blendv_ps(_mm256_max_ps(a, b), a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  }
  static vec replace_neg_inf(vec x, vec y) {
    return _mm256_blendv_ps(
        x, y, _mm256_cmp_ps(x, _mm256_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ));
  }
  static vec add_masked(mask m, vec a, vec b) {
    return _mm256_add_ps(a, _mm256_and_ps(b, _mm256_castsi256_ps(bits(m))));
  }
  /// x[0, 8) transposed in place (lane i of x[k] <-> lane k of x[i]). Within each 128-bit half,
  /// u[4 b + k] gathers column k of rows 4b..4b+3; the halves are then paired. Inlined and
  /// unrolled: out of line, x and the temporaries went through the stack.
  ATTNKIT_INLINE static void transpose(vec* x) {
    vec t[8], u[8];
    ATTNKIT_UNROLL
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(x[2 * i], x[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(x[2 * i], x[2 * i + 1]);
    }
    ATTNKIT_UNROLL
    for (int b = 0; b < 2; ++b) {
      ATTNKIT_UNROLL
      for (int k = 0; k < 4; ++k) {
        const __m256d lo = _mm256_castps_pd(t[4 * b + k / 2]),
                      hi = _mm256_castps_pd(t[4 * b + 2 + k / 2]);
        u[4 * b + k] =
            _mm256_castpd_ps(k % 2 ? _mm256_unpackhi_pd(lo, hi) : _mm256_unpacklo_pd(lo, hi));
      }
    }
    ATTNKIT_UNROLL
    for (int k = 0; k < 4; ++k) {
      x[k] = _mm256_permute2f128_ps(u[k], u[4 + k], 0x20);
      x[4 + k] = _mm256_permute2f128_ps(u[k], u[4 + k], 0x31);
    }
  }
  static float hsum(vec x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float hmax_nan(vec x) {
    x = max_nan(x, _mm256_permute2f128_ps(x, x, 1));
    x = max_nan(x, _mm256_permute_ps(x, _MM_SHUFFLE(1, 0, 3, 2)));
    x = max_nan(x, _mm256_permute_ps(x, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm256_cvtss_f32(x);
  }
  /// Lane i = the sum of x[i]'s lanes, for x[0, 8): lane-halving on pairs, lanes out in the
  /// order idx (an involution: see vec_avx512.inl). The first two halvings add a blend of the
  /// pair to one shuffle of it, not two shuffles: the shuffle pipes are FMA ones on Zen cores,
  /// and a score block reduces 8 sums per 2 keys.
  ATTNKIT_INLINE static vec sums(const vec* x) {
    constexpr int idx[8] = {0, 2, 1, 3, 4, 6, 5, 7};
    vec a[4], b[2];
    // Unrolled, x[idx[i]] names registers; as a loop GCC read x through idx from memory.
    ATTNKIT_UNROLL
    for (int i = 0; i < 4; ++i)  // (x lo | y hi) + (x hi | y lo)
      a[i] = _mm256_add_ps(_mm256_blend_ps(x[idx[i]], x[idx[i + 4]], 0xF0),
                           _mm256_permute2f128_ps(x[idx[i]], x[idx[i + 4]], 0x21));
    ATTNKIT_UNROLL
    for (int i = 0; i < 2; ++i)  // per 128 bits (a0 a1 c2 c3) + (a2 a3 c0 c1)
      b[i] = _mm256_add_ps(_mm256_blend_ps(a[i], a[i + 2], 0xCC),
                           _mm256_shuffle_ps(a[i], a[i + 2], 0x4E));
    return _mm256_add_ps(_mm256_shuffle_ps(b[0], b[1], 0x88), _mm256_shuffle_ps(b[0], b[1], 0xDD));
  }
  // exp (kernels.inl): 2^n is built in the exponent field, so n stays in [-126, 127]: the argument
  // is clamped to [ln 2^-126, 88.3] (vmaxps / vminps return the second operand, x, when it is NaN)
  // and the lanes below it (exp under the smallest normal float; -inf among them) are set to 0 afterwards.
  static vec exp_clamp(vec x) {
    return _mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(_mm256_set1_ps(-87.33654f), x));
  }
  static vec exp_scale(vec p, vec n, vec x) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const vec r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ), r);
  }
};
