// Identities of the GQA family, each over randomized shapes with a stated tolerance:
//   MHA == GQA with one query head per KV head (replicating each KV head g times);
//   MQA == GQA with one KV head (every KV head equal);
//   full prefill == chunked prefill == token-by-token decode.
#include <numeric>

#include "gqa_fixture.hpp"
#include "layer_fixture.hpp"

using namespace attnkit;
using namespace attnkit::test;

namespace {
/// Replicates each KV head's columns g times: [T, H_kv*d] -> [T, H_kv*g*d].
fmat replicate_heads(const fmat& m, std::int64_t kv_heads, std::int64_t g) {
  const std::int64_t d = m.cols() / kv_heads;
  fmat r(m.rows(), kv_heads * g * d);
  for (std::int64_t j = 0; j < kv_heads; ++j)
    for (std::int64_t i = 0; i < g; ++i) r.middleCols((j * g + i) * d, d) = m.middleCols(j * d, d);
  return r;
}
}  // namespace

TEST_CASE("I: GQA(H, H_kv) equals MHA on KV heads replicated per group", "[identity][gqa]") {
  std::mt19937_64 rng(GENERATE(1, 2, 3, 4, 5, 6));
  const std::int64_t hkv = 1 + static_cast<std::int64_t>(rng() % 4),
                     g = 2 + static_cast<std::int64_t>(rng() % 4);
  gqa_case c{.heads = hkv * g,
             .kv_heads = hkv,
             .head_dim = 64,
             .v_head_dim = rng() % 2 ? 64 : 32,
             .tk = 1 + static_cast<std::int64_t>(rng() % 700),
             .tq = rng() % 2 ? 1 : 20};
  const gqa_data x = make_gqa_data(rng, c);
  const fmat gqa = run_kernel<float>(c, x);
  gqa_case mha = c;
  mha.kv_heads = c.heads;
  gqa_data xm = x;
  xm.k = replicate_heads(x.k, hkv, g);
  xm.v = replicate_heads(x.v, hkv, g);
  dense_cache<float> cache({.kv_heads = mha.kv_heads,
                            .head_dim = c.head_dim,
                            .v_head_dim = c.v_head_dim,
                            .capacity = c.tk});
  cache.append(tensor3_view<const float>(xm.k.data(), {c.tk, mha.kv_heads, c.head_dim}),
               tensor3_view<const float>(xm.v.data(), {c.tk, mha.kv_heads, c.v_head_dim}), x.k_pos);
  fmat out(c.tq, c.heads * c.v_head_dim);
  attend_mha(tensor3_view<const float>(x.q.data(), {c.tq, c.heads, c.head_dim}), x.q_pos, cache,
             tensor3_view<float>(out.data(), {c.tq, c.heads, c.v_head_dim}));
  INFO(describe(c));
  // Two float evaluations of the same function: twice the one-sided tolerance.
  CHECK(max_abs_diff(to_double(out), to_double(gqa)) <=
        2 * float_tolerance(c.head_dim, c.tk, x.a_max(c.head_dim), x.v.cwiseAbs().maxCoeff()));
}

TEST_CASE("I: MQA equals GQA whose KV heads are all the same head", "[identity][gqa]") {
  std::mt19937_64 rng(GENERATE(11, 12, 13, 14));
  const std::int64_t h = 4 * (1 + static_cast<std::int64_t>(rng() % 4)),
                     hkv = 2 + static_cast<std::int64_t>(rng() % 2) * 2;
  gqa_case mqa{.heads = h,
               .kv_heads = 1,
               .head_dim = 32,
               .v_head_dim = 32,
               .tk = 1 + static_cast<std::int64_t>(rng() % 900),
               .tq = rng() % 2 ? 1 : 9};
  const gqa_data x = make_gqa_data(rng, mqa);
  dense_cache<float> one({.kv_heads = 1, .head_dim = 32, .capacity = mqa.tk});
  one.append(tensor3_view<const float>(x.k.data(), {mqa.tk, 1, 32}),
             tensor3_view<const float>(x.v.data(), {mqa.tk, 1, 32}), x.k_pos);
  fmat out_mqa(mqa.tq, h * 32), out_gqa(mqa.tq, h * 32);
  attend_mqa(tensor3_view<const float>(x.q.data(), {mqa.tq, h, 32}), x.q_pos, one,
             tensor3_view<float>(out_mqa.data(), {mqa.tq, h, 32}));
  const fmat k_rep = replicate_heads(x.k, 1, hkv), v_rep = replicate_heads(x.v, 1, hkv);
  dense_cache<float> many({.kv_heads = hkv, .head_dim = 32, .capacity = mqa.tk});
  many.append(tensor3_view<const float>(k_rep.data(), {mqa.tk, hkv, 32}),
              tensor3_view<const float>(v_rep.data(), {mqa.tk, hkv, 32}), x.k_pos);
  attend(tensor3_view<const float>(x.q.data(), {mqa.tq, h, 32}), x.q_pos, many,
         tensor3_view<float>(out_gqa.data(), {mqa.tq, h, 32}));
  CHECK(max_abs_diff(to_double(out_mqa), to_double(out_gqa)) <=
        2 * float_tolerance(32, mqa.tk, x.a_max(32), x.v.cwiseAbs().maxCoeff()));
}

TEMPLATE_TEST_CASE("I: full prefill == chunked prefill == token-by-token decode (layer)",
                   "[identity][layer]", float, bf16) {
  using S = TestType;
  std::mt19937_64 rng(GENERATE(21, 22, 23));
  const std::int64_t hkv = 1 + static_cast<std::int64_t>(rng() % 3),
                     g = 1 + static_cast<std::int64_t>(rng() % 3);
  gqa_config cfg{.model_dim = 64,
                 .heads = hkv * g,
                 .kv_heads = hkv,
                 .head_dim = 32,
                 .rope = {.theta = 500000.0, .layout = rope_layout::half_split}};
  if (rng() % 2) cfg.window = 17;
  const auto w = make_layer_data(rng, cfg, rng() % 2);
  const std::int64_t t = 70;
  const fmat x = random_matrix(rng, t, cfg.model_dim);
  const auto pos = gapped_positions(rng, t, 1000, 2);
  gqa_layer layer(cfg, w.weights());
  thread_pool pool(2);
  auto run_chunks = [&](std::int64_t chunk) {
    auto cache = layer.make_cache<S>(t);
    fmat y(t, cfg.model_dim);
    for (std::int64_t s = 0; s < t; s += chunk) {
      const std::int64_t n = std::min(chunk, t - s);
      layer.forward(matrix_view<const float>(x.row(s).data(), {n, cfg.model_dim}),
                    std::span(pos).subspan(s, n), cache,
                    matrix_view<float>(y.row(s).data(), {n, cfg.model_dim}), pool);
    }
    return to_double(y);
  };
  const auto full = run_chunks(t), chunked = run_chunks(16), decode = run_chunks(1);
  // Each is within the layer tolerance of the reference, hence within twice of each other.
  const double tol = 2 * layer_rel_tolerance<float>(cfg, t, layer_a_max(w, x));
  CHECK(rel_error(chunked, full) <= tol);
  CHECK(rel_error(decode, full) <= tol);
}

TEST_CASE("I: prefill == token-by-token decode at the kernel level, bf16 cache, Tk up to 2048",
          "[identity][gqa]") {
  std::mt19937_64 rng(31);
  const std::int64_t h = 8, hkv = 2, d = 128, t = 2048;
  const fmat q = random_matrix(rng, t, h * d), k = random_matrix(rng, t, hkv * d),
             v = random_matrix(rng, t, hkv * d);
  std::vector<std::int64_t> pos(t);
  std::iota(pos.begin(), pos.end(), 0);
  dense_cache<bf16> cache({.kv_heads = hkv, .head_dim = d, .capacity = t});
  cache.append(tensor3_view<const float>(k.data(), {t, hkv, d}),
               tensor3_view<const float>(v.data(), {t, hkv, d}), pos);
  thread_pool pool(2);
  fmat full(t, h * d);
  attend(tensor3_view<const float>(q.data(), {t, h, d}), pos, cache,
         tensor3_view<float>(full.data(), {t, h, d}), {}, pool);
  // Decode: the cache grows token by token; query i sees the first i + 1 keys.
  dense_cache<bf16> growing({.kv_heads = hkv, .head_dim = d, .capacity = t});
  double worst = 0;
  fmat row(1, h * d);
  for (std::int64_t i = 0; i < t; ++i) {
    growing.append(tensor3_view<const float>(k.row(i).data(), {1, hkv, d}),
                   tensor3_view<const float>(v.row(i).data(), {1, hkv, d}),
                   std::span(pos).subspan(i, 1));
    if (i % 97 != 0 && i != t - 1) continue;  // check a spread of steps, the last included
    attend(tensor3_view<const float>(q.row(i).data(), {1, h, d}), std::span(pos).subspan(i, 1),
           growing, tensor3_view<float>(row.data(), {1, h, d}), {}, pool);
    worst = std::max(worst, (row - full.row(i)).cwiseAbs().maxCoeff() * 1.0);
  }
  gqa_data x{q, k, v, pos, pos, 1 / std::sqrt(double(d))};
  CHECK(worst <= 2 * float_tolerance(d, t, x.a_max(d), v.cwiseAbs().maxCoeff()));
}
