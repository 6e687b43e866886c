#pragma once
// y = x W^T (+ b) for nn.Linear-layout weights, split over output features across the
// executor's workers (so it parallelises both decode, T = 1, and prefill).
#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <span>

#include "error.hpp"
#include "executor.hpp"
#include "view.hpp"

namespace attnkit {

namespace detail {

template <class T>
using row_map =
    Eigen::Map<std::conditional_t<std::is_const_v<T>, const row_matrix<T>, row_matrix<T>>,
               Eigen::Unaligned, Eigen::OuterStride<>>;

/// y[T, N] = x[T, K] w[N, K]^T + b[N]; w rows are split across workers in blocks of 64.
template <class Exec>
void linear(const row_map<const float>& x, const row_map<const float>& w, std::span<const float> b,
            row_map<float> y, Exec& exec) {
  const std::int64_t n = w.rows(), block = 64, blocks = (n + block - 1) / block;
  const std::int64_t chunks = std::min<std::int64_t>(blocks, 4 * concurrency_of(exec));
  exec.parallel_for(chunks, [&](std::int64_t c) {
    const std::int64_t b0 = blocks * c / chunks * block,
                       b1 = std::min(n, blocks * (c + 1) / chunks * block);
    if (b1 <= b0) return;
    y.middleCols(b0, b1 - b0).noalias() = x * w.middleRows(b0, b1 - b0).transpose();
    if (!b.empty())
      y.middleCols(b0, b1 - b0).rowwise() +=
          Eigen::Map<const Eigen::RowVectorXf>(b.data() + b0, b1 - b0);
  });
}

}  // namespace detail
}  // namespace attnkit
