// Batched decode (kernels/batch.hpp): one attend_batch call for 32 sequences of lengths spread
// over 1k-16k tokens against a loop of single-sequence calls over the same caches, bf16 caches,
// contiguous or paged, with the machine's read bandwidth measured in the same run
// (roofline.hpp). Bytes are the KV bytes the step reads (every sequence's whole cache).
//   BM_{batch,loop}_gqa/page_size/threads/products:
//                                           Llama-3-8B attention (H 32, H_kv 8, d 128);
//                                           page_size 0 is contiguous caches; f32 (0) or bf16
//                                           products (1: the scores on vdpbf16ps where the CPU
//                                           runs it faster than f32; elsewhere f32).
//   BM_{batch,loop}_mla/page_size/threads/products:
//                                           DeepSeek-V2-Lite absorbed MLA (H 16, d_c 512,
//                                           d_R 64: one latent row of 576 per token), f32 (0)
//                                           or bf16 products (1: AMX or vdpbf16ps where the
//                                           CPU has them).
//   BM_single_gqa/page_size/T/threads:      one sequence's decode (attend) over a contiguous
//                                           (page_size 0) or paged bf16 cache of T tokens, same
//                                           geometry: what paging costs a single call.
//   BM_plan_gqa/threads:                    plan_batch for the same batch (once per step).
#include <attnkit/attention.hpp>
#include <benchmark/benchmark.h>

#include <algorithm>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <vector>

#include "roofline.hpp"

namespace {
namespace ak = attnkit;
using ak::bf16;
constexpr std::int64_t SEQS = 32;

std::vector<float> random_floats(std::int64_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = nd(rng);
  return v;
}

/// 32 lengths evenly spread over [1024, 16384], in a shuffled order.
std::vector<std::int64_t> lengths() {
  std::vector<std::int64_t> t;
  for (std::int64_t i = 0; i < SEQS; ++i) t.push_back(1024 + i * (16384 - 1024) / (SEQS - 1));
  std::shuffle(t.begin(), t.end(), std::mt19937(7));
  return t;
}

/// One variant's caches of the batch: contiguous (page_size 0) or paged in one pool.
template <class Flat, class Layout, class Fill>
struct batch_caches {
  std::vector<std::int64_t> len, positions;
  std::unique_ptr<ak::page_pool<bf16>> pool;
  std::vector<Flat> flat;
  std::vector<ak::paged_cache<bf16, Layout>> paged;

  batch_caches(std::vector<std::int64_t> lens, std::int64_t page_size, Layout layout, Fill fill,
               std::function<Flat(std::int64_t)> make_flat)
      : len(std::move(lens)) {
    if (page_size > 0) {
      std::int64_t pages = 0;
      for (const auto t : len) pages += (t + page_size - 1) / page_size;
      Layout l = layout;
      l.validate();
      pool = std::make_unique<ak::page_pool<bf16>>(ak::page_pool_config{
          .num_pages = pages, .page_size = page_size, .token_elements = l.token_elements()});
    }
    for (const auto t : len) {
      if (pool) {
        paged.emplace_back(*pool, layout);
        fill(paged.back(), t);
      } else {
        flat.push_back(make_flat(t));
        fill(flat.back(), t);
      }
    }
  }
  std::int64_t tokens() const {
    std::int64_t n = 0;
    for (const auto t : len) n += t;
    return n;
  }
  template <class View>
  std::vector<View> views() const {
    std::vector<View> v;
    for (std::size_t i = 0; i < len.size(); ++i) v.push_back(pool ? paged[i].view() : flat[i].view());
    return v;
  }
};

/// Appends T tokens at positions 0..T-1 in chunks of one random block.
struct fill_dense {
  std::int64_t hkv, d;
  template <class Cache>
  void operator()(Cache& c, std::int64_t t) const {
    const std::int64_t chunk = 1024;
    static const auto k = random_floats(chunk * 8 * 128, 1), v = random_floats(chunk * 8 * 128, 2);
    std::vector<std::int64_t> pos(chunk);
    for (std::int64_t s = 0; s < t; s += chunk) {
      const std::int64_t n = std::min(chunk, t - s);
      for (std::int64_t i = 0; i < n; ++i) pos[static_cast<std::size_t>(i)] = s + i;
      c.append(ak::dense_append{ak::tensor3_view<const float>(k.data(), {n, hkv, d}),
                                ak::tensor3_view<const float>(v.data(), {n, hkv, d}),
                                std::span<const std::int64_t>(pos).first(static_cast<std::size_t>(n))});
    }
  }
};
struct fill_latent {
  std::int64_t dc, dr;
  template <class Cache>
  void operator()(Cache& c, std::int64_t t) const {
    const std::int64_t chunk = 1024;
    static const auto lat = random_floats(chunk * 512, 3), kr = random_floats(chunk * 64, 4);
    std::vector<std::int64_t> pos(chunk);
    for (std::int64_t s = 0; s < t; s += chunk) {
      const std::int64_t n = std::min(chunk, t - s);
      for (std::int64_t i = 0; i < n; ++i) pos[static_cast<std::size_t>(i)] = s + i;
      c.append(ak::latent_append{ak::matrix_view<const float>(lat.data(), {n, dc}),
                                 ak::tensor3_view<const float>(kr.data(), {n, 1, dr}),
                                 std::span<const std::int64_t>(pos).first(static_cast<std::size_t>(n))});
    }
  }
};

using gqa_caches = batch_caches<ak::dense_cache<bf16>, ak::paged_dense, fill_dense>;
using mla_caches = batch_caches<ak::latent_cache<bf16>, ak::paged_latent, fill_latent>;

// Building a batch's caches takes seconds: each configuration is built once per process.
// lens: the batch's lengths (default) or one sequence's.
const gqa_caches& gqa_batch_caches(std::int64_t page_size,
                                   std::vector<std::int64_t> lens = lengths()) {
  static std::map<std::pair<std::int64_t, std::vector<std::int64_t>>, std::unique_ptr<gqa_caches>>
      cache;
  auto& c = cache[{page_size, lens}];
  if (!c)
    c = std::make_unique<gqa_caches>(lens, page_size, ak::paged_dense{8, 128, 128},
                                     fill_dense{8, 128}, [](std::int64_t t) {
                                       return ak::dense_cache<bf16>({8, 128, 128, t});
                                     });
  return *c;
}
const mla_caches& mla_batch_caches(std::int64_t page_size) {
  static std::map<std::int64_t, std::unique_ptr<mla_caches>> cache;
  auto& c = cache[page_size];
  if (!c)
    c = std::make_unique<mla_caches>(lengths(), page_size, ak::paged_latent{512, 64, 1},
                                     fill_latent{512, 64}, [](std::int64_t t) {
                                       return ak::latent_cache<bf16>({512, 64, 1, t});
                                     });
  return *c;
}

/// One decode token per sequence, at the position after its cache's last.
struct decode_step {
  std::vector<std::int64_t> qpos, indptr;
  explicit decode_step(const std::vector<std::int64_t>& len) {
    indptr.push_back(0);
    for (const auto t : len) qpos.push_back(t - 1), indptr.push_back(indptr.back() + 1);
  }
};

void BM_gqa(benchmark::State& state, bool batched) {
  const std::int64_t ps = state.range(0), threads = state.range(1), h = 32, d = 128;
  const auto products = state.range(2) ? ak::product_math::bf16 : ak::product_math::f32;
  const gqa_caches& c = gqa_batch_caches(ps);
  const auto views = c.views<ak::kv_view<bf16>>();
  const decode_step step(c.len);
  const auto q = random_floats(SEQS * h * d, 5);
  std::vector<float> out(static_cast<std::size_t>(SEQS * h * d));
  ak::thread_pool pool(static_cast<int>(threads));
  ak::attention_workspace ws;
  const ak::attention_options opt{.causal = true, .products = products};
  const ak::gqa_batch<bf16> b{ak::tensor3_view<const float>(q.data(), {SEQS, h, d}), step.qpos,
                              step.indptr, views};
  const ak::batch_plan plan = ak::plan_batch(b, opt, pool);
  for (auto _ : state) {
    if (batched) {
      ak::attend_batch(plan, b, ak::tensor3_view<float>(out.data(), {SEQS, h, d}), opt, pool, &ws);
    } else {
      for (std::int64_t s = 0; s < SEQS; ++s)
        ak::attend(ak::tensor3_view<const float>(q.data() + s * h * d, {1, h, d}),
                   std::span(step.qpos).subspan(static_cast<std::size_t>(s), 1),
                   views[static_cast<std::size_t>(s)],
                   ak::tensor3_view<float>(out.data() + s * h * d, {1, h, d}), opt, pool, &ws);
    }
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(state.iterations() * c.tokens() * 8 * 2 * d * 2);
  state.counters["tokens_per_s"] =
      benchmark::Counter(static_cast<double>(state.iterations() * SEQS), benchmark::Counter::kIsRate);
}
void BM_batch_gqa(benchmark::State& state) { BM_gqa(state, true); }
void BM_loop_gqa(benchmark::State& state) { BM_gqa(state, false); }

void BM_mla(benchmark::State& state, bool batched) {
  const std::int64_t ps = state.range(0), threads = state.range(1), h = 16, dc = 512, dr = 64;
  const auto products = state.range(2) ? ak::product_math::bf16 : ak::product_math::f32;
  const mla_caches& c = mla_batch_caches(ps);
  const auto views = c.views<ak::kv_view<bf16>>();
  const decode_step step(c.len);
  const auto ql = random_floats(SEQS * h * dc, 6), qr = random_floats(SEQS * h * dr, 7);
  std::vector<float> out(static_cast<std::size_t>(SEQS * h * dc));
  ak::thread_pool pool(static_cast<int>(threads));
  ak::attention_workspace ws;
  const ak::attention_options opt{.causal = true, .products = products};
  const ak::latent_batch<bf16> b{ak::tensor3_view<const float>(ql.data(), {SEQS, h, dc}),
                                 ak::tensor3_view<const float>(qr.data(), {SEQS, h, dr}),
                                 step.qpos, step.indptr, views};
  const ak::batch_plan plan = ak::plan_batch(b, opt, pool);
  for (auto _ : state) {
    if (batched) {
      ak::attend_batch(plan, b, ak::tensor3_view<float>(out.data(), {SEQS, h, dc}), opt, pool, &ws);
    } else {
      for (std::int64_t s = 0; s < SEQS; ++s)
        ak::attend_latent(ak::tensor3_view<const float>(ql.data() + s * h * dc, {1, h, dc}),
                          ak::tensor3_view<const float>(qr.data() + s * h * dr, {1, h, dr}),
                          std::span(step.qpos).subspan(static_cast<std::size_t>(s), 1),
                          views[static_cast<std::size_t>(s)],
                          ak::tensor3_view<float>(out.data() + s * h * dc, {1, h, dc}), opt, pool,
                          &ws);
    }
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(state.iterations() * c.tokens() * (dc + dr) * 2);
  // Scores and values: 2 (d_c + d_R) + 2 d_c FLOPs per head and key.
  state.counters["FLOPS"] = benchmark::Counter(
      static_cast<double>(state.iterations() * c.tokens() * h * (2 * (dc + dr) + 2 * dc)),
      benchmark::Counter::kIsRate);
  state.counters["tokens_per_s"] =
      benchmark::Counter(static_cast<double>(state.iterations() * SEQS), benchmark::Counter::kIsRate);
}
void BM_batch_mla(benchmark::State& state) { BM_mla(state, true); }
void BM_loop_mla(benchmark::State& state) { BM_mla(state, false); }

void BM_single_gqa(benchmark::State& state) {
  const std::int64_t ps = state.range(0), t = state.range(1), h = 32, d = 128;
  const gqa_caches& c = gqa_batch_caches(ps, {t});
  const ak::kv_view<bf16> view = c.views<ak::kv_view<bf16>>()[0];
  const std::vector<std::int64_t> qpos{t - 1};
  const auto q = random_floats(h * d, 5);
  std::vector<float> out(static_cast<std::size_t>(h * d));
  ak::thread_pool pool(static_cast<int>(state.range(2)));
  ak::attention_workspace ws;
  for (auto _ : state) {
    ak::attend(ak::tensor3_view<const float>(q.data(), {1, h, d}), qpos, view,
               ak::tensor3_view<float>(out.data(), {1, h, d}), {.causal = true}, pool, &ws);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(state.iterations() * t * 8 * 2 * d * 2);
}

void BM_plan_gqa(benchmark::State& state) {
  const gqa_caches& c = gqa_batch_caches(16);
  const auto views = c.views<ak::kv_view<bf16>>();
  const decode_step step(c.len);
  const auto q = random_floats(SEQS * 32 * 128, 5);
  ak::thread_pool pool(static_cast<int>(state.range(0)));
  const ak::gqa_batch<bf16> b{ak::tensor3_view<const float>(q.data(), {SEQS, 32, 128}), step.qpos,
                              step.indptr, views};
  for (auto _ : state) benchmark::DoNotOptimize(ak::plan_batch(b, {.causal = true}, pool));
}

// page size, threads, products (0: f32, 1: bf16)
void args(benchmark::internal::Benchmark* b) {
  for (std::int64_t products : {0, 1})
    for (std::int64_t ps : {0, 16, 64}) b->Args({ps, 2, products});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_batch_gqa)->Apply(args);
BENCHMARK(BM_loop_gqa)->Apply(args);
BENCHMARK(BM_batch_mla)->Apply(args);
BENCHMARK(BM_loop_mla)->Apply(args);
BENCHMARK(BM_single_gqa)
    ->ArgsProduct({{0, 16, 64}, {1024, 16384}, {1, 2}})
    ->ArgNames({"page", "T", "threads"})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_plan_gqa)->Arg(2)->Unit(benchmark::kMicrosecond);

BENCHMARK_MAIN();
