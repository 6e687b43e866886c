// The micro-kernels, written once against the target's float vector V (vec_*.inl) and compiled
// by simd/targets.hpp once per target, inside that target's namespace and attributes. Nothing
// here includes anything: every header is included before. No lambdas (clang applies a
// target attribute pushed with `#pragma clang attribute` to functions, not to lambdas).
//
//   scores         S[r][t] = sum_c Q[r][c] K[t][c]   streaming path: all query rows of a KV group
//   accumulate_pv  O[r][c] += sum_t P[r][t] V[t][c]  streaming path
//   gemm_bcast     C (+)= A B, register-blocked      GEMM tiles (prefill) and TPA's value product
//   softmax_rows, softmax_columns, exp_given_columns, exp_shift_sum: the softmax's vector loops
//   scale_row, scale_row_to, scale_add_row, fill_row, any_non_finite: the driver's row loops
//                  (rescale, output, split merge, masking, the repair check), vectorised
//                  whatever the includer's -O level
//   transpose_scaled  a query tile's rows into Q^T
//   tpa_score_rows TPA's per-key head combination
// K and V are read in their storage type and widened to float in registers, so bf16/f16 caches
// are never converted in memory. Register blocks: out-of-range rows and keys are clamped to the
// last valid one (computed, then discarded) so there is one code path. With V::pairs, bf16 rows
// are widened 2 * lanes columns at a time as (even, odd) vectors without a cross-lane shuffle;
// the float operands they meet (query tile, output accumulator) then hold every full group of
// 2 * lanes columns in that order (permute_pairs), except in pv_columns, whose tiles split and
// join their own output columns (V::split_pairs / V::join_pairs) so O stays in natural order.

using vec = V::vec;
using vmask = V::mask;
constexpr int L = V::lanes;
/// Columns per (even, odd) group of a paired bf16 row, 0 for natural order.
constexpr std::int64_t pair_group = V::pairs ? 2 * L : 0;

/// exp(x) per lane: std::exp on the scalar target; else x = n ln2 + r with |r| <= ln2/2
/// (Cody-Waite: ln2 split in a part exact in float and a small one, so r carries no error from
/// n ln2), e^r by its Taylor series of degree Degree, times 2^n. Degree 7 (vexp): truncation
/// < 6e-9 relative, within ~2 ulp. Degree 4 (vexp_coarse): truncation < 5.6e-5 relative (at r =
/// -ln2/2), for probabilities rounded to bf16 next (whose rounding, 2^-8, is 70 times larger):
/// three fewer FMAs per vector. exp(-inf) = 0, exp(NaN) = NaN, finite for x <= 88 (the kernels
/// take x <= 0: a score less its row's max, a max less a larger one, a score less its LSE). Results
/// below the smallest normal float (x < ln(FLT_MIN)) are 0 on every vector target: forming a
/// subnormal costs a microcode assist per instruction on Intel cores, and a masked tile's -inf
/// scores would all take one.
template <int Degree = 7, class W = V>
inline typename W::vec vexp(typename W::vec x) {
  if constexpr (W::lanes == 1) {
    return std::exp(x);
  } else {
    constexpr float inverse_factorial[8] = {1.f,        1.f,         0.5f,        1.f / 6.f,
                                            1.f / 24.f, 1.f / 120.f, 1.f / 720.f, 1.f / 5040.f};
    static_assert(Degree >= 1 && Degree <= 7);
    // n = x log2(e) rounded to an integer by the magic number 1.5 2^23 (the FMA's one
    // rounding puts n in the low mantissa bits; |x log2(e)| < 2^22 after the clamp, and the
    // lanes a target leaves unclamped are set to 0 by exp_scale).
    const vec xc = W::exp_clamp(x), magic = W::set1(0x1.8p23f);
    const vec n = W::sub(W::fmadd(xc, W::set1(1.44269504088896341f), magic), magic);
    const vec r = W::fnmadd(n, W::set1(1.42860682e-06f),
                            W::fnmadd(n, W::set1(0.693145751953125f), xc));
    vec p = W::set1(inverse_factorial[Degree]);
    ATTNKIT_UNROLL
    for (int k = Degree - 1; k >= 0; --k) p = W::fmadd(p, r, W::set1(inverse_factorial[k]));
    return W::exp_scale(p, n, x);
  }
}
template <class W = V>
inline typename W::vec vexp_coarse(typename W::vec x) {
  return vexp<4, W>(x);
}

/// Natural -> paired order in place over whole groups of 2 L columns (ToPaired), or back (see
/// detail::reorder_pairs in simd/targets.hpp).
template <bool ToPaired>
inline void reorder_pair_groups(float* x, std::int64_t n) {
  for (std::int64_t c = 0; c + 2 * L <= n; c += 2 * L) {
    vec even, odd;
    if constexpr (ToPaired) {
      V::split_pairs(x + c, even, odd);
      V::store(x + c, even);
      V::store(x + c + L, odd);
    } else {
      even = V::load(x + c);
      odd = V::load(x + c + L);
      V::join_pairs(x + c, even, odd);
    }
  }
}

/// n elements of storage type S to float.
template <storage_type S>
inline void to_float_row(const S* src, float* dst, std::int64_t n) {
  if constexpr (std::same_as<S, float>) {
    std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(float));
  } else {
    std::int64_t i = 0;
    for (; i + L <= n; i += L) V::store(dst + i, V::load_as_float(src + i));
    if (i < n) {
      const vmask m = V::first(n - i);
      V::store(m, dst + i, V::load_as_float(m, src + i));
    }
  }
}

/// s[i] = exp(s[i] - shift) in place; returns the sum. Out of line: inlined into softmax_rows,
/// the exponential's constants went to the stack and its loop read them from there.
ATTNKIT_NOINLINE float exp_shift_sum(float* s, std::int64_t n, float shift) {
  const vec vs = V::set1(shift);
  vec acc = V::zero();
  std::int64_t i = 0;
  for (; i + L <= n; i += L) {  // whole vectors: no mask to test or apply
    const vec e = vexp(V::sub(V::load(s + i), vs));
    V::store(s + i, e);
    acc = V::add(acc, e);
  }
  if (i < n) {
    const vmask m = V::first(n - i);
    const vec e = vexp(V::sub(V::load(m, s + i), vs));
    V::store(m, s + i, e);
    acc = V::add_masked(m, acc, e);
  }
  return V::hsum(acc);
}

/// dst[i] = src[i] * a (dst == src allowed): whole vectors, then the masked tail.
inline void scale_row_to(const float* src, float* dst, std::int64_t n, float a) {
  const vec va = V::set1(a);
  std::int64_t i = 0;
  for (; i + L <= n; i += L) V::store(dst + i, V::mul(V::load(src + i), va));
  if (i < n) {
    const vmask m = V::first(n - i);
    V::store(m, dst + i, V::mul(V::load(m, src + i), va));
  }
}

/// dst[i] = bf16(src[i] * a), rounded to nearest even.
inline void scale_row_to(const float* src, bf16* dst, std::int64_t n, float a) {
  const vec va = V::set1(a);
  std::int64_t i = 0;
  for (; i + L <= n; i += L) V::store_bf16(V::first(L), dst + i, V::mul(V::load(src + i), va));
  if (i < n) {
    const vmask m = V::first(n - i);
    V::store_bf16(m, dst + i, V::mul(V::load(m, src + i), va));
  }
}

/// x[i] *= a.
inline void scale_row(float* x, std::int64_t n, float a) { scale_row_to(x, x, n, a); }

/// a[i] = a[i] * fa + b[i] * fb (two softmax states' accumulators merged).
inline void scale_add_row(float* a, float fa, const float* b, float fb, std::int64_t n) {
  const vec va = V::set1(fa), vb = V::set1(fb);
  for (std::int64_t i = 0; i < n; i += L) {
    const vmask m = V::first(n - i);
    V::store(m, a + i, V::fmadd(V::load(m, a + i), va, V::mul(V::load(m, b + i), vb)));
  }
}

/// dst[c * ld + i] = rows[i][c] * scale for i < n, c < cols: rows turned into columns (a query
/// tile's Q^T), L x L blocks transposed in registers. Column blocks outside, so the L rows of
/// dst being written stay in L1 until they are whole: rows outside wrote every dst row a vector
/// at a time, n / L times over (128 heads x 576: 295 KiB rewritten from L2; docs/benchmarks.md).
inline void transpose_scaled(const float* const* rows, std::int64_t n, std::int64_t cols,
                             float scale, float* dst, std::int64_t ld) {
  const vec s = V::set1(scale);
  for (std::int64_t c0 = 0; c0 < cols; c0 += L) {
    const std::int64_t nc = std::min<std::int64_t>(L, cols - c0);
    for (std::int64_t i0 = 0; i0 < n; i0 += L) {
      const std::int64_t nr = std::min<std::int64_t>(L, n - i0);
      vec x[L];
      if (nr == L && nc == L) {  // constant trip counts: x stays in registers
        ATTNKIT_UNROLL
        for (int i = 0; i < L; ++i) x[i] = V::mul(V::load(rows[i0 + i] + c0), s);
        V::transpose(x);
        ATTNKIT_UNROLL
        for (int k = 0; k < L; ++k) V::store(dst + (c0 + k) * ld + i0, x[k]);
        continue;
      }
      ATTNKIT_UNROLL
      for (int i = 0; i < L; ++i)
        x[i] = i < nr ? V::mul(V::load(V::first(nc), rows[i0 + i] + c0), s) : V::zero();
      V::transpose(x);
      for (std::int64_t k = 0; k < nc; ++k) V::store(V::first(nr), dst + (c0 + k) * ld + i0, x[k]);
    }
  }
}

/// x[i] = value.
inline void fill_row(float* x, std::int64_t n, float value) {
  const vec v = V::set1(value);
  for (std::int64_t i = 0; i < n; i += L) V::store(V::first(n - i), x + i, v);
}

/// Whether some x[i] is inf or NaN: x * 0 is NaN exactly for those, and a NaN makes the sum NaN.
inline bool any_non_finite(const float* x, std::int64_t n) {
  vec acc = V::zero();
  const vec zero = V::zero();
  for (std::int64_t i = 0; i < n; i += L) acc = V::add(acc, V::mul(V::load(V::first(n - i), x + i), zero));
  const float sum = V::hsum(acc);
  return sum != sum;
}

/// h[g] = max over row g's n columns (s + g * ld), NaN if one is NaN, for g < G: one row's max
/// is a chain of dependent max steps, and the G chains overlap.
template <int G>
inline void row_maxima(const float* s, std::int64_t ld, std::int64_t n, float* h) {
  const float ninf = -std::numeric_limits<float>::infinity();
  vec m[G];
  ATTNKIT_UNROLL
  for (int g = 0; g < G; ++g) m[g] = V::set1(ninf);
  std::int64_t i = 0;
  for (; i + L <= n; i += L) {
    ATTNKIT_UNROLL
    for (int g = 0; g < G; ++g) m[g] = V::max_nan(m[g], V::load(s + g * ld + i));
  }
  if (i < n) {
    const vmask mk = V::first(n - i);
    ATTNKIT_UNROLL
    for (int g = 0; g < G; ++g) m[g] = V::max_nan(m[g], V::load_or(mk, s + g * ld + i, ninf));
  }
  ATTNKIT_UNROLL
  for (int g = 0; g < G; ++g) h[g] = V::hmax_nan(m[g]);
}

/// Row form of the online softmax for rows r < rows of s[r * ld + t], t < n: each row
/// becomes exp(s - max'), its running max and sum are updated, alpha[r] = the factor its
/// accumulator must be rescaled by (1 if the max stayed, 0 the first time a row that was fully
/// masked sees a key; a row still fully masked becomes zeros with alpha 1). The maxima are taken
/// 4 rows (2, 1) at a time.
inline void softmax_rows(float* s, std::int64_t ld, std::int64_t rows, std::int64_t n,
                         float* state_max, float* state_sum, float* alpha) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (std::int64_t r0 = 0, g_n; r0 < rows; r0 += g_n) {
    float h[4];
    g_n = rows - r0 >= 4 ? 4 : rows - r0 >= 2 ? 2 : 1;
    if (g_n == 4)
      row_maxima<4>(s + r0 * ld, ld, n, h);
    else if (g_n == 2)
      row_maxima<2>(s + r0 * ld, ld, n, h);
    else
      row_maxima<1>(s + r0 * ld, ld, n, h);
    for (std::int64_t g = 0; g < g_n; ++g) {
      const std::int64_t r = r0 + g;
      float* x = s + r * ld;
      const float old = state_max[r];
      const float mx = h[g] != h[g] || h[g] > old ? h[g] : old;  // NaN-propagating max
      if (mx == ninf) {  // everything masked so far: the probabilities are all zero
        fill_row(x, n, 0.f);
        alpha[r] = 1.f;
        continue;
      }
      alpha[r] = old == ninf ? 0.f : old == mx ? 1.f : std::exp(old - mx);
      state_sum[r] = state_sum[r] * alpha[r] + exp_shift_sum(x, n, mx);
      state_max[r] = mx;
    }
  }
}

// ---- streaming score and value products ----

/// Prefetches the line at column c of each of the N rows where c is a multiple of 64 bytes into
/// the row (any c where `any`).
template <int N, class S>
inline void prefetch_column_lines(const S* const (&rows)[N], std::int64_t c, bool any = false) {
  if (!any && c * static_cast<std::int64_t>(sizeof(S)) % 64 != 0) return;
  ATTNKIT_UNROLL
  for (int u = 0; u < N; ++u) prefetch_line(rows[u] + c);
}

/// x, kept in a register (V::hold) as a value of its own: the hold applied to an array element
/// made GCC store the whole array to the stack on every step of the loop it is in.
ATTNKIT_INLINE vec held(vec x) {
  V::hold(x);
  return x;
}

/// One step of a score block: acc[r][u] += the products of the RB rows' query vectors q(r, i)
/// (i < NQ: NQ vectors per row and step) with the KB keys' vectors kv[u][i]. The operand with
/// fewer vectors per step is held in registers (the query vectors, or the keys' widened ones)
/// and the other streamed past it, so the block's sums and operands fit the registers. Keys
/// held (KB < RB: AVX2's 16 registers) are held one vector i at a time; every held vector goes
/// through held() (an array of all NQ keys, or holds on array elements, cost a store per vector
/// and step: in the AVX-512 decode 16 per step of 32 FMAs). Either order adds the same products
/// to each sum in the same order.
template <int RB, int KB, int NQ, class QLoad, class KLoad>
ATTNKIT_INLINE void score_step(vec (&acc)[RB][KB], const QLoad& q, const KLoad& k) {
  if constexpr (KB >= RB) {
    vec qv[RB][NQ];
    ATTNKIT_UNROLL
    for (int r = 0; r < RB; ++r) {
      ATTNKIT_UNROLL
      for (int i = 0; i < NQ; ++i) qv[r][i] = held(q(r, i));
    }
    ATTNKIT_UNROLL
    for (int u = 0; u < KB; ++u) {
      vec kv[NQ];
      k(u, kv);
      ATTNKIT_UNROLL
      for (int i = 0; i < NQ; ++i) kv[i] = held(kv[i]);  // one load for the RB rows
      ATTNKIT_UNROLL
      for (int r = 0; r < RB; ++r) {
        ATTNKIT_UNROLL
        for (int i = 0; i < NQ; ++i) acc[r][u] = V::fmadd(qv[r][i], kv[i], acc[r][u]);
      }
    }
  } else {
    ATTNKIT_UNROLL
    for (int i = 0; i < NQ; ++i) {
      vec kv[KB];
      ATTNKIT_UNROLL
      for (int u = 0; u < KB; ++u) kv[u] = held(k.one(u, i));
      ATTNKIT_UNROLL
      for (int r = 0; r < RB; ++r) {
        const vec qv = held(q(r, i));  // one load for the KB keys
        ATTNKIT_UNROLL
        for (int u = 0; u < KB; ++u) acc[r][u] = V::fmadd(qv, kv[u], acc[r][u]);
      }
    }
  }
}

/// Query and key operands of score_step: function objects, not lambdas (see the file comment).
struct query_vectors {
  const float* const* rows;
  std::int64_t c;
  ATTNKIT_INLINE vec operator()(int r, int i) const { return V::load(rows[r] + c + L * i); }
};
struct query_tail {
  const float* const* rows;
  std::int64_t c;
  vmask m;
  ATTNKIT_INLINE vec operator()(int r, int) const { return V::load(m, rows[r] + c); }
};
template <class S>
struct key_pairs {  // 2 L bf16 columns as (even, odd) vectors
  const S* const* rows;
  std::int64_t c;
  ATTNKIT_INLINE void operator()(int u, vec (&kv)[2]) const {
    V::load_bf16_pairs(rows[u] + c, kv[0], kv[1]);
  }
  ATTNKIT_INLINE vec one(int u, int i) const {  // one of the two: the other is not computed
    vec kv[2];
    V::load_bf16_pairs(rows[u] + c, kv[0], kv[1]);
    return kv[i];
  }
};
template <class S>
struct key_vectors {
  const S* const* rows;
  std::int64_t c;
  ATTNKIT_INLINE void operator()(int u, vec (&kv)[1]) const {
    kv[0] = V::load_as_float(rows[u] + c);
  }
  ATTNKIT_INLINE vec one(int u, int) const { return V::load_as_float(rows[u] + c); }
};
template <class S>
struct key_tail {
  const S* const* rows;
  std::int64_t c;
  vmask m;
  ATTNKIT_INLINE void operator()(int u, vec (&kv)[1]) const {
    kv[0] = V::load_as_float(m, rows[u] + c);
  }
  ATTNKIT_INLINE vec one(int u, int) const { return V::load_as_float(m, rows[u] + c); }
};

/// Whether the target stores part of a vector's lanes from the register (V::store_lanes).
template <class W>
constexpr bool stores_lanes = requires(float* p, typename W::vec x) {
  W::store_lanes(p, x, 0, 1);
};
template <class W>
ATTNKIT_INLINE void store_lanes(float* p, typename W::vec x, int first, int n) {
  W::store_lanes(p, x, first, n);
}

/// S for RB query rows x KB keys at a time (rows and keys past the end clamped: computed, not
/// stored); S row-major (s[r * s_stride + t]) or, Columns, in column form (s[t * s_stride + r]).
/// The RB x KB sums are reduced L at a time by V::sums, in the order they are stored.
template <int RB, int KB, bool Columns, class Rows, class Prefetch>
inline void scores_block(const float* q, std::int64_t q_stride, std::int64_t rows, const Rows& k,
                         std::int64_t keys, std::int64_t d, float* s, std::int64_t s_stride,
                         Prefetch& pf) {
  using S = typename Rows::element;
  constexpr int N = RB * KB, NL = (N + L - 1) / L * L;  // the sums, padded to whole vectors
  const float* qr[RB];
  ATTNKIT_UNROLL
  for (int r = 0; r < RB; ++r) qr[r] = q + std::min<std::int64_t>(r, rows - 1) * q_stride;
  const vmask tail = V::first(d % L);
  const std::int64_t d_full = d - d % L;
  for (std::int64_t t0 = 0; t0 < keys; t0 += KB) {
    std::int64_t tu[KB];
    const S* kr[KB];
    ATTNKIT_UNROLL
    for (int u = 0; u < KB; ++u)
      tu[u] = std::min<std::int64_t>(t0 + u, keys - 1), kr[u] = k.row(tu[u]);
    // The keys' rows `ahead` on, prefetched a line of each per 64 bytes of columns as the
    // columns are read: all their lines at once make a burst that fills the core's miss
    // buffers, and DRAM then streams slower than with the same lines spread (docs/benchmarks.md).
    const bool k_pf = k.prefetches();
    const S* ka[KB];
    ATTNKIT_UNROLL
    for (int u = 0; u < KB; ++u) ka[u] = k_pf ? k.ahead_row(tu[u]) : nullptr;
    vec acc[RB][KB];
    ATTNKIT_UNROLL
    for (int r = 0; r < RB; ++r) {
      ATTNKIT_UNROLL
      for (int u = 0; u < KB; ++u) acc[r][u] = V::zero();
    }
    std::int64_t c0 = 0;
    if constexpr (V::pairs && std::same_as<S, bf16>) {
      for (; c0 + 2 * L <= d; c0 += 2 * L) {
        pf.step();
        if (k_pf) prefetch_column_lines(ka, c0);
        score_step<RB, KB, 2>(acc, query_vectors{qr, c0}, key_pairs<S>{kr, c0});
      }
    }
    for (std::int64_t c = c0; c < d_full; c += L) {
      pf.step();
      if (k_pf) prefetch_column_lines(ka, c);
      score_step<RB, KB, 1>(acc, query_vectors{qr, c}, key_vectors<S>{kr, c});
    }
    if (d_full < d) {
      if (k_pf) prefetch_column_lines(ka, d - 1, true);  // the rows' last lines
      score_step<RB, KB, 1>(acc, query_tail{qr, d_full, tail}, key_tail<S>{kr, d_full, tail});
    }
    // Column form: key u's RB sums adjacent; row form: row r's KB sums.
    vec flat[NL];
    ATTNKIT_UNROLL
    for (int r = 0; r < RB; ++r) {
      ATTNKIT_UNROLL
      for (int u = 0; u < KB; ++u) flat[Columns ? u * RB + r : r * KB + u] = acc[r][u];
    }
    ATTNKIT_UNROLL
    for (int f = N; f < NL; ++f) flat[f] = V::zero();
    vec sums[NL / L];
    ATTNKIT_UNROLL
    for (int g = 0; g < NL; g += L) sums[g / L] = V::sums(flat + g);
    // Constant trip counts with guards (not `r < rows` in the loop condition): a runtime bound
    // makes GCC keep acc[][] in memory and store it on every iteration of the hot loop.
    const bool whole = rows == RB && t0 + KB <= keys;
    constexpr int outer = Columns ? KB : RB, inner = Columns ? RB : KB;
    if constexpr (stores_lanes<V>) {
      if (whole && inner >= 2 && L % inner == 0) {  // each row's (key's) sums from the register
        ATTNKIT_UNROLL
        for (int a = 0; a < outer; ++a)
          store_lanes<V>(Columns ? s + (t0 + a) * s_stride : s + a * s_stride + t0,
                         sums[a * inner / L], a * inner % L, inner);
        continue;
      }
    }
    alignas(64) float sum[NL];
    ATTNKIT_UNROLL
    for (int g = 0; g < NL; g += L) V::store(sum + g, sums[g / L]);
    ATTNKIT_UNROLL
    for (int a = 0; a < outer; ++a) {
      float* dst = Columns ? s + (t0 + a) * s_stride : s + a * s_stride + t0;
      const float* src = sum + a * inner;
      if (whole) {
        std::copy_n(src, inner, dst);
      } else if (Columns ? t0 + a < keys : a < rows) {
        const std::int64_t n = Columns ? rows : std::min<std::int64_t>(KB, keys - t0);
        for (std::int64_t b = 0; b < n; ++b) dst[b] = src[b];
      }
    }
  }
}

/// S[rows][keys] = Q K^T (see detail::scores in simd/targets.hpp), or its column form S^T
/// (Columns: s[t * s_stride + r]); k: strided_rows or listed_rows. Blocks of 4 query rows (3
/// take one clamped row) x V::score_keys keys, then of 2 or 1 row x 4 keys.
template <bool Columns = false, class Rows, class Prefetch>
inline void scores(const float* q, std::int64_t q_stride, std::int64_t rows, const Rows& k,
                   std::int64_t keys, std::int64_t d, float* s, std::int64_t s_stride,
                   Prefetch& pf) {
  if constexpr (std::same_as<Prefetch, l1_range_prefetch> && !V::value_block_l1) {
    no_prefetch none;  // issued only where measured to help (V::value_block_l1)
    scores<Columns>(q, q_stride, rows, k, keys, d, s, s_stride, none);
    return;
  }
  auto at = [&](std::int64_t r) { return Columns ? s + r : s + r * s_stride; };
  // Only the first row block prefetches: the later ones read the same K rows.
  const Rows k_again = k.without_prefetch();
  std::int64_t r = 0;
  for (; rows - r >= 3; r += 4)
    scores_block<4, V::score_keys, Columns>(q + r * q_stride, q_stride,
                                            std::min<std::int64_t>(4, rows - r),
                                            r == 0 ? k : k_again, keys, d, at(r), s_stride, pf);
  if (rows - r == 2) {
    scores_block<2, 4, Columns>(q + r * q_stride, q_stride, 2, r == 0 ? k : k_again, keys, d, at(r),
                                s_stride, pf);
    r += 2;
  }
  if (rows - r == 1)
    scores_block<1, 4, Columns>(q + r * q_stride, q_stride, 1, r == 0 ? k : k_again, keys, d, at(r),
                                s_stride, pf);
}

/// What a pv chunk of `width` columns at column c0 prefetches of the row ahead of key t: its own
/// bytes. Chunks narrower than a line share it, and each line is requested once: by the n chunks
/// of a line in turn, one key in n each (a single chunk requesting the line of every key sends
/// them in bursts that fill the core's miss buffers while the other chunks send none); a chunk
/// that does not tile its line requests it where it starts the line.
struct chunk_prefetch {
  // Keys t with (t & mask) == phase, bytes > 0. The loops count the next such key in a
  // register rather than test each key: the bf16 decode on AVX-512 ran slower with the test
  // (GCC 12 on Zen 5; docs/benchmarks.md, 2026-12-06).
  std::int64_t bytes = 0, mask = 0, phase = 0;
};
template <class S>
constexpr chunk_prefetch chunk_prefetch_of(std::int64_t c0, std::int64_t width) {
  constexpr auto size = static_cast<std::int64_t>(sizeof(S));
  const std::int64_t bytes = width * size, offset = c0 * size % 64;
  if (bytes < 64 && 64 % bytes == 0 && offset % bytes == 0)
    return {bytes, 64 / bytes - 1, offset / bytes};
  return {offset == 0 ? bytes : 0, 0, 0};
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

/// O[rows][width] += P V over `width` <= V::pv_vectors * L columns: columns [c0, c0 + width) of
/// the rows v (strided_rows or listed_rows).
template <int RB, class Rows>
inline void pv_chunk(const float* p, std::int64_t p_stride, std::int64_t rows, const Rows& v,
                     std::int64_t c0, std::int64_t keys, std::int64_t width, float* o,
                     std::int64_t o_stride, chunk_prefetch pf) {
  using S = typename Rows::element;
  constexpr int NV = V::pv_vectors;
  vmask m[NV];
  ATTNKIT_UNROLL
  for (int i = 0; i < NV; ++i) m[i] = V::first(width - L * i);
  const pv_rows<RB> rw(p, p_stride, o, o_stride, rows);
  vec acc[RB][NV];
  ATTNKIT_UNROLL
  for (int r = 0; r < RB; ++r) {
    ATTNKIT_UNROLL
    for (int i = 0; i < NV; ++i) acc[r][i] = V::load(m[i], rw.o[r] + L * i);
  }
  std::int64_t next_pf = pf.bytes > 0 ? pf.phase : keys;
  for (std::int64_t t = 0; t < keys; ++t) {
    const S* vr = v.row(t) + c0;
    if (v.prefetches() && t == next_pf) {
      prefetch_row(v.ahead_row(t) + c0, pf.bytes);
      next_pf += pf.mask + 1;
    }
    vec vv[NV];
    ATTNKIT_UNROLL
    for (int i = 0; i < NV; ++i) vv[i] = V::load_as_float(m[i], vr + L * i);
    ATTNKIT_UNROLL
    for (int r = 0; r < RB; ++r) {
      const vec pv = V::set1(rw.p[r][t]);
      ATTNKIT_UNROLL
      for (int i = 0; i < NV; ++i) acc[r][i] = V::fmadd(pv, vv[i], acc[r][i]);
    }
  }
  ATTNKIT_UNROLL
  for (int r = 0; r < RB; ++r) {  // constant trip count: see scores_block
    ATTNKIT_UNROLL
    for (int i = 0; i < NV; ++i)
      if (r < rows) V::store(m[i], rw.o[r] + L * i, acc[r][i]);
  }
}

/// The same over exactly NV * L columns (NV even): unmasked; bf16 with V::pairs in paired order.
template <int RB, int NV, class Rows>
inline void pv_chunk_full(const float* p, std::int64_t p_stride, std::int64_t rows, const Rows& v,
                          std::int64_t c0, std::int64_t keys, float* o, std::int64_t o_stride,
                          chunk_prefetch pf) {
  using S = typename Rows::element;
  const pv_rows<RB> rw(p, p_stride, o, o_stride, rows);
  vec acc[RB][NV];
  ATTNKIT_UNROLL
  for (int r = 0; r < RB; ++r) {
    ATTNKIT_UNROLL
    for (int i = 0; i < NV; ++i) acc[r][i] = V::load(rw.o[r] + L * i);
  }
  std::int64_t next_pf = pf.bytes > 0 ? pf.phase : keys;
  for (std::int64_t t = 0; t < keys; ++t) {
    const S* vr = v.row(t) + c0;
    if (v.prefetches() && t == next_pf) {
      prefetch_row(v.ahead_row(t) + c0, pf.bytes);
      next_pf += pf.mask + 1;
    }
    vec vv[NV];
    if constexpr (V::pairs && std::same_as<S, bf16>) {  // NV / 2 groups of 2 L paired columns
      ATTNKIT_UNROLL
      for (int g = 0; g < NV / 2; ++g) V::load_bf16_pairs(vr + 2 * L * g, vv[2 * g], vv[2 * g + 1]);
    } else {
      ATTNKIT_UNROLL
      for (int i = 0; i < NV; ++i) vv[i] = V::load_as_float(vr + L * i);
    }
    ATTNKIT_UNROLL
    for (int r = 0; r < RB; ++r) {
      const vec pv = V::set1(rw.p[r][t]);
      ATTNKIT_UNROLL
      for (int i = 0; i < NV; ++i) acc[r][i] = V::fmadd(pv, vv[i], acc[r][i]);
    }
  }
  ATTNKIT_UNROLL
  for (int r = 0; r < RB; ++r) {  // constant trip count: see scores_block
    ATTNKIT_UNROLL
    for (int i = 0; i < NV; ++i)
      if (r < rows) V::store(rw.o[r] + L * i, acc[r][i]);
  }
}

template <int RB, class Rows>
inline void pv_block(const float* p, std::int64_t p_stride, std::int64_t rows, const Rows& v,
                     std::int64_t keys, std::int64_t dv, float* o, std::int64_t o_stride) {
  constexpr std::int64_t W = V::pv_vectors * L;
  static_assert(V::pv_vectors % 2 == 0, "paired bf16 chunks take whole (even, odd) groups");
  using S = typename Rows::element;
  constexpr auto pf = chunk_prefetch_of<S>;
  std::int64_t c = 0;
  for (; c + W <= dv; c += W)
    pv_chunk_full<RB, V::pv_vectors>(p, p_stride, rows, v, c, keys, o + c, o_stride, pf(c, W));
  if constexpr (V::pairs && std::same_as<S, bf16>)  // paired order: whole groups
    for (; c + 2 * L <= dv; c += 2 * L)
      pv_chunk_full<RB, 2>(p, p_stride, rows, v, c, keys, o + c, o_stride, pf(c, 2 * L));
  if (c < dv) pv_chunk<RB>(p, p_stride, rows, v, c, keys, dv - c, o + c, o_stride, pf(c, dv - c));
}

/// O[rows][dv] += P[rows][keys] V[keys][dv] (see detail::accumulate_pv in simd/targets.hpp); v:
/// strided_rows or listed_rows.
template <class Rows>
inline void accumulate_pv(const float* p, std::int64_t p_stride, std::int64_t rows, const Rows& v,
                          std::int64_t keys, std::int64_t dv, float* o, std::int64_t o_stride) {
  if (rows == 1) {
    pv_block<1>(p, p_stride, 1, v, keys, dv, o, o_stride);
    return;
  }
  if (rows == 2) {
    pv_block<2>(p, p_stride, 2, v, keys, dv, o, o_stride);
    return;
  }
  const Rows v_again = v.without_prefetch();  // the later row blocks read the same V rows
  for (std::int64_t r = 0; r < rows; r += 4)
    pv_block<4>(p + r * p_stride, p_stride, std::min<std::int64_t>(4, rows - r),
                r == 0 ? v : v_again, keys, dv, o + r * o_stride, o_stride);
}

/// One MR-head x NV-vector tile of O += P V for heads [i0, i0 + MR) (all < m) and columns
/// [j0, j0 + L NV) (masks mk unless Full), P in column form (p[t * m + h]). Each value vector is
/// widened in a register once for the MR heads, whose broadcasts sit at constant offsets.
template <int MR, int NV, bool Full, class Rows, class Prefetch>
inline void pv_columns_tile(const float* p, std::int64_t m, std::int64_t i0, const Rows& v,
                            std::int64_t keys, std::int64_t j0, const vmask* mk, float* o,
                            std::int64_t ldo, Prefetch& pf) {
  using S = typename Rows::element;
  // A full tile of 2 L bf16 columns widens them as one (even, odd) pair: half the widening
  // instructions, which share the FMAs' ports on Intel cores; O's columns are split the same
  // way for the tile and joined back at its end.
  constexpr bool paired = V::pairs && std::same_as<S, bf16> && Full && NV == 2;
  vec acc[MR][NV];
  ATTNKIT_UNROLL
  for (int r = 0; r < MR; ++r) {
    const float* src = o + (i0 + r) * ldo + j0;
    if constexpr (paired) {
      V::split_pairs(src, acc[r][0], acc[r][1]);
    } else {
      ATTNKIT_UNROLL
      for (int i = 0; i < NV; ++i)
        acc[r][i] = Full ? V::load(src + L * i) : V::load(mk[i], src + L * i);
    }
  }
  const float* pt = p + i0;
  for (std::int64_t t = 0; t < keys; ++t, pt += m) {
    pf.step();
    const auto* vr = v.row(t) + j0;
    vec vv[NV];
    if constexpr (paired) {
      V::load_bf16_pairs(vr, vv[0], vv[1]);
    } else {
      ATTNKIT_UNROLL
      for (int i = 0; i < NV; ++i)
        vv[i] = Full ? V::load_as_float(vr + L * i) : V::load_as_float(mk[i], vr + L * i);
    }
    ATTNKIT_UNROLL
    for (int r = 0; r < MR; ++r) {
      const vec a = V::set1(pt[r]);
      ATTNKIT_UNROLL
      for (int i = 0; i < NV; ++i) acc[r][i] = V::fmadd(a, vv[i], acc[r][i]);
    }
  }
  ATTNKIT_UNROLL
  for (int r = 0; r < MR; ++r) {
    float* dst = o + (i0 + r) * ldo + j0;
    if constexpr (paired) {
      V::join_pairs(dst, acc[r][0], acc[r][1]);
    } else {
      ATTNKIT_UNROLL
      for (int i = 0; i < NV; ++i) {
        if (Full)
          V::store(dst + L * i, acc[r][i]);
        else
          V::store(mk[i], dst + L * i, acc[r][i]);
      }
    }
  }
}

/// Heads [i0, m) of one column block: whole MR-head tiles, then MR/2, MR/4, ... heads.
template <int MR, int NV, bool Full, class Rows, class Prefetch>
inline void pv_columns_heads(const float* p, std::int64_t m, std::int64_t i0, const Rows& v,
                             std::int64_t keys, std::int64_t j0, const vmask* mk, float* o,
                             std::int64_t ldo, Prefetch& pf) {
  for (; i0 + MR <= m; i0 += MR)
    pv_columns_tile<MR, NV, Full>(p, m, i0, v, keys, j0, mk, o, ldo, pf);
  if constexpr (MR > 1)
    if (i0 < m) pv_columns_heads<MR / 2, NV, Full>(p, m, i0, v, keys, j0, mk, o, ldo, pf);
}

/// O[m][dv] += P V, P in column form (see detail::pv_columns in simd/targets.hpp).
template <class Rows, class Prefetch>
inline void pv_columns(const float* p, std::int64_t m, const Rows& v, std::int64_t keys,
                       std::int64_t dv, float* o, std::int64_t ldo, Prefetch& pf) {
  constexpr int MR = L >= 16 ? 8 : 4, NV = 2;
  for (std::int64_t j0 = 0; j0 < dv; j0 += L * NV) {
    vmask mk[NV];
    ATTNKIT_UNROLL
    for (int i = 0; i < NV; ++i) mk[i] = V::first(dv - j0 - L * i);
    if (j0 + L * NV <= dv)
      pv_columns_heads<MR, NV, true>(p, m, 0, v, keys, j0, mk, o, ldo, pf);
    else
      pv_columns_heads<MR, NV, false>(p, m, 0, v, keys, j0, mk, o, ldo, pf);
  }
}

// ---- register-blocked GEMM ----

/// One MR x L*NV micro-tile of C (+)= A B at rows [i0, i0 + MR) (clamped to the last row; the
/// clamped rows are computed, then discarded) and columns [j0, j0 + L NV) under masks mk; b
/// points at B's column j0.
/// RowStep > 0: A's rows are RowStep elements apart (a_rs == RowStep; 1: adjacent rows) and the
/// tile is full, so the MR broadcasts of a step read one pointer at constant offsets instead of
/// MR pointers (which spill when inlined: the TPA value GEMM ran measurably slower that way;
/// docs/benchmarks.md, TPA). RowStep 0: any a_rs.
template <bool Accumulate, int MR, int NV, int RowStep, bool Full, class Prefetch>
inline void gemm_bcast_tile(std::int64_t i0, std::int64_t j0, const vmask* mk, std::int64_t rows,
                            std::int64_t depth, const float* a, std::int64_t a_rs,
                            std::int64_t a_cs, const float* b, std::int64_t b_rs, float* c,
                            std::int64_t ldc, Prefetch& pf) {
  const float* ar[MR];
  ATTNKIT_UNROLL
  for (int r = 0; r < MR; ++r)
    ar[r] = a + (RowStep ? i0 + r : std::min<std::int64_t>(i0 + r, rows - 1)) * a_rs;
  vec acc[MR][NV];
  ATTNKIT_UNROLL
  for (int r = 0; r < MR; ++r) {
    float* cr = c + std::min<std::int64_t>(i0 + r, rows - 1) * ldc + j0;
    ATTNKIT_UNROLL
    for (int v = 0; v < NV; ++v)
      acc[r][v] = !Accumulate ? V::zero() : Full ? V::load(cr + L * v) : V::load(mk[v], cr + L * v);
  }
  const float* bk = b;
  const float* ak = a + i0 * RowStep;
  for (std::int64_t k = 0; k < depth; ++k, bk += b_rs) {
    pf.step();
    vec bv[NV];
    ATTNKIT_UNROLL
    for (int v = 0; v < NV; ++v) bv[v] = Full ? V::load(bk + L * v) : V::load(mk[v], bk + L * v);
    ATTNKIT_UNROLL
    for (int r = 0; r < MR; ++r) {
      const vec av = V::set1(RowStep ? ak[r * RowStep] : ar[r][k * a_cs]);
      ATTNKIT_UNROLL
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fmadd(av, bv[v], acc[r][v]);
    }
    if constexpr (RowStep > 0) ak += a_cs;
  }
  ATTNKIT_UNROLL
  for (int r = 0; r < MR; ++r) {
    if (i0 + r >= rows) break;
    float* cr = c + (i0 + r) * ldc + j0;
    ATTNKIT_UNROLL
    for (int v = 0; v < NV; ++v) {
      if (Full)
        V::store(cr + L * v, acc[r][v]);
      else
        V::store(mk[v], cr + L * v, acc[r][v]);
    }
  }
}

/// Rows [i0, rows) of A with rows RowStep apart (a_rs == RowStep): full MR-row tiles, then the
/// remainder in tiles of MR/2, MR/4, ... rows, so a ragged edge (34 heads = 4 x 8 + 2) costs
/// what it computes instead of a whole clamped tile.
template <bool Accumulate, int MR, int NV, int RowStep, bool Full, class Prefetch>
inline void gemm_bcast_step_rows(std::int64_t i0, std::int64_t j0, const vmask* mk,
                                 std::int64_t rows, std::int64_t depth, const float* a,
                                 std::int64_t a_cs, const float* b, std::int64_t b_rs, float* c,
                                 std::int64_t ldc, Prefetch& pf) {
  for (; i0 + MR <= rows; i0 += MR)
    gemm_bcast_tile<Accumulate, MR, NV, RowStep, Full>(i0, j0, mk, rows, depth, a, RowStep, a_cs, b,
                                                       b_rs, c, ldc, pf);
  if constexpr (MR > 1)
    if (i0 < rows)
      gemm_bcast_step_rows<Accumulate, MR / 2, NV, RowStep, Full>(i0, j0, mk, rows, depth, a, a_cs,
                                                                  b, b_rs, c, ldc, pf);
}

/// Depth steps per pass over a column strip: its B panel (L NV floats a step) fits in L1 with room
/// for A's rows, so the row tiles after the first read it from there.
template <int NV>
constexpr std::int64_t gemm_panel_depth = 24 * 1024 / (4 * L * NV);

/// One column strip [j0, j0 + L NV) of C over all rows, depth steps of A and B.
template <bool Accumulate, int MR, int NV, int RowStep, bool Full, class Prefetch>
inline void gemm_bcast_rows(std::int64_t j0, const vmask* mk, std::int64_t rows, std::int64_t depth,
                            const float* a, std::int64_t a_rs, std::int64_t a_cs, const float* b,
                            std::int64_t b_rs, float* c, std::int64_t ldc, Prefetch& pf) {
  if constexpr (RowStep > 0) {
    gemm_bcast_step_rows<Accumulate, MR, NV, RowStep, Full>(0, j0, mk, rows, depth, a, a_cs, b,
                                                            b_rs, c, ldc, pf);
  } else if (a_rs == 1) {
    gemm_bcast_step_rows<Accumulate, MR, NV, 1, Full>(0, j0, mk, rows, depth, a, a_cs, b, b_rs, c,
                                                      ldc, pf);
  } else {
    for (std::int64_t i0 = 0; i0 < rows; i0 += MR)
      gemm_bcast_tile<Accumulate, MR, NV, 0, Full>(i0, j0, mk, rows, depth, a, a_rs, a_cs, b, b_rs,
                                                   c, ldc, pf);
  }
}

/// The column blocks [j0, j0 + L NV) of C in rows [0, rows); Full: every block is whole
/// (unmasked loads and stores: without mask registers a masked access is dearer).
template <bool Accumulate, int MR, int NV, int RowStep, bool Full, class Prefetch>
inline void gemm_bcast_columns(std::int64_t j_begin, std::int64_t j_end, std::int64_t rows,
                               std::int64_t cols, std::int64_t depth, const float* a,
                               std::int64_t a_rs, std::int64_t a_cs, const float* b,
                               std::int64_t b_rs, float* c, std::int64_t ldc, Prefetch& pf) {
  for (std::int64_t j0 = j_begin; j0 < j_end; j0 += L * NV) {
    vmask mk[NV];
    ATTNKIT_UNROLL
    for (int v = 0; v < NV; ++v) mk[v] = V::first(cols - j0 - L * v);
    // Few row tiles read the strip too few times to repay packing it.
    if (rows <= 2 * MR) {
      gemm_bcast_rows<Accumulate, MR, NV, RowStep, Full>(j0, mk, rows, depth, a, a_rs, a_cs, b + j0,
                                                         b_rs, c, ldc, pf);
      continue;
    }
    // Otherwise B's strip is packed a panel at a time: contiguous (a strided strip maps onto
    // few L1 sets) and short enough to stay in L1 across the row tiles.
    const std::int64_t chunks = (depth + gemm_panel_depth<NV> - 1) / gemm_panel_depth<NV>;
    alignas(64) float panel[gemm_panel_depth<NV> * L * NV];  // [kn][L NV]
    for (std::int64_t q = 0; q < chunks; ++q) {
      const std::int64_t k0 = depth * q / chunks, kn = depth * (q + 1) / chunks - k0;
      for (std::int64_t k = 0; k < kn; ++k) {
        const float* src = b + (k0 + k) * b_rs + j0;
        ATTNKIT_UNROLL
        for (int v = 0; v < NV; ++v)
          V::store(panel + (k * NV + v) * L,
                   Full ? V::load(src + L * v) : V::load(mk[v], src + L * v));
      }
      if (q == 0)  // the later panels add to what the first wrote
        gemm_bcast_rows<Accumulate, MR, NV, RowStep, Full>(j0, mk, rows, kn, a, a_rs, a_cs, panel,
                                                           L * NV, c, ldc, pf);
      else
        gemm_bcast_rows<true, MR, NV, RowStep, Full>(j0, mk, rows, kn, a + k0 * a_cs, a_rs, a_cs,
                                                     panel, L * NV, c, ldc, pf);
    }
  }
}

template <bool Accumulate, int MR, int NV, int RowStep, class Prefetch>
inline void gemm_bcast_tiles(std::int64_t rows, std::int64_t cols, std::int64_t depth,
                             const float* a, std::int64_t a_rs, std::int64_t a_cs, const float* b,
                             std::int64_t b_rs, float* c, std::int64_t ldc, Prefetch& pf) {
  if constexpr (V::mask_registers) {  // masked loads cost what plain ones do: one path
    gemm_bcast_columns<Accumulate, MR, NV, RowStep, false>(0, cols, rows, cols, depth, a, a_rs,
                                                           a_cs, b, b_rs, c, ldc, pf);
    return;
  }
  const std::int64_t full = cols / (L * NV) * (L * NV);
  gemm_bcast_columns<Accumulate, MR, NV, RowStep, true>(0, full, rows, cols, depth, a, a_rs, a_cs,
                                                        b, b_rs, c, ldc, pf);
  gemm_bcast_columns<Accumulate, MR, NV, RowStep, false>(full, cols, rows, cols, depth, a, a_rs,
                                                         a_cs, b, b_rs, c, ldc, pf);
}

/// C[rows, cols] (+)= A B (see detail::gemm_bcast in simd/targets.hpp): V::gemm_mr x
/// V::gemm_nv vectors, or V::narrow_mr x 1 when C is at most one vector wide (e.g. the 16 query
/// heads of an MLA decode step on AVX-512), so narrow products do not compute half-empty vectors.
template <bool Accumulate, int RowStep, class Prefetch>
inline void gemm_bcast(std::int64_t rows, std::int64_t cols, std::int64_t depth, const float* a,
                       std::int64_t a_rs, std::int64_t a_cs, const float* b, std::int64_t b_rs,
                       float* c, std::int64_t ldc, Prefetch& pf) {
  if (cols <= L)
    gemm_bcast_tiles<Accumulate, V::narrow_mr, 1, RowStep>(rows, cols, depth, a, a_rs, a_cs, b,
                                                           b_rs, c, ldc, pf);
  else
    gemm_bcast_tiles<Accumulate, V::gemm_mr, V::gemm_nv, RowStep>(rows, cols, depth, a, a_rs, a_cs,
                                                                  b, b_rs, c, ldc, pf);
}

// ---- softmax, column form ----

/// Writes the probabilities back into the score tile.
struct store_in_place {
  float* st;
  std::int64_t ld;
  void operator()(std::int64_t t, std::int64_t r0, vec p, vmask m) const {
    V::store(m, st + t * ld + r0, p);
  }
};
/// TPA: the probabilities become value weights wt[(s, v)][h] = p[s][h] A_V(s)[v, h].
template <storage_type S>
struct into_value_weights {
  const tpa_weights<S>& w;
  void operator()(std::int64_t s, std::int64_t i0, vec p, vmask m) const {
    for (std::int64_t v = 0; v < w.v_rank; ++v)
      V::store(m, w.out + (s * w.v_rank + v) * w.out_stride + i0,
               V::mul(p, V::load_as_float(m, w.a_v + (s * w.v_rank + v) * w.heads + i0)));
  }
};

/// Rows [m0, m0 + G L) of softmax_columns_to (masks mm): the G vectors of a key's row side by
/// side, so each pass reads the tile's rows in address order, once for the max and once for the
/// exponentials (a G L-column strip stays in L1 between them).
template <int G, bool CoarseExp, class Sink>
ATTNKIT_INLINE void softmax_column_strip(const float* st, std::int64_t ld, std::int64_t keys,
                                         std::int64_t m0, const vmask* mm, float* state_max,
                                         float* state_sum, float* alpha, const float* block_max,
                                         const Sink& sink) {
  const float ninf = -std::numeric_limits<float>::infinity();
  vec colmax[G], shift[G], colsum[G], scale[G];
  ATTNKIT_UNROLL
  for (int g = 0; g < G; ++g)
    colmax[g] = block_max ? V::load_or(mm[g], block_max + m0 + g * L, ninf) : V::set1(ninf);
  if (!block_max)
    for (std::int64_t t = 0; t < keys; ++t) {
      ATTNKIT_UNROLL
      for (int g = 0; g < G; ++g)
        // The plain max here (the per-key hot loop): a NaN it drops still makes its p, and so
        // the row's sum, NaN; the merge and finalisation key on the sum.
        colmax[g] = V::max(colmax[g], V::load(mm[g], st + t * ld + m0 + g * L));
    }
  ATTNKIT_UNROLL
  for (int g = 0; g < G; ++g) {
    const std::int64_t r = m0 + g * L;
    const vec old = V::load_or(mm[g], state_max + r, ninf);
    const vec mx = V::max_nan(old, colmax[g]);
    shift[g] = V::replace_neg_inf(mx, V::zero());
    scale[g] = vexp(V::sub(old, shift[g]));  // exp(-inf - finite) = 0
    V::store(mm[g], state_max + r, mx);
    V::store(mm[g], alpha + r, scale[g]);
    colsum[g] = V::zero();
  }
  for (std::int64_t t = 0; t < keys; ++t) {
    ATTNKIT_UNROLL
    for (int g = 0; g < G; ++g) {
      const vec x = V::sub(V::load(mm[g], st + t * ld + m0 + g * L), shift[g]);
      const vec p = CoarseExp ? vexp_coarse(x) : vexp(x);
      sink(t, m0 + g * L, p, mm[g]);
      colsum[g] = V::add(colsum[g], p);
    }
  }
  ATTNKIT_UNROLL
  for (int g = 0; g < G; ++g) {
    const std::int64_t r = m0 + g * L;
    V::store(mm[g], state_sum + r, V::fmadd(V::load(mm[g], state_sum + r), scale[g], colsum[g]));
  }
}

/// For keys t < keys and rows r < rows of the column tile st[t * ld + r]: the probabilities
/// exp(s - max') to sink (by vexp_coarse with CoarseExp), the running max / sum updated, alpha[r]
/// = the rescale factor of row r. block_max, when given, is each row's max over the block.
/// Strips of G vectors of rows (AVX2's 16 registers hold the state of 2 beside the
/// exponential's temporaries), then single vectors.
template <bool CoarseExp, class Sink>
inline void softmax_columns_to(const float* st, std::int64_t ld, std::int64_t keys,
                               std::int64_t rows, float* state_max, float* state_sum, float* alpha,
                               const float* block_max, const Sink& sink) {
  constexpr int G = L >= 16 ? 4 : 2;
  std::int64_t m0 = 0;
  for (; m0 + G * L <= rows; m0 += G * L) {
    vmask mm[G];
    for (int g = 0; g < G; ++g) mm[g] = V::first(L);
    softmax_column_strip<G, CoarseExp>(st, ld, keys, m0, mm, state_max, state_sum, alpha, block_max,
                                       sink);
  }
  for (; m0 < rows; m0 += L) {
    const vmask mm[1] = {V::first(rows - m0)};
    softmax_column_strip<1, CoarseExp>(st, ld, keys, m0, mm, state_max, state_sum, alpha, block_max,
                                       sink);
  }
}

/// softmax_columns_to with the probabilities written back into st, or into TPA's value weights.
template <storage_type S>
inline void softmax_columns(float* st, std::int64_t ld, std::int64_t keys, std::int64_t rows,
                            float* state_max, float* state_sum, float* alpha,
                            const float* block_max, const tpa_weights<S>* weights,
                            bool coarse_exp) {
  if (weights)
    softmax_columns_to<false>(st, ld, keys, rows, state_max, state_sum, alpha, block_max,
                              into_value_weights<S>{*weights});
  else if (coarse_exp)
    softmax_columns_to<true>(st, ld, keys, rows, state_max, state_sum, alpha, block_max,
                             store_in_place{st, ld});
  else
    softmax_columns_to<false>(st, ld, keys, rows, state_max, state_sum, alpha, block_max,
                              store_in_place{st, ld});
}

/// st[t * ld + r] <- exp(st[t * ld + r] - lse[r]), 0 where lse[r] is -inf.
inline void exp_given_columns(float* st, std::int64_t ld, std::int64_t keys, std::int64_t rows,
                              const float* lse) {
  const vec pinf = V::set1(std::numeric_limits<float>::infinity());
  for (std::int64_t m0 = 0; m0 < rows; m0 += L) {
    const vmask mm = V::first(rows - m0);
    const vec shift = V::replace_neg_inf(V::load(mm, lse + m0), pinf);
    for (std::int64_t t = 0; t < keys; ++t)
      V::store(mm, st + t * ld + m0, vexp(V::sub(V::load(mm, st + t * ld + m0), shift)));
  }
}

// ---- TPA ----

/// st[s][h] = the score of the block's key s for head h, vectorised over heads, and bmax[h] =
/// the block's max, in one pass over the D products (kernels/tpa.hpp):
/// score[h] = sum_u A_K(s)[u, h] * sum_r aq[r, h] D[r][(s, u)]. G keys at a time, so the sums
/// over r are G independent FMA chains (one key's chain alone waits on the FMA latency).
template <storage_type S, class Prefetch>
inline void tpa_score_rows(const tpa_scores<S>& p, Prefetch& pf) {
  constexpr int G = L >= 16 ? 8 : L >= 4 ? 6 : 4;
  const std::int64_t nb = p.keys, h = p.heads, hp = p.heads_padded, rk = p.k_rank,
                     ks = rk * p.dots_key_stride;
  std::fill(p.block_max, p.block_max + hp, -std::numeric_limits<float>::infinity());
  for (std::int64_t s0 = 0; s0 < nb; s0 += G) {
    std::int64_t sk[G];  // keys past the block repeat the last one (computed, never stored)
    for (int j = 0; j < G; ++j) {
      pf.step();
      sk[j] = std::min(s0 + j, nb - 1);
    }
    for (std::int64_t i0 = 0; i0 < hp; i0 += L) {
      const vmask m = V::first(h - i0);
      vec acc[G];
      ATTNKIT_UNROLL
      for (int j = 0; j < G; ++j) acc[j] = V::zero();
      for (std::int64_t u = 0; u < rk; ++u) {
        vec t[G];
        ATTNKIT_UNROLL
        for (int j = 0; j < G; ++j) t[j] = V::zero();
        for (std::int64_t r = 0; r < p.q_rank; ++r) {
          const vec a = V::load(p.a_q + r * hp + i0);
          const float* dr = p.dots + r * p.dots_stride + u * p.dots_key_stride;
          ATTNKIT_UNROLL
          for (int j = 0; j < G; ++j) t[j] = V::fmadd(a, V::set1(dr[sk[j] * ks]), t[j]);
        }
        ATTNKIT_UNROLL
        for (int j = 0; j < G; ++j)
          acc[j] = V::fmadd(V::load_as_float(m, p.a_k + (sk[j] * rk + u) * h + i0), t[j], acc[j]);
      }
      vec mx = V::load(p.block_max + i0);
      ATTNKIT_UNROLL
      for (int j = 0; j < G; ++j)
        if (s0 + j < nb) {
          V::store(p.scores + (s0 + j) * hp + i0, acc[j]);
          mx = V::max(mx, acc[j]);  // NaN reaches the sum (see softmax_columns)
        }
      V::store(p.block_max + i0, mx);
    }
  }
}
