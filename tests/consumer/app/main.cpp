// A consumer of attnkit: decode one token with GQA over a dense cache and compare with the
// double reference. Exits non-zero on a mismatch.
#include <attnkit/attnkit.hpp>
#include <attnkit/reference/attention.hpp>
#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  namespace ak = attnkit;
  const std::int64_t h = 4, hkv = 2, d = 16, t = 10;
  ak::dense_cache<float> cache({.kv_heads = hkv, .head_dim = d, .v_head_dim = d, .capacity = t});
  std::vector<float> k(t * hkv * d), v(t * hkv * d), q(h * d), out(h * d);
  std::vector<std::int64_t> pos(t);
  for (std::size_t i = 0; i < k.size(); ++i) k[i] = std::sin(0.1 * i), v[i] = std::cos(0.07 * i);
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = std::sin(0.3 * i + 1);
  for (std::int64_t i = 0; i < t; ++i) pos[i] = i;
  cache.append(ak::tensor3_view<const float>(k.data(), {t, hkv, d}),
               ak::tensor3_view<const float>(v.data(), {t, hkv, d}), pos);
  const std::int64_t qpos = t - 1;
  ak::attend(ak::tensor3_view<const float>(q.data(), {1, h, d}), std::span(&qpos, 1), cache,
             ak::tensor3_view<float>(out.data(), {1, h, d}));
  using M = ak::reference::matrix;
  const M Q = Eigen::Map<const ak::row_matrix<float>>(q.data(), 1, h * d).cast<double>();
  const M K = Eigen::Map<const ak::row_matrix<float>>(k.data(), t, hkv * d).cast<double>();
  const M V = Eigen::Map<const ak::row_matrix<float>>(v.data(), t, hkv * d).cast<double>();
  const auto ref =
      ak::reference::attention(Q, std::span(&qpos, 1), K, V, pos, h, hkv, 1 / std::sqrt(double(d)));
  double err = 0;
  for (std::int64_t i = 0; i < h * d; ++i) err = std::max(err, std::abs(out[i] - ref.out(0, i)));
  std::printf("attnkit %s consumer: max |out - reference| = %.3g\n", ATTNKIT_VERSION_STRING, err);
  return err < 1e-5 ? 0 : 1;
}
