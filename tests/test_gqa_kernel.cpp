// The GQA kernel family against the double reference: randomized shapes, all three storage
// types, both tile strategies, masks, windows, executors, strided views and bad input.
#include "gqa_fixture.hpp"

using namespace attnkit;
using namespace attnkit::test;

namespace {

/// The kernel on data x against the double reference: output, LSE, fully masked rows.
/// given: run_reference<S>(c, x) if the caller has it (the same data under other tile strategies).
template <storage_type S, class Exec = serial_executor>
void check_data_against_reference(const gqa_case& c, const gqa_data& x, Exec&& exec = Exec{},
                                  const reference::attention_result* given = nullptr) {
  INFO(describe(c) << " storage=" << storage_name<S>());
  fmat lse;
  const fmat out = run_kernel<S>(c, x, exec, &lse);
  const auto ref = given ? *given : run_reference<S>(c, x);
  const double v_max = x.v.cwiseAbs().maxCoeff(), a = x.a_max(c.head_dim);
  const double tol = float_tolerance(c.head_dim, c.tk, a, v_max);
  INFO("A=" << a << " tolerance=" << tol);
  CHECK(max_abs_diff(to_double(out), ref.out) <= tol);
  // LSE: natural log; -inf exactly where the reference row is fully masked.
  for (std::int64_t t = 0; t < c.tq; ++t)
    for (std::int64_t h = 0; h < c.heads; ++h) {
      if (std::isinf(ref.lse(t, h))) {
        CHECK(lse(t, h) == -INFINITY);
        for (std::int64_t i = 0; i < c.v_head_dim; ++i) CHECK(out(t, h * c.v_head_dim + i) == 0.f);
      } else {
        // LSE = max + log(sum): the score error (about u A, see float_tolerance) plus log's u
        // |LSE|.
        CHECK(std::abs(lse(t, h) - ref.lse(t, h)) <=
              2 * 0x1p-24 * (std::abs(ref.lse(t, h)) + 2 + a));
      }
    }
  if constexpr (!std::same_as<S, float>) {
    // Against the unrounded data: the storage type's own error bound on top.
    const auto exact =
        reference::attention(to_double(x.q), x.q_pos, to_double(x.k), to_double(x.v), x.k_pos,
                             c.heads, c.kv_heads, x.scale, c.causal, c.window);
    CHECK(max_abs_diff(to_double(out), exact.out) <= tol + storage_tolerance<S>(a, v_max));
  }
}

template <storage_type S, class Exec = serial_executor>
void check_against_reference(const gqa_case& c, std::mt19937_64& rng, Exec&& exec = Exec{}) {
  check_data_against_reference<S>(c, make_gqa_data(rng, c), exec);
}

gqa_case random_case(std::mt19937_64& rng) {
  static const std::int64_t dims[] = {32, 64, 80, 128, 256};
  static const std::int64_t tqs[] = {1, 1, 2, 3, 7, 33, 100};
  gqa_case c;
  c.kv_heads = 1 + static_cast<std::int64_t>(rng() % 4);
  const std::int64_t g = 1 + static_cast<std::int64_t>(rng() % 8);
  c.heads = c.kv_heads * g;
  c.head_dim = dims[rng() % 5];
  c.v_head_dim = rng() % 3 == 0 ? dims[rng() % 5] : c.head_dim;
  c.tq = tqs[rng() % 7];
  c.tk = 1 + static_cast<std::int64_t>(rng() % (c.tq > 8 ? 400 : 1500));
  c.causal = rng() % 5 != 0;
  if (rng() % 3 == 0) c.window = 1 + static_cast<std::int64_t>(rng() % 300);
  c.strategy = static_cast<tile_strategy>(rng() % 3);
  return c;
}

}  // namespace

TEMPLATE_TEST_CASE("attend matches the double reference over randomized shapes", "[gqa]", float,
                   bf16, half) {
  const std::uint64_t seed = GENERATE(range(1, 17));
  std::mt19937_64 rng(seed * 7919);
  const gqa_case c = random_case(rng);
  thread_pool pool(2);
  if (seed % 2)
    check_against_reference<TestType>(c, rng);
  else
    check_against_reference<TestType>(c, rng, pool);
}

TEMPLATE_TEST_CASE("long-context decode (Tk = 4096) for every group size g dividing H = 32",
                   "[gqa]", float, bf16) {
  const std::int64_t g = GENERATE(1, 2, 4, 8, 16, 32);
  std::mt19937_64 rng(static_cast<std::uint64_t>(g));
  gqa_case c{
      .heads = 32, .kv_heads = 32 / g, .head_dim = 128, .v_head_dim = 128, .tk = 4096, .tq = 1};
  thread_pool pool(2);
  check_against_reference<TestType>(c, rng, pool);
}

TEST_CASE("a decode whose key-split merge runs on the workers (H 128 on one KV head, d_v 256)",
          "[gqa][executor]") {
  // 8 splits of 128 rows x 256 columns: above the size from which all workers merge the splits,
  // a few rows each, after the items.
  std::mt19937_64 rng(128);
  gqa_case c{.heads = 128, .kv_heads = 1, .head_dim = 64, .v_head_dim = 256, .tk = 4096, .tq = 1};
  thread_pool pool(2);
  check_against_reference<float>(c, rng, pool);
  check_against_reference<bf16>(c, rng, pool);
  // 24 workers: 32 splits of 128 keys (a tall item's smallest split), merged after the items.
  thread_pool wide(24);
  check_against_reference<float>(c, rng, wide);
}

TEST_CASE("key splits: enough items for the workers, at least 256 keys each, 128 for tall items",
          "[gqa][executor]") {
  // A decode step of 128 heads on one KV head (absorbed MLA's shape) over 4096 keys; the same
  // with 4 heads (a GQA group), whose splits stay at 256 keys or more.
  const detail::attention_shape tall{.q_tokens = 1,
                                     .groups = 1,
                                     .group_heads = 128,
                                     .keys = 4096,
                                     .v_head_dim = 512,
                                     .tile_rows = 128,
                                     .block = 64};
  detail::attention_shape narrow = tall;
  narrow.group_heads = 4;
  for (const int workers : {1, 2, 8, 16, 32, 64}) {
    INFO("workers " << workers);
    const std::int64_t wanted = 4 * workers;  // about four items per worker
    CHECK(detail::plan_attention(tall, workers).splits == std::min<std::int64_t>(wanted, 32));
    CHECK(detail::plan_attention(narrow, workers).splits == std::min<std::int64_t>(wanted, 16));
  }
  detail::attention_shape short_keys = tall;
  short_keys.keys = 200;  // fewer keys than one split's least: no split
  CHECK(detail::plan_attention(short_keys, 16).splits == 1);
}

TEST_CASE(
    "key splits merged by the worker that finishes a pair's last split: the reference's result, "
    "bitwise the same whichever worker merges",
    "[gqa][executor]") {
  // 4 workers: a decode of 4 KV heads gets 4 key splits per head, a 3-token step of 2 KV heads
  // 8, each (tile, head group) merged by whichever worker ends its last split. A callable
  // executor that claims 4 workers but runs them one after another has the same plan and so the
  // same splits, merged in another order of finishing: the results must agree bit for bit.
  const std::int64_t tq = GENERATE(1, 3);
  std::mt19937_64 rng(static_cast<std::uint64_t>(700 + tq));
  gqa_case c{.heads = 16,
             .kv_heads = tq == 1 ? 4 : 2,
             .head_dim = 64,
             .v_head_dim = 48,
             .tk = 2500,
             .tq = tq};
  const gqa_data x = make_gqa_data(rng, c);
  thread_pool pool(4);
  check_data_against_reference<float>(c, x, pool);
  callable_executor in_turn(
      [](std::int64_t n, const std::function<void(std::int64_t)>& fn) {
        for (std::int64_t i = n - 1; i >= 0; --i) fn(i);
      },
      4);
  fmat lse_ref, lse;
  const fmat ref = run_kernel<float>(c, x, in_turn, &lse_ref);
  for (int rep = 0; rep < 10; ++rep) {
    const fmat out = run_kernel<float>(c, x, pool, &lse);
    CHECK(out == ref);
    CHECK(lse == lse_ref);
  }
}

TEST_CASE(
    "gemm_bcast, the GEMM tiles' product: B packed a panel at a time, bitwise the in-order FMA "
    "chain of every element, on every target",
    "[gqa][simd]") {
  // Depths that span one panel, a panel and a step, and several (a panel is 192 to 6144 steps
  // by target and tile width); rows past two micro-tiles (packed) and at most two (not);
  // ragged column strips. Each C element is one FMA chain over k in order, whatever the
  // panels, so the expected value is that chain, computed here with the target's rounding rule.
  struct shape {
    std::int64_t rows, cols, depth;
  };
  const shape shapes[] = {{1, 1, 1},     {17, 33, 193}, {45, 100, 577}, {45, 13, 1600},
                          {3, 1, 6200},  {40, 32, 192}, {33, 70, 385},  {16, 16, 100},
                          {50, 1, 3100}, {9, 40, 800}};
  std::mt19937_64 rng(303);
  const simd_target before = active_target();
  for (simd_target t : supported_targets()) {
    set_target(t);
    const bool fused = t != simd_target::scalar;
#ifdef FP_FAST_FMAF
    const bool fused_scalar = true;
#else
    const bool fused_scalar = false;
#endif
    auto fma_rule = [&](float a, float b, float c) {
      return fused || fused_scalar ? std::fma(a, b, c) : a * b + c;
    };
    for (const auto& [rows, cols, depth] : shapes)
      for (bool accumulate : {false, true})
        for (bool row_step : {false, true}) {  // A [rows][depth], or A^T [depth][rows] (P's form)
          const std::int64_t b_rs = cols + 3, a_rs = row_step ? 1 : depth,
                             a_cs = row_step ? rows : 1;
          const fmat a = random_matrix(rng, rows * depth, 1), b = random_matrix(rng, depth, b_rs),
                     c0 = random_matrix(rng, rows, cols);
          fmat c = c0;  // [rows][cols], row-major, ldc = cols
          if (accumulate && row_step)
            detail::gemm_bcast<true, 1>(rows, cols, depth, a.data(), a_rs, a_cs, b.data(), b_rs,
                                        c.data(), cols);
          else if (accumulate)
            detail::gemm_bcast<true>(rows, cols, depth, a.data(), a_rs, a_cs, b.data(), b_rs,
                                     c.data(), cols);
          else
            detail::gemm_bcast<false>(rows, cols, depth, a.data(), a_rs, a_cs, b.data(), b_rs,
                                      c.data(), cols);
          std::int64_t wrong = 0;
          for (std::int64_t i = 0; i < rows; ++i)
            for (std::int64_t j = 0; j < cols; ++j) {
              float e = accumulate ? c0(i, j) : 0.f;
              for (std::int64_t k = 0; k < depth; ++k)
                e = fma_rule(a.data()[i * a_rs + k * a_cs], b.data()[k * b_rs + j], e);
              wrong += c(i, j) != e;
            }
          INFO("target " << target_name(t) << " rows " << rows << " cols " << cols << " depth "
                         << depth << " accumulate " << accumulate << " row_step " << row_step);
          CHECK(wrong == 0);
        }
  }
  set_target(before);
}

TEMPLATE_TEST_CASE(
    "score blocks: every row count and key remainder, row and column form, against a double "
    "dot product, nothing else written, on every target",
    "[gqa][simd]", float, bf16, half) {
  // Row counts 1-9 take 4-row blocks (one clamped row at 3 and 7) and 2- and 1-row blocks; key
  // counts leave every remainder of 2 and 4 keys a step; depths with and without (even, odd)
  // groups and masked tails. K holds values exact in float, so only the float sum errs: a chain
  // of d rounded products and additions, |error| <= 2 d u sum |q k| (u = 2^-24); query operands
  // rounded to bf16 would exceed it about 2^15 / d times over.
  using S = TestType;
  std::mt19937_64 rng(505);
  const simd_target before = active_target();
  for (simd_target t : supported_targets()) {
    set_target(t);
    const std::int64_t group = std::same_as<S, bf16> ? detail::bf16_pair_group() : 0;
    for (std::int64_t d : {16, 40, 71, 128})
      for (std::int64_t rows = 1; rows <= 9; ++rows)
        for (std::int64_t keys : {1, 2, 3, 5, 8, 13}) {
          const std::int64_t k_stride = d + 3, s_stride = keys + 2, ld = rows + 3;
          const fmat q = random_matrix(rng, rows, d);
          const fmat kf = round_trip<S>(random_matrix(rng, keys, k_stride));
          std::vector<S> k(static_cast<std::size_t>(keys * k_stride));
          for (std::int64_t i = 0; i < keys * k_stride; ++i)
            k[static_cast<std::size_t>(i)] = static_cast<S>(kf.data()[i]);
          fmat qp = q;  // the kernel's order: (even, odd) groups for bf16
          for (std::int64_t r = 0; r < rows; ++r) detail::permute_pairs(&qp(r, 0), d, group);
          const float sentinel = 12345.f;
          std::vector<float> s_rows(static_cast<std::size_t>(rows * s_stride), sentinel),
              s_cols(static_cast<std::size_t>(keys * ld), sentinel);
          detail::scores(qp.data(), d, rows, k.data(), k_stride, keys, d, s_rows.data(), s_stride,
                         rows % 2 == 0);
          detail::no_prefetch pf;
          detail::scores_columns(qp.data(), d, rows, detail::strided_rows<S>{k.data(), k_stride},
                                 keys, d, s_cols.data(), ld, pf);
          std::int64_t wrong = 0;
          for (std::int64_t r = 0; r < rows; ++r)
            for (std::int64_t j = 0; j < keys; ++j) {
              double ref = 0, mag = 0;
              for (std::int64_t c = 0; c < d; ++c) {
                const double x = double(q(r, c)) * double(kf(j, c));
                ref += x, mag += std::abs(x);
              }
              const double tol = 2.0 * double(d) * 0x1p-24 * mag;
              wrong += !(std::abs(s_rows[static_cast<std::size_t>(r * s_stride + j)] - ref) <= tol);
              wrong += !(std::abs(s_cols[static_cast<std::size_t>(j * ld + r)] - ref) <= tol);
            }
          for (std::int64_t r = 0; r < rows; ++r)
            for (std::int64_t j = keys; j < s_stride; ++j)
              wrong += s_rows[static_cast<std::size_t>(r * s_stride + j)] != sentinel;
          for (std::int64_t j = 0; j < keys; ++j)
            for (std::int64_t r = rows; r < ld; ++r)
              wrong += s_cols[static_cast<std::size_t>(j * ld + r)] != sentinel;
          INFO("target " << target_name(t) << " d " << d << " rows " << rows << " keys " << keys);
          CHECK(wrong == 0);
        }
  }
  set_target(before);
}

TEST_CASE(
    "transpose_scaled: a query tile's rows into Q^T, exactly rows[i][c] * scale, nothing "
    "else written, on every target",
    "[gqa][simd]") {
  std::mt19937_64 rng(404);
  const simd_target before = active_target();
  for (simd_target t : supported_targets()) {
    set_target(t);
    for (std::int64_t n : {1, 3, 8, 15, 16, 21})
      for (std::int64_t cols : {1, 5, 16, 17, 64, 579}) {
        const std::int64_t stride = cols + 7, ld = n + 5;  // source rows apart; dst rows
        const fmat src = random_matrix(rng, n, stride);
        std::vector<const float*> rows(static_cast<std::size_t>(n));
        for (std::int64_t i = 0; i < n; ++i) rows[static_cast<std::size_t>(i)] = &src(n - 1 - i, 0);
        const float scale = 0.0883883f, sentinel = 12345.f;
        std::vector<float> dst(static_cast<std::size_t>(cols * ld), sentinel);
        detail::transpose_scaled(rows.data(), n, cols, scale, dst.data(), ld);
        std::int64_t wrong = 0;
        for (std::int64_t c = 0; c < cols; ++c)
          for (std::int64_t i = 0; i < ld; ++i)
            wrong += dst[static_cast<std::size_t>(c * ld + i)] !=
                     (i < n ? src(n - 1 - i, c) * scale : sentinel);
        INFO("target " << target_name(t) << " rows " << n << " cols " << cols);
        CHECK(wrong == 0);
      }
  }
  set_target(before);
}

TEST_CASE("prefill tiles for every g dividing H = 24, both strategies, d_qk != d_v", "[gqa]") {
  const std::int64_t g = GENERATE(1, 2, 3, 4, 6, 8, 12, 24);
  std::mt19937_64 rng(static_cast<std::uint64_t>(100 + g));
  gqa_case c{.heads = 24, .kv_heads = 24 / g, .head_dim = 80, .v_head_dim = 48, .tk = 300, .tq = 300};
  // One problem and its reference (most of the test's time) for both strategies.
  const gqa_data x = make_gqa_data(rng, c);
  const auto ref = run_reference<float>(c, x);
  for (const tile_strategy st : {tile_strategy::streaming, tile_strategy::gemm}) {
    c.strategy = st;
    check_data_against_reference<float>(c, x, serial_executor{}, &ref);
  }
}

TEST_CASE("full causal prefill with contiguous positions up to T = 1024", "[gqa]") {
  const std::int64_t t = GENERATE(129, 1024);
  std::mt19937_64 rng(static_cast<std::uint64_t>(t));
  gqa_case c{.heads = 4, .kv_heads = 2, .head_dim = 64, .v_head_dim = 64, .tk = t, .tq = t};
  gqa_data x = make_gqa_data(rng, c);
  for (std::int64_t i = 0; i < t; ++i)
    x.q_pos[static_cast<std::size_t>(i)] = x.k_pos[static_cast<std::size_t>(i)] = 5000 + i;
  thread_pool pool(2);
  const fmat out = run_kernel<float>(c, x, pool);
  const auto ref = run_reference<float>(c, x);
  CHECK(max_abs_diff(to_double(out), ref.out) <=
        float_tolerance(c.head_dim, c.tk, x.a_max(c.head_dim), x.v.cwiseAbs().maxCoeff()));
}

TEST_CASE(
    "masked blocks: positions in order (each row's visible keys one interval), repeated "
    "and out of order, causal with and without a window, both tile layouts",
    "[gqa][mask]") {
  const tile_strategy st = GENERATE(tile_strategy::streaming, tile_strategy::gemm);
  const std::int64_t window = GENERATE(0, 1, 45);
  const int order = GENERATE(0, 1, 2);  // sorted, sorted with repeats, one pair swapped
  std::mt19937_64 rng(static_cast<std::uint64_t>(window * 7 + order * 3) +
                      (st == tile_strategy::gemm));
  gqa_case c{.heads = 8,
             .kv_heads = 2,
             .head_dim = 64,
             .v_head_dim = 48,
             .tk = 300,
             .tq = 70,
             .strategy = st};
  if (window > 0) c.window = window;
  gqa_data x = make_gqa_data(rng, c);  // keys at gapped increasing positions
  // Queries from before the first key to past the last: diagonal blocks where a row sees a
  // prefix, a middle run (window) or none of a block's keys.
  std::uniform_int_distribution<std::int64_t> pick(x.k_pos.front() - 5, x.k_pos.back() + 5);
  for (auto& p : x.q_pos) p = pick(rng);
  std::sort(x.q_pos.begin(), x.q_pos.end());
  if (order == 1)
    for (std::size_t i = 1; i < x.q_pos.size(); i += 3) x.q_pos[i] = x.q_pos[i - 1];
  if (order == 2) std::swap(x.q_pos[3], x.q_pos[40]);  // not in order: every pair tested
  INFO("order=" << order);
  check_data_against_reference<float>(c, x);
  if (st == tile_strategy::gemm && bf16_products_available()) {  // AMX or vdpbf16ps tiles
    c.products = product_math::bf16;
    CHECK(bf16_products_error_ratio(c, x, run_kernel<bf16>(c, x)) <= 1.0);
  }
}

/// An executor that plans for three workers and runs their tasks on a pool of two threads.
inline auto three_workers(thread_pool& pool) {
  return callable_executor(
      [&pool](std::int64_t n, const std::function<void(std::int64_t)>& fn) {
        pool.parallel_for(n, fn);
      },
      3);
}

TEST_CASE("results with 1, 2 and 3 workers agree within tolerance", "[gqa][executor]") {
  std::mt19937_64 rng(GENERATE(31, 32, 33));
  gqa_case c = random_case(rng);
  c.tq = rng() % 2 ? 1 : 40;
  const gqa_data x = make_gqa_data(rng, c);
  thread_pool pool(2);
  auto three = three_workers(pool);
  const fmat a = run_kernel<float>(c, x), b = run_kernel<float>(c, x, pool),
             d = run_kernel<float>(c, x, three);
  const double tol =
      float_tolerance(c.head_dim, c.tk, x.a_max(c.head_dim), x.v.cwiseAbs().maxCoeff());
  INFO(describe(c));
  CHECK(max_abs_diff(to_double(a), to_double(b)) <= 2 * tol);
  CHECK(max_abs_diff(to_double(a), to_double(d)) <= 2 * tol);
}

TEST_CASE("fully masked rows and empty caches give zeros and LSE -inf, never NaN", "[gqa]") {
  const tile_strategy st = GENERATE(tile_strategy::streaming, tile_strategy::gemm);
  std::mt19937_64 rng(41);
  for (std::int64_t tk : {0, 50}) {
    gqa_case c{.heads = 4,
               .kv_heads = 1,
               .head_dim = 32,
               .v_head_dim = 16,
               .tk = tk,
               .tq = 3,
               .strategy = st};
    gqa_data x = make_gqa_data(rng, c);
    x.q_pos = {-100, -1, -7};  // before every key
    fmat lse;
    const fmat out = run_kernel<float>(c, x, serial_executor{}, &lse);
    CHECK(out.cwiseAbs().maxCoeff() == 0.f);
    CHECK((lse.array() == -INFINITY).all());
  }
  // A window that excludes every key of an otherwise visible past.
  gqa_case c{.heads = 2,
             .kv_heads = 2,
             .head_dim = 32,
             .v_head_dim = 32,
             .tk = 20,
             .tq = 1,
             .window = 3,
             .strategy = st};
  gqa_data x = make_gqa_data(rng, c);
  x.q_pos = {x.k_pos.back() + 10};
  CHECK(run_kernel<float>(c, x).cwiseAbs().maxCoeff() == 0.f);
}

TEST_CASE("strided q and out views and the caller-owned K/V overload give the cache's result",
          "[gqa][view]") {
  std::mt19937_64 rng(51);
  gqa_case c{.heads = 6, .kv_heads = 3, .head_dim = 40, .v_head_dim = 24, .tk = 77, .tq = 5};
  const gqa_data x = make_gqa_data(rng, c);
  const fmat base = run_kernel<float>(c, x);
  // q with padded head stride (a slice of a fused QKV buffer), out with padded token stride.
  const std::int64_t qhs = c.head_dim + 8, ots = c.heads * c.v_head_dim + 5;
  std::vector<float> qbuf(static_cast<std::size_t>(c.tq * c.heads * qhs), NAN),
      obuf(static_cast<std::size_t>(c.tq * ots), -1.f);
  for (std::int64_t t = 0; t < c.tq; ++t)
    for (std::int64_t h = 0; h < c.heads; ++h)
      for (std::int64_t i = 0; i < c.head_dim; ++i)
        qbuf[static_cast<std::size_t>((t * c.heads + h) * qhs + i)] = x.q(t, h * c.head_dim + i);
  // K/V token-major [Tk, H_kv, d] exactly as the caller has them.
  const kv_view<float> kv(tensor3_view<const float>(x.k.data(), {c.tk, c.kv_heads, c.head_dim}),
                          tensor3_view<const float>(x.v.data(), {c.tk, c.kv_heads, c.v_head_dim}),
                          x.k_pos);
  attend(
      tensor3_view<const float>(qbuf.data(), {c.tq, c.heads, c.head_dim}, {c.heads * qhs, qhs, 1}),
      x.q_pos, kv,
      tensor3_view<float>(obuf.data(), {c.tq, c.heads, c.v_head_dim}, {ots, c.v_head_dim, 1}));
  for (std::int64_t t = 0; t < c.tq; ++t) {
    for (std::int64_t i = 0; i < c.heads * c.v_head_dim; ++i)
      CHECK(obuf[static_cast<std::size_t>(t * ots + i)] == Approx(base(t, i)).margin(1e-6));
    for (std::int64_t i = c.heads * c.v_head_dim; i < ots; ++i)
      CHECK(obuf[static_cast<std::size_t>(t * ots + i)] == -1.f);  // padding untouched
  }
}

TEST_CASE("a reused workspace gives the same result and stops growing", "[gqa]") {
  std::mt19937_64 rng(61);
  gqa_case c{.heads = 8, .kv_heads = 1, .head_dim = 64, .v_head_dim = 64, .tk = 2000, .tq = 1};
  const gqa_data x = make_gqa_data(rng, c);
  dense_cache<float> cache({.kv_heads = 1, .head_dim = 64, .capacity = c.tk});
  cache.append(tensor3_view<const float>(x.k.data(), {c.tk, 1, 64}),
               tensor3_view<const float>(x.v.data(), {c.tk, 1, 64}), x.k_pos);
  thread_pool pool(2);
  attention_workspace ws;
  fmat o1(1, 8 * 64), o2(1, 8 * 64);
  attend(tensor3_view<const float>(x.q.data(), {1, 8, 64}), x.q_pos, cache,
         tensor3_view<float>(o1.data(), {1, 8, 64}), {}, pool, &ws);
  const std::size_t bytes = ws.bytes();
  CHECK(bytes > 0);
  attend(tensor3_view<const float>(x.q.data(), {1, 8, 64}), x.q_pos, cache,
         tensor3_view<float>(o2.data(), {1, 8, 64}), {}, pool, &ws);
  CHECK(ws.bytes() == bytes);
  CHECK(max_abs_diff(to_double(o1), to_double(o2)) <= 1e-6);
}

TEST_CASE("attend: invalid input throws attnkit::invalid_argument naming the parameter",
          "[gqa][errors]") {
  dense_cache<float> cache({.kv_heads = 2, .head_dim = 8, .capacity = 4});
  std::vector<float> q(3 * 8), out(3 * 8), lse(3);
  std::vector<std::int64_t> pos{0};
  auto qv = [&](std::int64_t h, std::int64_t d) {
    return tensor3_view<const float>(q.data(), {1, h, d});
  };
  auto ov = [&](std::int64_t h, std::int64_t d) {
    return tensor3_view<float>(out.data(), {1, h, d});
  };
  ATTNKIT_CHECK_INVALID(attend(qv(3, 8), pos, cache, ov(3, 8)), "heads=3",
                        "multiple of kv_heads=2");
  ATTNKIT_CHECK_INVALID(attend(qv(2, 6), pos, cache, ov(2, 8)), "q.extent(2)=6", "head_dim=8");
  ATTNKIT_CHECK_INVALID(attend(qv(2, 8), std::span<const std::int64_t>(), cache, ov(2, 8)),
                        "q_positions has 0 entries", "Tq=1");
  ATTNKIT_CHECK_INVALID(attend(qv(2, 8), pos, cache, ov(2, 7)),
                        "attend: out has shape [1, 2, 7] but [1, 2, 8]");
  ATTNKIT_CHECK_INVALID(
      attend(qv(2, 8), pos, cache, ov(2, 8), {.lse = matrix_view<float>(lse.data(), {1, 3})}),
      "attend: lse has shape [1, 3] but [1, 2]");
  ATTNKIT_CHECK_INVALID(attend(qv(2, 8), pos, cache, ov(2, 8), {.window = 0}),
                        "window must be >= 1", "got 0");
  ATTNKIT_CHECK_INVALID(attend(qv(2, 8), pos, cache, ov(2, 8), {.scale = NAN}),
                        "scale must be finite");
  ATTNKIT_CHECK_INVALID(attend_mha(qv(3, 8), pos, cache, ov(3, 8)),
                        "attend_mha: heads=3 must equal kv_heads=2");
  ATTNKIT_CHECK_INVALID(attend_mqa(qv(2, 8), pos, cache, ov(2, 8)),
                        "attend_mqa: kv_heads must be 1, got 2");
  std::vector<float> k(4 * 2 * 8);
  ATTNKIT_CHECK_INVALID(kv_view<float>(tensor3_view<const float>(k.data(), {4, 2, 8}),
                                       tensor3_view<const float>(k.data(), {4, 2, 8}), pos),
                        "kv_view: positions has 1 entries but k has Tk=4");
  std::vector<std::int64_t> kp{0, 1, 2, 3};
  ATTNKIT_CHECK_INVALID(kv_view<float>(tensor3_view<const float>(k.data(), {4, 2, 8}, {16, 8, 2}),
                                       tensor3_view<const float>(k.data(), {4, 2, 8}), kp),
                        "contiguous last dimension", "strides 2 and 1");
}

TEST_CASE(
    "bf16 products: within the probability-rounding bound of the reference on rounded queries",
    "[gqa][bf16]") {
  const std::uint64_t seed = GENERATE(range(1, 13));
  std::mt19937_64 rng(seed * 104729);
  gqa_case c = random_case(rng);
  if (c.head_dim % 2) c.head_dim += 1;  // odd d_qk computes as f32 (checked below)
  c.tq = 20 + static_cast<std::int64_t>(rng() % 150);
  c.tk = 1 + static_cast<std::int64_t>(rng() % 400);  // odd block ends too
  c.strategy = seed % 3 ? tile_strategy::gemm : tile_strategy::automatic;
  c.products = product_math::bf16;
  const gqa_data x = make_gqa_data(rng, c);
  INFO(describe(c) << " bf16 products available: " << bf16_products_available());
  thread_pool pool(2);
  const fmat out = run_kernel<bf16>(c, x, pool);
  if (bf16_products_available()) {
    const double ratio = bf16_products_error_ratio(c, x, out);  // about 0.25 here
    CHECK(ratio <= 1.0);
  } else {  // the f32 path, bit for bit
    gqa_case f = c;
    f.products = product_math::f32;
    CHECK(out == run_kernel<bf16>(f, x, pool));
  }
}

TEST_CASE(
    "bf16 products: a worker's value blocks, packed once, serve every query tile of their KV "
    "head",
    "[gqa][bf16]") {
  // Two query tiles per KV head and 9 whole key blocks and a partial one: with d_v 512 a worker
  // keeps the value pairs of the first 8 whole blocks (1 MiB) for the next tile of the same head
  // and packs the rest (and a causal tile's diagonal block) each time. One worker runs every item
  // (each head's tiles, then the next head's blocks over the same cache slots), two interleave
  // them: with no key splits in either plan, the answers agree bit for bit. Three workers split
  // each item's keys in three (blocks that start between whole blocks are packed each time).
  std::mt19937_64 rng(211);
  const gqa_case c{.heads = 8,
                   .kv_heads = 2,
                   .head_dim = 32,
                   .v_head_dim = 512,
                   .tk = 9 * 128 + 24,
                   .tq = 40,
                   .strategy = tile_strategy::gemm,
                   .products = product_math::bf16};
  const gqa_data x = make_gqa_data(rng, c);
  thread_pool pool(2);
  auto three = three_workers(pool);
  const fmat one = run_kernel<bf16>(c, x), split = run_kernel<bf16>(c, x, three);
  INFO(describe(c) << " bf16 products available: " << bf16_products_available());
  CHECK(run_kernel<bf16>(c, x, pool) == one);
  if (bf16_products_available()) {
    CHECK(bf16_products_error_ratio(c, x, one) <= 1.0);
    CHECK(bf16_products_error_ratio(c, x, split) <= 1.0);
  } else {  // the f32 path, bit for bit; its key splits within float round-off
    gqa_case f = c;
    f.products = product_math::f32;
    CHECK(one == run_kernel<bf16>(f, x));
    const double tol =
        float_tolerance(c.head_dim, c.tk, x.a_max(c.head_dim), x.v.cwiseAbs().maxCoeff());
    CHECK(max_abs_diff(to_double(one), to_double(split)) <= 2 * tol);
  }
}

TEST_CASE(
    "bf16 products: odd d_qk, d_qk not whole 32s on the streaming path, and float caches "
    "compute as f32",
    "[gqa][bf16]") {
  std::mt19937_64 rng(71);
  for (gqa_case c : {gqa_case{.heads = 8, .kv_heads = 2, .head_dim = 48, .tk = 300, .tq = 1},
                     gqa_case{.heads = 8,
                     .kv_heads = 2,
                     .head_dim = 33,
                     .v_head_dim = 32,
                     .tk = 300,
                     .tq = 64,
                     .strategy = tile_strategy::gemm}}) {
    const gqa_data x = make_gqa_data(rng, c);
    const fmat f32_bf16 = run_kernel<bf16>(c, x), f32_float = run_kernel<float>(c, x);
    c.products = product_math::bf16;
    INFO(describe(c));
    CHECK(run_kernel<bf16>(c, x) == f32_bf16);
    CHECK(run_kernel<float>(c, x) == f32_float);
  }
}

TEST_CASE(
    "bf16 products on the streaming path: the reference on rounded queries, to float "
    "round-off",
    "[gqa][bf16]") {
  // Decode steps and short multi-token steps (g Tq < 16 rows: the streaming kernels), d_qk a
  // multiple of 32; key counts that end blocks of 4 keys and of 64 anywhere, odd and even. Where
  // vdpbf16ps runs, the scores take the queries rounded to bf16, and P V the probabilities
  // rounded to bf16 where d_v is whole 32-column groups (else its f32 kernel: nothing else
  // rounded); elsewhere the answer is the f32 path's, bit for bit.
  const std::uint64_t seed = GENERATE(range(1, 9));
  std::mt19937_64 rng(seed * 7919);
  gqa_case c;
  c.kv_heads = 1 + static_cast<std::int64_t>(rng() % 3);
  c.heads = c.kv_heads * (1 + static_cast<std::int64_t>(rng() % 8));
  c.head_dim = 32 * (1 + static_cast<std::int64_t>(rng() % 4));
  c.v_head_dim = 16 * (1 + static_cast<std::int64_t>(rng() % 8));
  c.tq = 1 + static_cast<std::int64_t>(rng() % (15 / (c.heads / c.kv_heads)));
  c.tk = c.tq + static_cast<std::int64_t>(rng() % 700);
  if (seed % 4 == 0) c.window = 1 + static_cast<std::int64_t>(rng() % 200);
  c.products = product_math::bf16;
  const gqa_data x = make_gqa_data(rng, c);
  INFO(describe(c) << " vdpbf16ps: " << detail::bf16_dot_available());
  thread_pool pool(2);
  const fmat out = run_kernel<bf16>(c, x, pool);
  if (detail::bf16_dot_available()) {
    CHECK(bf16_products_error_ratio(c, x, out, c.v_head_dim % 32 == 0) <= 1.0);
  } else {
    gqa_case f = c;
    f.products = product_math::f32;
    CHECK(out == run_kernel<bf16>(f, x, pool));
  }
}

TEST_CASE("bf16 products: absorbed MLA (values = the latent columns of the key rows)",
          "[gqa][mla][bf16]") {
  // 3 tokens of 16 and 40 heads: tall tiles; decode steps of 16 heads with d_qk a multiple of
  // 32: one row tile, whose values AMX reads in place.
  const auto [heads, tq, dc, dr] =
      GENERATE(std::tuple<std::int64_t, std::int64_t, std::int64_t, std::int64_t>{16, 3, 64, 16},
               std::tuple{40, 3, 64, 16}, std::tuple{16, 1, 64, 32}, std::tuple{16, 1, 512, 64});
  std::mt19937_64 rng(static_cast<std::uint64_t>(heads * tq + dc));
  const std::int64_t tk = 333;
  gqa_case c{.heads = heads,
             .kv_heads = 1,
             .head_dim = dc + dr,
             .v_head_dim = dc,
             .tk = tk,
             .tq = tq,
             .products = product_math::bf16};
  gqa_data x = make_gqa_data(rng, c);
  x.v = x.k.leftCols(dc);
  std::vector<bf16> rows(static_cast<std::size_t>(tk * (dc + dr)));
  for (std::size_t i = 0; i < rows.size(); ++i) rows[i] = bf16(x.k.data()[i]);
  const auto kv = kv_view<bf16>::latent(rows.data(), dc + dr, dc, dc + dr, x.k_pos);
  fmat out(c.tq, heads * dc);
  const std::int64_t w = dc + dr;  // x.q [Tq][H * w]: q_latent and q_rope side by side
  attend_latent(tensor3_view<const float>(x.q.data(), {c.tq, heads, dc}, {heads * w, w, 1}),
                tensor3_view<const float>(x.q.data() + dc, {c.tq, heads, dr}, {heads * w, w, 1}),
                x.q_pos, kv, tensor3_view<float>(out.data(), {c.tq, heads, dc}),
                {.products = product_math::bf16});
  INFO(describe(c) << " bf16 products available: " << bf16_products_available());
  CHECK(bf16_products_error_ratio(c, x, out) <= 1.0);
}

TEST_CASE(
    "bf16 products on a single row tile (16 rows or fewer): AMX reads the value rows in place, "
    "key remainders, a last single value group, other value widths paired",
    "[gqa][mla][bf16]") {
  std::mt19937_64 rng(83);
  // 16, 12 and 1 rows; d_v 96 ends in one 32-column group, 48 is no multiple of 32 (the values
  // are paired instead); 7 keys are fewer than a tile's 16, 300 end in 12 after whole blocks.
  for (const auto& [dqk, dv] : {std::pair{64, 64}, {128, 96}, {64, 48}})
    for (const auto& [heads, kv_heads, tq] : {std::tuple{16, 1, 1}, {4, 1, 3}, {3, 3, 1}})
      for (const std::int64_t tk : {7, 300}) {
        const gqa_case c{.heads = heads,
                         .kv_heads = kv_heads,
                         .head_dim = dqk,
                         .v_head_dim = dv,
                         .tk = tk,
                         .tq = tq,
                         .strategy = tile_strategy::gemm,
                         .products = product_math::bf16};
        const gqa_data x = make_gqa_data(rng, c);
        INFO(describe(c) << " bf16 products available: " << bf16_products_available());
        CHECK(bf16_products_error_ratio(c, x, run_kernel<bf16>(c, x)) <= 1.0);
      }
}

TEST_CASE(
    "f32 products on AMX tiles: each float operand as three bf16 parts, to float round-off: "
    "single row tiles and GEMM tiles, key remainders, value widths, key splits",
    "[gqa][mla][bf16][amx]") {
  using products = detail::gqa_products<bf16>;
  std::mt19937_64 rng(89);
  // 16, 12 and 1 rows: a single row tile (d_v 96 ends in one 32-column group; 48 is no multiple
  // of 32, so its values are paired for the GEMM tiles); 80 rows: GEMM tiles. 40 keys end in a
  // partial 16-key tile, 300 in a partial block; 7 stay on FMAs (fewer than split_min_keys). The
  // float tolerance is the f32 path's: two parts miss it, a single one (bf16 products) by orders
  // of magnitude.
  for (const auto& [dqk, dv] : {std::pair{64, 64}, {128, 96}, {64, 48}, {576, 512}})
    for (const auto& [heads, kv_heads, tq] :
         {std::tuple{16, 1, 1}, {4, 1, 3}, {3, 3, 1}, {32, 2, 5}})
      for (const std::int64_t tk : {7, 40, 300}) {
        const gqa_case c{.heads = heads,
                         .kv_heads = kv_heads,
                         .head_dim = dqk,
                         .v_head_dim = dv,
                         .tk = tk,
                         .tq = tq,
                         .strategy = tile_strategy::gemm};
        const std::vector<std::int64_t> pos(static_cast<std::size_t>(tk));
        const std::vector<bf16> rows(static_cast<std::size_t>(tk * dqk));
        const auto view = kv_view<bf16>::latent(rows.data(), dqk, dv, dqk, pos);
        CHECK((products::engine_for(view, false, false) == products::pair_engine::amx) ==
              (detail::bf16_amx_available() && tk >= products::split_min_keys));
        INFO(describe(c) << " AMX: " << detail::bf16_amx_available());
        check_against_reference<bf16>(c, rng);
        check_against_reference<bf16>(c, rng, thread_pool(2));
      }
}

namespace {
/// 8 query heads over 2 KV heads of width 128 on the GEMM tiles, f32 products: AMX tiles with
/// three bf16 parts where the CPU has them.
gqa_case amx_gemm_case(std::int64_t tk, std::int64_t tq) {
  return {.heads = 8,
          .kv_heads = 2,
          .head_dim = 128,
          .v_head_dim = 128,
          .tk = tk,
          .tq = tq,
          .strategy = tile_strategy::gemm};
}
}  // namespace

TEST_CASE("f32 products on AMX GEMM tiles: value pairs kept across query tiles past 32 key blocks",
          "[gqa][bf16][amx]") {
  std::mt19937_64 rng(97);
  // 3 query tiles of 32 tokens per KV head read the same key blocks: on AMX (blocks of 64 keys)
  // the first 64 blocks' value pairs come from the worker's cache after the first tile, the
  // blocks past 4096 keys are paired again each time; 2 KV heads share the cache slots in turn.
  const gqa_case c = amx_gemm_case(4200, 80);
  INFO(describe(c) << " AMX: " << detail::bf16_amx_available());
  check_against_reference<bf16>(c, rng);
  check_against_reference<bf16>(c, rng, thread_pool(2));
}

TEST_CASE(
    "f32 products on AMX tiles: a row that sees no key (LSE -inf) keeps the call on the tiles",
    "[gqa][bf16][amx]") {
  std::mt19937_64 rng(101);
  const gqa_case c = amx_gemm_case(300, 40);
  gqa_data x = make_gqa_data(rng, c);
  x.q_pos[0] = x.k_pos.front() - 1;  // before every key: no key visible under the causal rule
  fmat lse;
  const fmat with_lse = run_kernel<bf16>(c, x, serial_executor{}, &lse);
  const fmat without = run_kernel<bf16>(c, x);
  INFO(describe(c) << " AMX: " << detail::bf16_amx_available());
  for (std::int64_t h = 0; h < c.heads; ++h) CHECK(lse(0, h) == -INFINITY);
  // Asking for the LSE changes no output: a call on bf16 parts runs again on FMAs (whose sums
  // round differently) only where an output or LSE is NaN or +inf, not for a row's -inf.
  CHECK((with_lse.array() == without.array()).all());
  check_data_against_reference<bf16>(c, x);
}

TEST_CASE(
    "f32 products on AMX tiles: an infinite key or value gives the FMA path's answer (inf or "
    "NaN where it has them)",
    "[gqa][bf16][amx]") {
  // A part of 0 (or of the other sign) times an infinite key or value is NaN where the float
  // product is +-inf: such calls run again on FMAs (splits_products), here checked against the
  // avx2 target's FMAs on the same data.
  if (!detail::bf16_amx_available() || !cpu_supports(simd_target::avx2)) {
    SUCCEED("no AMX engine on this CPU (the f32 products stay on FMAs)");
    return;
  }
  std::mt19937_64 rng(97);
  for (const bool in_values : {false, true})
    for (const auto& [heads, tq] : {std::pair{16, 1}, {8, 5}}) {
      const gqa_case c{.heads = heads,
                       .kv_heads = 1,
                       .head_dim = 64,
                       .v_head_dim = 64,
                       .tk = 300,
                       .tq = tq,
                       .strategy = tile_strategy::gemm};
      gqa_data x = make_gqa_data(rng, c);
      fmat& planted = in_values ? x.v : x.k;
      planted(123, 7) = std::numeric_limits<float>::infinity();
      planted(200, 9) = -std::numeric_limits<float>::infinity();
      const fmat tiles = run_kernel<bf16>(c, x);
      const simd_target before = active_target();
      set_target(simd_target::avx2);
      const fmat fmas = run_kernel<bf16>(c, x);
      set_target(before);
      INFO(describe(c) << " infinities in the " << (in_values ? "values" : "keys"));
      CHECK(check_as_fmas(tiles, fmas) > 0);  // the infinities reach the output
    }
}

TEMPLATE_TEST_CASE(
    "narrow tiles (16 rows or fewer) read the cache in place: scores in column form, row and "
    "column remainders, GQA values and absorbed MLA values from the latent rows",
    "[gqa][mla]", float, bf16) {
  std::mt19937_64 rng(61);
  // GQA: d_qk 48, 80 and 200 end in a partial bf16 pair group (read in natural order), d_v 48
  // and 136 in a partial value tile; 16, 12, 8 and 1 rows: whole and partial score blocks.
  for (const auto& [dqk, dv] : {std::pair{48, 32}, {80, 48}, {200, 136}})
    for (const auto& [heads, kv_heads, tq] :
         {std::tuple{16, 1, 1}, {4, 1, 3}, {8, 2, 2}, {3, 3, 1}}) {
      const gqa_case c{.heads = heads,
                       .kv_heads = kv_heads,
                       .head_dim = dqk,
                       .v_head_dim = dv,
                       .tk = 300,  // two whole key blocks and a partial one: the prefetch crosses
                       .tq = tq,
                       .strategy = tile_strategy::gemm};
      check_against_reference<TestType>(c, rng);
    }
  // MLA: the values are the latent rows' leading columns, read in place by the P V product;
  // 15 rows: value tiles of 8, 4, 2 and 1 heads.
  for (const auto& [dc, dr] : {std::pair{64, 16}, {136, 64}, {512, 64}})
    for (const auto& [heads, tq] : {std::pair{16, 1}, {5, 3}}) {
      const gqa_case c{.heads = heads,
                       .kv_heads = 1,
                       .head_dim = dc + dr,
                       .v_head_dim = dc,
                       .tk = 300,
                       .tq = tq,
                       .strategy = tile_strategy::gemm};
      gqa_data x = make_gqa_data(rng, c);
      x.v = x.k.leftCols(dc);
      std::vector<TestType> rows(static_cast<std::size_t>(c.tk * (dc + dr)));
      for (std::size_t i = 0; i < rows.size(); ++i) rows[i] = TestType(x.k.data()[i]);
      const auto kv = kv_view<TestType>::latent(rows.data(), dc + dr, dc, dc + dr, x.k_pos);
      fmat out(c.tq, heads * dc);
      const std::int64_t w = dc + dr;  // x.q [Tq][H * w]: q_latent and q_rope side by side
      attend_latent(
          tensor3_view<const float>(x.q.data(), {c.tq, heads, dc}, {heads * w, w, 1}),
          tensor3_view<const float>(x.q.data() + dc, {c.tq, heads, dr}, {heads * w, w, 1}), x.q_pos,
          kv, tensor3_view<float>(out.data(), {c.tq, heads, dc}),
          {.strategy = tile_strategy::gemm});
      const auto ref = run_reference<TestType>(c, x);
      INFO(describe(c));
      CHECK(max_abs_diff(to_double(out), ref.out) <=
            float_tolerance(c.head_dim, c.tk, x.a_max(c.head_dim), x.v.cwiseAbs().maxCoeff()));
    }
}

TEST_CASE(
    "amx_gemm: every row remainder, C (+)= A B to float round-off, nothing outside C's "
    "rows and columns written",
    "[gqa][bf16][amx]") {
  if (!detail::bf16_amx_available()) {
    SUCCEED("no AMX engine on this CPU (ATTNKIT_BF16_ENGINE=amx on an AMX host runs this)");
    return;
  }
  std::mt19937_64 rng(97);
  std::normal_distribution<float> nd;
  const float sentinel = 12345.f;
  for (const std::int64_t rows : {1, 5, 16, 17, 31, 32, 40, 48, 63})
    for (const std::int64_t cols : {16, 48, 64})
      for (const std::int64_t depth : {32, 96}) {
        // A [rows + 16][depth + 8] bf16, the rows past `rows` NaN: read, they would show in C.
        const std::int64_t as = depth + 8, ldb = cols + 16, ldc = cols + 16;
        std::vector<bf16> a(static_cast<std::size_t>((rows + 16) * as),
                            bf16(std::numeric_limits<float>::quiet_NaN()));
        for (std::int64_t i = 0; i < rows; ++i)
          for (std::int64_t k = 0; k < depth; ++k) a[i * as + k] = bf16(nd(rng));
        // B's pairs [depth / 2][ldb]: (b[2k][j], b[2k + 1][j]) with the even row low.
        std::vector<float> b(static_cast<std::size_t>(depth * cols));
        for (auto& x : b) x = static_cast<float>(bf16(nd(rng)));
        std::vector<std::uint32_t> bp(static_cast<std::size_t>(depth / 2 * ldb), 0x7fc07fc0u);
        auto bits = [](float x) { return Eigen::numext::bit_cast<std::uint16_t>(bf16(x)); };
        for (std::int64_t k = 0; k < depth / 2; ++k)
          for (std::int64_t j = 0; j < cols; ++j)
            bp[k * ldb + j] =
                bits(b[2 * k * cols + j]) | std::uint32_t(bits(b[(2 * k + 1) * cols + j])) << 16;
        std::vector<float> c(static_cast<std::size_t>((rows + 16) * ldc), sentinel), c0 = c;
        for (std::int64_t i = 0; i < rows; ++i)
          for (std::int64_t j = 0; j < cols; ++j) c0[i * ldc + j] = c[i * ldc + j] = nd(rng);
        detail::amx_gemm<true>(rows, cols, depth, a.data(), as, bp.data(), ldb, c.data(), ldc);
        INFO("rows=" << rows << " cols=" << cols << " depth=" << depth);
        double worst = 0;
        for (std::int64_t i = 0; i < rows + 16; ++i)
          for (std::int64_t j = 0; j < ldc; ++j) {
            const float got = c[i * ldc + j];
            if (i >= rows || j >= cols) {
              CHECK(got == sentinel);
              continue;
            }
            // Exact products, float sums: |error| <= (depth + 1) u (|c0| + sum |a b|).
            double sum = c0[i * ldc + j], mag = std::abs(sum);
            for (std::int64_t k = 0; k < depth; ++k) {
              const double p = double(static_cast<float>(a[i * as + k])) * b[k * cols + j];
              sum += p, mag += std::abs(p);
            }
            worst = std::max(worst, std::abs(got - sum) / ((depth + 1) * 0x1p-24 * mag));
          }
        CHECK(worst <= 1.0);
      }
}

namespace {

/// x's queries rounded to bf16, and the same values widened back to float.
struct bf16_queries {
  std::vector<bf16> b;
  fmat f;
};
bf16_queries round_queries(const fmat& q) {
  bf16_queries r{std::vector<bf16>(static_cast<std::size_t>(q.size())), fmat(q.rows(), q.cols())};
  for (std::int64_t i = 0; i < q.size(); ++i) {
    r.b[static_cast<std::size_t>(i)] = bf16(q.data()[i]);
    r.f.data()[i] = static_cast<float>(r.b[static_cast<std::size_t>(i)]);
  }
  return r;
}

/// The bits of a bf16 (NaNs compared by their bits too: the conversions keep sign and payload
/// the same way on every target).
std::uint16_t bits_of(bf16 x) { return Eigen::numext::bit_cast<std::uint16_t>(x); }

}  // namespace

TEST_CASE("bf16 queries and outputs: the float call on the same queries, rounded once",
          "[gqa][bf16][io]") {
  // A bf16 call widens its queries to the floats a float call would get and rounds each output
  // element of the same float result to bf16 once (to nearest even): its outputs are those of
  // the float call rounded, bit for bit, and its LSE the float call's, on every path (streaming
  // decodes, GEMM tiles, AMX and vdpbf16ps tiles, f32 and bf16 products, float and bf16
  // caches, key splits) and every target. A NaN query element makes its rows NaN in both.
  const std::uint64_t seed = GENERATE(range(1, 17));
  std::mt19937_64 rng(seed * 7919);
  gqa_case c = random_case(rng);
  if (seed % 4 == 0) c.tq = 40 + static_cast<std::int64_t>(rng() % 90);  // GEMM / AMX tiles
  if (seed % 2 == 0) c.products = product_math::bf16;
  if (c.head_dim % 32) c.head_dim = 32 * (1 + c.head_dim / 32);  // AMX takes whole 32 columns
  if (seed % 3 == 0) c.v_head_dim = c.head_dim;
  gqa_data x = make_gqa_data(rng, c);
  if (seed % 5 == 0) x.q(c.tq / 2, 1) = NAN;
  const bf16_queries q = round_queries(x.q);
  INFO(describe(c) << " products=" << (c.products == product_math::bf16 ? "bf16" : "f32"));
  thread_pool pool(2);
  auto check = [&](auto cache) {
    const std::int64_t n = c.tq * c.heads * c.v_head_dim;
    fmat out_f(c.tq, c.heads * c.v_head_dim), lse_f(c.tq, c.heads), lse_b(c.tq, c.heads);
    std::vector<bf16> out_b(static_cast<std::size_t>(n));
    attention_options opt{
        .causal = c.causal, .window = c.window, .strategy = c.strategy, .products = c.products};
    opt.lse = matrix_view<float>(lse_f.data(), {c.tq, c.heads});
    attend(tensor3_view<const float>(q.f.data(), {c.tq, c.heads, c.head_dim}), x.q_pos, cache,
           tensor3_view<float>(out_f.data(), {c.tq, c.heads, c.v_head_dim}), opt, pool);
    opt.lse = matrix_view<float>(lse_b.data(), {c.tq, c.heads});
    attend(tensor3_view<const bf16>(q.b.data(), {c.tq, c.heads, c.head_dim}), x.q_pos, cache,
           tensor3_view<bf16>(out_b.data(), {c.tq, c.heads, c.v_head_dim}), opt, pool);
    std::int64_t differ = 0;
    for (std::int64_t i = 0; i < n; ++i)
      differ += bits_of(out_b[static_cast<std::size_t>(i)]) != bits_of(bf16(out_f.data()[i]));
    CHECK(differ == 0);
    CHECK(lse_b.cwiseEqual(lse_f).count() +
              (lse_b.array().isNaN() && lse_f.array().isNaN()).count() ==
          lse_f.size());
    return out_f;
  };
  check(cache_of<float>(c, x));
  const fmat out = check(cache_of<bf16>(c, x));
  if (seed % 5 != 0 && c.products == product_math::f32) {  // and the float result is the kernel's
    gqa_data xr = x;
    xr.q = q.f;
    const auto ref = run_reference<bf16>(c, xr);
    CHECK(max_abs_diff(to_double(out), ref.out) <=
          float_tolerance(c.head_dim, c.tk, xr.a_max(c.head_dim), x.v.cwiseAbs().maxCoeff()));
  }
}

TEST_CASE("bf16 queries and outputs: strided views, MHA and MQA, and bad input",
          "[gqa][bf16][io][view][errors]") {
  std::mt19937_64 rng(73);
  gqa_case c{.heads = 4, .kv_heads = 4, .head_dim = 64, .v_head_dim = 32, .tk = 90, .tq = 6};
  const gqa_data x = make_gqa_data(rng, c);
  const bf16_queries q = round_queries(x.q);
  const auto cache = cache_of<bf16>(c, x);
  fmat base(c.tq, c.heads * c.v_head_dim);
  attend_mha(tensor3_view<const float>(q.f.data(), {c.tq, c.heads, c.head_dim}), x.q_pos, cache,
             tensor3_view<float>(base.data(), {c.tq, c.heads, c.v_head_dim}));
  // q with padded head stride and every other column (a strided slice), out with padded token
  // stride: the strided widening and the strided rounding of the output rows.
  const std::int64_t qhs = 2 * c.head_dim + 6, ots = c.heads * c.v_head_dim + 3;
  std::vector<bf16> qbuf(static_cast<std::size_t>(c.tq * c.heads * qhs), bf16(NAN)),
      obuf(static_cast<std::size_t>(c.tq * ots), bf16(-1.f));
  for (std::int64_t t = 0; t < c.tq; ++t)
    for (std::int64_t h = 0; h < c.heads; ++h)
      for (std::int64_t i = 0; i < c.head_dim; ++i)
        qbuf[static_cast<std::size_t>((t * c.heads + h) * qhs + 2 * i)] =
            q.b[static_cast<std::size_t>(t * c.heads * c.head_dim + h * c.head_dim + i)];
  attend_mha(
      tensor3_view<const bf16>(qbuf.data(), {c.tq, c.heads, c.head_dim}, {c.heads * qhs, qhs, 2}),
      x.q_pos, cache,
      tensor3_view<bf16>(obuf.data(), {c.tq, c.heads, c.v_head_dim}, {ots, 1, c.heads}));
  for (std::int64_t t = 0; t < c.tq; ++t) {
    for (std::int64_t h = 0; h < c.heads; ++h)
      for (std::int64_t i = 0; i < c.v_head_dim; ++i)
        CHECK(bits_of(obuf[static_cast<std::size_t>(t * ots + i * c.heads + h)]) ==
              bits_of(bf16(base(t, h * c.v_head_dim + i))));
    for (std::int64_t i = c.heads * c.v_head_dim; i < ots; ++i)
      CHECK(bits_of(obuf[static_cast<std::size_t>(t * ots + i)]) == bits_of(bf16(-1.f)));
  }
  // MQA: one KV head.
  gqa_case m{.heads = 3, .kv_heads = 1, .head_dim = 32, .v_head_dim = 32, .tk = 20, .tq = 2};
  const gqa_data y = make_gqa_data(rng, m);
  const bf16_queries qm = round_queries(y.q);
  const auto mqa_cache = cache_of<float>(m, y);
  fmat mf(m.tq, m.heads * m.v_head_dim);
  std::vector<bf16> mb(static_cast<std::size_t>(mf.size()));
  attend_mqa(tensor3_view<const float>(qm.f.data(), {m.tq, m.heads, m.head_dim}), y.q_pos,
             mqa_cache, tensor3_view<float>(mf.data(), {m.tq, m.heads, m.v_head_dim}));
  attend_mqa(tensor3_view<const bf16>(qm.b.data(), {m.tq, m.heads, m.head_dim}), y.q_pos, mqa_cache,
             tensor3_view<bf16>(mb.data(), {m.tq, m.heads, m.v_head_dim}));
  for (std::int64_t i = 0; i < mf.size(); ++i)
    CHECK(bits_of(mb[static_cast<std::size_t>(i)]) == bits_of(bf16(mf.data()[i])));
  // Bad input: the float call's messages; a throwing call writes nothing.
  std::vector<bf16> qs(2 * 8, bf16(1.f)), os(2 * 8, bf16(-1.f));
  dense_cache<float> small({.kv_heads = 2, .head_dim = 8, .capacity = 4});
  std::vector<std::int64_t> pos{0};
  auto qv = [&](std::int64_t h, std::int64_t d) {
    return tensor3_view<const bf16>(qs.data(), {1, h, d});
  };
  auto ov = [&](bf16* p, std::int64_t h, std::int64_t d) {
    return tensor3_view<bf16>(p, {1, h, d});
  };
  ATTNKIT_CHECK_INVALID(attend(qv(2, 6), pos, small, ov(os.data(), 2, 8)), "q.extent(2)=6",
                        "head_dim=8");
  ATTNKIT_CHECK_INVALID(attend(qv(2, 8), pos, small, ov(os.data(), 2, 7)),
                        "attend: out has shape [1, 2, 7] but [1, 2, 8]");
  ATTNKIT_CHECK_INVALID(attend(qv(2, 8), pos, small, ov(qs.data(), 2, 8)),
                        "attend: out overlaps the input q");
  ATTNKIT_CHECK_INVALID(attend_mqa(qv(2, 8), pos, small, ov(os.data(), 2, 8)),
                        "attend_mqa: kv_heads must be 1, got 2");
  for (const bf16 o : os) CHECK(bits_of(o) == bits_of(bf16(-1.f)));
}
