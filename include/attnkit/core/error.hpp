#pragma once
// attnkit::invalid_argument and the argument-checking helpers used at API boundaries.
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

}  // namespace detail
}  // namespace attnkit
