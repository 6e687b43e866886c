#pragma once
// The linear algebra of the approximate conversions: second moments of activations and their
// principal axes.
//   activation_gram: G = sum_t a_t a_t^T over calibration tokens for a_t = W x_t + b. The
//     activations are made in float chunks (one GEMM per chunk, split over the executor) and each
//     worker accumulates a float Gram of at most `chunk / workers` tokens before it is added into
//     a double accumulator, so rounding grows with the chunk, not with N (32k tokens: ~1e-6
//     relative instead of ~1e-4 for one float sum).
//   principal_axes: the leading eigenvectors of a symmetric positive semi-definite G, columns
//     sorted by descending eigenvalue, as TransMLA's PCA (uncentered, damped by a fraction of the
//     mean diagonal, which shifts the eigenvalues and leaves the eigenvectors). Eigen's double
//     QR-iteration solver spends ~9 s on n = 2048 here (the rotations it accumulates into the
//     n x n eigenvector matrix), so the axes come from Eigen's float solver (~2.6 s) and are then
//     refined in double by one Rayleigh-Ritz step: orthonormalise the float axes (Householder QR,
//     double) and diagonalise G projected on them. The result is orthonormal to double round-off,
//     so keeping every axis is exact, and the kept subspace is the float solver's, whose captured
//     variance differs from the optimum by O(u) relative.
#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/linear.hpp"
#include "../core/view.hpp"

namespace attnkit::convert {

using dmatrix =
    Eigen::MatrixXd;  ///< double matrix of the conversions' linear algebra (column-major).
using dvector = Eigen::VectorXd;  ///< double vector of the conversions' linear algebra.

namespace detail {

/// Conversion data must be finite: a NaN or inf in the calibration tokens poisons the Gram
/// matrix, which the eigensolver then fails on (or worse, turns into a finite checkpoint that
/// is silently wrong). Names the first bad element.
inline void require_finite(matrix_view<const float> x, const char* who, const char* name) {
  for (std::int64_t t = 0; t < x.extent(0); ++t)
    for (std::int64_t c = 0; c < x.extent(1); ++c)
      ::attnkit::detail::require(std::isfinite(x(t, c)), who, ": ", name, " token ", t, " column ",
                                 c, " is ", x(t, c), "; conversion data must be finite");
}

/// Calls visit(a) for consecutive chunks a [rows, n] of the activations a_t = w x_t + bias of the
/// rows x_t of x (w [n, D], nn.Linear layout), made by one GEMM per chunk split over `exec`.
template <class Exec, class Visit>
void for_each_activation_chunk(matrix_view<const float> x, const row_matrix<float>& w,
                               std::span<const float> bias, Exec& exec, Visit&& visit,
                               std::int64_t chunk = 2048) {
  const std::int64_t n = w.rows(), tokens = x.extent(0);
  const auto xm = ::attnkit::as_eigen(x, "calibration x");
  const ::attnkit::detail::row_map<const float> wm(w.data(), w.rows(), w.cols(),
                                                   Eigen::OuterStride<>(w.cols()));
  row_matrix<float> a(std::min(chunk, tokens), n);
  for (std::int64_t t0 = 0; t0 < tokens; t0 += chunk) {
    const std::int64_t rows = std::min(chunk, tokens - t0);
    const ::attnkit::detail::row_map<const float> xc(
        xm.data() + t0 * xm.outerStride(), rows, xm.cols(), Eigen::OuterStride<>(xm.outerStride()));
    ::attnkit::detail::row_map<float> am(a.data(), rows, n, Eigen::OuterStride<>(n));
    ::attnkit::detail::linear(xc, wm, bias, am, exec);
    visit(std::as_const(am));
  }
}

/// sum_t a_t a_t^T over the activations a_t = w x_t + bias, in double. Each worker takes its own
/// tokens of every chunk: one GEMM for its activations, then a rank update of its float Gram
/// while they are in cache, added into the double sum after the chunk.
template <class Exec>
dmatrix activation_gram(matrix_view<const float> x, const row_matrix<float>& w,
                        std::span<const float> bias, Exec& exec, std::int64_t chunk = 4096) {
  const std::int64_t n = w.rows(), tokens = x.extent(0);
  const int workers = concurrency_of(exec);
  const auto xm = ::attnkit::as_eigen(x, "calibration x");
  dmatrix gram = dmatrix::Zero(n, n);
  std::vector<Eigen::MatrixXf> partial(static_cast<std::size_t>(workers), Eigen::MatrixXf(n, n));
  std::vector<row_matrix<float>> act(static_cast<std::size_t>(workers));
  for (std::int64_t t0 = 0; t0 < tokens; t0 += chunk) {
    const std::int64_t rows = std::min(chunk, tokens - t0);
    exec.parallel_for(workers, [&](std::int64_t k) {
      const std::int64_t r0 = t0 + rows * k / workers, r1 = t0 + rows * (k + 1) / workers;
      auto& p = partial[static_cast<std::size_t>(k)];
      auto& a = act[static_cast<std::size_t>(k)];
      p.setZero();
      if (r1 <= r0) return;
      a.noalias() = xm.middleRows(r0, r1 - r0) * w.transpose();
      if (!bias.empty()) a.rowwise() += Eigen::Map<const Eigen::RowVectorXf>(bias.data(), n);
      p.selfadjointView<Eigen::Lower>().rankUpdate(a.transpose());
    });
    for (auto& p : partial) gram.triangularView<Eigen::Lower>() += p.cast<double>();
  }
  gram.triangularView<Eigen::StrictlyUpper>() = gram.transpose();
  return gram;
}

/// a b with the rows of a split over the executor (Eigen's own GEMM runs on one thread here).
template <class Exec, class A, class B>
dmatrix product(const A& a, const B& b, Exec& exec) {
  dmatrix c(a.rows(), b.cols());
  const std::int64_t n = a.rows(), parts = std::min<std::int64_t>(n, concurrency_of(exec));
  exec.parallel_for(parts, [&](std::int64_t k) {
    const std::int64_t r0 = n * k / parts, r1 = n * (k + 1) / parts;
    c.middleRows(r0, r1 - r0).noalias() = a.middleRows(r0, r1 - r0) * b;
  });
  return c;
}

}  // namespace detail

/// The `rank` leading principal axes of a symmetric PSD matrix (columns, descending eigenvalue),
/// damped as TransMLA does: g + damping * mean(diag g) * I (the damping moves eigenvalues only).
/// g may be any Eigen expression (a product is evaluated once). A template, as Eigen's own
/// functions are, so that only the translation units that call it compile the eigensolvers.
template <class Derived>
dmatrix principal_axes(const Eigen::MatrixBase<Derived>& g, std::int64_t rank,
                       double damping = 0.01) {
  dmatrix damped = g;
  const std::int64_t n = damped.rows();
  ::attnkit::detail::require(damped.cols() == n && rank >= 0 && rank <= n,
                             "principal_axes: rank must be in [0, ", n, "], got ", rank);
  if (rank == 0) return dmatrix(n, 0);
  damped.diagonal().array() += damping * damped.diagonal().mean();
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXf> coarse(damped.cast<float>());
  ::attnkit::detail::require(coarse.info() == Eigen::Success,
                             "principal_axes: the eigensolver did not converge");
  // Eigen sorts ascending: the last `rank` columns, reversed, are the leading axes.
  const dmatrix start = coarse.eigenvectors().rightCols(rank).rowwise().reverse().cast<double>();
  const dmatrix basis =
      Eigen::HouseholderQR<dmatrix>(start).householderQ() * dmatrix::Identity(n, rank);
  Eigen::SelfAdjointEigenSolver<dmatrix> fine(basis.transpose() * damped * basis);
  return basis * fine.eigenvectors().rowwise().reverse();
}

}  // namespace attnkit::convert
