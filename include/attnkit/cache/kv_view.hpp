#pragma once
// KV views: what an attention kernel reads. Every cache exports one through view(); an engine
// can also build one directly over memory it owns. Two shapes cover every variant:
//
//   kv_view<S>      per KV head, rows of keys and rows of values (MHA/GQA/MQA; MLA's latent
//                   rows, where the values are the first d_c columns of the key rows),
//   factor_view<S>  per token, TPA's factor rows A_K, B_K, A_V, B_V,
//   value_view<S>   per KV head, rows of values only (shared-attention followers, which reuse
//                   another layer's attention weights and keep no keys),
//
// each with one int64 position per token. Kernels address rows only through row(head, t) and
// run_end(t): the rows [t, run_end(t)) of a head are one run at a fixed row stride, and no key
// block of the attention driver crosses a run end. A contiguous view is one run; a paged view
// (rows through a page table) ends runs at page boundaries and is a second model of the same
// interface, leaving the kernels' math untouched.
#include <cmath>
#include <cstdint>
#include <span>

#include "../core/error.hpp"
#include "../core/storage.hpp"
#include "../core/view.hpp"

namespace attnkit {

/// Rows of one kind (keys or values) of every KV head: row t of head j starts at
/// data + j * head_stride + t * row_stride and holds `width` contiguous elements.
template <storage_type S>
struct row_set {
  const S* data = nullptr;
  std::int64_t head_stride = 0;
  std::int64_t row_stride = 0;
  std::int64_t width = 0;
  const S* row(std::int64_t head, std::int64_t t) const {
    return data + head * head_stride + t * row_stride;
  }
};

template <storage_type S>
class kv_view {
 public:
  using storage_type = S;
  kv_view() = default;
  /// Keys and values of kv_heads heads over `positions.size()` tokens.
  kv_view(row_set<S> keys, row_set<S> values, std::int64_t kv_heads,
          std::span<const std::int64_t> positions)
      : k_(keys), v_(values), kv_heads_(kv_heads), pos_(positions) {
    using detail::require;
    require(kv_heads > 0, "kv_view: kv_heads must be > 0, got ", kv_heads);
    require(keys.width > 0 && values.width > 0, "kv_view: key and value widths must be > 0, got ",
            keys.width, " and ", values.width);
    require(size() == 0 || keys.data, "kv_view: the key data is a null pointer for ", size(),
            " tokens");
    require(size() == 0 || values.data, "kv_view: the value data is a null pointer for ", size(),
            " tokens");
  }
  /// Caller-owned K [T, H_kv, d_qk] and V [T, H_kv, d_v] (any token and head strides; the last
  /// dimension contiguous) with one position per token.
  kv_view(tensor3_view<const S> k, tensor3_view<const S> v, std::span<const std::int64_t> positions)
      : kv_view(checked_rows(k, v, positions, true), checked_rows(k, v, positions, false),
                k.extent(1), positions) {}

  /// Rows of an MLA latent cache (one row [c | k_rope] per token, row_stride apart): keys are
  /// the whole row (key_width), values the first latent_dim elements of the same row.
  static kv_view latent(const S* rows, std::int64_t row_stride, std::int64_t latent_dim,
                        std::int64_t key_width, std::span<const std::int64_t> positions) {
    detail::require(latent_dim > 0 && key_width >= latent_dim,
                    "kv_view::latent: latent_dim=", latent_dim,
                    " must be in [1, key_width=", key_width, "]");
    return kv_view({rows, 0, row_stride, key_width}, {rows, 0, row_stride, latent_dim}, 1,
                   positions);
  }

  std::int64_t size() const { return static_cast<std::int64_t>(pos_.size()); }
  std::int64_t kv_heads() const { return kv_heads_; }
  std::int64_t head_dim() const { return k_.width; }
  std::int64_t v_head_dim() const { return v_.width; }
  std::span<const std::int64_t> positions() const { return pos_; }
  const row_set<S>& keys() const { return k_; }
  const row_set<S>& values() const { return v_; }
  /// Values are the leading columns of the key rows (MLA): a kernel may widen a block once.
  bool values_in_keys() const {
    return v_.data == k_.data && v_.row_stride == k_.row_stride && v_.width <= k_.width;
  }
  /// End of the run of uniformly strided rows that starts at token t.
  std::int64_t run_end(std::int64_t /*t*/) const { return size(); }

 private:
  static row_set<S> checked_rows(const tensor3_view<const S>& k, const tensor3_view<const S>& v,
                                 std::span<const std::int64_t> positions, bool keys) {
    using detail::require;
    const std::int64_t tk = k.extent(0);
    require(static_cast<std::int64_t>(positions.size()) == tk, "kv_view: positions has ",
            positions.size(), " entries but k has Tk=", tk, " tokens");
    detail::require_extents(v, {tk, k.extent(1), v.extent(2)}, "kv_view: v");
    require(k.stride(2) == 1 && v.stride(2) == 1,
            "kv_view: k and v need a contiguous last dimension, got strides ", k.stride(2), " and ",
            v.stride(2));
    const auto& x = keys ? k : v;
    return {x.data_handle(), x.stride(1), x.stride(0), x.extent(2)};
  }

  row_set<S> k_, v_;
  std::int64_t kv_heads_ = 0;
  std::span<const std::int64_t> pos_;
};

/// Values only: row t of KV head j at values.row(j, t) ([v_head_dim] elements), one position per
/// token. What a shared-attention follower reads (kernels/shared.hpp).
template <storage_type S>
class value_view {
 public:
  using storage_type = S;
  value_view() = default;
  value_view(row_set<S> values, std::int64_t kv_heads, std::span<const std::int64_t> positions)
      : v_(values), kv_heads_(kv_heads), pos_(positions) {
    using detail::require;
    require(kv_heads > 0, "value_view: kv_heads must be > 0, got ", kv_heads);
    require(values.width > 0, "value_view: v_head_dim must be > 0, got ", values.width);
    require(size() == 0 || values.data, "value_view: the value data is a null pointer for ",
            size(), " tokens");
  }
  /// Caller-owned V [T, H_kv, d_v] (any token and head strides, last dimension contiguous).
  value_view(tensor3_view<const S> v, std::span<const std::int64_t> positions)
      : value_view(checked_rows(v, positions), v.extent(1), positions) {}

  std::int64_t size() const { return static_cast<std::int64_t>(pos_.size()); }
  std::int64_t kv_heads() const { return kv_heads_; }
  std::int64_t v_head_dim() const { return v_.width; }
  std::span<const std::int64_t> positions() const { return pos_; }
  const row_set<S>& values() const { return v_; }
  std::int64_t run_end(std::int64_t /*t*/) const { return size(); }

 private:
  static row_set<S> checked_rows(const tensor3_view<const S>& v,
                                 std::span<const std::int64_t> positions) {
    detail::require(static_cast<std::int64_t>(positions.size()) == v.extent(0),
                    "value_view: positions has ", positions.size(), " entries but v has T=",
                    v.extent(0), " tokens");
    detail::require(v.stride(2) == 1, "value_view: v needs a contiguous last dimension, got stride ",
                    v.stride(2));
    return {v.data_handle(), v.stride(1), v.stride(0), v.extent(2)};
  }

  row_set<S> v_;
  std::int64_t kv_heads_ = 0;
  std::span<const std::int64_t> pos_;
};

/// TPA's factors for `positions.size()` tokens, each token's block contiguous:
/// A_K [k_rank, heads], B_K [k_rank, head_dim] (roped), A_V [v_rank, heads], B_V [v_rank,
/// v_head_dim] at a_k + t * k_rank * heads etc. K[h] = k_scale sum_r A_K[r, h] B_K[r], V likewise
/// with v_scale.
template <storage_type S>
struct factor_view {
  using storage_type = S;
  std::int64_t heads = 0, head_dim = 0, v_head_dim = 0, k_rank = 0, v_rank = 0;
  float k_scale = 1.f, v_scale = 1.f;
  const S *a_k = nullptr, *b_k = nullptr, *a_v = nullptr, *b_v = nullptr;
  std::span<const std::int64_t> positions{};

  std::int64_t size() const { return static_cast<std::int64_t>(positions.size()); }
  const S* a_k_row(std::int64_t t) const { return a_k + t * k_rank * heads; }
  const S* b_k_row(std::int64_t t) const { return b_k + t * k_rank * head_dim; }
  const S* a_v_row(std::int64_t t) const { return a_v + t * v_rank * heads; }
  const S* b_v_row(std::int64_t t) const { return b_v + t * v_rank * v_head_dim; }
  std::int64_t run_end(std::int64_t /*t*/) const { return size(); }

  /// Checks the shape at an API boundary.
  void validate(const char* who) const {
    using detail::require;
    require(heads > 0 && head_dim > 0 && v_head_dim > 0 && k_rank > 0 && v_rank > 0, who,
            ": factor view needs positive heads, head_dim, v_head_dim, k_rank, v_rank; got ", heads,
            ", ", head_dim, ", ", v_head_dim, ", ", k_rank, ", ", v_rank);
    const char* null_name = !a_k ? "a_k" : !b_k ? "b_k" : !a_v ? "a_v" : !b_v ? "b_v" : nullptr;
    require(size() == 0 || !null_name, who, ": factor ", null_name ? null_name : "",
            " is a null pointer for ", size(), " tokens");
    require(std::isfinite(k_scale) && std::isfinite(v_scale), who,
            ": k_scale and v_scale must be finite, got ", k_scale, " and ", v_scale);
  }
};

}  // namespace attnkit
