// The "vector" of the scalar target: one float, so the kernels written against V run as plain
// loops (the compiler may still vectorise them for its baseline). Included by simd/targets.hpp
// inside namespace attnkit::detail::simd_scalar.

struct V {
  static constexpr int lanes = 1;
  static constexpr bool mask_registers = false;  // masked loads/stores as cheap as plain ones
  static constexpr bool pairs = false;
  static constexpr int score_keys = 4;
  static constexpr int pv_vectors = 4;
  static constexpr bool value_block_l1 = false;
  static constexpr int gemm_mr = 4, gemm_nv = 4, narrow_mr = 4;
  using vec = float;
  using mask = int;  // 1: the lane is on

  static mask first(std::int64_t n) { return n > 0 ? 1 : 0; }
  static vec zero() { return 0.f; }
  static vec set1(float x) { return x; }
  static void hold(vec&) {}
  static vec load(const float* p) { return *p; }
  static vec load(mask m, const float* p) { return m ? *p : 0.f; }
  static vec load_or(mask m, const float* p, float fill) { return m ? *p : fill; }
  static void store(float* p, vec x) { *p = x; }
  static void store(mask m, float* p, vec x) {
    if (m) *p = x;
  }
  template <storage_type S>
  static vec load_as_float(const S* p) { return static_cast<float>(*p); }
  template <storage_type S>
  static vec load_as_float(mask m, const S* p) { return m ? static_cast<float>(*p) : 0.f; }

  static void store_bf16(mask m, bf16* p, vec x) {
    if (m) *p = static_cast<bf16>(x);
  }
  static void load_bf16_pairs(const bf16* p, vec& even, vec& odd) {  // (unused: pairs is off)
    even = static_cast<float>(p[0]), odd = static_cast<float>(p[1]);
  }
  static void split_pairs(const float* p, vec& even, vec& odd) { even = p[0], odd = p[1]; }
  static void join_pairs(float* p, vec even, vec odd) { p[0] = even, p[1] = odd; }

  static vec add(vec a, vec b) { return a + b; }
  static vec sub(vec a, vec b) { return a - b; }
  static vec mul(vec a, vec b) { return a * b; }
  /// Fused where the baseline has an FMA instruction, else a product and a sum: one rounding rule
  /// for every call site (left to the compiler, a * b + c is contracted in some inlined copies and
  /// not in others, and a paged and a contiguous pass over the same keys would differ).
  static vec fmadd(vec a, vec b, vec c) {
#ifdef FP_FAST_FMAF
    return std::fma(a, b, c);
#else
    return a * b + c;
#endif
  }
  static vec max(vec a, vec b) { return max_nan(a, b); }
  static vec max_nan(vec a, vec b) { return a != a || a > b ? a : b; }
  static vec replace_neg_inf(vec x, vec y) {
    return x == -std::numeric_limits<float>::infinity() ? y : x;
  }
  static vec add_masked(mask m, vec a, vec b) { return m ? a + b : a; }
  /// x[0, lanes) transposed in place (lane i of x[k] <-> lane k of x[i]).
  static void transpose(vec*) {}
  static float hsum(vec x) { return x; }
  static float hmax_nan(vec x) { return x; }
  ATTNKIT_INLINE static vec sums(const vec* x) { return x[0]; }
};
