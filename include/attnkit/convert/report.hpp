#pragma once
// What a conversion step did and what it cost.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

namespace attnkit::convert {

/// One step of a conversion: what it did, the cache it left and the error it cost.
struct conversion_report {
  std::string step;                     ///< e.g. "exact GQA -> MLA (grouped rope)"
  std::int64_t kv_elements_before = 0;  ///< KV-cache elements per token per layer
  std::int64_t kv_elements_after = 0;   ///< the same after the step
  /// Relative Frobenius error ||y_new - y_old|| / ||y_old|| of the layer output on held-out
  /// inputs; NaN when no held-out inputs were given.
  double rel_error = std::numeric_limits<double>::quiet_NaN();
  double seconds = 0;  ///< wall time of the step (not of its error measurement)
};

}  // namespace attnkit::convert
