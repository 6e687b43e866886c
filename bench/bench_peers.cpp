// The shapes of PyTorch's CPU SDPA peer script (shared/reference/peers/torch_sdpa.py), timed at
// the thread counts of the environment variable ATTNKIT_BENCH_THREADS (comma-separated; default
// "1,2"), so that attnkit's figures sit beside torch's from the same machine and session:
//   S1 GQA decode      H 32, H_kv 8, d 128, one query at position T - 1, T = 1k, 4k, 16k
//   S2 MLA absorbed    d_c 512 + d_R 64, T = 4096, H = 16, 128 (all heads as rows of the latent)
//   S3 causal prefill  H 32, H_kv 8, d 128, T = 512, 2048
// f32 and bf16 caches; bf16 also with bf16 products (product_math::bf16, where the CPU has them).
// The queries and outputs are f32, and for the bf16-product prefill also bf16, as torch's bf16
// SDPA takes and writes them. Runs on the best target.
// BM_block_piece: the parts of one bf16-product block, to see where its time goes.
#include <algorithm>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "gqa_decode.hpp"
#include "mla_decode.hpp"

namespace {
namespace ak = attnkit;
using namespace attnkit::bench;

std::vector<std::int64_t> thread_counts() {
  const char* env = std::getenv("ATTNKIT_BENCH_THREADS");
  std::vector<std::int64_t> out;
  std::stringstream ss(env && *env ? env : "1,2");
  for (std::string item; std::getline(ss, item, ',');) out.push_back(std::stoll(item));
  return out;
}

template <class Fn>
void add(const std::string& name, Fn fn, std::vector<std::int64_t> args,
         std::vector<std::string> arg_names) {
  benchmark::RegisterBenchmark(name.c_str(), fn)
      ->Args(args)
      ->ArgNames(arg_names)
      ->UseRealTime()
      ->Unit(benchmark::kMicrosecond);
}
/// The pieces of one 128 x 128 x 128 block of a bf16-product prefill tile (where its time goes),
/// one core: the scores GEMM (AMX or vdpbf16ps, whichever this CPU runs; f32 for comparison),
/// the column softmax, the packing of P and V. Skipped where the CPU has no bf16 products.
struct block_data {
  static constexpr std::int64_t n = 128;
  // On cache lines, as the kernels' own buffers are (a tile row split over two lines would
  // double the AMX tile loads' lines).
  template <class T>
  using buffer = ak::detail::scratch_vector<T>;
  buffer<ak::bf16> k = buffer<ak::bf16>(n * n);
  buffer<float> q = buffer<float>(n * n), s = buffer<float>(n * n), acc = buffer<float>(n * n, 0.f),
                mx = buffer<float>(n), sum = buffer<float>(n), alpha = buffer<float>(n);
  buffer<std::uint32_t> qp = buffer<std::uint32_t>(n * n / 2),
                        pp = buffer<std::uint32_t>(n * n / 2);
  block_data() {
    std::mt19937 rng(1);
    std::normal_distribution<float> nd;
    for (auto& x : k) x = ak::bf16(nd(rng));
    for (auto& x : q) x = nd(rng);
    for (auto& x : s) x = nd(rng);
    // Q's pairs for the score GEMM (zeros would time the tiles on data they take faster),
    // where this CPU has bf16 products.
    if (!ak::detail::bf16_amx_available() && !ak::detail::bf16_dot_available()) return;
    const float* rows[16];
    for (std::int64_t r0 = 0; r0 < n; r0 += 16) {
      for (int i = 0; i < 16; ++i) rows[i] = q.data() + (r0 + i) * n;
      ak::detail::pack_query_pairs(rows, 16, n / 2, 0.1f, 16, qp.data() + r0, n);
    }
  }
};
void BM_block_piece(benchmark::State& state) {
  namespace d = ak::detail;
  block_data b;
  const std::int64_t n = block_data::n, piece = state.range(0);
  const bool amx = d::bf16_amx_available(), dot = d::bf16_dot_available();
  if (piece < 4 && !amx && !dot) state.SkipWithError("no bf16 products on this CPU");
  const float* rows[16];
  for (int i = 0; i < 16; ++i) rows[i] = b.q.data() + i * n;
  const ak::bf16* vrows[64];
  for (int i = 0; i < 64; ++i) vrows[i] = b.k.data() + i * n;
  const char* names[] = {"scores (bf16 products)", "pack Q^T pairs, 128 rows", "pack P pairs",
                         "pack V pairs",           "column softmax",           "scores (f32 tile)"};
  for (auto _ : state) {
    switch (piece) {
      case 0:
        if (amx)
          d::amx_gemm<false>(n, n, n, b.k.data(), n, b.qp.data(), n, b.s.data(), n);
        else
          d::gemm_pairs<false>(n, n, n / 2, b.k.data(), n, 2, b.qp.data(), n, b.s.data(), n);
        break;
      case 1:
        for (std::int64_t r0 = 0; r0 < n; r0 += 16)
          d::pack_query_pairs(rows, 16, n / 2, 0.1f, 16, b.qp.data() + r0, n);
        break;
      case 2:
        if (amx)
          d::pack_pairs_transposed(b.s.data(), n, n, n, n / 2, b.pp.data(), n / 2);
        else
          for (std::int64_t t0 = 0; t0 < n; t0 += 64) {
            const float* prow[64];
            for (int i = 0; i < 64; ++i) prow[i] = b.s.data() + (t0 + i) * n;
            d::pack_row_pairs(prow, 64, n, b.pp.data() + t0 / 2 * n, n);
          }
        break;
      case 3:
        for (int h = 0; h < 2; ++h) d::pack_row_pairs(vrows, 64, n, b.pp.data() + h * 32 * n, n);
        break;
      case 4:
        std::fill(b.mx.begin(), b.mx.end(), 3.f);
        d::softmax_columns(b.s.data(), n, n, n, b.mx.data(), b.sum.data(), b.alpha.data());
        break;
      default:
        d::gemm_bcast<false>(n, n, n, b.q.data(), n, 1, b.q.data(), n, b.s.data(), n);
    }
    benchmark::DoNotOptimize(b.s.data());
    benchmark::DoNotOptimize(b.pp.data());
  }
  state.SetLabel(std::string(names[piece]) + (amx ? ", AMX" : dot ? ", vdpbf16ps" : ""));
}
}  // namespace

BENCHMARK(BM_block_piece)->DenseRange(0, 5)->ArgName("piece")->Unit(benchmark::kMicrosecond);

int main(int argc, char** argv) {
  for (const std::int64_t th : thread_counts()) {
    for (const std::int64_t tk : {1024, 4096, 16384}) {
      add("S1_gqa_decode<f32>", BM_gqa_decode<float>, {tk, th}, {"T", "threads"});
      add("S1_gqa_decode<bf16>", BM_gqa_decode<ak::bf16>, {tk, th}, {"T", "threads"});
    }
    for (const std::int64_t h : {16, 128}) {
      const std::vector<std::string> names{"H", "T", "threads"};
      add("S2_mla_decode<f32>", BM_mla_absorbed_decode<float>, {h, 4096, th}, names);
      add("S2_mla_decode<bf16>", BM_mla_absorbed_decode<ak::bf16>, {h, 4096, th}, names);
      add("S2_mla_decode<bf16, products>", BM_mla_absorbed_decode<ak::bf16, true>, {h, 4096, th},
          names);
    }
    for (const std::int64_t tq : {512, 2048}) {
      add("S3_prefill<f32>", BM_gqa_prefill_causal<float, false, false>, {tq, th},
          {"T", "threads"});
      add("S3_prefill<bf16>", BM_gqa_prefill_causal<ak::bf16, false, false>, {tq, th},
          {"T", "threads"});
      add("S3_prefill<bf16, products>", BM_gqa_prefill_causal<ak::bf16, true, false>, {tq, th},
          {"T", "threads"});
      add("S3_prefill<bf16, products, bf16 q/out>",
          BM_gqa_prefill_causal<ak::bf16, true, false, ak::bf16>, {tq, th}, {"T", "threads"});
    }
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
