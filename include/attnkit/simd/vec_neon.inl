// The float vector of the NEON target (AArch64 Advanced SIMD): 4 lanes, a mask is a lane count;
// FMAX / FMAXV already return NaN when a lane is NaN. Included by simd/targets.hpp inside
// namespace attnkit::detail::simd_neon.

struct V {
  static constexpr int lanes = 4;
  static constexpr bool mask_registers = false;  // masked loads/stores as cheap as plain ones
  static constexpr bool pairs = true;
  static constexpr int score_keys = 4;
  static constexpr int pv_vectors = 4;
  static constexpr bool value_block_l1 = false;
  static constexpr int gemm_mr = 8, gemm_nv = 3, narrow_mr = 16;
  using vec = float32x4_t;
  using mask = int;  // lanes [0, mask) are on

  static mask first(std::int64_t n) { return n >= 4 ? 4 : n <= 0 ? 0 : static_cast<int>(n); }
  static uint32x4_t bits(mask m) {
    static constexpr std::uint32_t table[8] = {~0u, ~0u, ~0u, ~0u, 0, 0, 0, 0};
    return vld1q_u32(table + 4 - m);
  }
  static vec zero() { return vdupq_n_f32(0.f); }
  static vec set1(float x) { return vdupq_n_f32(x); }
  static void hold(vec&) {}  // AArch64 FMAs take no memory operand
  static vec load(const float* p) { return vld1q_f32(p); }
  static vec load(mask m, const float* p) { return load_or(m, p, 0.f); }
  // A whole vector is a plain access; a partial one goes through a copy on the stack.
  static vec load_or(mask m, const float* p, float fill) {
    if (m == lanes) return vld1q_f32(p);
    float t[4] = {fill, fill, fill, fill};
    for (int i = 0; i < m; ++i) t[i] = p[i];
    return vld1q_f32(t);
  }
  static void store(float* p, vec x) { vst1q_f32(p, x); }
  static void store(mask m, float* p, vec x) {
    if (m == lanes) return vst1q_f32(p, x);
    float t[4];
    vst1q_f32(t, x);
    for (int i = 0; i < m; ++i) p[i] = t[i];
  }
  template <storage_type S>
  static vec load_as_float(const S* p) {
    if constexpr (std::same_as<S, float>) {
      return vld1q_f32(p);
    } else if constexpr (std::same_as<S, bf16>) {
      return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const std::uint16_t*>(p)), 16));
    } else {
      return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const std::uint16_t*>(p))));
    }
  }
  template <storage_type S>
  static vec load_as_float(mask m, const S* p) {
    S t[4] = {};
    for (int i = 0; i < m; ++i) t[i] = p[i];
    return load_as_float(t);
  }
  /// x rounded to bf16 into p's first m lanes: see vec_avx512.inl.
  static void store_bf16(mask m, bf16* p, vec x) {
    const uint32x4_t b = vreinterpretq_u32_f32(x), high = vshrq_n_u32(b, 16);
    const uint32x4_t bias = vaddq_u32(vandq_u32(high, vdupq_n_u32(1)), vdupq_n_u32(0x7FFF));
    uint32x4_t r = vshrq_n_u32(vaddq_u32(b, bias), 16);
    r = vbslq_u32(vmvnq_u32(vceqq_f32(x, x)), vorrq_u32(high, vdupq_n_u32(0x40)), r);
    std::uint16_t t[4];
    vst1_u16(t, vmovn_u32(r));
    std::memcpy(p, t, static_cast<std::size_t>(m) * sizeof(bf16));
  }
  static void load_bf16_pairs(const bf16* p, vec& even, vec& odd) {
    const uint32x4_t raw = vld1q_u32(reinterpret_cast<const std::uint32_t*>(p));
    even = vreinterpretq_f32_u32(vshlq_n_u32(raw, 16));
    odd = vreinterpretq_f32_u32(vandq_u32(raw, vdupq_n_u32(0xFFFF0000u)));
  }

  /// 8 floats as their even and odd columns (the order of load_bf16_pairs), and back.
  static void split_pairs(const float* p, vec& even, vec& odd) {
    const float32x4x2_t x = vld2q_f32(p);
    even = x.val[0], odd = x.val[1];
  }
  static void join_pairs(float* p, vec even, vec odd) { vst2q_f32(p, float32x4x2_t{{even, odd}}); }

  static vec add(vec a, vec b) { return vaddq_f32(a, b); }
  static vec sub(vec a, vec b) { return vsubq_f32(a, b); }
  static vec mul(vec a, vec b) { return vmulq_f32(a, b); }
  static vec fmadd(vec a, vec b, vec c) { return vfmaq_f32(c, a, b); }
  static vec fnmadd(vec a, vec b, vec c) { return vfmsq_f32(c, a, b); }
  static vec max(vec a, vec b) { return vmaxq_f32(a, b); }
  static vec max_nan(vec a, vec b) { return vmaxq_f32(a, b); }
  static vec replace_neg_inf(vec x, vec y) {
    return vbslq_f32(vceqq_f32(x, vdupq_n_f32(-std::numeric_limits<float>::infinity())), y, x);
  }
  static vec add_masked(mask m, vec a, vec b) {
    return vaddq_f32(a, vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(b), bits(m))));
  }
  /// x[0, 4) transposed in place (lane i of x[k] <-> lane k of x[i]).
  static void transpose(vec* x) {
    const float32x4x2_t a = vtrnq_f32(x[0], x[1]), b = vtrnq_f32(x[2], x[3]);
    x[0] = vcombine_f32(vget_low_f32(a.val[0]), vget_low_f32(b.val[0]));
    x[1] = vcombine_f32(vget_low_f32(a.val[1]), vget_low_f32(b.val[1]));
    x[2] = vcombine_f32(vget_high_f32(a.val[0]), vget_high_f32(b.val[0]));
    x[3] = vcombine_f32(vget_high_f32(a.val[1]), vget_high_f32(b.val[1]));
  }
  static float hsum(vec x) { return vaddvq_f32(x); }
  static float hmax_nan(vec x) { return vmaxvq_f32(x); }
  /// Lane i = the sum of x[i]'s lanes, for x[0, 4).
  ATTNKIT_INLINE static vec sums(const vec* x) {
    return vpaddq_f32(vpaddq_f32(x[0], x[1]), vpaddq_f32(x[2], x[3]));
  }
  // exp (kernels.inl): as on AVX2, 2^n in the exponent field, n in [-126, 127].
  static vec exp_clamp(vec x) {
    return vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.33654f)), vdupq_n_f32(88.3f));
  }
  static vec exp_scale(vec p, vec n, vec x) {
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127)), 23);
    const vec r = vmulq_f32(p, vreinterpretq_f32_s32(e));
    return vreinterpretq_f32_u32(
        vbicq_u32(vreinterpretq_u32_f32(r), vcltq_f32(x, vdupq_n_f32(-87.33654f))));
  }
};
