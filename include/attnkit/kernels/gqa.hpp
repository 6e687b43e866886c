#pragma once
// The GQA attention kernel family: MHA (one query head per KV head), GQA and MQA (one KV head)
// are one kernel; absorbed MLA runs on it too (kernels/mla.hpp). Flash-style over a kv_view: the
// Tq x Tk score matrix is never materialised. This file holds the variant's block products; the
// driver (kernels/driver.hpp) plans, masks, runs the softmax and merges.
//
// A work item's rows are tq tokens x the g query heads of KV head j, so every cached K/V row is
// read once per tile for all heads of its group. Which path runs where:
//   streaming  register-blocked micro-kernels (simd/kernels.inl) reading K/V in their storage
//              type, query tiles of 32 rows, key blocks of 64: the automatic choice for tiles of
//              fewer than 16 rows (decode, short chunks) on the vector targets;
//   gemm       tiles of 128 rows x 128 keys: on a vector target, its own register-blocked GEMM
//              on the transposed score tile S^T = K Q^T (column layout); on the scalar target,
//              Eigen GEMMs (row layout). The automatic choice for larger tiles, and for every
//              size on the scalar target (its streaming loops are slow).
// Decode, chunked prefill and full prefill are the same call with different Tq: the causal rule
// is "key position <= query position" on explicit int64 positions.
#include <Eigen/Core>
#include <algorithm>
#include <array>
#include <cmath>
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
#include "policy.hpp"

namespace attnkit {

template <class T>
struct is_kv_view : std::false_type {};
template <storage_type S>
struct is_kv_view<kv_view<S>> : std::true_type {};

/// What attend and attend_latent accept: a kv_view, or a cache whose view() is one.
template <class X>
concept kv_source = is_kv_view<X>::value ||
    (kv_cache<X>&& requires(const X& x) { requires is_kv_view<decltype(x.view())>::value; });

namespace detail {

template <class X>
auto kv_view_of(const X& x) {
  if constexpr (is_kv_view<X>::value)
    return x;
  else
    return x.view();
}

/// dst[c] = src[c * stride], c < n (a memmove for unit stride).
inline void copy_strided(const float* src, std::int64_t stride, std::int64_t n, float* dst) {
  if (stride == 1)
    std::copy(src, src + n, dst);
  else
    for (std::int64_t c = 0; c < n; ++c) dst[c] = src[c * stride];
}

/// Queries [Tq, H, d_qk]: float, or bf16 (an engine's bf16 activations, widened a tile of
/// rows at a time as the kernels load them).
struct query_view {
  tensor3_view<const float> f32{};
  tensor3_view<const bf16> b16{};
  bool bf16_in = false;
  query_view(tensor3_view<const float> q) : f32(q) {}
  query_view(tensor3_view<const bf16> q) : b16(q), bf16_in(true) {}
  index_t extent(std::size_t i) const { return bf16_in ? b16.extent(i) : f32.extent(i); }
  /// f(view) with the view of the queries' element type.
  template <class F>
  decltype(auto) visit(F&& f) const {
    return bf16_in ? f(b16) : f(f32);
  }
};

template <storage_type S>
struct gqa_problem {
  query_view q;  // [Tq, H, d_qk]
  kv_view<S> kv;
  float scale = 1.f;
  bool streaming = true;
  bool keys_only = false;  ///< scores only (a follower recomputing them): V is not widened
  bool bf16_products = false;  ///< product_math::bf16 asked for
  bool split_products = true;  ///< f32 products may run as bf16 parts (engine_for); false: FMAs
};

/// The rows of KV head j that keys [begin, end) read, as byte ranges (range_prefetcher): the key
/// rows, then (values true) the value rows; a run of rows at a dense stride is one range.
template <storage_type S>
struct block_ranges {
  const kv_view<S>* kv = nullptr;
  std::int64_t j = 0, begin = 0, end = 0;
  bool values = false;
  std::int64_t t = begin;
  int set = 0;  // 0: keys, 1: values
  bool next(const char*& b, const char*& e) {
    for (; set < (values ? 2 : 1); ++set, t = begin) {
      if (t >= end) continue;
      const row_set<S>& rs = set == 0 ? kv->keys() : kv->values();
      const std::int64_t n = rs.row_stride == rs.width ? std::min(end, kv->run_end(t)) - t : 1;
      const S* r = rs.row(j, t);
      b = reinterpret_cast<const char*>(r);
      e = reinterpret_cast<const char*>(r + (n - 1) * rs.row_stride + rs.width);
      t += n;
      return true;
    }
    return false;
  }
};

template <storage_type S>
class gqa_products {
 public:
  using problem = gqa_problem<S>;
  static attention_shape shape(const problem& pb) {
    return shape_of(pb.q.extent(0), pb.q.extent(1), pb.kv, pb.streaming, pb.bf16_products,
                    pb.keys_only);
  }
  /// The shape of Tq tokens of H query heads against kv (bf16_products: product_math::bf16).
  /// Keys per block: 64 on the streaming path and for tiles of a single AMX row tile (amx_rows),
  /// whose tile products stream the next block's rows in (an MLA batch's latent rows came from
  /// DRAM faster a block of 64 keys ahead than of 128); 32 for an item of every KV head
  /// (merges_heads), whose block holds all its heads' rows and whose prefetch runs at least a
  /// block ahead (list_rows); 64 for f32 products as bf16 parts on AMX tiles over separate
  /// values (a GQA prefill's three parts of P per block stay half as large); else 128. Measured
  /// in docs/benchmarks.md.
  static attention_shape shape_of(std::int64_t tq, std::int64_t h, const kv_view<S>& kv,
                                  bool streaming, bool bf16_products, bool keys_only = false) {
    const bool merged = merges_heads(tq, kv, streaming, keys_only);
    const std::int64_t groups = merged ? 1 : kv.kv_heads();
    const bool amx_row_tile = engine_for(kv, streaming, bf16_products) == pair_engine::amx &&
                              tq * (h / groups) <= 16 && kv.v_head_dim() % 32 == 0;
    std::int64_t block = 128;
    if (merged)
      block = 32;
    else if (streaming || amx_row_tile ||
             (!bf16_products && !kv.values_in_keys() &&
              engine_for(kv, streaming, bf16_products) == pair_engine::amx))
      block = 64;
    return {tq, groups, h / groups, kv.size(), kv.v_head_dim(), streaming ? 32 : 128, block};
  }
  /// A paged decode step (one query token, streaming) makes one item of all KV heads, which
  /// walks each key block's pages head after head: the item reads whole pages ([H_kv, page_size,
  /// d] of keys, then of values) instead of one head's page_size rows of each, which this
  /// machine's memory serves much more slowly (docs/benchmarks.md, "Serving"). Not for a
  /// follower's donor (keys_only), whose value heads follow the item's KV head.
  static bool merges_heads(std::int64_t tq, const kv_view<S>& kv, bool streaming, bool keys_only) {
    return streaming && tq == 1 && kv.kv_heads() > 1 && kv.keys().table.paged() && !keys_only;
  }
  static std::size_t scratch_floats(const problem& pb, const attention_plan& pl) {
    // Rows rounded up to whole AMX tiles; the bf16 products' P pairs (Q's and P's per part).
    const std::int64_t m = round16(pl.rows), nb = pl.block, dqk = pb.kv.head_dim(),
                       dv = pb.kv.v_head_dim(), parts = split_parts(pb);
    return static_cast<std::size_t>(
        (listed(pb) ? 4 * nb * pointer_floats : 0) + m * (parts * dqk + nb) + nb * (dqk + dv) +
        (engine_of(pb) != pair_engine::none ? parts * std::max(m * (nb / 2 + 16), 32 * round16(nb))
                                            : 0) +
        cached_blocks(pb, pl) * nb / 2 * dv);
  }
  /// Whole key blocks whose value pairs a worker keeps (value_pairs): with bf16 products on the
  /// GEMM tiles (the AMX single row tile reads its values in place) and several query tiles,
  /// which all read the same blocks of a KV head, the first blocks within cache_bytes.
  static std::int64_t cached_blocks(const problem& pb, const attention_plan& pl) {
    const pair_engine e = engine_of(pb);
    if (e == pair_engine::none || (e == pair_engine::amx && pl.rows <= 16) || pl.qtiles < 2 ||
        pl.block % 32 != 0)
      return 0;
    return std::min({(pl.keys + pl.block - 1) / pl.block, max_cached_blocks,
                     cache_bytes / (2 * pl.block * pb.kv.v_head_dim())});
  }
  static constexpr std::int64_t max_cached_blocks = 64, cache_bytes = std::int64_t{1} << 20;
  /// What runs the GEMM tiles' products on a bf16 cache: AMX tiles (whole 32-column query tiles
  /// and 16-column value tiles), vdpbf16ps (bf16 products only: whole pairs of query columns), or
  /// nothing (f32 FMAs). With f32 products the AMX tiles take each float operand (Q, P) as the
  /// sum of split_parts() bf16 parts: a float times a bf16 is the sum of three exact bf16
  /// products, so the products stay exact and the sums float (docs/math.md); over fewer than
  /// split_min_keys keys, where packing three parts costs more than the FMAs they save, f32
  /// products stay on FMAs.
  enum class pair_engine { none, dot, amx };
  static constexpr std::int64_t split_min_keys = 32;
  static pair_engine engine_of(const problem& pb) {
    return engine_for(pb.kv, pb.streaming, pb.bf16_products, pb.split_products);
  }
  /// engine_of for a view, the call's tile strategy and its products (splits: f32 products may
  /// take bf16 parts).
  static pair_engine engine_for(const kv_view<S>& kv, bool streaming, bool bf16_products,
                                bool splits = true) {
    if (!std::same_as<S, bf16> || streaming) return pair_engine::none;
    const std::int64_t dqk = kv.head_dim(), dv = kv.v_head_dim();
    if (detail::bf16_amx_available() && dqk % 32 == 0 && dv % 16 == 0 &&
        (bf16_products || (splits && kv.size() >= split_min_keys)))
      return pair_engine::amx;
    if (!bf16_products) return pair_engine::none;
    if (detail::bf16_dot_available() && dqk % 2 == 0) return pair_engine::dot;
    return pair_engine::none;
  }
  /// product_math::bf16 on the streaming path (a decode step's few rows) of a bf16 cache where
  /// vdpbf16ps runs (bf16_dot_available) and d_qk is whole 32-column vectors: the score block
  /// takes the queries as bf16 pairs and the key rows as they are (stream_pair_scores), so no key
  /// is widened. P V takes the probabilities rounded to bf16 and two keys' value rows per
  /// vdpbf16ps (stream_pair_pv) where d_v is whole 32-column groups, else stays f32.
  static bool streams_pairs(const problem& pb) {
    return std::same_as<S, bf16> && pb.streaming && pb.bf16_products &&
           detail::bf16_dot_available() && pb.kv.head_dim() % 32 == 0;
  }

  /// bf16 parts per float operand of the tile products: 3 for f32 products on AMX (engine_for),
  /// else 1 (bf16 products round Q and P to bf16).
  static int split_parts(const problem& pb) {
    return !pb.bf16_products && engine_of(pb) == pair_engine::amx ? 3 : 1;
  }

  gqa_products(const problem& pb, const attention_plan& pl, float* f) : pb_(pb), pl_(pl) {
    const std::int64_t m = round16(pl.rows), nb = pl.block, dqk = pb.kv.head_dim(),
                       dv = pb.kv.v_head_dim();
    if (listed(pb)) {  // first: the worker's scratch is aligned for pointers
      auto* rows = reinterpret_cast<const S**>(f);
      k_rows_ = rows, k_ahead_ = rows + nb, v_rows_ = rows + 2 * nb, v_ahead_ = rows + 3 * nb;
      f += 4 * nb * pointer_floats;
    }
    q_ = f, f += m * dqk * parts_;  // [m][d_qk], or Q^T [d_qk][m], or Q^T's pairs [d_qk / 2][m16]
                                    // per part
    s_ = f, f += m * nb;     // scores / probabilities: [m][block], or [nb][m(16)] transposed
    kf_ = f, f += nb * dqk;  // a block of K widened to float, or gathered as bf16 (paged AMX)
    vf_ = f, f += nb * dv;   // a block of V widened to float, or its pairs [nb32 / 2][d_v]
    cached_heads_.fill(-1);
    if (pairs_ == pair_engine::none) return;
    // P^T's pairs [nb / 2][m], or P's [m16][nb32 / 2], or (amx_pv_rows) its halves [2][nb16][16]
    // per part
    pp_ = reinterpret_cast<std::uint32_t*>(f);
    f += parts_ * std::max(m * (nb / 2 + 16), 32 * round16(nb));
    cache_ = reinterpret_cast<std::uint32_t*>(f);  // [cached blocks][nb / 2][d_v]
  }

  std::span<const std::int64_t> positions() const { return pb_.kv.positions(); }
  /// The GEMM tiles' P V with bf16 products rounds the probabilities to bf16 (pair_accumulate),
  /// so the softmax computes them by the coarse exponential (docs/math.md); split into parts
  /// (f32 products) they keep the full one.
  bool rounds_probabilities() const { return pairs_ != pair_engine::none && parts_ == 1; }
  /// Key blocks may span page runs: scores and accumulate walk a block's runs themselves.
  std::int64_t run_end(std::int64_t /*t*/) const { return pb_.kv.size(); }

  void load_queries(std::int64_t t0, std::int64_t tn, std::int64_t j) {
    const std::int64_t g = pl_.g, dqk = pb_.kv.head_dim();
    m_ = tn * g;
    // The worker's previous item was another key split of this tile: q_ holds it already
    // (only load_queries writes q_).
    if (t0 == loaded_[0] && tn == loaded_[1] && j == loaded_[2]) return;
    loaded_[0] = t0, loaded_[1] = tn, loaded_[2] = j;
    if (pairs_ != pair_engine::none) return load_query_pairs(t0, j);
    for (std::int64_t r0 = 0; r0 < m_; r0 += 16) {  // 16 rows at a time (query_rows)
      const std::int64_t n = std::min<std::int64_t>(16, m_ - r0);
      const float* rows[16];
      query_rows(t0, j, r0, n, rows);
      if (transposed() && !narrow()) {  // Q^T [d_qk][m]
        transpose_scaled(rows, n, dqk, pb_.scale, q_ + r0, m_);
        continue;
      }
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t r = r0 + i;
        if (stream_pairs_) {  // [m][d_qk] bf16: row r's pairs in natural column order
          scale_row_to(rows[i], reinterpret_cast<bf16*>(q_) + r * dqk, dqk, pb_.scale);
          continue;
        }
        scale_row_to(rows[i], q_ + r * dqk, dqk, pb_.scale);
        if (paired() || (narrow() && std::same_as<S, bf16>))  // the score block reads bf16 pairs
          permute_pairs(q_ + r * dqk, dqk, bf16_pair_group());
      }
    }
  }

  score_tile scores(std::int64_t j, std::int64_t b0, std::int64_t nb, std::int64_t k_end) {
    const std::int64_t dqk = pb_.kv.head_dim(), ks = pb_.kv.keys().row_stride;
    if (pb_.streaming) {  // a call per KV head j + i of the item (merges_heads: j = 0) per block
      k_end_ = k_end;
      const std::int64_t rows = m_ / item_heads_;
      for (std::int64_t i = 0; i < item_heads_; ++i) {
        float* s = s_ + i * rows * pl_.block;
        if constexpr (std::same_as<S, bf16>)
          if (stream_pairs_) {
            stream_pair_scores(i, rows, j, b0, nb, s);
            continue;
          }
        const float* q = q_ + i * rows * dqk;
        if (!paged()) {
          detail::scores(q, dqk, rows, pb_.kv.keys().row(j + i, b0), ks, nb, dqk, s, pl_.block,
                         true, value_block_into_l1(j + i, b0, nb));
        } else {  // its rows listed across its pages, once for all the item's heads
          if (i == 0) list_rows(pb_.kv.keys(), j, b0, nb, k_rows_, k_ahead_);
          detail::scores(q, dqk, rows,
                         listed_rows<S>{k_rows_, k_ahead_, head_offset(pb_.kv.keys(), i)}, nb, dqk,
                         s, pl_.block, value_block_into_l1(j + i, b0, nb));
        }
      }
      return {s_, pl_.block, 1};
    }
    if constexpr (std::same_as<S, bf16>)
      if (pairs_ != pair_engine::none) return pair_scores(j, b0, nb, k_end);
    if (narrow()) return narrow_scores(j, b0, nb, k_end);
    // The GEMM tiles read the block's K (and V) as float rows: in place for a contiguous float
    // view, else widened or gathered once into kf_ / vf_ and reused by all m rows.
    const float* kf = reinterpret_cast<const float*>(pb_.kv.keys().row(j, b0));
    std::int64_t kfs = ks;
    vfp_ = reinterpret_cast<const float*>(pb_.kv.values().row(j, b0)),
    vfs_ = pb_.kv.values().row_stride;
    if (!std::same_as<S, float> || paged()) {
      for_each_run(b0, nb, [&](std::int64_t t, std::int64_t n) {
        const S* k = pb_.kv.keys().row(j, t);
        for (std::int64_t i = 0; i < n; ++i) to_float_row(k + i * ks, kf_ + (t - b0 + i) * dqk, dqk);
        if (simd_vector_target()) widen_values(j, t, n, b0);  // the Eigen path widens V later
      });
      kf = kf_, kfs = dqk;
      if (pb_.keys_only) {
      } else if (pb_.kv.values_in_keys()) {  // MLA: the values are the leading columns of the widened keys
        vfp_ = kf_, vfs_ = dqk;
      } else {
        vfp_ = vf_, vfs_ = pb_.kv.v_head_dim();
      }
    }
    if (transposed()) {  // S^T = K Q^T
      gemm_bcast<false>(nb, m_, dqk, kf, kfs, 1, q_, m_, s_, m_);
      return {s_, 1, m_};
    }
    using map_c = Eigen::Map<const row_matrix<float>, Eigen::Unaligned, Eigen::OuterStride<>>;
    Eigen::Map<row_matrix<float>, Eigen::Unaligned, Eigen::OuterStride<>> sm(
        s_, m_, nb, Eigen::OuterStride<>(pl_.block));
    const map_c qm(q_, m_, dqk, Eigen::OuterStride<>(dqk));
    sm.noalias() = qm * map_c(kf, nb, dqk, Eigen::OuterStride<>(kfs)).transpose();
    return {s_, pl_.block, 1};
  }

  void accumulate(std::int64_t j, std::int64_t b0, std::int64_t nb, const score_tile& p,
                  float* acc) {
    const std::int64_t dv = pb_.kv.v_head_dim(), vs = pb_.kv.values().row_stride;
    if (pb_.streaming) {
      const std::int64_t rows = m_ / item_heads_;
      const S** ahead = pb_.kv.values_in_keys() ? nullptr : v_ahead_;  // MLA: with the keys
      for (std::int64_t i = 0; i < item_heads_; ++i) {
        const float* pr = p.data + i * rows * p.row_stride;
        float* o = acc + i * rows * dv;
        if (!paged()) {
          const S* v = pb_.kv.values().row(j + i, b0);
          if (pairs_pv_)
            stream_pair_pv(pr, p.row_stride, rows,
                           strided_rows<S>{v, vs, prefetch_rows(vs * std::int64_t{sizeof(S)})}, nb,
                           dv, o);
          else
            accumulate_pv(pr, p.row_stride, rows, v, vs, nb, dv, o, dv);
        } else {
          if (i == 0) list_rows(pb_.kv.values(), j, b0, nb, v_rows_, ahead);
          const listed_rows<S> v{v_rows_, ahead, head_offset(pb_.kv.values(), i)};
          if (pairs_pv_)
            stream_pair_pv(pr, p.row_stride, rows, v, nb, dv, o);
          else
            accumulate_pv(pr, p.row_stride, rows, v, nb, dv, o, dv);
        }
      }
      return;
    }
    if constexpr (std::same_as<S, bf16>)
      if (pairs_ != pair_engine::none) return pair_accumulate(j, b0, nb, p, acc);
    if (transposed()) {  // O += P V, P(r, t) = S^T[t][r]
      if (!narrow()) {
        gemm_bcast<true>(m_, dv, nb, p.data, 1, m_, vfp_, vfs_, acc, dv);
      } else if (!paged()) {  // value rows in place (an MLA's: its latent rows' first d_v)
        pv_columns(p.data, m_, strided_rows<S>{pb_.kv.values().row(j, b0), vs}, nb, dv, acc, dv,
                   pf_);
      } else {
        list_rows(pb_.kv.values(), j, b0, nb, v_rows_, nullptr);
        pv_columns(p.data, m_, listed_rows<S>{v_rows_}, nb, dv, acc, dv, pf_);
      }
      return;
    }
    using map_c = Eigen::Map<const row_matrix<float>, Eigen::Unaligned, Eigen::OuterStride<>>;
    Eigen::Map<row_matrix<float>, Eigen::Unaligned, Eigen::OuterStride<>> om(
        acc, m_, dv, Eigen::OuterStride<>(dv));
    const map_c pm(p.data, m_, nb, Eigen::OuterStride<>(p.row_stride));
    if (std::same_as<S, float> && !paged()) {
      om.noalias() += pm * map_c(reinterpret_cast<const float*>(pb_.kv.values().row(j, b0)), nb,
                                 dv, Eigen::OuterStride<>(vs));
    } else {
      const float* vf = vf_;
      std::int64_t vfs = dv;
      if (pb_.kv.values_in_keys()) {
        vf = kf_, vfs = pb_.kv.head_dim();  // widened with the keys in scores()
      } else {
        for_each_run(b0, nb, [&](std::int64_t t, std::int64_t n) {
          const S* v = pb_.kv.values().row(j, t);
          for (std::int64_t i = 0; i < n; ++i) to_float_row(v + i * vs, vf_ + (t - b0 + i) * dv, dv);
        });
      }
      om.noalias() += pm * map_c(vf, nb, dv, Eigen::OuterStride<>(vfs));
    }
  }

  const float* value_row(std::int64_t /*j*/, std::int64_t head, std::int64_t t, float* buf) const {
    const std::int64_t dv = pb_.kv.v_head_dim();
    to_float_row(pb_.kv.values().row(head / real_g_, t), buf, dv);
    permute_pairs(buf, dv, acc_group());
    return buf;
  }

  void finish(float* acc, std::int64_t rows) {
    if (acc_group() > 0)
      for (std::int64_t r = 0; r < rows; ++r)
        unpermute_pairs(acc + r * pb_.kv.v_head_dim(), pb_.kv.v_head_dim(), acc_group());
  }

 private:
  bool paired() const { return pair_group_ > 0; }
  /// streams_pairs: the scores of the item's i-th KV head (j + i), `rows` query rows, into s.
  void stream_pair_scores(std::int64_t i, std::int64_t rows, std::int64_t j, std::int64_t b0,
                          std::int64_t nb, float* s) {
    const std::int64_t dqk = pb_.kv.head_dim();
    const auto* q = reinterpret_cast<const std::uint32_t*>(q_) + i * rows * (dqk / 2);
    const row_set<S>& keys = pb_.kv.keys();
    if (!paged()) {
      const strided_rows<S> k{keys.row(j + i, b0), keys.row_stride,
                              prefetch_rows(keys.row_stride * std::int64_t{sizeof(S)})};
      detail::stream_pair_scores(q, dqk / 2, rows, k, nb, dqk, s, pl_.block);
    } else {  // its rows listed across its pages, once for all the item's heads
      if (i == 0) list_rows(keys, j, b0, nb, k_rows_, k_ahead_);
      detail::stream_pair_scores(q, dqk / 2, rows,
                                 listed_rows<S>{k_rows_, k_ahead_, head_offset(keys, i)}, nb, dqk,
                                 s, pl_.block);
    }
  }
  /// The value rows [b0, b0 + nb) of KV head `head`, for the score block to bring into L1 while
  /// it runs (P V reads them next): a byte range per run of rows (per page of a paged view);
  /// none where a run's rows are not one range of memory or the values are not read (keys
  /// only, MLA's values inside the keys).
  l1_range_prefetch value_block_into_l1(std::int64_t head, std::int64_t b0, std::int64_t nb) const {
    const auto& v = pb_.kv.values();
    l1_range_prefetch pf;
    if (pb_.keys_only || pb_.kv.values_in_keys() || v.row_stride != v.width) return pf;
    const std::int64_t row_bytes = v.width * std::int64_t{sizeof(S)};
    for_each_run(b0, nb, [&](std::int64_t t, std::int64_t n) {
      const char* begin = reinterpret_cast<const char*>(v.row(head, t));
      pf.add(begin, begin + n * row_bytes);
    });
    return pf;
  }
  /// pairs_pv_: the streaming P V of `rows` rows on pairs into o (rows of d_v).
  template <class Rows>
  void stream_pair_pv(const float* p, std::int64_t p_stride, std::int64_t rows, const Rows& v,
                      std::int64_t nb, std::int64_t dv, float* o) const {
    if constexpr (std::same_as<S, bf16>)
      detail::stream_pair_pv(p, p_stride, rows, v, nb, dv, o, dv);
  }
  /// A single AMX row tile with whole 32-column value groups: P V reads the value rows in place
  /// (amx_pv_rows) and the scores' tiles stream the next block in.
  bool amx_rows() const {
    return pairs_ == pair_engine::amx && m_ <= 16 && pb_.kv.v_head_dim() % 32 == 0;
  }
  /// Columns per (even, odd) group of the accumulators' layout, 0 for natural order: the bf16
  /// streaming kernels' (bf16_pair_group), or amx_pv_rows' 32.
  std::int64_t acc_group() const { return paired() ? pair_group_ : amx_rows() ? 32 : 0; }
  bool paged() const { return pb_.kv.keys().table.paged(); }
  /// Calls f(t, n) for each run of rows [t, t + n) that makes up keys [b0, b0 + nb).
  template <class F>
  void for_each_run(std::int64_t b0, std::int64_t nb, F&& f) const {
    for (std::int64_t t = b0, e = b0 + nb; t < e;) {
      const std::int64_t n = std::min(e, pb_.kv.run_end(t)) - t;
      f(t, n);
      t += n;
    }
  }
  /// Elements from the item's first KV head's rows to its i-th head's (the same pages).
  static std::int64_t head_offset(const row_set<S>& rs, std::int64_t i) {
    return i * rs.head_stride;
  }
  /// A paged view: blocks span pages, and the kernels that read a block in place (streaming,
  /// narrow tiles) find its rows through a list (list_rows).
  static bool listed(const problem& pb) { return pb.kv.keys().table.paged(); }
  static constexpr std::int64_t pointer_floats = sizeof(const S*) / sizeof(float);
  /// rows[i] = row b0 + i of KV head j for i < nb, and (ahead not null) ahead[i] = the row
  /// as far on as the contiguous kernels prefetch (ATTNKIT_PREFETCH_BYTES of rows, shared among
  /// the item's KV heads so that the lines in flight stay within L2), found through the page
  /// table, or rows[i] itself past the item's keys (k_end_): one page lookup per run.
  void list_rows(const row_set<S>& rs, std::int64_t j, std::int64_t b0, std::int64_t nb,
                 const S** rows, const S** ahead) const {
    auto fill = [&](std::int64_t begin, std::int64_t end, const S** out) {
      for_each_run(begin, end - begin, [&](std::int64_t t, std::int64_t n) {
        const S* r = rs.row(j, t);
        for (std::int64_t i = 0; i < n; ++i) out[t - begin + i] = r + i * rs.row_stride;
      });
    };
    fill(b0, b0 + nb, rows);
    if (!ahead) return;
    const std::int64_t dist =
        std::max(nb, prefetch_rows(rs.width * static_cast<std::int64_t>(sizeof(S))) / item_heads_);
    const std::int64_t n = std::clamp<std::int64_t>(k_end_ - b0 - dist, 0, nb);
    fill(b0 + dist, b0 + dist + n, ahead);
    std::copy(rows + n, rows + nb, ahead + n);
  }
  bool transposed() const { return vector_gemm_ && !pb_.streaming; }
  /// Tiles of at most 16 rows (an MLA decode step's heads) read the block in place (the scores
  /// with the streaming score block, written in column form; P V with pv_columns) instead of
  /// widening it for the GEMM tiles, and prefetch the next block while they compute (they take
  /// about as long as its rows take to arrive from DRAM; taller tiles compute long enough for the
  /// hardware prefetchers). Widening cost as much as either product, and the broadcast GEMM's
  /// scores a load per FMA (docs/benchmarks.md, "Serving").
  bool narrow() const { return transposed() && m_ <= 16; }
  /// Columns of Q^T and S^T: the query rows, whole 16-row tiles on AMX.
  std::int64_t q_cols() const { return pairs_ == pair_engine::amx ? round16(m_) : m_; }
  /// Narrow tiles (narrow()): S^T = K Q^T straight from the cache's rows, while the next
  /// block's rows stream in.
  score_tile narrow_scores(std::int64_t j, std::int64_t b0, std::int64_t nb, std::int64_t k_end) {
    const std::int64_t dqk = pb_.kv.head_dim(), next = b0 + nb;
    pf_.start(ranges_, block_ranges<S>{&pb_.kv, j, next, std::min(next + pl_.block, k_end),
                                       !pb_.keys_only && !pb_.kv.values_in_keys()});
    if (!paged()) {
      scores_columns(q_, dqk, m_,
                     strided_rows<S>{pb_.kv.keys().row(j, b0), pb_.kv.keys().row_stride}, nb, dqk,
                     s_, m_, pf_);
    } else {
      list_rows(pb_.kv.keys(), j, b0, nb, k_rows_, nullptr);
      scores_columns(q_, dqk, m_, listed_rows<S>{k_rows_}, nb, dqk, s_, m_, pf_);
    }
    return {s_, 1, m_};
  }
  /// Value rows [t, t + n) of KV head j widened into vf_ (from row t - b0), unless the item reads
  /// no values of its own (keys_only, or an MLA's in its keys).
  void widen_values(std::int64_t j, std::int64_t t, std::int64_t n, std::int64_t b0) {
    if (pb_.keys_only || pb_.kv.values_in_keys()) return;
    const std::int64_t dv = pb_.kv.v_head_dim(), vs = pb_.kv.values().row_stride;
    const S* v = pb_.kv.values().row(j, t);
    for (std::int64_t i = 0; i < n; ++i) to_float_row(v + i * vs, vf_ + (t - b0 + i) * dv, dv);
  }
  // bf16 products (engine_of): S^T = K Q^T with the cache's K rows in place, then O += P V
  // with P^T's and V's rows paired by key (a single AMX row tile: V's rows in place).
  score_tile pair_scores(std::int64_t j, std::int64_t b0, std::int64_t nb, std::int64_t k_end) {
    const std::int64_t dqk = pb_.kv.head_dim(), ks = pb_.kv.keys().row_stride;
    const auto* qp = reinterpret_cast<const std::uint32_t*>(q_);
    if (amx_rows()) return amx_row_scores(j, b0, nb, k_end);
    if (pairs_ == pair_engine::amx) {  // the K rows in place, or gathered from their pages
      const S* k = pb_.kv.keys().row(j, b0);
      std::int64_t k_stride = ks;
      if (paged()) {
        k = gather_rows(pb_.kv.keys(), j, b0, nb, reinterpret_cast<S*>(kf_));
        k_stride = dqk;
      }
      amx_gemm<false>(nb, q_cols(), dqk, k, k_stride, qp, q_cols(), s_, q_cols(), query_parts());
      return {s_, 1, q_cols()};
    }
    for_each_run(b0, nb, [&](std::int64_t t, std::int64_t n) {
      gemm_pairs<false>(n, m_, dqk / 2, pb_.kv.keys().row(j, t), ks, 2,
                        reinterpret_cast<const std::uint32_t*>(q_), m_, s_ + (t - b0) * m_, m_);
    });
    return {s_, 1, m_};
  }
  void pair_accumulate(std::int64_t j, std::int64_t b0, std::int64_t nb, const score_tile& p,
                       float* acc) {
    const std::int64_t dv = pb_.kv.v_head_dim();
    if (amx_rows()) {  // the value rows in place (an MLA's: the key groups' leading columns)
      if (!pb_.kv.values_in_keys())
        key_groups(pb_.kv.values(), j, b0, nb, reinterpret_cast<S*>(vf_), v_groups_);
      const std::int64_t part_stride = 32 * round16(nb);
      pack_probability_halves(p.data, p.key_stride, nb, pp_, parts_, part_stride);
      amx_pv_rows(m_, dv, pp_, pb_.kv.values_in_keys() ? k_groups_ : v_groups_, acc, dv, &pf_,
                  pf_steps_, {parts_, part_stride, 0});
      return;
    }
    const std::uint32_t* vp = value_pairs(j, b0, nb);
    if (pairs_ == pair_engine::amx) {  // keys padded with zeros to whole 32-key tiles
      const std::int64_t nb32 = (nb + 31) / 32 * 32, part_words = q_cols() * nb32 / 2;
      pack_pairs_transposed(p.data, p.key_stride, nb, q_cols(), nb32 / 2, pp_, nb32 / 2, parts_,
                            part_words);
      amx_gemm<true>(m_, dv, nb32, reinterpret_cast<const bf16*>(pp_), nb32, vp, dv, acc, dv,
                     {parts_, 2 * part_words, 0});
      return;
    }
    pack_row_pairs_of<float>([&](std::int64_t t) { return p.data + t * p.key_stride; }, nb, m_, pp_,
                             m_);
    gemm_pairs<true>(m_, dv, (nb + 1) / 2, reinterpret_cast<const bf16*>(pp_), 2, 2 * m_, vp, dv,
                     acc, dv);
  }
  /// V's rows [b0, b0 + nb) of KV head j paired by key, [(nb + 1) / 2][d_v] words (an odd last
  /// key paired with 0; for AMX zeros up to whole 32-key tiles). A whole block among the first
  /// cached_blocks comes from the worker's cache, packed by the first query tile of the KV head
  /// that reads it (the driver runs a head group's items one after another); other blocks (a
  /// causal tile's diagonal one, key splits' ends) are packed into vf_ each time.
  const std::uint32_t* value_pairs(std::int64_t j, std::int64_t b0, std::int64_t nb) {
    const std::int64_t dv = pb_.kv.v_head_dim(), slot = b0 / pl_.block;
    const bool cached = nb == pl_.block && b0 % pl_.block == 0 && slot < cached_blocks_;
    std::uint32_t* vp =
        cached ? cache_ + slot * (pl_.block / 2) * dv : reinterpret_cast<std::uint32_t*>(vf_);
    if (cached && cached_heads_[static_cast<std::size_t>(slot)] == j) return vp;
    pack_row_pairs_of<S>([&](std::int64_t t) { return pb_.kv.values().row(j, b0 + t); }, nb, dv, vp,
                         dv);
    if (pairs_ == pair_engine::amx)
      std::fill(vp + (nb + 1) / 2 * dv, vp + (nb + 31) / 32 * 16 * dv, 0u);
    if (cached) cached_heads_[static_cast<std::size_t>(slot)] = j;
    return vp;
  }
  /// Rows [b0, b0 + nb) of KV head j copied from their pages into dst [nb][width]; returns dst.
  const S* gather_rows(const row_set<S>& rs, std::int64_t j, std::int64_t b0, std::int64_t nb,
                       S* dst) const {
    for_each_run(b0, nb, [&](std::int64_t t, std::int64_t n) {
      const S* src = rs.row(j, t);
      for (std::int64_t i = 0; i < n; ++i)
        std::copy(src + i * rs.row_stride, src + i * rs.row_stride + rs.width,
                  dst + (t - b0 + i) * rs.width);
    });
    return dst;
  }
  /// Rows [b0, b0 + nb) of KV head j in rs as 16-key groups (out): in place where a group's rows
  /// lie in one run, else copied into scratch (16 rows of rs.width per group).
  void key_groups(const row_set<S>& rs, std::int64_t j, std::int64_t b0, std::int64_t nb,
                  S* scratch, amx_key_groups& out) const {
    out.keys = nb;
    for (std::int64_t i = 0; 16 * i < nb; ++i) {
      const std::int64_t t = b0 + 16 * i, n = std::min<std::int64_t>(16, nb - 16 * i);
      const bool in_place = pb_.kv.run_end(t) - t >= n;
      out.base[i] = in_place ? rs.row(j, t) : gather_rows(rs, j, t, n, scratch + 16 * i * rs.width);
      out.stride[i] = in_place ? rs.row_stride : rs.width;
    }
  }
  /// amx_rows(): S^T [nb][16] from the key rows in place, while pf_ streams the next block's rows
  /// in, spread over this block's steps of tile products: the scores' (two 16-key groups x 32 of
  /// depth) and P V's (a group x 64 value columns).
  score_tile amx_row_scores(std::int64_t j, std::int64_t b0, std::int64_t nb, std::int64_t k_end) {
    const std::int64_t dqk = pb_.kv.head_dim(), dv = pb_.kv.v_head_dim(), next = b0 + nb;
    const bool values = !pb_.keys_only && !pb_.kv.values_in_keys();
    pf_.start(ranges_,
              block_ranges<S>{&pb_.kv, j, next, std::min(next + pl_.block, k_end), values});
    const std::int64_t groups = (nb + 15) / 16,
                       lines = nb * (dqk + (values ? dv : 0)) * std::int64_t{sizeof(S)} / 64,
                       products = (groups + 1) / 2 * (dqk / 32) + groups * ((dv + 63) / 64);
    pf_steps_ = static_cast<int>((lines + products - 1) / products);
    key_groups(pb_.kv.keys(), j, b0, nb, reinterpret_cast<S*>(kf_), k_groups_);
    amx_group_scores(k_groups_, dqk, reinterpret_cast<const std::uint32_t*>(q_), s_, &pf_,
                     pf_steps_, query_parts());
    return {s_, 1, 16};
  }
  /// rows[i] = the query row r0 + i (i < n <= 16) of tile (t0, j), contiguous: strided columns
  /// are copied into kf_ (free until the first block).
  void query_rows(std::int64_t t0, std::int64_t j, std::int64_t r0, std::int64_t n,
                  const float** rows) {
    const std::int64_t g = pl_.g, dqk = pb_.kv.head_dim();
    pb_.q.visit([&](const auto& q) {
      const std::int64_t cs = q.stride(2);
      for (std::int64_t i = 0; i < n; ++i) {
        const auto* src = &q(t0 + (r0 + i) / g, j * g + (r0 + i) % g, 0);
        float* row = kf_ + i * dqk;  // float rows in place, else widened or gathered here
        if constexpr (std::same_as<std::remove_cvref_t<decltype(*src)>, float>) {
          if (cs == 1) {
            rows[i] = src;
            continue;
          }
          copy_strided(src, cs, dqk, row);
        } else if (cs == 1) {
          to_float_row(src, row, dqk);
        } else {
          for (std::int64_t c = 0; c < dqk; ++c) row[c] = static_cast<float>(src[c * cs]);
        }
        rows[i] = row;
      }
    });
  }
  /// The parts of Q^T's pairs (load_query_pairs) as the B operand of AMX tile products.
  amx_parts query_parts() const { return {parts_, 0, pb_.kv.head_dim() / 2 * q_cols()}; }
  /// Q^T as bf16 pairs of adjacent columns [d_qk / 2][q_cols()] per part (split_parts); the AMX
  /// tiles' padding columns 0.
  void load_query_pairs(std::int64_t t0, std::int64_t j) {
    const std::int64_t dqk = pb_.kv.head_dim();
    auto* qp = reinterpret_cast<std::uint32_t*>(q_);
    for (std::int64_t r0 = 0; r0 < q_cols(); r0 += 16) {
      const std::int64_t n = std::clamp<std::int64_t>(m_ - r0, 0, 16);
      const float* rows[16];
      query_rows(t0, j, r0, n, rows);
      for (int part = 0; part < parts_; ++part)
        pack_query_pairs(rows, n, dqk / 2, pb_.scale, std::min<std::int64_t>(16, q_cols() - r0),
                         qp + part * (dqk / 2 * q_cols()) + r0, q_cols(), part);
    }
  }

  const problem& pb_;
  const attention_plan& pl_;
  std::int64_t m_ = 0;
  std::int64_t loaded_[3] = {-1, -1, -1};  // the (t0, tn, j) whose queries q_ holds
  const S** k_rows_ = nullptr;  // listed(): the block's K rows [block], their prefetch rows
  const S** k_ahead_ = nullptr;
  const S** v_rows_ = nullptr;  // the same for V
  const S** v_ahead_ = nullptr;
  std::int64_t k_end_ = 0;  // the current item's key end (scores())
  range_prefetcher pf_;     // the narrow GEMM tiles' (and AMX row tiles') next block
  int pf_steps_ = 0;        // amx_rows(): pf_'s steps per tile product
  amx_key_groups k_groups_, v_groups_;  // amx_rows(): the block's key and value rows
  block_ranges<S> ranges_;  // pf_'s ranges
  float *q_, *s_, *kf_, *vf_;
  std::uint32_t* pp_ = nullptr;
  std::uint32_t* cache_ = nullptr;  // value_pairs' blocks [cached_blocks_][block / 2][d_v]
  std::array<std::int64_t, max_cached_blocks> cached_heads_;  // the KV head each slot holds
  const float* vfp_ = nullptr;  // the current block's values as float (transposed path)
  std::int64_t vfs_ = 0;
  // The active target's layout choices, read once per call: the transposed GEMM tiles (else
  // Eigen's), and the bf16 streaming order (simd/targets.hpp).
  const bool vector_gemm_ = simd_vector_target();
  const std::int64_t pair_group_ = std::same_as<S, bf16> && pb_.streaming ? bf16_pair_group() : 0;
  const pair_engine pairs_ = engine_of(pb_);  // bf16 products (product_math::bf16)
  const int parts_ = split_parts(pb_);        // bf16 parts per float operand of pairs_
  const std::int64_t cached_blocks_ = cached_blocks(pb_, pl_);
  const bool stream_pairs_ = streams_pairs(pb_);  // bf16 products on the streaming path
  // ... and their P V on pairs (stream_pair_pv) where d_v is whole 32-column groups
  const bool pairs_pv_ = stream_pairs_ && pb_.kv.v_head_dim() % 32 == 0;
  // KV heads per item (merges_heads: all of them, else one) and query heads per KV head.
  const std::int64_t item_heads_ =
      merges_heads(pb_.q.extent(0), pb_.kv, pb_.streaming, pb_.keys_only) ? pb_.kv.kv_heads() : 1;
  const std::int64_t real_g_ = pb_.q.extent(1) / pb_.kv.kv_heads();
};

/// Streaming micro-kernels for tiles of fewer than 16 query rows (g heads x Tq tokens). On the
/// scalar target the streaming loops are slow and Eigen's vectorised GEMM tiles are the fast
/// path for every size.
inline bool streams(const attention_options& opt, std::int64_t g, std::int64_t tq) {
  return opt.strategy == tile_strategy::streaming ||
         (opt.strategy == tile_strategy::automatic && simd_vector_target() && g * tq < 16);
}

/// The GQA problem of queries q [Tq, H, d_qk] against kv (checked against each other): the
/// tile strategy and the scale.
template <storage_type S>
gqa_problem<S> gqa_problem_of(const char* who, query_view q, const kv_view<S>& kv,
                              const attention_options& opt, std::optional<float> default_scale) {
  const std::int64_t tq = q.extent(0), h = q.extent(1), hkv = kv.kv_heads(), dqk = kv.head_dim();
  require(h > 0 && h % hkv == 0, who, ": heads=", h,
          " (q.extent(1)) must be a positive multiple of kv_heads=", hkv);
  require(q.extent(2) == dqk, who, ": q head dim q.extent(2)=", q.extent(2),
          " differs from the keys' head_dim=", dqk);
  q.visit([&](const auto& v) { require_extents(v, {tq, h, dqk}, who, "q"); });
  const float scale =
      opt.scale.value_or(default_scale.value_or(1.f / std::sqrt(static_cast<float>(dqk))));
  return {.q = q,
          .kv = kv,
          .scale = scale,
          .streaming = streams(opt, h / hkv, tq),
          .bf16_products = opt.products == product_math::bf16};
}

/// The GQA path of attend and attend_latent on a validated kv_view.
template <storage_type S, class Q, class O, class Mask, class Exec>
void run_gqa(const char* who, tensor3_view<const Q> q, std::span<const std::int64_t> q_pos,
             const kv_view<S>& kv, tensor3_view<O> out, const attention_options& opt, Exec& exec,
             attention_workspace* ws, const Mask& mask, std::optional<float> default_scale = {}) {
  const gqa_problem<S> pb = gqa_problem_of(who, q, kv, opt, default_scale);
  require_outputs_disjoint(who, out, opt, q, "q");
  const attention_policy policy =
      validate_call(who, q.extent(0), q.extent(1), kv.v_head_dim(), kv.size(), q_pos, out, opt);
  run_attention<gqa_products<S>>(
      pb, attention_call<Mask>{q_pos, policy, mask, out, opt.lse, opt.weights}, exec, ws);
}

}  // namespace detail

/// Attention of roped queries q [Tq, H, d_qk] at q_positions against every token of `kv` (a
/// kv_view, or a cache exporting one); writes out [Tq, H, d_v]. H must be a multiple of the
/// view's kv_heads; query head h attends KV head h / (H / kv_heads). Options: scale (default
/// 1/sqrt(d_qk)), causal, window, soft-cap, ALiBi, sinks, LSE output, tile strategy; `mask`
/// narrows the visible keys further. Thread count is the executor's; `ws` keeps scratch memory
/// across calls.
///
/// Queries and outputs are float, or both bf16 (E, taken from `out`) as an engine running bf16
/// activations holds them: the same kernels, which load the queries a tile at a time (as float,
/// or with product_math::bf16 as bf16 pairs) and round each output row to bf16 once, to nearest
/// even, from its float result; a prefill moves half the interface bytes.
template <activation_type E, kv_source KV, class Exec = serial_executor,
          mask_predicate Mask = no_mask>
void attend(std::type_identity_t<tensor3_view<const E>> q,
            std::span<const std::int64_t> q_positions, const KV& kv, tensor3_view<E> out,
            const attention_options& opt = {}, Exec&& exec = Exec{},
            attention_workspace* ws = nullptr, const Mask& mask = {}) {
  detail::run_gqa("attend", q, q_positions, detail::kv_view_of(kv), out, opt, exec, ws, mask);
}

/// MHA and MQA are the same kernel: names for readers, with a shape check, not copies.
template <activation_type E, kv_source KV, class Exec = serial_executor,
          mask_predicate Mask = no_mask>
void attend_mha(std::type_identity_t<tensor3_view<const E>> q,
                std::span<const std::int64_t> q_positions, const KV& kv, tensor3_view<E> out,
                const attention_options& opt = {}, Exec&& exec = Exec{},
                attention_workspace* ws = nullptr, const Mask& mask = {}) {
  const auto v = detail::kv_view_of(kv);
  detail::require(q.extent(1) == v.kv_heads(), "attend_mha: heads=", q.extent(1),
                  " must equal kv_heads=", v.kv_heads());
  detail::run_gqa("attend_mha", q, q_positions, v, out, opt, exec, ws, mask);
}
/// MQA: attend with kv_heads = 1, checked.
template <activation_type E, kv_source KV, class Exec = serial_executor,
          mask_predicate Mask = no_mask>
void attend_mqa(std::type_identity_t<tensor3_view<const E>> q,
                std::span<const std::int64_t> q_positions, const KV& kv, tensor3_view<E> out,
                const attention_options& opt = {}, Exec&& exec = Exec{},
                attention_workspace* ws = nullptr, const Mask& mask = {}) {
  const auto v = detail::kv_view_of(kv);
  detail::require(v.kv_heads() == 1, "attend_mqa: kv_heads must be 1, got ", v.kv_heads());
  detail::run_gqa("attend_mqa", q, q_positions, v, out, opt, exec, ws, mask);
}

}  // namespace attnkit
