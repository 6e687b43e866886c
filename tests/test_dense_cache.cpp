// dense_cache: the concept, append/truncate/clear semantics, capacity errors, external memory.
#include "test_util.hpp"

using namespace attnkit;
using namespace attnkit::test;

static_assert(kv_cache<dense_cache<float>>);
static_assert(kv_cache<dense_cache<bf16>>);
static_assert(kv_cache<dense_cache<half>>);

namespace {
struct tokens {
  fmat k, v;
  std::vector<std::int64_t> pos;
  dense_append payload(std::int64_t hkv, std::int64_t dqk, std::int64_t dv) const {
    const std::int64_t t = k.rows();
    return {tensor3_view<const float>(k.data(), {t, hkv, dqk}),
            tensor3_view<const float>(v.data(), {t, hkv, dv}), pos};
  }
};
tokens make_tokens(std::mt19937_64& rng, std::int64_t t, std::int64_t hkv, std::int64_t dqk,
                   std::int64_t dv, std::int64_t first_pos) {
  tokens x{random_matrix(rng, t, hkv * dqk), random_matrix(rng, t, hkv * dv), {}};
  for (std::int64_t i = 0; i < t; ++i) x.pos.push_back(first_pos + i);
  return x;
}
}  // namespace

TEMPLATE_TEST_CASE("dense_cache stores rounded K/V head-major with positions", "[cache]", float,
                   bf16, half) {
  using S = TestType;
  std::mt19937_64 rng(7);
  const std::int64_t hkv = 3, dqk = 20, dv = 12;
  dense_cache<S> c({.kv_heads = hkv, .head_dim = dqk, .v_head_dim = dv, .capacity = 10});
  CHECK(c.size() == 0);
  CHECK(c.capacity() == 10);
  CHECK(c.bytes_per_token() == hkv * (dqk + dv) * static_cast<std::int64_t>(sizeof(S)));
  const tokens a = make_tokens(rng, 4, hkv, dqk, dv, 100);
  c.append(a.payload(hkv, dqk, dv));
  REQUIRE(c.size() == 4);
  CHECK(std::vector<std::int64_t>(c.positions().begin(), c.positions().end()) == a.pos);
  for (std::int64_t t = 0; t < 4; ++t)
    for (std::int64_t j = 0; j < hkv; ++j) {
      for (std::int64_t i = 0; i < dqk; ++i)
        CHECK(c.view().keys().row(j, t)[i] == static_cast<S>(a.k(t, j * dqk + i)));
      for (std::int64_t i = 0; i < dv; ++i)
        CHECK(c.view().values().row(j, t)[i] == static_cast<S>(a.v(t, j * dv + i)));
    }
}

TEST_CASE("dense_cache: appending past capacity throws and leaves the cache unchanged",
          "[cache][errors]") {
  std::mt19937_64 rng(8);
  dense_cache<float> c({.kv_heads = 2, .head_dim = 4, .capacity = 5});
  CHECK(c.v_head_dim() == 4);  // v_head_dim defaults to head_dim
  c.append(make_tokens(rng, 3, 2, 4, 4, 0).payload(2, 4, 4));
  const tokens more = make_tokens(rng, 3, 2, 4, 4, 3);
  ATTNKIT_CHECK_INVALID(c.append(more.payload(2, 4, 4)),
                        "appending 3 tokens to size=3 exceeds capacity=5");
  CHECK(c.size() == 3);
  ATTNKIT_CHECK_INVALID(c.truncate(4), "truncate: n=4 must be in [0, size=3]");
  ATTNKIT_CHECK_INVALID(c.truncate(-1), "n=-1");
  // Wrong payload shapes name the tensor and both shapes.
  const tokens bad = make_tokens(rng, 2, 2, 4, 4, 3);
  dense_append p = bad.payload(2, 4, 4);
  p.k = tensor3_view<const float>(bad.k.data(), {2, 1, 8});
  ATTNKIT_CHECK_INVALID(c.append(p), "dense_cache::append: k has shape [2, 1, 8] but [2, 2, 4]");
  p = bad.payload(2, 4, 4);
  p.positions = std::span(bad.pos).first(1);
  ATTNKIT_CHECK_INVALID(c.append(p), "k has shape [2, 2, 4] but [1, 2, 4]");
  ATTNKIT_CHECK_INVALID(dense_cache<float>({.kv_heads = 0, .head_dim = 4, .capacity = 1}),
                        "kv_heads must be > 0", "got 0");
  ATTNKIT_CHECK_INVALID(dense_cache<float>({.kv_heads = 1, .head_dim = -2, .capacity = 1}),
                        "head_dim must be > 0");
  ATTNKIT_CHECK_INVALID(dense_cache<float>({.kv_heads = 1, .head_dim = 2, .capacity = -1}),
                        "capacity must be >= 0");
}

TEST_CASE("dense_cache: truncate-then-append equals never having appended", "[cache]") {
  std::mt19937_64 rng(9);
  const std::int64_t hkv = 2, h = 4, d = 16;
  dense_cache<float> rolled({.kv_heads = hkv, .head_dim = d, .capacity = 64});
  dense_cache<float> clean({.kv_heads = hkv, .head_dim = d, .capacity = 64});
  const tokens prefix = make_tokens(rng, 20, hkv, d, d, 0);
  const tokens rejected = make_tokens(rng, 7, hkv, d, d, 20);  // e.g. rejected speculative tokens
  const tokens accepted = make_tokens(rng, 5, hkv, d, d, 20);
  rolled.append(prefix.payload(hkv, d, d));
  rolled.append(rejected.payload(hkv, d, d));
  rolled.truncate(20);
  rolled.append(accepted.payload(hkv, d, d));
  clean.append(prefix.payload(hkv, d, d));
  clean.append(accepted.payload(hkv, d, d));
  REQUIRE(rolled.size() == clean.size());
  CHECK(
      std::equal(rolled.positions().begin(), rolled.positions().end(), clean.positions().begin()));
  const fmat q = random_matrix(rng, 1, h * d);
  fmat o1(1, h * d), o2(1, h * d);
  const std::int64_t qpos = 24;
  attend(tensor3_view<const float>(q.data(), {1, h, d}), std::span(&qpos, 1), rolled,
         tensor3_view<float>(o1.data(), {1, h, d}));
  attend(tensor3_view<const float>(q.data(), {1, h, d}), std::span(&qpos, 1), clean,
         tensor3_view<float>(o2.data(), {1, h, d}));
  CHECK(o1 == o2);  // identical bits: same rows, same order, same arithmetic
  rolled.clear();
  CHECK(rolled.size() == 0);
  CHECK(rolled.positions().empty());
}

TEST_CASE("dense_cache can wrap engine-owned memory", "[cache]") {
  std::mt19937_64 rng(10);
  const std::int64_t hkv = 2, d = 8, cap = 6;
  std::vector<bf16> k(static_cast<std::size_t>(hkv * cap * d)), v(k.size());
  std::vector<std::int64_t> pos(cap);
  dense_cache<bf16> c({.kv_heads = hkv, .head_dim = d, .capacity = cap}, k.data(), v.data(),
                      pos.data());
  const tokens a = make_tokens(rng, 2, hkv, d, d, 40);
  c.append(a.payload(hkv, d, d));
  CHECK(pos[1] == 41);
  CHECK(k[static_cast<std::size_t>(1 * cap * d + 1 * d + 3)] ==
        static_cast<bf16>(a.k(1, d + 3)));  // head 1, token 1
  // Re-wrap the same memory with its size: the engine owns the state.
  dense_cache<bf16> again({.kv_heads = hkv, .head_dim = d, .capacity = cap}, k.data(), v.data(),
                          pos.data(), 2);
  CHECK(again.size() == 2);
  ATTNKIT_CHECK_INVALID((dense_cache<bf16>({.kv_heads = hkv, .head_dim = d, .capacity = cap},
                                           k.data(), v.data(), pos.data(), 7)),
                        "size=7 must be in [0, capacity=6]");
  ATTNKIT_CHECK_INVALID((dense_cache<bf16>({.kv_heads = hkv, .head_dim = d, .capacity = cap},
                                           nullptr, v.data(), pos.data())),
                        "must be non-null");
}
