// Online softmax: block updates and split merges equal the direct formula in double.
#include "test_util.hpp"

using namespace attnkit;
using namespace attnkit::test;

namespace {
// Direct softmax(s) v in double; lse in natural log.
void direct(const std::vector<float>& s, const fmat& v, std::vector<double>& out, double& lse) {
  double mx = -INFINITY;
  for (float x : s) mx = std::max(mx, double(x));
  out.assign(static_cast<std::size_t>(v.cols()), 0.0);
  if (mx == -INFINITY) {
    lse = mx;
    return;
  }
  double sum = 0;
  for (float x : s) sum += std::exp(double(x) - mx);
  for (std::size_t t = 0; t < s.size(); ++t)
    for (std::int64_t c = 0; c < v.cols(); ++c)
      out[static_cast<std::size_t>(c)] +=
          std::exp(double(s[t]) - mx) / sum * v(static_cast<std::int64_t>(t), c);
  lse = mx + std::log(sum);
}
}  // namespace

TEST_CASE("online_softmax: blockwise updates and merges equal the direct softmax", "[softmax]") {
  std::mt19937_64 rng(GENERATE(1, 2, 3, 4));
  const std::int64_t n = 1 + static_cast<std::int64_t>(rng() % 300),
                     dim = 1 + static_cast<std::int64_t>(rng() % 40);
  const fmat v = random_matrix(rng, n, dim);
  std::vector<float> s(static_cast<std::size_t>(n));
  std::normal_distribution<float> nd(0.f, 4.f);
  for (auto& x : s) x = nd(rng);
  // Mask a random subset.
  for (auto& x : s)
    if (rng() % 5 == 0) x = -INFINITY;

  std::vector<double> ref;
  double ref_lse;
  direct(s, v, ref, ref_lse);

  // Split the keys in two halves, each fed in blocks of 7, then merge.
  const std::int64_t half = n / 2;
  online_softmax a(1, dim), b(1, dim);
  std::vector<float> scratch = s;
  for (std::int64_t i = 0; i < half; i += 7)
    a.update(0, scratch.data() + i, v.row(i).data(), std::min<std::int64_t>(7, half - i), dim);
  for (std::int64_t i = half; i < n; i += 7)
    b.update(0, scratch.data() + i, v.row(i).data(), std::min<std::int64_t>(7, n - i), dim);
  a.merge(b);
  std::vector<float> out(static_cast<std::size_t>(dim));
  float lse;
  a.finalize(out.data(), dim, &lse);
  // Tolerance: float exp/sum of n terms, ~(8 + n) unit roundoffs of the largest |v|.
  const double tol = (8.0 + double(n)) * 0x1p-24 * v.cwiseAbs().maxCoeff();
  for (std::int64_t c = 0; c < dim; ++c)
    CHECK(std::abs(out[static_cast<std::size_t>(c)] - ref[static_cast<std::size_t>(c)]) <= tol);
  if (std::isinf(ref_lse))
    CHECK(std::isinf(lse));
  else
    CHECK(std::abs(lse - ref_lse) <= 1e-5 * (1 + std::abs(ref_lse)));
}

TEST_CASE("online_softmax: a fully masked row gives output 0 and LSE -inf, never NaN",
          "[softmax]") {
  online_softmax sm(2, 3);
  std::vector<float> s{-INFINITY, -INFINITY};
  const float v[6] = {1, 2, 3, 4, 5, 6};
  sm.update(0, s.data(), v, 2, 3);
  online_softmax other(2, 3);
  sm.merge(other);  // merging two empty states stays empty
  float out[6] = {9, 9, 9, 9, 9, 9}, lse[2];
  sm.finalize(out, 3, lse);
  for (float x : out) CHECK(x == 0.f);
  CHECK(lse[0] == -INFINITY);
  CHECK(lse[1] == -INFINITY);
  ATTNKIT_CHECK_INVALID(sm.merge(online_softmax(1, 3)), "shapes differ", "[2, 3] vs [1, 3]");
}

TEST_CASE("vectorised exp matches std::exp to a few ulp over the softmax range", "[softmax]") {
  std::vector<float> xs;
  for (float x = -100.f; x <= 0.f; x += 0.01237f) xs.push_back(x);
  xs.push_back(-INFINITY);
  std::vector<float> e = xs;
  const float sum = detail::exp_shift_sum(e.data(), static_cast<std::int64_t>(e.size()), 0.f);
  double ref_sum = 0;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    const double r = std::exp(double(xs[i]));
    ref_sum += r;
    // 4 ulp relative, or below the smallest normal float.
    CHECK(std::abs(e[i] - r) <= std::max(4 * 0x1p-24 * r, 1.2e-38));
  }
  CHECK(e.back() == 0.f);
  CHECK(std::abs(sum - ref_sum) <= 1e-5 * ref_sum);
}

TEST_CASE(
    "the column softmax's coarse exp (bf16 products): within 6e-5 of exp, vexp's within 4 ulp",
    "[softmax]") {
  // One row of the column form (keys t at stride 1) whose max is its first key, 0: p_t = exp(x_t).
  std::vector<float> xs{0.f};
  for (float x = -100.f; x <= 0.f; x += 0.01237f) xs.push_back(x);
  xs.push_back(-INFINITY);
  const auto n = static_cast<std::int64_t>(xs.size());
  for (const bool coarse : {false, true}) {
    std::vector<float> p = xs;
    float mx = -INFINITY, sum = 0.f, alpha = 0.f;
    detail::softmax_columns<float>(p.data(), 1, n, 1, &mx, &sum, &alpha, nullptr, nullptr, coarse);
    double worst = 0, ref_sum = 0;
    for (std::size_t t = 0; t < xs.size(); ++t) {
      const double r = std::exp(double(xs[t]));
      ref_sum += r;
      if (r >= 0x1p-126)
        worst = std::max(worst, std::abs(p[t] - r) / r);
      else  // below the smallest normal float: 0 on the vector targets
        CHECK(p[t] <= 1.2e-38f);
    }
    INFO("coarse=" << coarse << " worst relative error=" << worst);
    CHECK(mx == 0.f);
    CHECK(alpha == 0.f);  // the empty row's rescale: exp(-inf)
    CHECK(p.front() == 1.f);
    CHECK(p.back() == 0.f);
    const bool coarse_ran = coarse && detail::simd_vector_target();
    CHECK(std::abs(sum - ref_sum) <= (coarse_ran ? 6e-5 : 1e-5) * ref_sum);
    if (coarse_ran) {
      CHECK(worst <= 6e-5);  // degree 4: 5.6e-5 at r = -ln2/2; a tenfold loss fails
      CHECK(worst > 1e-5);   // and the coarse polynomial is the one that ran
    } else {
      CHECK(worst <= 4 * 0x1p-24);
    }
  }
}

TEST_CASE("vectorised exp is 0, not subnormal, below ln(FLT_MIN) on the vector targets",
          "[softmax]") {
  if (!detail::simd_vector_target()) return;  // the scalar target is std::exp
  // Far below too: AVX-512 exponentiates without clamping its argument (vec_avx512.inl).
  std::vector<float> xs{-1e3f, -1e10f, -3.4e38f};
  for (float x = -104.f; x < -87.3366f; x += 0.0731f) xs.push_back(x);
  const std::vector<float> just_above = {-87.3365f, -87.2f, -86.9f};
  xs.insert(xs.end(), just_above.begin(), just_above.end());
  std::vector<float> e = xs;
  detail::exp_shift_sum(e.data(), static_cast<std::int64_t>(e.size()), 0.f);
  for (std::size_t i = 0; i < xs.size(); ++i) {
    INFO("x=" << xs[i] << " exp=" << e[i]);
    if (i + just_above.size() < xs.size())
      CHECK(e[i] == 0.f);
    else  // normal floats from ln(FLT_MIN) up, within 4 ulp
      CHECK(std::abs(e[i] - std::exp(double(xs[i]))) <= 4 * 0x1p-24 * std::exp(double(xs[i])));
  }
  std::vector<float> nan_row{NAN, 0.f, -INFINITY};  // a NaN score stays NaN, its neighbours not
  detail::exp_shift_sum(nan_row.data(), 3, 0.f);
  CHECK(std::isnan(nan_row[0]));
  CHECK(nan_row[1] == 1.f);
  CHECK(nan_row[2] == 0.f);
}

TEST_CASE("softmax_rows: rows taken together equal each row alone, and the online update in double",
          "[softmax]") {
  std::mt19937_64 rng(GENERATE(5, 6, 7));
  std::normal_distribution<float> nd(0.f, 3.f);
  const auto same = [](float a, float b) { return a == b || (a != a && b != b); };
  for (const std::int64_t rows : {1, 2, 3, 4, 5, 7, 9})
    for (const std::int64_t n : {1, 5, 8, 13, 64, 67}) {
      const std::int64_t ld = n + 3;  // rows at a stride, the gaps never touched
      std::vector<float> s(static_cast<std::size_t>(rows * ld), 77.f), max(rows), sum(rows);
      for (std::int64_t r = 0; r < rows; ++r) {
        const auto kind = rng() % 6;  // 0: fully masked, 1: a NaN score, 2: no earlier key
        for (std::int64_t t = 0; t < n; ++t)
          s[r * ld + t] = kind == 0 || rng() % 5 == 0 ? -INFINITY : nd(rng);
        if (kind == 1) s[r * ld + static_cast<std::int64_t>(rng() % n)] = NAN;
        const bool empty = kind == 2 || rng() % 4 == 0;
        max[r] = empty ? -INFINITY : nd(rng);
        sum[r] = empty ? 0.f : 1.f + std::abs(nd(rng));
      }
      INFO("rows=" << rows << " n=" << n);
      std::vector<float> s1 = s, max1 = max, sum1 = sum, alpha(rows), alpha1(rows);
      const std::vector<float> s0 = s, max0 = max, sum0 = sum;
      detail::softmax_rows(s.data(), ld, rows, n, max.data(), sum.data(), alpha.data());
      for (std::int64_t r = 0; r < rows; ++r)
        detail::softmax_rows(s1.data() + r * ld, ld, 1, n, &max1[r], &sum1[r], &alpha1[r]);
      for (std::size_t i = 0; i < s.size(); ++i) CHECK(same(s[i], s1[i]));
      for (std::int64_t r = 0; r < rows; ++r) {
        CHECK(same(max[r], max1[r]));
        CHECK(same(sum[r], sum1[r]));
        CHECK(same(alpha[r], alpha1[r]));
        for (std::int64_t t = n; t < ld; ++t) CHECK(s[r * ld + t] == 77.f);
        // The update in double: max' = max(old, the row's max), NaN if a score is NaN.
        double mx = max0[r];
        bool nan = false;
        for (std::int64_t t = 0; t < n; ++t) {
          const double x = s0[r * ld + t];
          nan = nan || x != x;
          mx = std::max(mx, x);
        }
        INFO("row " << r);
        if (nan) {
          CHECK(max[r] != max[r]);
          CHECK(sum[r] != sum[r]);
          continue;
        }
        CHECK(max[r] == float(mx));
        if (mx == -INFINITY) {  // nothing seen yet: zeros, state unchanged, no rescale
          for (std::int64_t t = 0; t < n; ++t) CHECK(s[r * ld + t] == 0.f);
          CHECK(sum[r] == 0.f);
          CHECK(alpha[r] == 1.f);
          continue;
        }
        // exp of a difference rounded to float: 4 ulp, and the rounding times the difference;
        // or under the smallest normal float (0 on the vector targets)
        const auto close = [mx](float e, float x) {
          if (x == -INFINITY) return e == 0.f;
          const double ref = std::exp(double(x) - mx);
          return std::abs(e - ref) <= std::max((4 + std::abs(x - mx)) * 0x1p-24 * ref, 1.2e-38);
        };
        CHECK(close(alpha[r], max0[r]));
        const double a = max0[r] == -INFINITY ? 0.0 : std::exp(double(max0[r]) - mx);
        double ref_sum = sum0[r] * a;
        for (std::int64_t t = 0; t < n; ++t) {
          const float x = s0[r * ld + t];
          INFO("t=" << t << " score=" << x << " p=" << s[r * ld + t]);
          CHECK(close(s[r * ld + t], x));
          ref_sum += x == -INFINITY ? 0.0 : std::exp(double(x) - mx);
        }
        CHECK(std::abs(sum[r] - ref_sum) <= (8.0 + double(n)) * 0x1p-24 * ref_sum);
      }
    }
}
