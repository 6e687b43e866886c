#pragma once
// attnkit::invalid_argument and the argument-checking helpers used at API boundaries.
#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

namespace attnkit {

/// Thrown for invalid shapes, ranks, positions, capacities and options. The message names the
/// parameter and the offending values.
class invalid_argument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

template <class... Parts>
[[noreturn]] void throw_invalid(const Parts&... parts) {
  std::ostringstream os;
  os << "attnkit: ";
  (os << ... << parts);
  throw invalid_argument(os.str());
}

/// Checks `ok`; the message parts are only formatted when the check fails.
template <class... Parts>
void require(bool ok, const Parts&... parts) {
  if (!ok) throw_invalid(parts...);
}

/// a * b for non-negative sizes, or an attnkit::invalid_argument naming `what` when the product
/// does not fit in int64 (a capacity of 2^61 tokens times 8 heads must not wrap to a small size).
inline std::int64_t checked_mul(std::int64_t a, std::int64_t b, const char* what) {
  require(a >= 0 && b >= 0, what, ": negative size factor ", a, " x ", b);
  require(a == 0 || b <= std::numeric_limits<std::int64_t>::max() / a, what, ": size ", a, " x ", b,
          " overflows int64");
  return a * b;
}

}  // namespace detail
}  // namespace attnkit
