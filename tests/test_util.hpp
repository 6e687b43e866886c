#pragma once
// Shared test helpers: random data, float <-> double matrices, and storage round-trips.
#include <attnkit/attention.hpp>
#include <attnkit/reference/attention.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "catch_compat.hpp"

namespace attnkit::test {

using dmat = reference::matrix;
using fmat = row_matrix<float>;

/// float's unit roundoff, the unit of the derived tolerances.
inline constexpr double u = 0x1p-24;

/// Entries with mean 0 and standard deviation sigma: the sum of the four 16-bit uniforms of one
/// 64-bit draw (Irwin-Hall, close to normal and bounded by 3.46 sigma), several times cheaper than
/// std::normal_distribution, which dominated the long-context tests' time.
inline fmat random_matrix(std::mt19937_64& rng, std::int64_t rows, std::int64_t cols,
                          float sigma = 1.f) {
  // Each uniform has mean 32767.5 and variance (2^32 - 1) / 12; four of them sum to variance (2^32
  // - 1) / 3.
  const float a = sigma / std::sqrt(static_cast<float>((4294967296.0 - 1.0) / 3.0));
  fmat m(rows, cols);
  for (std::int64_t i = 0; i < m.size(); ++i) {
    const std::uint64_t r = rng();
    const auto sum =
        static_cast<float>((r & 0xFFFF) + (r >> 16 & 0xFFFF) + (r >> 32 & 0xFFFF) + (r >> 48));
    m.data()[i] = (sum - 131070.f) * a;
  }
  return m;
}
inline dmat to_double(const fmat& m) { return m.cast<double>(); }

/// How many times a layer's tolerance takes the 16-bit rounding term u_S (1 + 2 A) (A: scale
/// max|q| max|k|): once for the cache's rounded K and V, once more for bf16 products on a bf16
/// cache (product_math::bf16), whose rounded queries move each score by at most u A and whose
/// rounded probabilities add u, as the rounded keys and values do.
template <storage_type S>
double rounding_terms(product_math products) {
  if (std::same_as<S, float>) return 0;
  return std::same_as<S, bf16> && products == product_math::bf16 ? 2 : 1;
}

/// A cache's rows as double [T, heads * width]: row (t, j * width + c) = rows.row(j, t)[c].
template <storage_type S>
dmat cached_rows(const row_set<S>& rows, std::int64_t t, std::int64_t heads, std::int64_t width) {
  dmat m(t, heads * width);
  for (std::int64_t i = 0; i < t; ++i)
    for (std::int64_t j = 0; j < heads; ++j)
      for (std::int64_t c = 0; c < width; ++c)
        m(i, j * width + c) = static_cast<float>(rows.row(j, i)[c]);
  return m;
}

/// The largest |stored - exact| / (u_S |exact| + 64 u max|exact|): at most 1 where every stored
/// element is the exact one rounded once to S after a float computation's own error (well under
/// 64 u of the largest element for the layers' projections, norms and RoPE). A tenfold loss of
/// the storage's precision breaks it.
template <storage_type S>
double worst_rounding(const dmat& stored, const dmat& exact) {
  const double slack = 64 * u * exact.cwiseAbs().maxCoeff();
  return ((stored - exact).cwiseAbs().array() /
          (unit_roundoff<S>() * exact.cwiseAbs().array() + slack))
      .maxCoeff();
}

/// Rounds every element through storage type S (what a cache of S stores).
template <storage_type S>
fmat round_trip(const fmat& m) {
  fmat r(m.rows(), m.cols());
  for (std::int64_t i = 0; i < m.size(); ++i)
    r.data()[i] = static_cast<float>(static_cast<S>(m.data()[i]));
  return r;
}

/// Increasing positions starting at `offset` with random gaps in [1, max_gap].
inline std::vector<std::int64_t> gapped_positions(std::mt19937_64& rng, std::int64_t n,
                                                  std::int64_t offset, std::int64_t max_gap) {
  std::uniform_int_distribution<std::int64_t> gap(1, max_gap);
  std::vector<std::int64_t> p(static_cast<std::size_t>(n));
  std::int64_t cur = offset;
  for (auto& x : p) x = (cur += gap(rng));
  return p;
}

inline double max_abs_diff(const dmat& a, const dmat& b) { return (a - b).cwiseAbs().maxCoeff(); }

/// Checks got against the FMA path's answer want element for element (NaN where it has NaN,
/// the same infinity where it has one, else within 1e-5 relative, the order of the sums being
/// the one difference); returns how many of want's elements are not finite.
inline std::int64_t check_as_fmas(const fmat& got, const fmat& want) {
  std::int64_t non_finite = 0;
  for (std::int64_t i = 0; i < want.size(); ++i) {
    const float w = want.data()[i], g = got.data()[i];
    if (std::isnan(w)) {
      CHECK(std::isnan(g));
    } else if (std::isinf(w)) {
      CHECK(g == w);
    } else {
      CHECK(std::abs(g - w) <= 1e-5f * (1 + std::abs(w)));
    }
    non_finite += !std::isfinite(w);
  }
  return non_finite;
}

/// Largest norm of a width-wide segment (one head) of any row.
inline double max_segment_norm(const dmat& m, std::int64_t width) {
  double n = 0;
  for (std::int64_t i = 0; i < m.rows(); ++i)
    for (std::int64_t h = 0; h < m.cols() / width; ++h)
      n = std::max(n, m.row(i).segment(h * width, width).norm());
  return n;
}

template <class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const attnkit::invalid_argument& e) {
    return e.what();
  }
  return "<no attnkit::invalid_argument thrown>";
}

/// Checks that f throws attnkit::invalid_argument whose message contains every fragment.
#define ATTNKIT_CHECK_INVALID(expr, ...)                                         \
  do {                                                                           \
    const std::string msg_ = ::attnkit::test::message_of([&] { (void)(expr); }); \
    for (const char* frag_ : {__VA_ARGS__}) {                                    \
      INFO("message: " << msg_ << "\nexpected fragment: " << frag_);             \
      CHECK(msg_.find(frag_) != std::string::npos);                              \
    }                                                                            \
  } while (0)

}  // namespace attnkit::test
