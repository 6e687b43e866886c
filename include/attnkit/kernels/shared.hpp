#pragma once
// Shared attention (Liao & Vargas, arXiv 2407.12866): a follower layer reuses the attention
// weights P = softmax(Q K^T scale + mask) of a donor layer and keeps only values:
//   out[t, h] = sum_s P_donor[t, h, s] V_follower[s, h / g],   g = H / H_kv (follower).
// The donor hands its weights on in one of two forms, and a follower reads either:
//   materialised  the donor's call writes P [Tq, H, Tk] (attention_options::weights); the
//                 follower computes P V (attend_shared(weights, values, out)). H x Tk floats a
//                 decode step; Tq x H x Tk for a prefill, which is why there is a second form:
//   flash         the donor's call writes only its LSE [Tq, H] (attention_options::lse); the
//                 follower recomputes the donor's scores block by block from the donor's roped
//                 queries and cache (a score source: gqa_scores, latent_scores, factor_scores)
//                 and weighs them by exp(s - lse), never holding the Tq x Tk matrix
//                 (attend_shared(donor, q_positions, donor_lse, values, out, donor_options)).
// Both are variants of the attention driver (kernels/driver.hpp): the materialised follower's
// block products read P instead of computing scores (the driver's given-weights mode); the
// flash follower's are the donor's own score products with the follower's value products (the
// given-LSE mode). Values are accumulated by the GQA family's micro-kernels and GEMMs, per KV
// head of the follower for all of its query heads, so V streams once per KV head.
#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <span>
#include <type_traits>

#include "../cache/kv_cache.hpp"
#include "../cache/kv_view.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/options.hpp"
#include "../core/view.hpp"
#include "../core/workspace.hpp"
#include "../simd/targets.hpp"
#include "driver.hpp"
#include "gqa.hpp"
#include "mla.hpp"
#include "tpa.hpp"

namespace attnkit {

template <class T>
struct is_value_view : std::false_type {};
template <storage_type S>
struct is_value_view<value_view<S>> : std::true_type {};

/// What a follower reads: a value_view, or a cache whose view() is one (value_cache).
template <class X>
concept value_source = is_value_view<X>::value ||
    (kv_cache<X>&& requires(const X& x) { requires is_value_view<decltype(x.view())>::value; });

/// A donor's scores, to be recomputed by a flash-form follower: what the donor's own call read.
/// GQA family: roped queries q [Tq, H, d_qk] and the donor's kv_view.
template <storage_type S>
struct gqa_scores {
  tensor3_view<const float> q;  ///< [Tq, H, d_qk], roped
  kv_view<S> kv;                ///< the donor's keys and values
};
/// Absorbed MLA: q_latent [Tq, H, d_c], roped q_rope [Tq, H, d_R] and the latent view.
template <storage_type S>
struct latent_scores {
  tensor3_view<const float> q_latent;  ///< [Tq, H, d_c]
  tensor3_view<const float> q_rope;    ///< [Tq, H, d_R], roped
  kv_view<S> kv;                       ///< the donor's latent rows
};
/// TPA: query factors a_q [Tq, R_Q, H], b_q [Tq, R_Q, d] and the donor's factor_view.
template <storage_type S>
struct factor_scores {
  tensor3_view<const float> a_q;  ///< [Tq, R_Q, H]
  tensor3_view<const float> b_q;  ///< [Tq, R_Q, d], roped
  factor_view<S> kv;              ///< the donor's factors
};

namespace detail {

template <class X>
auto value_view_of(const X& x) {
  if constexpr (is_value_view<X>::value)
    return x;
  else
    return x.view();
}

/// acc[rows][d_v] += P[rows][keys] V[keys][d_v] for a follower's KV heads: the streaming
/// micro-kernel on row tiles (V read in its storage type; bf16 in the target's paired column
/// order, undone by finish), otherwise a GEMM on V widened to float (the vector target's own
/// GEMM for any tile layout, Eigen on the scalar target). On a bf16 value cache the GEMM tiles
/// run on AMX where the CPU has it (bf16_amx_available, d_v whole 16-column tiles, at least
/// amx_min_rows rows of a KV head): V paired by key,
/// P's rows rounded to bf16 (product_math::bf16) or, with f32 products over at least split_min_keys
/// keys, as three exact bf16 parts, as the GQA family's tiles take them
/// (gqa_products::split_parts). Elsewhere, with bf16 products where vdpbf16ps runs
/// (bf16_dot_available), the probabilities are rounded to bf16 and multiplied by the stored values
/// as they are: the streaming P V on pairs of value rows (stream_pair_pv, d_v whole 32-column
/// groups), or otherwise the GEMM on P^T and V paired by key (gemm_pairs).
template <storage_type S>
class value_accumulator {
 public:
  /// A block of V widened to float (or its key pairs), P's key pairs for `rows` rows (or their
  /// bf16 rows per part for the AMX tiles), and add_gathered's rows.
  static std::size_t scratch_floats(std::int64_t block, std::int64_t dv, std::int64_t rows) {
    return static_cast<std::size_t>(gathered_offset(block, dv, rows) + block * round16(rows) +
                                    rows * dv);
  }
  /// bf16 parts of P per AMX tile product: 0 where P V does not run on AMX tiles, 1 for bf16
  /// products, 3 for f32 products (splits: f32 products may take bf16 parts).
  static int amx_parts(const value_view<S>& v, bool streaming, bool bf16_products, bool splits) {
    if (!std::same_as<S, bf16> || streaming || !bf16_amx_available() || v.v_head_dim() % 16 != 0)
      return 0;
    if (bf16_products) return 1;
    return splits && v.size() >= split_min_keys ? 3 : 0;
  }
  /// A tile product costs as much for one row as for 16: fewer rows stay on FMAs.
  static constexpr std::int64_t amx_min_rows = 8;
  static constexpr std::int64_t split_min_keys = gqa_products<S>::split_min_keys;

  /// Over `rows` rows and blocks of `block` keys; f: scratch_floats(block, d_v, rows).
  value_accumulator(const value_view<S>& v, bool streaming, bool bf16_products, bool splits,
                    std::int64_t block, std::int64_t rows, float* f)
      : v_(v),
        streaming_(streaming),
        vf_(f),
        pp_(reinterpret_cast<std::uint32_t*>(f + value_floats(block, v.v_head_dim()))),
        gp_(f + gathered_offset(block, v.v_head_dim(), rows)),
        ga_(gp_ + block * round16(rows)),
        parts_(amx_parts(v, streaming, bf16_products, splits)),
        pairs_(parts_ > 0 ? pair_math::amx : pairs_of(streaming, bf16_products, v.v_head_dim())) {}

  /// Whether add_gathered runs (the GEMM tiles: a streaming row tile takes any rows in place).
  bool gathers() const { return !streaming_; }
  /// add for the rows r_i = (i / width) * stride + first + i % width, i < n (whole runs of
  /// width), of the tile p against KV head j, where they are not consecutive (a flash follower
  /// whose value heads change within a token's rows): their probabilities and accumulators
  /// gathered into a column tile and a block of rows, so that the GEMM tiles (AMX's among them)
  /// take them all at once, and the accumulators scattered back.
  void add_gathered(std::int64_t j, std::int64_t b0, std::int64_t nb, const score_tile& p,
                    std::int64_t first, std::int64_t width, std::int64_t stride, std::int64_t n,
                    float* acc) {
    const std::int64_t dv = v_.v_head_dim(), n16 = round16(n);
    // Each of the n / width runs: rows [a * stride + first, + width), gathered rows a * width on.
    auto runs = [&](auto&& f) {
      for (std::int64_t a = 0, i = 0; i < n; ++a, i += width) f(a * stride + first, i);
    };
    runs([&](std::int64_t r, std::int64_t i) {  // gp_ [nb][n16]: the rows' probabilities
      for (std::int64_t t = 0; t < nb; ++t)
        for (std::int64_t c = 0; c < width; ++c)
          gp_[t * n16 + i + c] = p.data[(r + c) * p.row_stride + t * p.key_stride];
    });
    runs([&](std::int64_t r, std::int64_t i) {  // ga_ [n][d_v]: their accumulators
      std::copy_n(acc + r * dv, width * dv, ga_ + i * dv);
    });
    add(j, b0, nb, score_tile{gp_, 1, n16}, 0, n, ga_);
    runs([&](std::int64_t r, std::int64_t i) {
      std::copy_n(ga_ + i * dv, width * dv, acc + r * dv);
    });
  }

  /// Rows [r0, r0 + rows) of the tile p (its keys [b0, b0 + nb)) against KV head j.
  void add(std::int64_t j, std::int64_t b0, std::int64_t nb, const score_tile& p, std::int64_t r0,
           std::int64_t rows, float* acc) {
    const std::int64_t dv = v_.v_head_dim(), vs = v_.values().row_stride;
    const S* v = v_.values().row(j, b0);
    const float* pr = p.data + r0 * p.row_stride;
    if (streaming_ && p.key_stride == 1) {
      if constexpr (std::same_as<S, bf16>)
        if (pairs_ == pair_math::stream) {
          stream_pair_pv(pr, p.row_stride, rows,
                         strided_rows<S>{v, vs, prefetch_rows(vs * std::int64_t{sizeof(S)})}, nb,
                         dv, acc + r0 * dv, dv);
          return;
        }
      accumulate_pv(pr, p.row_stride, rows, v, vs, nb, dv, acc + r0 * dv, dv);
      return;
    }
    if constexpr (std::same_as<S, bf16>)
      if (pairs_ == pair_math::amx && rows >= amx_min_rows &&
          (p.key_stride == 1 || p.row_stride == 1)) {
        add_on_tiles(j, b0, nb, p, pr, rows, acc + r0 * dv);
        return;
      }
    if constexpr (std::same_as<S, bf16>)
      if (pairs_ == pair_math::gemm) {
        // P^T's and V's rows paired by key: vp [ceil(nb / 2)][d_v]
        auto* vp = reinterpret_cast<std::uint32_t*>(vf_);
        if (repack(j, b0, nb, true))
          pack_row_pairs_of<S>([&](std::int64_t t) { return v + t * vs; }, nb, dv, vp, dv);
        pack_probability_pairs(p, pr, nb, rows);
        gemm_pairs<true>(rows, dv, (nb + 1) / 2, reinterpret_cast<const bf16*>(pp_), 2, 2 * rows,
                         vp, dv, acc + r0 * dv, dv);
        return;
      }
    const float* vf = reinterpret_cast<const float*>(v);
    std::int64_t vfs = vs;
    if constexpr (!std::same_as<S, float>) {
      if (repack(j, b0, nb, false))
        for (std::int64_t t = 0; t < nb; ++t) to_float_row(v + t * vs, vf_ + t * dv, dv);
      vf = vf_, vfs = dv;
    }
    if (vector_gemm_) {
      gemm_bcast<true>(rows, dv, nb, pr, p.row_stride, p.key_stride, vf, vfs, acc + r0 * dv, dv);
      return;
    }
    // Maps with a unit inner stride, so that Eigen's GEMM reads them in place (a general
    // stride makes it copy the operand into a heap temporary).
    using outer = Eigen::OuterStride<>;
    const Eigen::Map<const row_matrix<float>, Eigen::Unaligned, outer> vm(vf, nb, dv, outer(vfs));
    Eigen::Map<row_matrix<float>, Eigen::Unaligned, outer> om(acc + r0 * dv, rows, dv, outer(dv));
    if (p.key_stride == 1) {  // row tile
      om.noalias() +=
          Eigen::Map<const row_matrix<float>, Eigen::Unaligned, outer>(pr, rows, nb,
                                                                       outer(p.row_stride)) *
          vm;
    } else {  // column tile: P^T [nb][rows] (row_stride 1)
      using col_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
      om.noalias() +=
          Eigen::Map<const col_matrix, Eigen::Unaligned, outer>(pr, rows, nb,
                                                                outer(p.key_stride)) *
          vm;
    }
  }
  /// Value row t of KV head j as float, in the accumulators' column order.
  const float* value_row(std::int64_t j, std::int64_t t, float* buf) const {
    to_float_row(v_.values().row(j, t), buf, v_.v_head_dim());
    if (paired()) permute_pairs(buf, v_.v_head_dim(), pair_group_);
    return buf;
  }
  void finish(float* acc, std::int64_t rows) const {
    if (paired())
      for (std::int64_t r = 0; r < rows; ++r)
        unpermute_pairs(acc + r * v_.v_head_dim(), v_.v_head_dim(), pair_group_);
  }

 private:
  /// What computes P V on bf16 pairs: nothing (f32), the streaming kernel on value-row pairs,
  /// the GEMM on key pairs (vdpbf16ps), or AMX tiles.
  enum class pair_math { none, stream, gemm, amx };
  /// vf_: a block of V as float, or its key pairs up to whole 32-key tiles.
  static std::int64_t value_floats(std::int64_t block, std::int64_t dv) {
    return std::max(block, round32(block) / 2) * dv;
  }
  /// Where add_gathered's scratch starts: after vf_ and pp_ (P's key pairs or bf16 parts).
  static std::int64_t gathered_offset(std::int64_t block, std::int64_t dv, std::int64_t rows) {
    const bool amx = std::same_as<S, bf16> && bf16_amx_available();
    const std::int64_t parts = amx ? 3 * round16(rows) * (round32(block) / 2) : 0;
    return value_floats(block, dv) + std::max((block / 2 + 1) * rows, parts);
  }
  /// acc[rows][d_v] += P V on AMX tiles: V's rows [b0, b0 + nb) of KV head j paired by key (zero
  /// up to whole 32-key tiles, once per block), P's rows at pr (a row or a column tile) as bf16
  /// rows per part, [parts][round16(rows)][nb32].
  void add_on_tiles(std::int64_t j, std::int64_t b0, std::int64_t nb, const score_tile& p,
                    const float* pr, std::int64_t rows, float* acc) {
    const std::int64_t dv = v_.v_head_dim(), vs = v_.values().row_stride, nb32 = round32(nb),
                       part_elems = round16(rows) * nb32;
    auto* vp = reinterpret_cast<std::uint32_t*>(vf_);
    if (repack(j, b0, nb, true)) {
      const S* v = v_.values().row(j, b0);
      pack_row_pairs_of<S>([&](std::int64_t t) { return v + t * vs; }, nb, dv, vp, dv);
      std::fill(vp + (nb + 1) / 2 * dv, vp + nb32 / 2 * dv, 0u);
    }
    auto* a = reinterpret_cast<bf16*>(pp_);
    if (p.key_stride == 1)
      pack_rows_bf16(pr, p.row_stride, rows, nb, nb32, a, nb32, parts_, part_elems);
    else
      pack_pairs_transposed(pr, p.key_stride, nb, rows, nb32 / 2, pp_, nb32 / 2, parts_,
                            part_elems / 2);
    amx_gemm<true>(rows, dv, nb32, a, nb32, vp, dv, acc, dv, {parts_, part_elems, 0});
  }
  static pair_math pairs_of(bool streaming, bool bf16_products, std::int64_t dv) {
    if (!std::same_as<S, bf16> || !bf16_products || !bf16_dot_available()) return pair_math::none;
    if (!streaming) return pair_math::gemm;
    return dv % 32 == 0 ? pair_math::stream : pair_math::none;
  }
  bool paired() const { return pair_group_ > 0; }
  /// pp_ = P^T's key pairs [ceil(nb / 2)][rows] of the tile rows at pr: a column tile's key rows
  /// in place, or a row tile's (the materialised form's) adjacent columns, 16 rows at a time.
  void pack_probability_pairs(const score_tile& p, const float* pr, std::int64_t nb,
                              std::int64_t rows) {
    if (p.row_stride == 1) {
      pack_row_pairs_of<float>([&](std::int64_t t) { return pr + t * p.key_stride; }, nb, rows, pp_,
                               rows);
      return;
    }
    for (std::int64_t i0 = 0; i0 < rows; i0 += 16) {
      const std::int64_t n = std::min<std::int64_t>(16, rows - i0);
      const float* r[16];
      for (std::int64_t i = 0; i < n; ++i) r[i] = pr + (i0 + i) * p.row_stride;
      pack_query_pairs(r, n, nb / 2, 1.f, n, pp_ + i0, rows);
    }
    if (nb % 2)  // the last key pairs with 0; column nb of a row tile is not the block's
      for (std::int64_t i = 0; i < rows; ++i)
        pp_[nb / 2 * rows + i] =
            Eigen::numext::bit_cast<std::uint16_t>(bf16(pr[i * p.row_stride + nb - 1]));
  }
  /// Whether vf_ must be filled with block (j, b0) as pairs or as float: once per block for
  /// all runs of rows of a KV head.
  bool repack(std::int64_t j, std::int64_t b0, std::int64_t nb, bool pairs) {
    const std::int64_t block[4] = {j, b0, nb, pairs};
    if (std::equal(block, block + 4, packed_)) return false;
    std::copy(block, block + 4, packed_);
    return true;
  }
  const value_view<S>& v_;
  bool streaming_;
  float* vf_;          // [block][d_v]: a block of V widened to float, or its key pairs
  std::uint32_t* pp_;  // [block / 2 + 1][rows]: P^T's key pairs, or P's bf16 rows per part
  float* gp_;          // [block][round16(rows)]: add_gathered's column tile (P^T)
  float* ga_;          // [rows][d_v]: add_gathered's accumulators
  int parts_;          // amx_parts
  pair_math pairs_;
  // The block vf_ holds: (j, b0, nb), and whether as pairs. A causal item may end a block
  // early, so a later item's block at the same b0 can hold more keys.
  std::int64_t packed_[4] = {-1, -1, -1, -1};
  // The active target's layout choices, read once per call (see gqa_products).
  const bool vector_gemm_ = simd_vector_target();
  const std::int64_t pair_group_ = std::same_as<S, bf16> && streaming_ ? bf16_pair_group() : 0;
};

/// The materialised follower: P [Tq, H, Tk] given, out = P V.
template <storage_type S>
struct weights_problem {
  tensor3_view<const float> p;  // [Tq, H, Tk]
  value_view<S> v;
  bool streaming = true;
  bool bf16_products = false;  // product_math::bf16
  bool split_products = true;  // f32 products may run as bf16 parts on AMX tiles; false: FMAs
};

template <storage_type S>
class weights_products {
 public:
  using problem = weights_problem<S>;
  static constexpr bool given_weights = true;
  static attention_shape shape(const problem& pb) {
    const std::int64_t hkv = pb.v.kv_heads();
    return {pb.p.extent(0),       hkv, pb.p.extent(1) / hkv, pb.p.extent(2), pb.v.v_head_dim(),
            pb.streaming ? 32 : 128, pb.streaming ? 64 : 128};
  }
  static std::size_t scratch_floats(const problem& pb, const attention_plan& pl) {
    return static_cast<std::size_t>(pl.rows * pl.block) +
           value_accumulator<S>::scratch_floats(pl.block, pb.v.v_head_dim(), pl.rows);
  }
  /// bf16 parts per float operand of the tile products (driver.hpp's splits_products).
  static int split_parts(const problem& pb) {
    return std::max(1, value_accumulator<S>::amx_parts(pb.v, pb.streaming, pb.bf16_products,
                                                       pb.split_products));
  }
  weights_products(const problem& pb, const attention_plan& pl, float* f)
      : pb_(pb),
        pl_(pl),
        tile_(f),
        values_(pb.v, pb.streaming, pb.bf16_products, pb.split_products, pl.block, pl.rows,
                f + pl.rows * pl.block) {}

  std::span<const std::int64_t> positions() const { return pb_.v.positions(); }
  std::int64_t run_end(std::int64_t t) const { return pb_.v.run_end(t); }
  void load_queries(std::int64_t t0, std::int64_t tn, std::int64_t /*j*/) {
    t0_ = t0, m_ = tn * pl_.g;
  }
  /// The block's weights as a row tile [rows][block].
  score_tile scores(std::int64_t j, std::int64_t b0, std::int64_t nb, std::int64_t /*k_end*/) {
    const std::int64_t g = pl_.g, ks = pb_.p.stride(2);
    for (std::int64_t r = 0; r < m_; ++r) {
      const float* src = &pb_.p(t0_ + r / g, j * g + r % g, b0);
      float* dst = tile_ + r * pl_.block;
      for (std::int64_t t = 0; t < nb; ++t) dst[t] = src[t * ks];
    }
    return {tile_, pl_.block, 1};
  }
  void accumulate(std::int64_t j, std::int64_t b0, std::int64_t nb, const score_tile& p,
                  float* acc) {
    values_.add(j, b0, nb, p, 0, m_, acc);
  }
  const float* value_row(std::int64_t j, std::int64_t /*head*/, std::int64_t t, float* buf) const {
    return values_.value_row(j, t, buf);
  }
  void finish(float* acc, std::int64_t rows) { values_.finish(acc, rows); }

 private:
  const problem& pb_;
  const attention_plan& pl_;
  float* tile_;  // [rows][block]
  value_accumulator<S> values_;
  std::int64_t t0_ = 0, m_ = 0;
};

/// The flash follower: the donor's score products (its queries, its keys, its head groups) with
/// the follower's values. Query head h of the donor's rows reads the follower's KV head
/// h / (H / H_kv), so one item's rows may span several of them: runs of rows are accumulated
/// per KV head.
template <class Donor, storage_type S>
struct follower_problem {
  typename Donor::problem donor;
  value_view<S> v;
  std::int64_t heads = 0;  // H
  bool streaming = false;  // the donor's tiles are row tiles of its streaming micro-kernels
  bool bf16_products = false;  // product_math::bf16 for the follower's P V too
  bool split_products = true;  // f32 P V may run as bf16 parts on AMX tiles (the donor's scores
                               // follow donor.split_products); false: FMAs
};

template <class Donor, storage_type S>
class follower_products {
 public:
  using problem = follower_problem<Donor, S>;
  static attention_shape shape(const problem& pb) {
    attention_shape s = Donor::shape(pb.donor);
    s.v_head_dim = pb.v.v_head_dim();
    return s;
  }
  static std::size_t scratch_floats(const problem& pb, const attention_plan& pl) {
    return Donor::scratch_floats(pb.donor, pl) +
           value_accumulator<S>::scratch_floats(pl.block, pb.v.v_head_dim(), pl.rows);
  }
  /// bf16 parts per float operand of the donor's score products or the follower's P V, the
  /// more of the two (driver.hpp's splits_products; on_fmas turns off both).
  static int split_parts(const problem& pb) {
    return std::max(
        Donor::split_parts(pb.donor),
        value_accumulator<S>::amx_parts(pb.v, pb.streaming, pb.bf16_products, pb.split_products));
  }
  follower_products(const problem& pb, const attention_plan& pl, float* f)
      : pb_(pb),
        pl_(pl),
        donor_(pb.donor, pl, f),
        values_(pb.v, pb.streaming, pb.bf16_products, pb.split_products, pl.block, pl.rows,
                f + Donor::scratch_floats(pb.donor, pl)),
        gf_(pb.heads / pb.v.kv_heads()) {}

  std::span<const std::int64_t> positions() const { return donor_.positions(); }
  std::int64_t run_end(std::int64_t t) const {
    return std::min(donor_.run_end(t), pb_.v.run_end(t));
  }
  void load_queries(std::int64_t t0, std::int64_t tn, std::int64_t j) {
    donor_.load_queries(t0, tn, j);
    m_ = tn * pl_.g;
  }
  score_tile scores(std::int64_t j, std::int64_t b0, std::int64_t nb, std::int64_t k_end) {
    return donor_.scores(j, b0, nb, k_end);
  }
  /// Row r (token r / g, local head r % g) reads value head value_head(j, r): each run of local
  /// heads [h0, h1) of one value head is one run of rows if it is all g heads, else gathered
  /// over the tokens for the GEMM tiles (value_accumulator::add_gathered), else (a streaming
  /// tile, or one token) added token by token.
  void accumulate(std::int64_t j, std::int64_t b0, std::int64_t nb, const score_tile& p,
                  float* acc) {
    const std::int64_t g = pl_.g, tokens = m_ / g;
    for (std::int64_t h0 = 0, h1; h0 < g; h0 = h1) {
      const std::int64_t jf = value_head(j, h0);
      for (h1 = h0 + 1; h1 < g && value_head(j, h1) == jf;) ++h1;
      const std::int64_t w = h1 - h0;
      if (w == g)
        values_.add(jf, b0, nb, p, 0, m_, acc);
      else if (tokens > 1 && values_.gathers())
        values_.add_gathered(jf, b0, nb, p, h0, w, g, tokens * w, acc);
      else
        for (std::int64_t t = 0; t < tokens; ++t) values_.add(jf, b0, nb, p, t * g + h0, w, acc);
    }
  }
  const float* value_row(std::int64_t /*j*/, std::int64_t head, std::int64_t t, float* buf) const {
    return values_.value_row(head / gf_, t, buf);
  }
  void finish(float* acc, std::int64_t rows) { values_.finish(acc, rows); }

 private:
  std::int64_t value_head(std::int64_t j, std::int64_t r) const {
    return (j * pl_.g + r % pl_.g) / gf_;
  }
  const problem& pb_;
  const attention_plan& pl_;
  Donor donor_;
  value_accumulator<S> values_;
  std::int64_t gf_, m_ = 0;
};

/// Checks a follower's values against the donor's H query heads and Tk keys.
template <storage_type S>
void require_follower_values(const char* who, const value_view<S>& v, std::int64_t heads,
                             std::int64_t keys) {
  require(heads % v.kv_heads() == 0, who, ": the donor's heads=", heads,
          " must be a multiple of the follower's kv_heads=", v.kv_heads());
  require(v.size() == keys, who, ": the follower's values hold ", v.size(),
          " tokens but the donor's weights cover ", keys, " keys");
}

/// The flash follower on the donor's products and problem.
template <class Donor, storage_type S, class Mask, class Exec>
void run_follower(const char* who, const typename Donor::problem& donor, bool streaming,
                  std::int64_t heads, std::span<const std::int64_t> key_positions,
                  std::span<const std::int64_t> q_pos, matrix_view<const float> donor_lse,
                  const value_view<S>& v, tensor3_view<float> out, const attention_options& opt,
                  Exec& exec, attention_workspace* ws, const Mask& mask) {
  const std::int64_t tq = out.extent(0), keys = static_cast<std::int64_t>(key_positions.size());
  require(opt.lse.empty() && opt.weights.empty(), who,
          ": the follower's options are the donor's call; they take no lse or weights output");
  require_follower_values(who, v, heads, keys);
  require(std::equal(key_positions.begin(), key_positions.end(), v.positions().begin()), who,
          ": the follower's value positions differ from the donor's key positions (the layers "
          "must see the same tokens)");
  require_extents(donor_lse, {tq, heads}, who, "donor_lse");
  require_disjoint(out, donor_lse, who, "out", "donor_lse");
  const attention_policy policy =
      validate_call(who, tq, heads, v.v_head_dim(), keys, q_pos, out, opt);
  run_attention<follower_products<Donor, S>>(
      follower_problem<Donor, S>{donor, v, heads, streaming, opt.products == product_math::bf16},
      attention_call<Mask>{q_pos, policy, mask, out, {}, {}, donor_lse}, exec, ws);
}

}  // namespace detail

/// The materialised form: out [Tq, H, d_v] = weights [Tq, H, Tk] V, query head h reading KV head
/// h / (H / kv_heads) of `values` (a value_view or a value_cache over the same Tk tokens). The
/// weights are a donor's normalised attention weights (attention_options::weights); entries equal
/// to 0 contribute nothing, whatever the value holds. products: product_math::bf16 rounds the
/// weights to bf16 for the products with a bf16 value cache where the CPU has bf16 products (AMX
/// tiles, vdpbf16ps; core/options.hpp); elsewhere, and by default, f32.
template <value_source VS, class Exec = serial_executor>
void attend_shared(tensor3_view<const float> weights, const VS& values, tensor3_view<float> out,
                   Exec&& exec = Exec{}, attention_workspace* ws = nullptr,
                   tile_strategy strategy = tile_strategy::automatic,
                   product_math products = product_math::f32) {
  using S = typename VS::storage_type;
  const char* who = "attend_shared";
  const value_view<S> v = detail::value_view_of(values);
  const std::int64_t tq = weights.extent(0), h = weights.extent(1), tk = weights.extent(2);
  detail::require(h > 0, who, ": weights need at least one head, got ", h);
  detail::require_follower_values(who, v, h, tk);
  detail::require_extents(out, {tq, h, v.v_head_dim()}, who, "out");
  detail::require_disjoint(out, weights, who, "out", "weights");
  const bool streaming =
      strategy == tile_strategy::streaming ||
      (strategy == tile_strategy::automatic && detail::simd_vector_target() &&
       (h / v.kv_heads()) * tq < 16);
  const detail::weights_problem<S> pb{weights, v, streaming, products == product_math::bf16};
  detail::run_attention<detail::weights_products<S>>(
      pb,
      detail::attention_call<no_mask>{{}, detail::make_policy({.causal = false}, h, who), {}, out,
                                      {}},
      exec, ws);
}

/// The flash form: out [Tq, H, d_v] = P V with P the donor's weights, recomputed block by block
/// from `donor` (its roped queries and cache: gqa_scores, latent_scores or factor_scores) and
/// weighed by exp(s - donor_lse): donor_lse [Tq, H] is the LSE output of the donor's call, and
/// q_positions, donor_options and mask must be that call's (scale, causal, window, soft-cap,
/// ALiBi, sinks, strategy, products). `values` holds the follower's V over the donor's tokens
/// (same positions); the follower's P V takes the donor's products (product_math::bf16: the
/// probabilities rounded to bf16 against a bf16 value cache where the CPU has bf16 products).
/// Memory O(Tq H): the Tq x Tk weights are never held.
template <class Donor, value_source VS, class Exec = serial_executor,
          mask_predicate Mask = no_mask>
void attend_shared(const Donor& donor, std::span<const std::int64_t> q_positions,
                   matrix_view<const float> donor_lse, const VS& values, tensor3_view<float> out,
                   const attention_options& donor_options = {}, Exec&& exec = Exec{},
                   attention_workspace* ws = nullptr, const Mask& mask = {}) {
  using SV = typename VS::storage_type;
  const char* who = "attend_shared";
  const value_view<SV> v = detail::value_view_of(values);
  const attention_options& opt = donor_options;
  if constexpr (requires { donor.q_latent; }) {
    using S = typename decltype(donor.kv)::storage_type;
    attention_workspace local;
    attention_workspace& wsr = ws ? *ws : local;
    for (const auto& [in, name] :
         {std::pair{donor.q_latent, "q_latent"}, std::pair{donor.q_rope, "q_rope"}})
      detail::require_outputs_disjoint(who, out, opt, in, name);
    const auto qx = detail::latent_queries(who, donor.q_latent, donor.q_rope, donor.kv, wsr);
    auto pb = detail::gqa_problem_of(
        who, qx, donor.kv, opt,
        detail::latent_default_scale(donor.kv.v_head_dim(), donor.q_rope.extent(2)));
    pb.keys_only = true;
    detail::run_follower<detail::gqa_products<S>>(who, pb, pb.streaming, qx.extent(1),
                                                  donor.kv.positions(), q_positions, donor_lse, v,
                                                  out, opt, exec, &wsr, mask);
  } else if constexpr (requires { donor.a_q; }) {
    using S = typename decltype(donor.kv)::storage_type;
    for (const auto& [in, name] : {std::pair{donor.a_q, "a_q"}, std::pair{donor.b_q, "b_q"}})
      detail::require_outputs_disjoint(who, out, opt, in, name);
    const auto pb = detail::tpa_problem_of(who, donor.a_q, donor.b_q, donor.kv, opt);
    detail::run_follower<detail::tpa_products<S>>(who, pb, false, donor.kv.heads,
                                                  donor.kv.positions, q_positions, donor_lse, v,
                                                  out, opt, exec, ws, mask);
  } else {
    using S = typename decltype(donor.kv)::storage_type;
    detail::require_outputs_disjoint(who, out, opt, donor.q, "q");
    auto pb = detail::gqa_problem_of(who, donor.q, donor.kv, opt, {});
    pb.keys_only = true;
    detail::run_follower<detail::gqa_products<S>>(who, pb, pb.streaming, donor.q.extent(1),
                                                  donor.kv.positions(), q_positions, donor_lse, v,
                                                  out, opt, exec, ws, mask);
  }
}

}  // namespace attnkit
