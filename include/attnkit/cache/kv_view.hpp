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
// (rows through a page table, the block-table layout of vLLM and FlashInfer) ends runs at page
// boundaries and is a second model of the same interface, leaving the kernels' math untouched.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>

#include "../core/error.hpp"
#include "../core/storage.hpp"
#include "../core/view.hpp"

namespace attnkit {

/// A sequence's page table: token t lives on page pages[t / page_size] at slot t % page_size.
/// page_size 0 (the default) means not paged: token t is slot t of one run.
struct page_table {
  std::span<const std::int32_t> pages{};  ///< the sequence's pages in token order
  std::int64_t page_size = 0;             ///< tokens per page

  bool paged() const { return page_size > 0; }  ///< true when page_size > 0.
  /// Physical page and slot of token t.
  std::int64_t page(std::int64_t t) const {
    return paged() ? pages[static_cast<std::size_t>(t / page_size)] : 0;
  }
  /// Slot of token t within its page (t itself when not paged).
  std::int64_t slot(std::int64_t t) const { return paged() ? t % page_size : t; }
  /// End of the run of tokens that starts at t (its page's end) in a sequence of `size` tokens.
  std::int64_t run_end(std::int64_t t, std::int64_t size) const {
    return paged() ? std::min(size, (t / page_size + 1) * page_size) : size;
  }

  /// Checks at an API boundary that `tokens` tokens fit the table and every page they use is
  /// one of the pool's `num_pages`: a paged view never reads outside its pool.
  void validate(const char* who, std::int64_t tokens, std::int64_t num_pages) const {
    using detail::require;
    require(page_size >= 0, who, ": page_size must be >= 0, got ", page_size);
    if (!paged()) return;
    require(num_pages >= 0, who, ": num_pages must be >= 0, got ", num_pages);
    const std::int64_t needed = tokens / page_size + (tokens % page_size != 0);
    require(static_cast<std::int64_t>(pages.size()) >= needed, who, ": the page table has ",
            pages.size(), " pages but ", tokens, " tokens of page_size ", page_size, " need ",
            needed);
    for (std::int64_t i = 0; i < needed; ++i) {
      const std::int64_t p = pages[static_cast<std::size_t>(i)];
      require(p >= 0 && p < num_pages, who, ": page table entry ", i, " is page ", p,
              ", outside the pool's [0, ", num_pages, ")");
    }
  }
};

/// Rows of one kind (keys or values) of every KV head: row t of head j starts at
/// data + page(t) * page_stride + j * head_stride + slot(t) * row_stride and holds `width`
/// contiguous elements (page(t) = 0 and slot(t) = t unless `table` is paged).
template <storage_type S>
struct row_set {
  const S* data = nullptr;       ///< head 0's first row (page 0's, when paged).
  std::int64_t head_stride = 0;  ///< elements from one KV head's rows to the next.
  std::int64_t row_stride = 0;   ///< elements from one token's row to the next (within a page).
  std::int64_t width = 0;        ///< elements per row (d_qk for keys, d_v for values).
  std::int64_t page_stride = 0;  ///< elements from one page to the next (paged views)
  page_table table{};            ///< token -> page and slot (default: not paged).
  /// Row t of KV head `head`: `width` contiguous elements.
  const S* row(std::int64_t head, std::int64_t t) const {
    if (!table.paged()) return data + head * head_stride + t * row_stride;
    return data + table.page(t) * page_stride + head * head_stride + table.slot(t) * row_stride;
  }
};

/// What the GQA-family and latent kernels read: per KV head, key rows [T, d_qk] and value rows [T,
/// d_v] (contiguous runs or pages), one position per token. A view never owns memory.
template <storage_type S>
class kv_view {
 public:
  using storage_type = S;  ///< the element type of the rows.
  kv_view() = default;     ///< an empty view (no tokens).
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

  /// Paged keys and values over a pool of num_pages pages: keys.data and values.data point at
  /// page 0, keys.page_stride and values.page_stride step from page to page, and `table` maps
  /// the sequence's tokens to pages (checked against the pool). For the vLLM layout
  /// K [num_pages, H_kv, page_size, d] the strides are (H_kv page_size d, page_size d, d).
  static kv_view paged(row_set<S> keys, row_set<S> values, std::int64_t kv_heads,
                       const page_table& table, std::int64_t num_pages,
                       std::span<const std::int64_t> positions) {
    detail::require(table.paged(), "kv_view::paged: page_size must be > 0, got ",
                    table.page_size);
    table.validate("kv_view::paged", static_cast<std::int64_t>(positions.size()), num_pages);
    keys.table = values.table = table;
    return kv_view(keys, values, kv_heads, positions);
  }
  /// Paged rows of an MLA latent cache: row slot i of page p at rows + p * page_stride +
  /// i * row_stride.
  static kv_view paged_latent(const S* rows, std::int64_t row_stride, std::int64_t page_stride,
                              std::int64_t latent_dim, std::int64_t key_width,
                              const page_table& table, std::int64_t num_pages,
                              std::span<const std::int64_t> positions) {
    detail::require(latent_dim > 0 && key_width >= latent_dim,
                    "kv_view::paged_latent: latent_dim=", latent_dim,
                    " must be in [1, key_width=", key_width, "]");
    return paged({rows, 0, row_stride, key_width, page_stride},
                 {rows, 0, row_stride, latent_dim, page_stride}, 1, table, num_pages, positions);
  }

  std::int64_t size() const { return static_cast<std::int64_t>(pos_.size()); }  ///< tokens T.
  std::int64_t kv_heads() const { return kv_heads_; }                           ///< KV heads H_kv.
  std::int64_t head_dim() const { return k_.width; }                            ///< key width d_qk.
  std::int64_t v_head_dim() const { return v_.width; }              ///< value width d_v.
  std::span<const std::int64_t> positions() const { return pos_; }  ///< the tokens' positions [T].
  const row_set<S>& keys() const { return k_; }                     ///< the key rows.
  const row_set<S>& values() const { return v_; }                   ///< the value rows.
  /// Values are the leading columns of the key rows (MLA): a kernel may widen a block once.
  bool values_in_keys() const {
    return v_.data == k_.data && v_.row_stride == k_.row_stride &&
           v_.page_stride == k_.page_stride && v_.width <= k_.width;
  }
  /// End of the run of uniformly strided rows that starts at token t.
  std::int64_t run_end(std::int64_t t) const { return k_.table.run_end(t, size()); }

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
/// What a shared-attention follower reads: per KV head, value rows [T, d_v] (contiguous runs or
/// pages), one position per token; no keys.
template <storage_type S>
class value_view {
 public:
  using storage_type = S;  ///< the element type of the rows.
  value_view() = default;  ///< an empty view (no tokens).
  /// Values of kv_heads heads over `positions.size()` tokens, addressed by `values`.
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
  /// Paged values over a pool of num_pages pages (see kv_view::paged).
  static value_view paged(row_set<S> values, std::int64_t kv_heads, const page_table& table,
                          std::int64_t num_pages, std::span<const std::int64_t> positions) {
    detail::require(table.paged(), "value_view::paged: page_size must be > 0, got ",
                    table.page_size);
    table.validate("value_view::paged", static_cast<std::int64_t>(positions.size()), num_pages);
    values.table = table;
    return value_view(values, kv_heads, positions);
  }

  std::int64_t size() const { return static_cast<std::int64_t>(pos_.size()); }  ///< tokens T.
  std::int64_t kv_heads() const { return kv_heads_; }                           ///< KV heads H_kv.
  std::int64_t v_head_dim() const { return v_.width; }              ///< value width d_v.
  std::span<const std::int64_t> positions() const { return pos_; }  ///< the tokens' positions [T].
  const row_set<S>& values() const { return v_; }                   ///< the value rows.
  /// End of the run of uniformly strided rows that starts at token t.
  std::int64_t run_end(std::int64_t t) const { return v_.table.run_end(t, size()); }

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
/// with v_scale. Paged (`pages` set): a_k ... b_v point at page 0's blocks of each factor, the
/// page_size tokens of a page one run per factor, and page p's at + p * page_stride.
template <storage_type S>
struct factor_view {
  using storage_type = S;                     ///< the element type of the factors.
  std::int64_t heads = 0;                     ///< heads H (the A factors' width)
  std::int64_t head_dim = 0;                  ///< key width d
  std::int64_t v_head_dim = 0;                ///< value width
  std::int64_t k_rank = 0;                    ///< R_K
  std::int64_t v_rank = 0;                    ///< R_V
  float k_scale = 1.f;                        ///< K = k_scale sum_r A_K[r, h] B_K[r]
  float v_scale = 1.f;                        ///< V = v_scale sum_r A_V[r, h] B_V[r]
  const S* a_k = nullptr;                     ///< A_K blocks [T][k_rank, heads]
  const S* b_k = nullptr;                     ///< B_K blocks [T][k_rank, head_dim], roped
  const S* a_v = nullptr;                     ///< A_V blocks [T][v_rank, heads]
  const S* b_v = nullptr;                     ///< B_V blocks [T][v_rank, v_head_dim]
  std::span<const std::int64_t> positions{};  ///< one absolute position per token [T]
  page_table pages{};                         ///< token -> page and slot (default: not paged)
  std::int64_t page_stride = 0;  ///< elements from one page to the next (paged views)
  std::int64_t num_pages = 0;    ///< the pool's pages (paged views)

  std::int64_t size() const { return static_cast<std::int64_t>(positions.size()); }  ///< tokens T.
  /// Offset of token t's block of `width` elements in a factor array.
  std::int64_t offset(std::int64_t t, std::int64_t width) const {
    return pages.paged() ? pages.page(t) * page_stride + pages.slot(t) * width : t * width;
  }
  /// token t's A_K [k_rank, heads].
  const S* a_k_row(std::int64_t t) const { return a_k + offset(t, k_rank * heads); }
  /// token t's B_K [k_rank, head_dim].
  const S* b_k_row(std::int64_t t) const { return b_k + offset(t, k_rank * head_dim); }
  /// token t's A_V [v_rank, heads].
  const S* a_v_row(std::int64_t t) const { return a_v + offset(t, v_rank * heads); }
  /// token t's B_V [v_rank, v_head_dim].
  const S* b_v_row(std::int64_t t) const { return b_v + offset(t, v_rank * v_head_dim); }
  /// End of the run of uniformly strided factor blocks that starts at token t.
  std::int64_t run_end(std::int64_t t) const { return pages.run_end(t, size()); }

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
    pages.validate(who, size(), num_pages);
  }
};

}  // namespace attnkit
