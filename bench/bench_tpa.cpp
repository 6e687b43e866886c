// TPA decode (FlashTPA order over the factorized cache) at the Llama-3-8B geometry (H 32,
// d 128, R_Q 6, R_K = R_V = 2 and 1) and T6-small (H 34, d 64, R_Q 6, R_K = R_V = 2), the
// foundation's GQA decode at the same context, the roofline, and causal prefill through the
// layer on both TPA paths (factorized vs materialised), and the kernel's causal prefill alone
// (f32 and bf16 products), all in one run.
// FLOPs per cached token: 2 R_Q R_K d (B dots) + 2 H R_K (R_Q + 1) (head combination)
// + H R_V (value weights) + 2 H R_V d_v (values); bytes: (R_K (H + d) + R_V (H + d_v)) sizeof(S).
#include <attnkit/attention.hpp>

#include <random>

#include "gqa_decode.hpp"
#include "roofline.hpp"

namespace {
namespace ak = attnkit;
using attnkit::bench::BM_gqa_decode;

struct shape {
  std::int64_t h, d, rq, rk, rv;
};
constexpr shape llama_r2{32, 128, 6, 2, 2}, llama_r1{32, 128, 6, 1, 1}, t6_small{34, 64, 6, 2, 2};
const shape& shape_of(std::int64_t id) {
  return id == 0 ? llama_r2 : id == 1 ? llama_r1 : t6_small;
}
const char* name_of(std::int64_t id) {
  return id == 0 ? "llama R2" : id == 1 ? "llama R1" : "T6-small";
}

double decode_flops(const shape& s, std::int64_t t) {
  return double(t) * (2.0 * s.rq * s.rk * s.d + 2.0 * s.h * s.rk * (s.rq + 1) + double(s.h * s.rv) +
                      2.0 * s.h * s.rv * s.d);
}

/// A factorized cache of t tokens (positions 0 .. t - 1) of shape s, random factors.
template <ak::storage_type S>
ak::factorized_cache<S> random_cache(const shape& s, std::int64_t t) {
  ak::factorized_cache<S> cache(
      {.heads = s.h, .head_dim = s.d, .k_rank = s.rk, .v_rank = s.rv, .capacity = t});
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  const std::int64_t chunk = 1024;
  std::vector<float> ak(static_cast<std::size_t>(chunk * s.rk * s.h)),
      bk(static_cast<std::size_t>(chunk * s.rk * s.d)),
      av(static_cast<std::size_t>(chunk * s.rv * s.h)),
      bv(static_cast<std::size_t>(chunk * s.rv * s.d));
  std::vector<std::int64_t> pos(chunk);
  for (std::int64_t b = 0; b < t; b += chunk) {
    const std::int64_t n = std::min(chunk, t - b);
    for (auto* v : {&ak, &bk, &av, &bv})
      for (auto& x : *v) x = nd(rng);
    for (std::int64_t i = 0; i < n; ++i) pos[static_cast<std::size_t>(i)] = b + i;
    cache.append({ak::tensor3_view<const float>(ak.data(), {n, s.rk, s.h}),
                  ak::tensor3_view<const float>(bk.data(), {n, s.rk, s.d}),
                  ak::tensor3_view<const float>(av.data(), {n, s.rv, s.h}),
                  ak::tensor3_view<const float>(bv.data(), {n, s.rv, s.d}),
                  std::span(pos).first(static_cast<std::size_t>(n))});
  }
  return cache;
}

/// One attend_factorized call of tq query tokens (factors aq [tq, R_Q, H], bq [tq, R_Q, d]) at
/// positions pos into out [tq, H, d], with f32 or bf16 products.
template <bool Products, ak::storage_type S>
void attend_once(const shape& s, std::int64_t tq, const std::vector<float>& aq,
                 const std::vector<float>& bq, std::span<const std::int64_t> pos,
                 const ak::factorized_cache<S>& cache, std::vector<float>& out,
                 ak::thread_pool& pool, ak::attention_workspace& ws) {
  ak::attend_factorized(ak::tensor3_view<const float>(aq.data(), {tq, s.rq, s.h}),
                        ak::tensor3_view<const float>(bq.data(), {tq, s.rq, s.d}), pos, cache,
                        ak::tensor3_view<float>(out.data(), {tq, s.h, s.d}),
                        {.products = Products ? ak::product_math::bf16 : ak::product_math::f32},
                        pool, &ws);
  benchmark::DoNotOptimize(out.data());
}

/// Products: product_math::bf16 (the value GEMM on AMX tiles or vdpbf16ps where they run;
/// skipped elsewhere).
template <ak::storage_type S, bool Products = false>
void BM_tpa_decode(benchmark::State& state) {
  if (Products && !ak::bf16_products_available())
    return state.SkipWithError("no bf16 products for TPA on this CPU");
  const shape s = shape_of(state.range(0));
  const std::int64_t t = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  const ak::factorized_cache<S> cache = random_cache<S>(s, t);
  std::vector<float> aq(static_cast<std::size_t>(s.rq * s.h), 0.1f),
      bq(static_cast<std::size_t>(s.rq * s.d), 0.01f), out(static_cast<std::size_t>(s.h * s.d));
  const std::int64_t qpos = t - 1;
  ak::thread_pool pool(threads);
  ak::attention_workspace ws;
  for (auto _ : state)
    attend_once<Products>(s, 1, aq, bq, std::span(&qpos, 1), cache, out, pool, ws);
  state.SetBytesProcessed(state.iterations() * t * cache.bytes_per_token());
  state.counters["FLOPS"] =
      benchmark::Counter(decode_flops(s, t), benchmark::Counter::kIsIterationInvariantRate,
                         benchmark::Counter::OneK::kIs1000);
  // Regime: FLOP per byte against this machine's balance (~7 FLOP/byte at 2 threads).
  const double intensity = decode_flops(s, t) / double(t * cache.bytes_per_token());
  state.SetLabel(std::string(name_of(state.range(0))) + ", " + ak::storage_name<S>() +
                 (Products ? " products, " : ", ") + std::to_string(intensity).substr(0, 4) +
                 " FLOP/B");
}

/// Causal prefill of T query tokens against their own T cached ones in one attend_factorized
/// call (the kernel alone: compute-bound, where the bf16 products' engines show).
template <ak::storage_type S, bool Products = false>
void BM_tpa_prefill(benchmark::State& state) {
  if (Products && !ak::bf16_products_available())
    return state.SkipWithError("no bf16 products for TPA on this CPU");
  const shape s = shape_of(state.range(0));
  const std::int64_t t = state.range(1);
  const ak::factorized_cache<S> cache = random_cache<S>(s, t);
  std::mt19937 rng(2);
  std::normal_distribution<float> nd(0.f, 0.1f);
  std::vector<float> aq(static_cast<std::size_t>(t * s.rq * s.h)),
      bq(static_cast<std::size_t>(t * s.rq * s.d)), out(static_cast<std::size_t>(t * s.h * s.d));
  for (auto* v : {&aq, &bq})
    for (auto& x : *v) x = nd(rng);
  std::vector<std::int64_t> pos(static_cast<std::size_t>(t));
  for (std::int64_t i = 0; i < t; ++i) pos[static_cast<std::size_t>(i)] = i;
  ak::thread_pool pool(static_cast<int>(state.range(2)));
  ak::attention_workspace ws;
  for (auto _ : state) attend_once<Products>(s, t, aq, bq, pos, cache, out, pool, ws);
  // Each query token sees its own position and the earlier ones: T (T + 1) / 2 pairs.
  state.counters["FLOPS"] = benchmark::Counter(decode_flops(s, t * (t + 1) / 2),
                                               benchmark::Counter::kIsIterationInvariantRate,
                                               benchmark::Counter::OneK::kIs1000);
  state.SetLabel(std::string(name_of(state.range(0))) + ", " + ak::storage_name<S>() +
                 (Products ? " products" : ""));
}

/// Causal prefill through tpa_layer (Llama-shaped, R 2, D 4096) on one path: arg 0 = factorized
/// (FlashTPA order), 1 = materialised (Q/K/V formed, then the GQA kernel as MHA).
void BM_tpa_layer_prefill(benchmark::State& state) {
  const ak::tpa_path path =
      state.range(0) == 0 ? ak::tpa_path::factorized : ak::tpa_path::materialized;
  const std::int64_t t = state.range(1), dm = 4096, h = 32, d = 128, rq = 6, r = 2;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.f, 1.f / 64.f);
  auto mat = [&](std::int64_t rows, std::int64_t cols) {
    ak::row_matrix<float> m(rows, cols);
    for (std::int64_t i = 0; i < m.size(); ++i) m.data()[i] = nd(rng);
    return m;
  };
  const auto waq = mat(h * rq, dm), wbq = mat(rq * d, dm), wak = mat(h * r, dm),
             wbk = mat(r * d, dm), wav = mat(h * r, dm), wbv = mat(r * d, dm), wo = mat(dm, h * d),
             x = mat(t, dm);
  ak::tpa_layer layer({.model_dim = dm,
                       .heads = h,
                       .head_dim = d,
                       .q_rank = rq,
                       .k_rank = r,
                       .v_rank = r,
                       .rope = {.theta = 500000.0}},
                      {.w_a_q = ak::view_of(waq),
                       .w_b_q = ak::view_of(wbq),
                       .w_a_k = ak::view_of(wak),
                       .w_b_k = ak::view_of(wbk),
                       .w_a_v = ak::view_of(wav),
                       .w_b_v = ak::view_of(wbv),
                       .o_proj = ak::view_of(wo)});
  auto cache = layer.make_cache<float>(t);
  ak::row_matrix<float> y(t, dm);
  std::vector<std::int64_t> pos(static_cast<std::size_t>(t));
  for (std::int64_t i = 0; i < t; ++i) pos[static_cast<std::size_t>(i)] = i;
  ak::thread_pool pool(static_cast<int>(state.range(2)));
  for (auto _ : state) {
    cache.clear();
    layer.forward(ak::view_of(x), pos, cache, ak::view_of(y), pool, path);
    benchmark::DoNotOptimize(y.data());
  }
  state.SetLabel(state.range(0) == 0 ? "factorized" : "materialized");
}
}  // namespace

BENCHMARK_TEMPLATE(BM_tpa_decode, float)
    ->ArgsProduct({{0, 1, 2}, {1024, 4096, 16384}, {2}})
    ->ArgNames({"shape", "T", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_tpa_decode, ak::bf16)
    ->ArgsProduct({{0, 1, 2}, {1024, 4096, 16384}, {2}})
    ->ArgNames({"shape", "T", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_tpa_decode, ak::bf16, true)
    ->ArgsProduct({{0, 1, 2}, {1024, 4096, 16384}, {2}})
    ->ArgNames({"shape", "T", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_gqa_decode, float)
    ->ArgsProduct({{1024, 4096, 16384}, {2}})
    ->ArgNames({"T", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_tpa_prefill, float)
    ->ArgsProduct({{0, 2}, {512, 2048}, {2}})
    ->ArgNames({"shape", "T", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_tpa_prefill, ak::bf16)
    ->ArgsProduct({{0, 2}, {512, 2048}, {2}})
    ->ArgNames({"shape", "T", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_tpa_prefill, ak::bf16, true)
    ->ArgsProduct({{0, 2}, {512, 2048}, {2}})
    ->ArgNames({"shape", "T", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_tpa_layer_prefill)
    ->ArgsProduct({{0, 1}, {512, 2048}, {2}})
    ->ArgNames({"path", "T", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
