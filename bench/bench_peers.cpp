// The shapes of PyTorch's CPU SDPA peer script (shared/reference/peers/torch_sdpa.py), timed at
// the thread counts of the environment variable ATTNKIT_BENCH_THREADS (comma-separated; default
// "1,2"), so that attnkit's figures sit beside torch's from the same machine and session:
//   S1 GQA decode      H 32, H_kv 8, d 128, one query at position T - 1, T = 1k, 4k, 16k
//   S2 MLA absorbed    d_c 512 + d_R 64, T = 4096, H = 16, 128 (all heads as rows of the latent)
//   S3 causal prefill  H 32, H_kv 8, d 128, T = 512, 2048
// f32 and bf16 caches; bf16 also with bf16 products (product_math::bf16, where the CPU has them).
// The queries stay f32 (torch's SDPA rounds them to the cache's type). Runs on the best target.
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
}  // namespace

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
      add("S3_prefill<f32>", BM_gqa_prefill_causal<float, false, false>, {tq, th}, {"T", "threads"});
      add("S3_prefill<bf16>", BM_gqa_prefill_causal<ak::bf16, false, false>, {tq, th},
          {"T", "threads"});
      add("S3_prefill<bf16, products>", BM_gqa_prefill_causal<ak::bf16, true, false>, {tq, th},
          {"T", "threads"});
    }
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
