#pragma once
// The few vector primitives the kernels need: loads from any storage type into float32
// registers, a vectorised exp, and row conversions. AVX-512 when the compiler targets it
// (ATTNKIT_HAS_AVX512), plain loops otherwise. Internal: the API is in attnkit::detail.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../version.hpp"
#include "storage.hpp"

#if ATTNKIT_HAS_AVX512
#include <immintrin.h>
#endif

namespace attnkit::detail {

/// Converts n floats into storage type S (round to nearest even).
template <storage_type S>
inline void from_float_row(const float* src, S* dst, std::int64_t n) {
  if constexpr (std::same_as<S, float>) {
    std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(float));
  } else {
    for (std::int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(src[i]);
  }
}

/// n floats at src[i * stride] into storage type S at dst[0, n).
template <storage_type S>
inline void from_float_strided(const float* src, std::int64_t stride, S* dst, std::int64_t n) {
  if (stride == 1) {
    from_float_row(src, dst, n);
  } else {
    for (std::int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(src[i * stride]);
  }
}

#if ATTNKIT_HAS_AVX512

/// Mask of the first n (0..16) lanes.
inline __mmask16 lane_mask(std::int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

/// Horizontal sum / max of 16 lanes. GCC 12's _mm512_reduce_*_ps and unmasked shuffles pass
/// _mm512_undefined_ps() through, which trips -Wuninitialized in every includer built with
/// -Wall (GCC bug 105593); the zero-masked ("maskz", all lanes on) forms do not.
inline float hsum16(__m512 x) {
  x = _mm512_add_ps(x, _mm512_maskz_shuffle_f32x4(0xFFFF, x, x, _MM_SHUFFLE(1, 0, 3, 2)));
  x = _mm512_add_ps(x, _mm512_maskz_shuffle_f32x4(0xFFFF, x, x, _MM_SHUFFLE(2, 3, 0, 1)));
  x = _mm512_add_ps(x, _mm512_maskz_shuffle_ps(0xFFFF, x, x, _MM_SHUFFLE(1, 0, 3, 2)));
  x = _mm512_add_ps(x, _mm512_maskz_shuffle_ps(0xFFFF, x, x, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_cvtss_f32(x);
}
/// max(a, b) per lane, NaN if either lane is NaN. (vmaxps alone returns its second operand
/// when either is NaN, so a NaN in a running max would be forgotten at the next step.)
inline __m512 max16(__m512 a, __m512 b) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q),
                              _mm512_maskz_max_ps(0xFFFF, a, b), a);
}
/// Horizontal max of 16 lanes, NaN if any lane is NaN.
inline float hmax16(__m512 x) {
  x = max16(x, _mm512_maskz_shuffle_f32x4(0xFFFF, x, x, _MM_SHUFFLE(1, 0, 3, 2)));
  x = max16(x, _mm512_maskz_shuffle_f32x4(0xFFFF, x, x, _MM_SHUFFLE(2, 3, 0, 1)));
  x = max16(x, _mm512_maskz_shuffle_ps(0xFFFF, x, x, _MM_SHUFFLE(1, 0, 3, 2)));
  x = max16(x, _mm512_maskz_shuffle_ps(0xFFFF, x, x, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_cvtss_f32(x);
}

/// Loads 16 elements of S as float (masked lanes read nothing and are zero).
template <storage_type S>
inline __m512 load16(const S* p, __mmask16 m) {
  if constexpr (std::same_as<S, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else if constexpr (std::same_as<S, bf16>) {
    // bf16 -> f32 is a 16-bit left shift of the bit pattern.
    const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
}
template <storage_type S>
inline __m512 load16(const S* p) {
  if constexpr (std::same_as<S, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::same_as<S, bf16>) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}

/// exp(x) for every lane, within ~2 ulp; exp(-inf) = 0 exactly, exp(NaN) = NaN, finite for
/// x <= 88.
inline __m512 exp16(__m512 x) {
  // x = n ln2 + r with |r| <= ln2/2 (Cody-Waite: ln2 split in a high part exact in float and
  // a low part, so r carries no error from n ln2), e^r by its degree-7 Taylor series
  // (truncation < 6e-9 relative) and the 2^n scaling by vscalefps, which underflows to 0.
  // The clamps keep a NaN: vmaxps / vminps return the second operand when either is NaN.
  x = _mm512_maskz_max_ps(0xFFFF, _mm512_set1_ps(-150.f), x);
  x = _mm512_maskz_min_ps(0xFFFF, _mm512_set1_ps(88.7f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

#endif  // ATTNKIT_HAS_AVX512

/// Converts n elements of storage type S to float.
template <storage_type S>
inline void to_float_row(const S* src, float* dst, std::int64_t n) {
  if constexpr (std::same_as<S, float>) {
    std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(float));
  } else {
#if ATTNKIT_HAS_AVX512
    for (std::int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = lane_mask(n - i);
      _mm512_mask_storeu_ps(dst + i, m, load16(src + i, m));
    }
#else
    for (std::int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
#endif
  }
}

/// s[i] = exp(s[i] - shift) in place; returns the sum. exp(-inf) is 0.
inline float exp_shift_sum(float* s, std::int64_t n, float shift) {
#if ATTNKIT_HAS_AVX512
  const __m512 vs = _mm512_set1_ps(shift);
  __m512 acc = _mm512_setzero_ps();
  for (std::int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lane_mask(n - i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + i), vs));
    _mm512_mask_storeu_ps(s + i, m, e);
    acc = _mm512_mask_add_ps(acc, m, acc, e);
  }
  return hsum16(acc);
#else
  float sum = 0.f;
  for (std::int64_t i = 0; i < n; ++i) {
    s[i] = std::exp(s[i] - shift);
    sum += s[i];
  }
  return sum;
#endif
}

/// max(a, b), NaN if either is NaN: a NaN score must reach the softmax state, whose max then
/// carries it to the row's output and LSE (std::max and a > b ? a : b drop it).
inline float max_nan(float a, float b) { return a != a || a > b ? a : b; }

/// max over s[0, n), NaN if any element is NaN; -inf for n == 0.
inline float row_max(const float* s, std::int64_t n) {
#if ATTNKIT_HAS_AVX512
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (std::int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = lane_mask(n - i);
    m = max16(m, _mm512_mask_loadu_ps(m, k, s + i));
  }
  return hmax16(m);
#else
  float m = -std::numeric_limits<float>::infinity();
  for (std::int64_t i = 0; i < n; ++i) m = max_nan(m, s[i]);
  return m;
#endif
}

/// x[i] *= a.
inline void scale_row(float* x, std::int64_t n, float a) {
  for (std::int64_t i = 0; i < n; ++i) x[i] *= a;
}

}  // namespace attnkit::detail
