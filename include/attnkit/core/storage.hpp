#pragma once
// Cache storage types (float, bf16, fp16) and scalar conversions. Compute is always float32.
#include <Eigen/Core>
#include <concepts>
#include <cstdint>
#include <cstring>

static_assert(EIGEN_VERSION_AT_LEAST(3, 4, 0), "attnkit needs Eigen >= 3.4");

namespace attnkit {

using bf16 = Eigen::bfloat16;  ///< bfloat16 storage (8-bit exponent, 8-bit significand).
using half = Eigen::half;      ///< IEEE half storage (5-bit exponent, 11-bit significand).

/// The element types a cache may store. Both 16-bit types are bit-compatible with uint16_t.
template <class S>
concept storage_type = std::same_as<S, float> || std::same_as<S, bf16> || std::same_as<S, half>;

/// The element types of the activations an attention call takes and writes (queries, outputs):
/// float, or bf16 as an engine running bf16 activations holds them.
template <class E>
concept activation_type = std::same_as<E, float> || std::same_as<E, bf16>;

/// x as float (exact for every storage type).
template <storage_type S>
inline float to_float(S x) {
  return static_cast<float>(x);
}
/// x rounded to S (round to nearest even).
template <storage_type S>
inline S from_float(float x) {
  return static_cast<S>(x);  // round to nearest even for bf16 and half
}

/// Unit roundoff of the storage type (half the machine epsilon): the relative error of one
/// rounding from float into S. Tests derive their tolerances from it.
template <storage_type S>
constexpr double unit_roundoff() {
  if constexpr (std::same_as<S, float>)
    return 0x1p-24;
  else if constexpr (std::same_as<S, bf16>)
    return 0x1p-8;
  else
    return 0x1p-11;
}

/// "f32", "bf16" or "f16".
template <storage_type S>
constexpr const char* storage_name() {
  if constexpr (std::same_as<S, float>)
    return "f32";
  else if constexpr (std::same_as<S, bf16>)
    return "bf16";
  else
    return "f16";
}

}  // namespace attnkit
