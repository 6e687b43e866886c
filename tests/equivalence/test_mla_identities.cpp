// MLA identities: absorbed == naive (I3) over randomized configs, the bias identities (I4), and
// full prefill == chunked prefill == token-by-token decode.
#include "layer_fixture.hpp"
#include "mla_fixture.hpp"

using namespace attnkit;
using namespace attnkit::test;

namespace {
fmat run(const mla_data& w, const fmat& x, const std::vector<std::int64_t>& pos, mla_path path,
         std::int64_t chunk) {
  mla_layer layer(w.cfg, w.weights());
  auto cache = layer.make_cache<float>(x.rows());
  fmat y(x.rows(), w.cfg.model_dim);
  thread_pool pool(2);
  for (std::int64_t s = 0; s < x.rows(); s += chunk) {
    const std::int64_t n = std::min(chunk, x.rows() - s);
    layer.forward(matrix_view<const float>(x.row(s).data(), {n, w.cfg.model_dim}),
                  std::span(pos).subspan(s, n), cache,
                  matrix_view<float>(y.row(s).data(), {n, w.cfg.model_dim}), pool, path);
  }
  return y;
}
}  // namespace

TEST_CASE("I3: absorbed MLA equals naive MLA", "[identity][mla]") {
  const std::uint64_t seed = GENERATE(range(1, 13));
  std::mt19937_64 rng(seed * 101);
  const mla_config cfg = random_mla_config(rng);
  const auto w = make_mla(rng, cfg, rng() % 2, rng() % 2);
  const std::int64_t t = 1 + static_cast<std::int64_t>(rng() % 50);
  const fmat x = random_matrix(rng, t, cfg.model_dim);
  const auto pos = gapped_positions(rng, t, 7, 3);
  const fmat naive = run(w, x, pos, mla_path::naive, t),
             absorbed = run(w, x, pos, mla_path::absorbed, t);
  INFO("H=" << cfg.heads << " rope_heads=" << cfg.rope_heads << " q_lora=" << cfg.q_lora_rank);
  CHECK(rel_error(to_double(absorbed), to_double(naive)) <=
        2 * mla_rel_tolerance<float>(cfg, t, mla_a_max(w, x, pos)));
}

TEST_CASE("I4: a key bias on kv_b_proj changes nothing, a value bias is added after W_UV",
          "[identity][mla]") {
  std::mt19937_64 rng(5);
  const mla_config cfg = random_mla_config(rng);
  auto w = make_mla(rng, cfg, true, true);
  const std::int64_t t = 12;
  const fmat x = random_matrix(rng, t, cfg.model_dim);
  const auto pos = gapped_positions(rng, t, 0, 2);
  const double tol = 2 * mla_rel_tolerance<float>(cfg, t, mla_a_max(w, x, pos));
  auto without_key_bias = w;
  const std::int64_t dn = cfg.nope_dim, dv = cfg.v_head_dim;
  for (std::int64_t i = 0; i < cfg.heads; ++i)
    for (std::int64_t c = 0; c < dn; ++c)
      without_key_bias.kv_b_bias[static_cast<std::size_t>(i * (dn + dv) + c)] = 0.f;
  // The naive path applies the key bias literally; dropping it gives the same function.
  CHECK(rel_error(to_double(run(w, x, pos, mla_path::naive, t)),
                  to_double(run(without_key_bias, x, pos, mla_path::naive, t))) <= tol);
  // The value bias matters, and both paths apply it the same way (naive: inside V; absorbed: after
  // W_UV).
  auto without_value_bias = w;
  std::fill(without_value_bias.kv_b_bias.begin(), without_value_bias.kv_b_bias.end(), 0.f);
  const fmat a = run(w, x, pos, mla_path::absorbed, t),
             b = run(without_value_bias, x, pos, mla_path::absorbed, t);
  CHECK(rel_error(to_double(a), to_double(b)) > 100 * tol);
  CHECK(rel_error(to_double(a), to_double(run(w, x, pos, mla_path::naive, t))) <= tol);
}

TEST_CASE("I: MLA full prefill == chunked prefill == token-by-token decode", "[identity][mla]") {
  std::mt19937_64 rng(GENERATE(41, 42, 43));
  mla_config cfg = random_mla_config(rng);
  if (rng() % 2) cfg.window = 9;
  const auto w = make_mla(rng, cfg, rng() % 2, true);
  const std::int64_t t = 40;
  const fmat x = random_matrix(rng, t, cfg.model_dim);
  const auto pos = gapped_positions(rng, t, 100, 2);
  const fmat full = run(w, x, pos, mla_path::automatic, t),
             chunked = run(w, x, pos, mla_path::automatic, 7),
             decode = run(w, x, pos, mla_path::automatic, 1);
  const double tol = 2 * mla_rel_tolerance<float>(cfg, t, mla_a_max(w, x, pos));
  CHECK(rel_error(to_double(chunked), to_double(full)) <= tol);
  CHECK(rel_error(to_double(decode), to_double(full)) <= tol);
}
