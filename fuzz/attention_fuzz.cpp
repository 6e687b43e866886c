// Differential fuzz target (libFuzzer): the input bytes choose a variant (GQA family over f32,
// bf16 or f16 storage, contiguous or paged; absorbed MLA; TPA), its shapes, the key and query positions (anywhere in
// int64, in any order, repeated), a window, the causal rule, the tile strategy, the thread count
// and special values (NaN, +-inf) planted in queries, keys and values. The kernel's answer must
// equal the double reference's class by class (NaN where it has NaN, the same infinity, finite
// values within a tolerance), and a valid call must not throw. Built with
// -fsanitize=fuzzer,address,undefined (CMake option ATTNKIT_FUZZ, clang); scripts/test.sh runs it
// for a bounded time from the corpus in fuzz/corpus.
#include <attnkit/attention.hpp>
#include <attnkit/reference/attention.hpp>
#include <attnkit/reference/tpa.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

using namespace attnkit;
using dmat = reference::matrix;
using fmat = row_matrix<float>;

namespace {

/// Reads the fuzzer's bytes as small integers. The bulk data (the
/// values of queries, keys and values) comes from a generator seeded by the input, so that short
/// inputs still give varied data; special values are planted where further bytes say.
class byte_reader {
 public:
  /// Once the bytes run out, further bytes come from a generator seeded by a hash of the input,
  /// so that short inputs still choose varied positions and planting sites.
  byte_reader(const std::uint8_t* d, std::size_t n) : d_(d), n_(n) {
    std::uint64_t h = 1469598103934665603ull;  // FNV-1a
    for (std::size_t i = 0; i < n; ++i) h = (h ^ d[i]) * 1099511628211ull;
    rest_.seed(h);
  }
  std::uint64_t bits(int nbytes) {
    std::uint64_t x = 0;
    for (int i = 0; i < nbytes; ++i) x = x << 8 | (i_ < n_ ? d_[i_++] : rest_() & 0xFF);
    return x;
  }
  /// In [lo, hi].
  std::int64_t in(std::int64_t lo, std::int64_t hi) {
    return lo + static_cast<std::int64_t>(bits(2) % static_cast<std::uint64_t>(hi - lo + 1));
  }
  /// A position near one of a few anchors, including both ends of int64.
  std::int64_t position() {
    constexpr std::int64_t mx = std::numeric_limits<std::int64_t>::max(),
                           mn = std::numeric_limits<std::int64_t>::min();
    const std::int64_t anchors[] = {0, 0, 100, -50, mx, mn, mx / 2, mn / 2};
    const std::int64_t a = anchors[bits(1) % 8], off = in(0, 40);
    return a >= 0 ? a - off : a + off;
  }

 private:
  const std::uint8_t* d_;
  std::size_t n_, i_ = 0;
  std::mt19937_64 rest_;
};

/// Uniform values in [-1, 1]: scores stay within +-25, so no probability underflows in float
/// where it would not in double (which would turn 0 * inf into a NaN the reference has not).
fmat uniform(std::mt19937_64& rng, std::int64_t rows, std::int64_t cols) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  fmat m(rows, cols);
  for (std::int64_t i = 0; i < m.size(); ++i) m.data()[i] = u(rng);
  return m;
}

/// Up to 4 special values (NaN, +inf, -inf) planted in m where the bytes say: half of them in
/// the last rows (the newest keys, which the causal rule hides from earlier queries).
void plant(byte_reader& in, fmat& m, bool nan_only = false) {
  if (m.size() == 0) return;
  const std::int64_t n = in.in(0, 4);
  for (std::int64_t i = 0; i < n; ++i) {
    const std::uint64_t kind = in.bits(1) % 3;
    const std::int64_t rows = m.rows(), back = in.in(0, 3);
    const std::int64_t row = in.bits(1) % 2 ? std::max<std::int64_t>(0, rows - 1 - back)
                                            : static_cast<std::int64_t>(in.bits(3) % rows);
    m(row, in.in(0, m.cols() - 1)) = kind == 0 || nan_only ? std::numeric_limits<float>::quiet_NaN()
                                     : kind == 1           ? std::numeric_limits<float>::infinity()
                                                 : -std::numeric_limits<float>::infinity();
  }
}

[[noreturn]] void fail(const char* what, std::int64_t t, std::int64_t h, double want, float got) {
  std::fprintf(stderr, "attention_fuzz: %s at token %lld head %lld: reference %g, kernel %g\n",
               what, static_cast<long long>(t), static_cast<long long>(h), want, got);
  std::abort();
}

void compare(const fmat& out, const fmat& lse, const reference::attention_result& ref, double tol) {
  const std::int64_t heads = ref.lse.cols(), dv = ref.out.cols() / heads;
  auto same = [&](double r, float o) {
    if (std::isnan(r)) return std::isnan(o);
    if (std::isinf(r)) return o == static_cast<float>(r);
    return std::isfinite(o) && std::abs(o - r) <= tol * (1 + std::abs(r));
  };
  for (std::int64_t t = 0; t < out.rows(); ++t)
    for (std::int64_t h = 0; h < heads; ++h) {
      if (!same(ref.lse(t, h), lse(t, h))) fail("lse", t, h, ref.lse(t, h), lse(t, h));
      for (std::int64_t c = 0; c < dv; ++c)
        if (!same(ref.out(t, h * dv + c), out(t, h * dv + c))) {
          std::fprintf(stderr, "attention_fuzz: column %lld of %lld\n", (long long)c, (long long)dv);
          fail("out", t, h, ref.out(t, h * dv + c), out(t, h * dv + c));
        }
    }
}

struct common {
  std::int64_t tq, tk;
  std::vector<std::int64_t> qpos, kpos;
  attention_options opt;
  reference::attention_rules rules;
  bool specials;
  int threads;
  std::mt19937_64 rng;
  /// Random values, with special values planted when the case has them.
  fmat values(byte_reader& in, std::int64_t rows, std::int64_t cols, bool nan_only = false) {
    fmat m = uniform(rng, rows, cols);
    if (specials) plant(in, m, nan_only);
    return m;
  }
};

common read_common(byte_reader& in) {
  common c;
  c.tq = in.in(1, 40);
  c.tk = in.in(0, 700);
  // Positions: a run from one anchor (the common case: a sequence) or each its own.
  constexpr std::int64_t mx = std::numeric_limits<std::int64_t>::max(),
                         mn = std::numeric_limits<std::int64_t>::min();
  const bool scattered = in.bits(1) % 4 == 0;
  std::int64_t p = in.position();
  for (std::int64_t i = 0; i < c.tk; ++i) {
    c.kpos.push_back(scattered ? in.position() : p);
    if (!scattered && p < mx) ++p;
  }
  for (std::int64_t i = 0; i < c.tq; ++i) {
    if (scattered || c.kpos.empty()) {
      c.qpos.push_back(in.position());
      continue;
    }
    const std::int64_t last = c.kpos.back(), back = in.in(-2, 2 * c.tq);  // last - back, saturated
    c.qpos.push_back(back < 0 && last > mx + back   ? mx
                     : back > 0 && last < mn + back ? mn
                                                    : last - back);
  }
  c.opt.causal = c.rules.causal = in.bits(1) % 4 != 0;
  if (in.bits(1) % 3 == 0) {
    const std::int64_t windows[] = {1, 2, 10, 100, std::numeric_limits<std::int64_t>::max()};
    c.opt.window = c.rules.window = windows[in.bits(1) % 5];
  }
  c.specials = in.bits(1) % 2 == 0;
  c.threads = 1 + static_cast<int>(in.bits(1) % 2);
  c.rng.seed(in.bits(4));
  return c;
}

template <class T>
std::vector<T> stored(const fmat& m) {
  std::vector<T> s(static_cast<std::size_t>(m.size()));
  for (std::int64_t i = 0; i < m.size(); ++i)
    s[static_cast<std::size_t>(i)] = static_cast<T>(m.data()[i]);
  return s;
}

template <class Exec>
void run_gqa(byte_reader& in, common& c, Exec& exec) {
  const std::int64_t hkv = in.in(1, 3), g = in.in(1, 4), h = hkv * g, d = 8 * in.in(1, 8);
  const int storage = static_cast<int>(in.bits(1) % 3);
  c.opt.strategy = static_cast<tile_strategy>(in.bits(1) % 3);
  fmat q = c.values(in, c.tq, h * d), k = c.values(in, c.tk, hkv * d),
       v = c.values(in, c.tk, hkv * d);
  // Half the cases read the cache through pages (of 1 to 70 tokens) in a shuffled order (read
  // last, so the corpus's earlier inputs keep their cases).
  const std::int64_t page_size = in.bits(1) % 2 ? 0 : in.in(1, 70);
  const std::uint64_t page_seed = in.bits(4);
  fmat out(c.tq, h * d), lse(c.tq, h);
  c.opt.lse = matrix_view<float>(lse.data(), {c.tq, h});
  auto call = [&](auto tag) {
    using S = decltype(tag);
    const auto ks = stored<S>(k), vs = stored<S>(v);
    for (std::int64_t i = 0; i < k.size(); ++i) k.data()[i] = static_cast<float>(ks[i]);
    for (std::int64_t i = 0; i < v.size(); ++i) v.data()[i] = static_cast<float>(vs[i]);
    const kv_view<S> flat(tensor3_view<const S>(ks.data(), {c.tk, hkv, d}),
                          tensor3_view<const S>(vs.data(), {c.tk, hkv, d}), c.kpos);
    // Paged: pool [num_pages][2][H_kv][page_size][d] (K then V), the pages in a random order.
    const std::int64_t pages = page_size ? (c.tk + page_size - 1) / page_size : 0,
                       page_elems = 2 * hkv * page_size * d;
    std::vector<std::int32_t> table(static_cast<std::size_t>(pages));
    for (std::int64_t i = 0; i < pages; ++i) table[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
    std::shuffle(table.begin(), table.end(), std::mt19937_64(page_seed));
    std::vector<S> pool(static_cast<std::size_t>(pages * page_elems));
    for (std::int64_t t = 0; t < c.tk && page_size; ++t)
      for (std::int64_t j = 0; j < hkv; ++j) {
        S* page = pool.data() + table[static_cast<std::size_t>(t / page_size)] * page_elems;
        std::copy_n(&ks[static_cast<std::size_t>((t * hkv + j) * d)], d,
                    page + (j * page_size + t % page_size) * d);
        std::copy_n(&vs[static_cast<std::size_t>((t * hkv + j) * d)], d,
                    page + ((hkv + j) * page_size + t % page_size) * d);
      }
    const kv_view<S> kv =
        pages > 0 ? kv_view<S>::paged({pool.data(), page_size * d, d, d, page_elems},
                                      {pool.data() + hkv * page_size * d, page_size * d, d, d,
                                       page_elems},
                                      hkv, page_table{table, page_size}, pages, c.kpos)
                  : flat;
    attend(tensor3_view<const float>(q.data(), {c.tq, h, d}), c.qpos, kv,
           tensor3_view<float>(out.data(), {c.tq, h, d}), c.opt, exec);
  };
  if (std::getenv("ATTNKIT_FUZZ_VERBOSE")) {
    std::fprintf(stderr, "GQA H %lld H_kv %lld d %lld storage %d strategy %d threads %d causal %d "
                 "window %lld page_size %lld\n", (long long)h, (long long)hkv, (long long)d, storage,
                 (int)c.opt.strategy, c.threads, (int)c.opt.causal,
                 (long long)c.opt.window.value_or(-1), (long long)page_size);
    for (std::int64_t t = 0; t < c.tq; ++t) {
      std::fprintf(stderr, "q %lld:", (long long)c.qpos[t]);
      for (std::int64_t i = 0; i < h * d; ++i)
        if (!std::isfinite(q(t, i))) std::fprintf(stderr, " [%lld]=%g", (long long)i, q(t, i));
      std::fprintf(stderr, "\n");
    }
    for (std::int64_t t = 0; t < c.tk; ++t) {
      std::fprintf(stderr, "k %lld:", (long long)c.kpos[t]);
      for (std::int64_t i = 0; i < hkv * d; ++i) {
        if (!std::isfinite(k(t, i))) std::fprintf(stderr, " k[%lld]=%g", (long long)i, k(t, i));
        if (!std::isfinite(v(t, i))) std::fprintf(stderr, " v[%lld]=%g", (long long)i, v(t, i));
      }
      std::fprintf(stderr, "\n");
    }
  }
  if (storage == 0) call(float{});
  if (storage == 1) call(bf16{});
  if (storage == 2) call(half{});
  const double scale = 1 / std::sqrt(double(d));
  compare(out, lse,
          reference::attention(q.cast<double>(), c.qpos, k.cast<double>(), v.cast<double>(), c.kpos,
                               h, hkv, scale, c.rules),
          1e-4);
}

template <class Exec>
void run_mla(byte_reader& in, common& c, Exec& exec) {
  const std::int64_t h = in.in(1, 16), dc = 8 * in.in(1, 8), dr = 4 * in.in(0, 4);
  c.opt.strategy = static_cast<tile_strategy>(in.bits(1) % 3);
  const fmat ql = c.values(in, c.tq, h * dc), qr = c.values(in, c.tq, h * dr),
             rows = c.values(in, c.tk, dc + dr);
  fmat out(c.tq, h * dc), lse(c.tq, h);
  c.opt.lse = matrix_view<float>(lse.data(), {c.tq, h});
  if (std::getenv("ATTNKIT_FUZZ_VERBOSE")) {
    std::fprintf(stderr, "MLA H %lld dc %lld dr %lld strategy %d threads %d causal %d window %lld\n",
                 (long long)h, (long long)dc, (long long)dr, (int)c.opt.strategy, c.threads,
                 (int)c.opt.causal, (long long)c.opt.window.value_or(-1));
    for (auto p : c.qpos) std::fprintf(stderr, "q %lld\n", (long long)p);
    for (std::int64_t t = 0; t < c.tk; ++t) {
      std::fprintf(stderr, "k %lld:", (long long)c.kpos[t]);
      for (std::int64_t i = 0; i < dc + dr; ++i)
        if (!std::isfinite(rows(t, i))) std::fprintf(stderr, " [%lld]=%g", (long long)i, rows(t, i));
      std::fprintf(stderr, "\n");
    }
  }
  attend_latent(tensor3_view<const float>(ql.data(), {c.tq, h, dc}),
                tensor3_view<const float>(qr.data(), {c.tq, h, dr}), c.qpos,
                kv_view<float>::latent(rows.data(), dc + dr, dc, dc + dr, c.kpos),
                tensor3_view<float>(out.data(), {c.tq, h, dc}), c.opt, exec);
  dmat q(c.tq, h * (dc + dr));
  for (std::int64_t t = 0; t < c.tq; ++t)
    for (std::int64_t i = 0; i < h; ++i)
      q.row(t).segment(i * (dc + dr), dc + dr) << ql.row(t).segment(i * dc, dc).cast<double>(),
          qr.row(t).segment(i * dr, dr).cast<double>();
  const dmat k = rows.cast<double>();
  compare(out, lse,
          reference::attention(q, c.qpos, k, k.leftCols(dc), c.kpos, h, 1,
                               1 / std::sqrt(double(dc + dr)), c.rules),
          1e-4);
}

template <class Exec>
void run_tpa(byte_reader& in, common& c, Exec& exec) {
  const std::int64_t h = in.in(1, 20), d = 8 * in.in(1, 4), rq = in.in(1, 4), rk = in.in(1, 3),
                     rv = in.in(1, 3);
  // Infinite factors meet infinities of both signs in the factored contraction order, where the
  // materialised reference has one: only NaN is planted.
  const fmat aq = c.values(in, c.tq, rq * h, true), bq = c.values(in, c.tq, rq * d, true),
             ak = c.values(in, c.tk, rk * h, true), bk = c.values(in, c.tk, rk * d, true),
             av = c.values(in, c.tk, rv * h, true), bv = c.values(in, c.tk, rv * d, true);
  const factor_view<float> f{.heads = h,
                             .head_dim = d,
                             .v_head_dim = d,
                             .k_rank = rk,
                             .v_rank = rv,
                             .k_scale = 1.f / float(rk),
                             .v_scale = 1.f / float(rv),
                             .a_k = ak.data(),
                             .b_k = bk.data(),
                             .a_v = av.data(),
                             .b_v = bv.data(),
                             .positions = c.kpos};
  fmat out(c.tq, h * d), lse(c.tq, h);
  c.opt.lse = matrix_view<float>(lse.data(), {c.tq, h});
  attend_factorized(tensor3_view<const float>(aq.data(), {c.tq, rq, h}),
                    tensor3_view<const float>(bq.data(), {c.tq, rq, d}), c.qpos, f,
                    tensor3_view<float>(out.data(), {c.tq, h, d}), c.opt, exec);
  const dmat q = reference::tpa_materialise(aq.cast<double>(), bq.cast<double>(), rq, h, 1.0);
  const dmat k = reference::tpa_materialise(ak.cast<double>(), bk.cast<double>(), rk, h, 1.0 / rk);
  const dmat v = reference::tpa_materialise(av.cast<double>(), bv.cast<double>(), rv, h, 1.0 / rv);
  compare(out, lse,
          reference::attention(q, c.qpos, k, v, c.kpos, h, h, 1 / std::sqrt(double(d)), c.rules),
          2e-4);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  byte_reader in(data, size);
  const int variant = static_cast<int>(in.bits(1) % 3);
  common c = read_common(in);
  static thread_pool pool(2);
  serial_executor serial;
  try {
    if (c.threads == 1) {
      if (variant == 0) run_gqa(in, c, serial);
      if (variant == 1) run_mla(in, c, serial);
      if (variant == 2) run_tpa(in, c, serial);
    } else {
      if (variant == 0) run_gqa(in, c, pool);
      if (variant == 1) run_mla(in, c, pool);
      if (variant == 2) run_tpa(in, c, pool);
    }
  } catch (const attnkit::invalid_argument& e) {
    std::fprintf(stderr, "attention_fuzz: a valid call threw: %s\n", e.what());
    std::abort();
  }
  return 0;
}
