#pragma once
// Non-owning strided views over caller memory, in mdspan vocabulary (extent, stride,
// data_handle), with 64-bit extents and strides (in elements) and Eigen Map interop.
#include <Eigen/Core>
#include <array>
#include <utility>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "error.hpp"

namespace attnkit {

using index_t = std::int64_t;  ///< extents, strides and indices: 64-bit, so sizes never overflow.

/// A non-owning Rank-dimensional view of T over caller memory: extents and strides in
/// elements (64-bit), element (i0, ..., i_{Rank-1}) at data + sum_r i_r stride(r).
template <class T, std::size_t Rank>
class strided_view {
 public:
  using element_type = T;                               ///< T, const-qualified for read-only views
  using value_type = std::remove_cv_t<T>;               ///< T without const
  static constexpr std::size_t rank() { return Rank; }  ///< dimensions

  constexpr strided_view() = default;

  /// Row-major contiguous view: the last extent varies fastest.
  constexpr strided_view(T* data, const std::array<index_t, Rank>& extents)
      : data_(data), extents_(extents) {
    index_t s = 1;
    for (std::size_t r = Rank; r-- > 0;) {
      strides_[r] = s;
      s *= extents_[r];
    }
  }
  /// Any strides (in elements; 0 repeats a row, e.g. one query broadcast over heads).
  constexpr strided_view(T* data, const std::array<index_t, Rank>& extents,
                         const std::array<index_t, Rank>& strides)
      : data_(data), extents_(extents), strides_(strides) {}

  /// A view of T converts to a view of const T.
  template <class U>
  requires(std::is_same_v<const U, T> &&
           !std::is_same_v<U, T>) constexpr strided_view(const strided_view<U, Rank>& other)
      : data_(other.data_handle()), extents_(other.extents()), strides_(other.strides()) {}

  constexpr T* data_handle() const { return data_; }                     ///< element (0, ..., 0)
  constexpr index_t extent(std::size_t r) const { return extents_[r]; }  ///< size of dimension r
  constexpr index_t stride(std::size_t r) const { return strides_[r]; }  ///< step of dimension r
  constexpr const std::array<index_t, Rank>& extents() const { return extents_; }  ///< all sizes
  constexpr const std::array<index_t, Rank>& strides() const { return strides_; }  ///< all steps
  /// Elements viewed: the product of the extents.
  constexpr index_t size() const {
    index_t n = 1;
    for (auto e : extents_) n *= e;
    return n;
  }
  /// No data or no elements: what optional view arguments pass for "not given".
  constexpr bool empty() const { return data_ == nullptr || size() == 0; }

  /// Element (idx...), unchecked.
  template <class... I>
  requires(sizeof...(I) == Rank) constexpr T& operator()(I... idx) const {
    const std::array<index_t, Rank> i{static_cast<index_t>(idx)...};
    index_t off = 0;
    for (std::size_t r = 0; r < Rank; ++r) off += i[r] * strides_[r];
    return data_[off];
  }

  /// Pointer to element (i, 0, ..., 0): the start of a leading-index slice.
  constexpr T* slice_ptr(index_t i) const { return data_ + i * strides_[0]; }

 private:
  T* data_ = nullptr;
  std::array<index_t, Rank> extents_{};
  std::array<index_t, Rank> strides_{};
};

template <class T>
using matrix_view = strided_view<T, 2>;  ///< 2-D view [rows, cols].
template <class T>
using tensor3_view = strided_view<T, 3>;  ///< 3-D view, e.g. [tokens, heads, dim].

/// Row-major Eigen matrix type and the Map type a 2-D view converts to.
template <class T>
using row_matrix =
    Eigen::Matrix<std::remove_const_t<T>, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
/// Eigen Map of a 2-D view of T (const T: read-only), any strides.
template <class T>
using eigen_map =
    Eigen::Map<std::conditional_t<std::is_const_v<T>, const row_matrix<T>, row_matrix<T>>,
               Eigen::Unaligned, Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>>;

/// A 2-D view as an Eigen Map (no copy; any strides).
template <class T>
eigen_map<T> as_eigen(const matrix_view<T>& v) {
  return eigen_map<T>(v.data_handle(), v.extent(0), v.extent(1),
                      Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>(v.stride(0), v.stride(1)));
}

/// A 2-D view with unit column stride as the row-major Eigen Map that GEMMs use without copying
/// (an outer stride only); attnkit::invalid_argument naming `name` otherwise.
template <class T>
auto as_eigen(const matrix_view<T>& v, const char* name) {
  using map = Eigen::Map<std::conditional_t<std::is_const_v<T>, const row_matrix<T>, row_matrix<T>>,
                         Eigen::Unaligned, Eigen::OuterStride<>>;
  detail::require(v.stride(1) == 1 || v.extent(1) <= 1, name,
                  " must have unit column stride, got stride(1)=", v.stride(1));
  return map(v.data_handle(), v.extent(0), v.extent(1),
             Eigen::OuterStride<>(v.stride(0) > 1 ? v.stride(0) : 1));
}

/// A 2-D view of any direct-access Eigen matrix, Map or Block (no copy).
template <class Derived>
auto view_of(Eigen::PlainObjectBase<Derived>& m) {
  using T = typename Derived::Scalar;
  const bool row_major = Derived::IsRowMajor;
  return matrix_view<T>(m.data(), {m.rows(), m.cols()},
                        {row_major ? m.outerStride() : m.innerStride(),
                         row_major ? m.innerStride() : m.outerStride()});
}
/// A read-only 2-D view of a const Eigen matrix (no copy).
template <class Derived>
auto view_of(const Eigen::PlainObjectBase<Derived>& m) {
  using T = const typename Derived::Scalar;
  const bool row_major = Derived::IsRowMajor;
  return matrix_view<T>(m.data(), {m.rows(), m.cols()},
                        {row_major ? m.outerStride() : m.innerStride(),
                         row_major ? m.innerStride() : m.outerStride()});
}
/// A read-only 2-D view of a read-only Eigen Map or Block (no copy).
template <class Derived>
auto view_of(const Eigen::MapBase<Derived, Eigen::ReadOnlyAccessors>& m) {
  using T = std::remove_pointer_t<decltype(m.data())>;
  const bool row_major = Derived::IsRowMajor;
  return matrix_view<T>(m.data(), {m.rows(), m.cols()},
                        {row_major ? m.outerStride() : m.innerStride(),
                         row_major ? m.innerStride() : m.outerStride()});
}

namespace detail {
/// The bytes a view can touch, [first, last) as addresses; empty for an empty view.
template <class T, std::size_t Rank>
std::pair<std::uintptr_t, std::uintptr_t> byte_range(const strided_view<T, Rank>& v) {
  if (v.empty()) return {0, 0};
  index_t lo = 0, hi = 0;  // element offsets of the extreme elements
  for (std::size_t r = 0; r < Rank; ++r) {
    const index_t reach = (v.extent(r) - 1) * v.stride(r);
    (reach < 0 ? lo : hi) += reach;
  }
  const auto base = reinterpret_cast<std::uintptr_t>(v.data_handle());
  return {base + static_cast<std::uintptr_t>(lo * index_t(sizeof(T))),
          base + static_cast<std::uintptr_t>((hi + 1) * index_t(sizeof(T)))};
}

/// An output must not share memory with an input: the kernels read inputs after they have
/// started writing outputs, so overlap gives wrong answers (even exact aliasing is not safe).
/// Compares address ranges, so interleaved but disjoint views are rejected too; keep them apart.
template <class T, std::size_t R1, class U, std::size_t R2>
void require_disjoint(const strided_view<T, R1>& out, const strided_view<U, R2>& in,
                      const char* who, const char* out_name, const char* in_name) {
  const auto [a0, a1] = byte_range(out);
  const auto [b0, b1] = byte_range(in);
  require(a0 == a1 || b0 == b1 || a1 <= b0 || b1 <= a0, who, ": ", out_name, " overlaps the input ",
          in_name, " in memory; outputs must not alias inputs");
}

/// Checks a view's extents at an API boundary; `name` is the parameter's name.
/// `name` may come in two parts (who, parameter), joined by ": " only when the check fails.
template <class T, std::size_t Rank>
void require_extents(const strided_view<T, Rank>& v, const std::array<index_t, Rank>& expected,
                     const char* name, const char* param = nullptr) {
  bool shape_ok = true;
  for (std::size_t r = 0; r < Rank; ++r) shape_ok = shape_ok && v.extent(r) == expected[r];
  const bool null_data = v.data_handle() == nullptr && v.size() != 0;
  if (!shape_ok || null_data) {
    std::ostringstream os;
    os << name << (param ? ": " : "") << (param ? param : "");
    auto shape = [&](const auto& e) {
      os << "[";
      for (std::size_t r = 0; r < Rank; ++r) os << (r ? ", " : "") << e[r];
      os << "]";
    };
    std::array<index_t, Rank> got;
    for (std::size_t r = 0; r < Rank; ++r) got[r] = v.extent(r);
    if (!shape_ok) {
      os << " has shape ";
      shape(got);
      os << " but ";
      shape(expected);
      os << " was expected";
    } else {
      os << " is a null pointer with shape ";
      shape(got);
      os << " (" << v.size() << " elements)";
    }
    throw_invalid(os.str());
  }
}
}  // namespace detail

}  // namespace attnkit
