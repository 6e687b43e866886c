#pragma once
// attnkit-compare --batch: one serving step of a mixed batch per variant over paged caches (N
// decodes of random context lengths plus M prefill chunks at the end of a context), run as one
// attend_batch call and as a loop of single-sequence calls over the same caches. Reports the
// step time of each, tokens per second, the KV bytes the step reads per second and that rate's
// share of the machine's read bandwidth, measured in the same run.
#include <attnkit/attention.hpp>

#include "../bench/read_stream.hpp"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace compare_batch {

namespace ak = attnkit;

struct batch_options {
  std::int64_t decodes = 32, min_context = 1024, max_context = 16384, prefills = 2, chunk = 512;
  std::int64_t page_size = 16;
  std::int64_t heads = 32, kv_heads = 8, head_dim = 128;  // the GQA row's geometry
  int threads = 2;
  bool json = false;
  /// product_math::bf16: AMX or vdpbf16ps products over bf16 caches where the CPU has them.
  ak::product_math products = ak::product_math::f32;
  const char* products_name() const { return products == ak::product_math::bf16 ? "bf16" : "f32"; }
};

struct batch_row {
  std::string variant, shape;
  std::int64_t sequences = 0, tokens = 0;
  double kv_bytes = 0, batch_us = 0, loop_us = 0;
};

inline double median_us(int reps, const std::function<void()>& fn) {
  fn();
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto a = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

/// Medians of `reps` runs of a and of b, alternated (a, b, a, b, ...): on a machine whose speed
/// drifts, both see the same conditions.
inline std::pair<double, double> median_pair_us(int reps, const std::function<void()>& a,
                                                const std::function<void()>& b) {
  auto time = [](const std::function<void()>& fn) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  };
  a(), b();
  std::vector<double> ta, tb;
  for (int r = 0; r < reps; ++r) ta.push_back(time(a)), tb.push_back(time(b));
  std::sort(ta.begin(), ta.end()), std::sort(tb.begin(), tb.end());
  return {ta[ta.size() / 2], tb[tb.size() / 2]};
}

/// Read bandwidth of `threads` threads streaming a 1 GiB buffer (GB/s, median of 5 passes): the
/// benchmarks' yardstick (bench/read_stream.hpp), so both report the same share of it.
inline double read_bandwidth(ak::thread_pool& pool, int threads) {
  const ak::bench::read_stream stream;
  volatile float sink = 0.f;
  const double us = median_us(5, [&] { sink = sink + stream.pass(pool, threads); });
  return static_cast<double>(stream.bytes()) / us / 1e3;
}

/// Per sequence: keys it holds after the step's appends and the tokens it feeds this step.
struct step_shape {
  std::vector<std::int64_t> keys, queries, indptr, positions;
};

inline step_shape make_step(const batch_options& o) {
  std::mt19937_64 rng(11);
  std::uniform_int_distribution<std::int64_t> len(o.min_context, o.max_context);
  step_shape s;
  s.indptr.push_back(0);
  for (std::int64_t i = 0; i < o.decodes + o.prefills; ++i) {
    const bool decode = i < o.decodes;
    const std::int64_t q = decode ? 1 : o.chunk, k = decode ? len(rng) : o.min_context + o.chunk;
    s.keys.push_back(k), s.queries.push_back(q);
    for (std::int64_t t = 0; t < q; ++t) s.positions.push_back(k - q + t);
    s.indptr.push_back(s.indptr.back() + q);
  }
  return s;
}

/// Fills a paged cache with `t` tokens at positions 0..t-1 from a reused block of random rows.
template <class Cache, class Append>
void fill(Cache& c, std::int64_t t, Append&& append_block) {
  std::vector<std::int64_t> pos(1024);
  for (std::int64_t s = 0; s < t; s += 1024) {
    const std::int64_t n = std::min<std::int64_t>(1024, t - s);
    for (std::int64_t i = 0; i < n; ++i) pos[static_cast<std::size_t>(i)] = s + i;
    append_block(c, n, std::span<const std::int64_t>(pos).first(static_cast<std::size_t>(n)));
  }
}

inline std::vector<float> random_floats(std::int64_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = nd(rng);
  return v;
}

/// Builds one variant's paged caches (make(pool) per sequence, filled by append_block), then
/// times its batch and its loop of single calls (run(plan or nullptr)).
template <ak::storage_type S, class Layout, class Append, class Run>
batch_row measure(const batch_options& o, const step_shape& st, std::string name,
                  std::string shape, const Layout& layout, Append&& append_block, Run&& run) {
  Layout l = layout;
  l.validate();
  std::int64_t pages = 0;
  for (const auto k : st.keys) pages += (k + o.page_size - 1) / o.page_size;
  ak::page_pool<S> pool({.num_pages = pages, .page_size = o.page_size, .token_elements = l.token_elements()});
  std::vector<ak::paged_cache<S, Layout>> caches;
  caches.reserve(st.keys.size());
  for (const auto k : st.keys) {
    caches.emplace_back(pool, layout);
    fill(caches.back(), k, append_block);
  }
  batch_row r{std::move(name), std::move(shape), static_cast<std::int64_t>(st.keys.size()),
              st.indptr.back()};
  for (const auto k : st.keys) r.kv_bytes += double(k) * double(caches[0].bytes_per_token());
  using view_t = decltype(caches[0].view());
  std::vector<view_t> views;
  for (const auto& c : caches) views.push_back(c.view());
  std::tie(r.batch_us, r.loop_us) = median_pair_us(
      7, [&] { run(views, true); }, [&] { run(views, false); });
  return r;
}

template <ak::storage_type S>
std::vector<batch_row> run_all(const batch_options& o, ak::thread_pool& pool) {
  const step_shape st = make_step(o);
  const std::int64_t tokens = st.indptr.back();
  const ak::attention_options opt{.causal = true, .products = o.products};
  ak::attention_workspace ws;
  std::vector<batch_row> rows;
  auto seq_rows = [&](std::size_t s) {
    return std::pair{st.indptr[s], st.indptr[s + 1] - st.indptr[s]};
  };
  auto qpos = [&](std::size_t s) {
    const auto [b, n] = seq_rows(s);
    return std::span<const std::int64_t>(st.positions).subspan(static_cast<std::size_t>(b),
                                                               static_cast<std::size_t>(n));
  };
  {  // GQA at the geometry
    const std::int64_t h = o.heads, hkv = o.kv_heads, d = o.head_dim;
    const auto k = random_floats(1024 * hkv * d, 1), v = random_floats(1024 * hkv * d, 2),
               q = random_floats(tokens * h * d, 3);
    std::vector<float> out(static_cast<std::size_t>(tokens * h * d));
    rows.push_back(measure<S>(
        o, st, "GQA", "H=" + std::to_string(h) + " H_kv=" + std::to_string(hkv) + " d=" + std::to_string(d),
        ak::paged_dense{hkv, d, d},
        [&](auto& c, std::int64_t n, std::span<const std::int64_t> p) {
          c.append(ak::dense_append{ak::tensor3_view<const float>(k.data(), {n, hkv, d}),
                                    ak::tensor3_view<const float>(v.data(), {n, hkv, d}), p});
        },
        [&](const auto& views, bool batched) {
          using V = typename std::decay_t<decltype(views)>::value_type;
          const ak::gqa_batch<typename V::storage_type> b{
              ak::tensor3_view<const float>(q.data(), {tokens, h, d}), st.positions, st.indptr, views};
          if (batched) {
            const ak::batch_plan plan = ak::plan_batch(b, opt, pool);  // part of the step's time
            ak::attend_batch(plan, b, ak::tensor3_view<float>(out.data(), {tokens, h, d}), opt, pool, &ws);
            return;
          }
          for (std::size_t s = 0; s < views.size(); ++s) {
            const auto [r0, n] = seq_rows(s);
            ak::attend(ak::tensor3_view<const float>(q.data() + r0 * h * d, {n, h, d}), qpos(s), views[s],
                       ak::tensor3_view<float>(out.data() + r0 * h * d, {n, h, d}), opt, pool, &ws);
          }
        }));
  }
  {  // absorbed MLA, DeepSeek-V2-Lite: H 16, d_c 512, d_R 64
    const std::int64_t h = 16, dc = 512, dr = 64;
    const auto c0 = random_floats(1024 * dc, 4), kr = random_floats(1024 * dr, 5),
               ql = random_floats(tokens * h * dc, 6), qr = random_floats(tokens * h * dr, 7);
    std::vector<float> out(static_cast<std::size_t>(tokens * h * dc));
    rows.push_back(measure<S>(
        o, st, "MLA-V2-Lite", "H=16 d_c=512 d_R=64 absorbed", ak::paged_latent{dc, dr, 1},
        [&](auto& c, std::int64_t n, std::span<const std::int64_t> p) {
          c.append(ak::latent_append{ak::matrix_view<const float>(c0.data(), {n, dc}),
                                     ak::tensor3_view<const float>(kr.data(), {n, 1, dr}), p});
        },
        [&](const auto& views, bool batched) {
          using V = typename std::decay_t<decltype(views)>::value_type;
          const ak::latent_batch<typename V::storage_type> b{
              ak::tensor3_view<const float>(ql.data(), {tokens, h, dc}),
              ak::tensor3_view<const float>(qr.data(), {tokens, h, dr}), st.positions, st.indptr, views};
          if (batched) {
            const ak::batch_plan plan = ak::plan_batch(b, opt, pool);
            ak::attend_batch(plan, b, ak::tensor3_view<float>(out.data(), {tokens, h, dc}), opt, pool, &ws);
            return;
          }
          for (std::size_t s = 0; s < views.size(); ++s) {
            const auto [r0, n] = seq_rows(s);
            ak::attend_latent(ak::tensor3_view<const float>(ql.data() + r0 * h * dc, {n, h, dc}),
                              ak::tensor3_view<const float>(qr.data() + r0 * h * dr, {n, h, dr}),
                              qpos(s), views[s],
                              ak::tensor3_view<float>(out.data() + r0 * h * dc, {n, h, dc}), opt, pool, &ws);
          }
        }));
  }
  {  // TPA at the geometry's H and d, ranks 6 / 2 / 2
    const std::int64_t h = o.heads, d = o.head_dim, rq = 6, rk = 2, rv = 2;
    const auto ak_ = random_floats(1024 * rk * h, 8), bk = random_floats(1024 * rk * d, 9),
               av = random_floats(1024 * rv * h, 10), bv = random_floats(1024 * rv * d, 11),
               aq = random_floats(tokens * rq * h, 12), bq = random_floats(tokens * rq * d, 13);
    std::vector<float> out(static_cast<std::size_t>(tokens * h * d));
    rows.push_back(measure<S>(
        o, st, "TPA-R2", "H=" + std::to_string(h) + " d=" + std::to_string(d) + " R=6/2/2",
        ak::paged_factors{.heads = h, .head_dim = d, .k_rank = rk, .v_rank = rv},
        [&](auto& c, std::int64_t n, std::span<const std::int64_t> p) {
          c.append(ak::factorized_append{ak::tensor3_view<const float>(ak_.data(), {n, rk, h}),
                                         ak::tensor3_view<const float>(bk.data(), {n, rk, d}),
                                         ak::tensor3_view<const float>(av.data(), {n, rv, h}),
                                         ak::tensor3_view<const float>(bv.data(), {n, rv, d}), p});
        },
        [&](const auto& views, bool batched) {
          using V = typename std::decay_t<decltype(views)>::value_type;
          const ak::factorized_batch<typename V::storage_type> b{
              ak::tensor3_view<const float>(aq.data(), {tokens, rq, h}),
              ak::tensor3_view<const float>(bq.data(), {tokens, rq, d}), st.positions, st.indptr, views};
          if (batched) {
            const ak::batch_plan plan = ak::plan_batch(b, opt, pool);
            ak::attend_batch(plan, b, ak::tensor3_view<float>(out.data(), {tokens, h, d}), opt, pool, &ws);
            return;
          }
          for (std::size_t s = 0; s < views.size(); ++s) {
            const auto [r0, n] = seq_rows(s);
            ak::attend_factorized(ak::tensor3_view<const float>(aq.data() + r0 * rq * h, {n, rq, h}),
                                  ak::tensor3_view<const float>(bq.data() + r0 * rq * d, {n, rq, d}),
                                  qpos(s), views[s],
                                  ak::tensor3_view<float>(out.data() + r0 * h * d, {n, h, d}), opt, pool, &ws);
          }
        }));
  }
  return rows;
}

inline void print(const batch_options& o, const std::string& storage, double bandwidth,
                  const std::vector<batch_row>& rows) {
  if (o.json) {
    std::printf("{\n  \"batch\": {\"decodes\": %lld, \"min_context\": %lld, \"max_context\": %lld, "
                "\"prefills\": %lld, \"chunk\": %lld, \"page_size\": %lld, \"threads\": %d, "
                "\"storage\": \"%s\", \"products\": \"%s\", \"read_bandwidth_gbs\": %.2f},\n"
                "  \"rows\": [\n",
                (long long)o.decodes, (long long)o.min_context, (long long)o.max_context,
                (long long)o.prefills, (long long)o.chunk, (long long)o.page_size, o.threads,
                storage.c_str(), o.products_name(), bandwidth);
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const auto& r = rows[i];
      std::printf("    {\"variant\": \"%s\", \"shape\": \"%s\", \"sequences\": %lld, \"tokens\": %lld, "
                  "\"kv_bytes\": %.0f, \"batch_ms\": %.3f, \"loop_ms\": %.3f, \"tokens_per_s\": %.1f, "
                  "\"kv_gbs\": %.2f, \"bandwidth_share\": %.3f}%s\n",
                  r.variant.c_str(), r.shape.c_str(), (long long)r.sequences, (long long)r.tokens,
                  r.kv_bytes, r.batch_us / 1e3, r.loop_us / 1e3, double(r.tokens) / r.batch_us * 1e6,
                  r.kv_bytes / r.batch_us / 1e3, r.kv_bytes / r.batch_us / 1e3 / bandwidth,
                  i + 1 < rows.size() ? "," : "");
    }
    std::printf("  ]\n}\n");
    return;
  }
  std::printf("attnkit %s  batch step: %lld decodes (context %lld-%lld) + %lld prefill chunks of %lld, "
              "page size %lld, storage %s (%s products), %d threads\n",
              ATTNKIT_VERSION_STRING, (long long)o.decodes, (long long)o.min_context,
              (long long)o.max_context, (long long)o.prefills, (long long)o.chunk,
              (long long)o.page_size, storage.c_str(), o.products_name(), o.threads);
  std::printf(
      "read bandwidth measured now: %.1f GB/s. Medians of 7 steps, batch and loop "
      "alternated; batch = plan_batch + attend_batch, loop = one call per sequence.\n\n",
      bandwidth);
  std::printf("%-12s %-30s %6s %10s %10s %8s %12s %10s %8s\n", "variant", "shape", "tokens",
              "batch ms", "loop ms", "speedup", "tokens/s", "KV GB/s", "of BW");
  for (const auto& r : rows) {
    const double gbs = r.kv_bytes / r.batch_us / 1e3;
    std::printf("%-12s %-30s %6lld %10.2f %10.2f %7.2fx %12.0f %10.1f %7.0f%%\n", r.variant.c_str(),
                r.shape.c_str(), (long long)r.tokens, r.batch_us / 1e3, r.loop_us / 1e3,
                r.loop_us / r.batch_us, double(r.tokens) / r.batch_us * 1e6, gbs,
                100 * gbs / bandwidth);
  }
  std::printf("\nKV GB/s: every sequence's cache bytes (read at least once by the step) over the "
              "batch step's time.\n");
}

}  // namespace compare_batch
