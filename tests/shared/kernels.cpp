// Shared attention at the kernel level: the donors' weights in both forms (materialised P and
// the LSE of the flash form) for GQA, absorbed MLA and TPA donors, and the follower kernel over
// a value-only cache in both forms, against the double reference P_donor V_follower.
#include <attnkit/kernels/shared.hpp>
#include <attnkit/reference/tpa.hpp>

#include "gqa_fixture.hpp"

using namespace attnkit;
using namespace attnkit::test;

namespace {

/// A donor call of any variant, as the kernels see it and as the reference sees it (the same
/// attention written as a GQA over materialised double Q and K).
struct donor_case {
  std::string name;
  std::int64_t heads = 0, tq = 0, tk = 0;
  std::vector<std::int64_t> q_pos, k_pos;
  reference::matrix q, k;  // [Tq, H d], [Tk, H_kv d]
  std::int64_t ref_kv_heads = 1;
  double scale = 1, a_max = 0;  // A: the largest |score| bound (Cauchy-Schwarz)
  attention_options opt;
  reference::attention_rules rules;
  // Kernel operands (kept alive here).
  fmat fq, fk, fv, fc, fkr, aq, bq, ak, bk, av, bv;
  dense_cache<float> dense{{1, 1, 1, 0}};
  latent_cache<float> latent{{1, 0, 1, 0}};
  factorized_cache<float> factors{{1, 1, 1, 1, 1, 0}};
};

double max_row_norm(const reference::matrix& m, std::int64_t width) {
  double n = 0;
  for (std::int64_t i = 0; i < m.rows(); ++i)
    for (std::int64_t h = 0; h < m.cols() / width; ++h)
      n = std::max(n, m.row(i).segment(h * width, width).norm());
  return n;
}

std::vector<std::int64_t> query_positions(std::mt19937_64& rng, const std::vector<std::int64_t>& kp,
                                          std::int64_t tq) {
  std::vector<std::int64_t> q;
  for (std::int64_t i = 0; i < tq; ++i)
    q.push_back(i == tq - 1 ? kp.back() : kp[rng() % kp.size()] + static_cast<std::int64_t>(rng() % 3) - 1);
  return q;
}

donor_case gqa_donor(std::mt19937_64& rng, std::int64_t tq, std::int64_t tk, tile_strategy st) {
  donor_case c;
  c.name = "GQA";
  const std::int64_t h = 8, hkv = 2, d = 32;
  c.heads = h, c.tq = tq, c.tk = tk, c.ref_kv_heads = hkv;
  c.fq = random_matrix(rng, tq, h * d), c.fk = random_matrix(rng, tk, hkv * d);
  c.fv = random_matrix(rng, tk, hkv * d);
  c.k_pos = gapped_positions(rng, tk, 5, 2);
  c.q_pos = query_positions(rng, c.k_pos, tq);
  c.dense = dense_cache<float>({hkv, d, d, tk});
  c.dense.append(tensor3_view<const float>(c.fk.data(), {tk, hkv, d}),
                 tensor3_view<const float>(c.fv.data(), {tk, hkv, d}), c.k_pos);
  c.q = to_double(c.fq), c.k = to_double(c.fk);
  c.scale = 1 / std::sqrt(double(d));
  c.opt.strategy = st;
  c.a_max = c.scale * max_row_norm(c.q, d) * max_row_norm(c.k, d);
  return c;
}

donor_case mla_donor(std::mt19937_64& rng, std::int64_t tq, std::int64_t tk) {
  donor_case c;
  c.name = "MLA";
  const std::int64_t h = 8, dc = 48, dr = 16;
  c.heads = h, c.tq = tq, c.tk = tk, c.ref_kv_heads = 1;
  c.fc = random_matrix(rng, tk, dc), c.fkr = random_matrix(rng, tk, dr);
  c.aq = random_matrix(rng, tq, h * dc, 0.3f), c.bq = random_matrix(rng, tq, h * dr, 0.3f);
  c.k_pos = gapped_positions(rng, tk, 10, 2);
  c.q_pos = query_positions(rng, c.k_pos, tq);
  c.latent = latent_cache<float>({.latent_dim = dc, .rope_dim = dr, .capacity = tk});
  c.latent.append(view_of(c.fc), tensor3_view<const float>(c.fkr.data(), {tk, 1, dr}), c.k_pos);
  c.q.resize(tq, h * (dc + dr));
  c.k.resize(tk, dc + dr);
  for (std::int64_t t = 0; t < tq; ++t)
    for (std::int64_t i = 0; i < h; ++i)
      c.q.row(t).segment(i * (dc + dr), dc + dr) << to_double(c.aq).row(t).segment(i * dc, dc),
          to_double(c.bq).row(t).segment(i * dr, dr);
  c.k << to_double(c.fc), to_double(c.fkr);
  c.scale = 0.1;
  c.opt.scale = 0.1f;
  c.a_max = c.scale * max_row_norm(c.q, dc + dr) * max_row_norm(c.k, dc + dr);
  return c;
}

donor_case tpa_donor(std::mt19937_64& rng, std::int64_t tq, std::int64_t tk) {
  donor_case c;
  c.name = "TPA";
  const std::int64_t h = 20, d = 32, rq = 3, rk = 2, rv = 2;
  c.heads = h, c.tq = tq, c.tk = tk, c.ref_kv_heads = h;
  c.aq = random_matrix(rng, tq, rq * h), c.bq = random_matrix(rng, tq, rq * d, 0.5f);
  c.ak = random_matrix(rng, tk, rk * h), c.bk = random_matrix(rng, tk, rk * d, 0.5f);
  c.av = random_matrix(rng, tk, rv * h), c.bv = random_matrix(rng, tk, rv * d);
  c.k_pos = gapped_positions(rng, tk, 0, 2);
  c.q_pos = query_positions(rng, c.k_pos, tq);
  c.factors = factorized_cache<float>(
      {.heads = h, .head_dim = d, .k_rank = rk, .v_rank = rv, .capacity = tk});
  c.factors.append({tensor3_view<const float>(c.ak.data(), {tk, rk, h}),
                    tensor3_view<const float>(c.bk.data(), {tk, rk, d}),
                    tensor3_view<const float>(c.av.data(), {tk, rv, h}),
                    tensor3_view<const float>(c.bv.data(), {tk, rv, d}), c.k_pos});
  c.q = reference::tpa_materialise(to_double(c.aq), to_double(c.bq), rq, h, 1.0);
  c.k = reference::tpa_materialise(to_double(c.ak), to_double(c.bk), rk, h, 1.0 / rk);  // k_scale
  c.scale = 1 / std::sqrt(double(d));
  c.a_max = c.scale * max_row_norm(c.q, d) * max_row_norm(c.k, d);
  return c;
}

donor_case make_donor(int kind, std::mt19937_64& rng, std::int64_t tq, std::int64_t tk,
                      tile_strategy st = tile_strategy::automatic) {
  return kind == 0 ? gqa_donor(rng, tq, tk, st)
         : kind == 1 ? mla_donor(rng, tq, tk)
                     : tpa_donor(rng, tq, tk);
}

/// Runs the donor's own kernel with `opt` (outputs: out, and the options' lse / weights).
template <class Exec, class Mask = no_mask>
fmat run_donor(donor_case& c, const attention_options& opt, Exec& exec, const Mask& mask = {}) {
  const std::int64_t h = c.heads, tq = c.tq;
  fmat out;
  if (c.name == "GQA") {
    out.resize(tq, h * 32);
    attend(tensor3_view<const float>(c.fq.data(), {tq, h, 32}), c.q_pos, c.dense,
           tensor3_view<float>(out.data(), {tq, h, 32}), opt, exec, nullptr, mask);
  } else if (c.name == "MLA") {
    out.resize(tq, h * 48);
    attend_latent(tensor3_view<const float>(c.aq.data(), {tq, h, 48}),
                  tensor3_view<const float>(c.bq.data(), {tq, h, 16}), c.q_pos, c.latent,
                  tensor3_view<float>(out.data(), {tq, h, 48}), opt, exec, nullptr, mask);
  } else {
    out.resize(tq, h * 32);
    attend_factorized(tensor3_view<const float>(c.aq.data(), {tq, 3, h}),
                      tensor3_view<const float>(c.bq.data(), {tq, 3, 32}), c.q_pos, c.factors,
                      tensor3_view<float>(out.data(), {tq, h, 32}), opt, exec, nullptr, mask);
  }
  return out;
}

/// The donor's call with both hand-off outputs: P [Tq, H*Tk] and its LSE [Tq, H].
struct donor_outputs {
  fmat p, lse;
};
template <class Exec, class Mask = no_mask>
donor_outputs run_donor_handing_on(donor_case& c, Exec& exec, const Mask& mask = {}) {
  donor_outputs d{fmat(c.tq, c.heads * c.tk), fmat(c.tq, c.heads)};
  attention_options opt = c.opt;
  opt.lse = matrix_view<float>(d.lse.data(), {c.tq, c.heads});
  opt.weights = tensor3_view<float>(d.p.data(), {c.tq, c.heads, c.tk});
  run_donor(c, opt, exec, mask);
  return d;
}

/// The follower's flash form for the donor's kind.
template <class VS, class Exec, class Mask = no_mask>
void run_flash(donor_case& c, const fmat& lse, const VS& values, tensor3_view<float> out,
               Exec& exec, const Mask& mask = {}) {
  const std::int64_t h = c.heads, tq = c.tq;
  const matrix_view<const float> l(lse.data(), {tq, h});
  if (c.name == "GQA")
    attend_shared(gqa_scores<float>{tensor3_view<const float>(c.fq.data(), {tq, h, 32}),
                                    c.dense.view()},
                  c.q_pos, l, values, out, c.opt, exec, nullptr, mask);
  else if (c.name == "MLA")
    attend_shared(latent_scores<float>{tensor3_view<const float>(c.aq.data(), {tq, h, 48}),
                                       tensor3_view<const float>(c.bq.data(), {tq, h, 16}),
                                       c.latent.view()},
                  c.q_pos, l, values, out, c.opt, exec, nullptr, mask);
  else
    attend_shared(factor_scores<float>{tensor3_view<const float>(c.aq.data(), {tq, 3, h}),
                                       tensor3_view<const float>(c.bq.data(), {tq, 3, 32}),
                                       c.factors.view()},
                  c.q_pos, l, values, out, c.opt, exec, nullptr, mask);
}

reference::matrix as_rows(const fmat& p3, std::int64_t rows) {  // [Tq, H*Tk] -> [Tq*H, Tk]
  return to_double(p3).reshaped<Eigen::RowMajor>(rows, p3.size() / rows);
}

}  // namespace

TEST_CASE("donor weights: the materialised P equals the reference softmax, rows sum to 1, masked "
          "entries are exactly 0, and the output is unchanged",
          "[shared][kernel]") {
  const int kind = GENERATE(0, 1, 2);
  const std::int64_t tq = GENERATE(1, 9);
  std::mt19937_64 rng(static_cast<std::uint64_t>(40 + kind * 7 + tq));
  const std::int64_t tk = tq == 1 ? 1500 : 1 + static_cast<std::int64_t>(rng() % 300);
  donor_case c = make_donor(kind, rng, tq, tk,
                            tq == 1 ? tile_strategy::streaming : tile_strategy::gemm);
  INFO(c.name << " Tq=" << tq << " Tk=" << tk);
  thread_pool pool(2);  // decode at Tk 1500: key splits, merged before the weights are formed
  fmat p(tq, c.heads * tk), lse(tq, c.heads), lse_plain(tq, c.heads);
  attention_options opt = c.opt;
  opt.lse = matrix_view<float>(lse_plain.data(), {tq, c.heads});
  const fmat plain = run_donor(c, opt, pool);
  opt.lse = matrix_view<float>(lse.data(), {tq, c.heads});
  opt.weights = tensor3_view<float>(p.data(), {tq, c.heads, tk});
  const fmat out = run_donor(c, opt, pool);
  CHECK(out == plain);
  CHECK(lse == lse_plain);

  const auto ref = reference::attention_weights(c.q, c.q_pos, c.k, c.k_pos, c.heads,
                                                c.ref_kv_heads, c.scale, c.rules);
  const reference::matrix pd = as_rows(p, tq * c.heads);
  // A score error ds <= ~u A moves p by p ds; exp and the normalisation add a few u p.
  const double tol = u * (4 + 3 * c.a_max);
  INFO("A=" << c.a_max << " tolerance=" << tol);
  CHECK(max_abs_diff(pd, ref) <= tol);
  for (std::int64_t r = 0; r < pd.rows(); ++r) {
    const double sum = pd.row(r).sum();
    if (ref.row(r).sum() == 0) {
      CHECK(sum == 0);
    } else {
      CHECK(std::abs(sum - 1) <= tol * 2);
    }
    for (std::int64_t s = 0; s < tk; ++s)
      if (ref(r, s) == 0 && c.k_pos[static_cast<std::size_t>(s)] > c.q_pos[static_cast<std::size_t>(r / c.heads)])
        CHECK(pd(r, s) == 0);  // a masked key: exactly 0, not merely underflowed
  }
}

TEST_CASE("follower kernel: both forms equal the reference P_donor V_follower for GQA, MLA and TPA "
          "donors, and each other",
          "[shared][kernel]") {
  const int kind = GENERATE(0, 1, 2);
  const std::int64_t tq = GENERATE(1, 3, 40);
  const std::int64_t hkv_pick = GENERATE(0, 1, 2);
  std::mt19937_64 rng(static_cast<std::uint64_t>(700 + kind * 31 + tq * 3 + hkv_pick));
  const std::int64_t tk = tq == 1 ? 2000 : 1 + static_cast<std::int64_t>(rng() % 400);
  donor_case c = make_donor(kind, rng, tq, tk);
  // Follower KV heads: one (MQA-like), a middle divisor, or one per query head.
  const std::int64_t hkv = hkv_pick == 0 ? 1 : hkv_pick == 1 ? (c.heads == 20 ? 5 : 2) : c.heads;
  const std::int64_t dv = 40;
  INFO(c.name << " Tq=" << tq << " Tk=" << tk << " follower H_kv=" << hkv);
  thread_pool pool(2);
  const auto [p, lse] = run_donor_handing_on(c, pool);

  const fmat v = random_matrix(rng, tk, hkv * dv);
  value_cache<float> values({.kv_heads = hkv, .v_head_dim = dv, .capacity = tk});
  values.append(tensor3_view<const float>(v.data(), {tk, hkv, dv}), c.k_pos);
  fmat mat(tq, c.heads * dv), flash(tq, c.heads * dv);
  attend_shared(tensor3_view<const float>(p.data(), {tq, c.heads, tk}), values,
                tensor3_view<float>(mat.data(), {tq, c.heads, dv}), pool);
  run_flash(c, lse, values, tensor3_view<float>(flash.data(), {tq, c.heads, dv}), pool);

  const auto pref = reference::attention_weights(c.q, c.q_pos, c.k, c.k_pos, c.heads,
                                                 c.ref_kv_heads, c.scale, c.rules);
  const auto ref = reference::weighted_values(pref, to_double(v), c.heads, hkv);
  const double vmax = v.cwiseAbs().maxCoeff(), tol = u * vmax * (4 + 3 * c.a_max);
  INFO("A=" << c.a_max << " tolerance=" << tol);
  CHECK(max_abs_diff(to_double(mat), ref) <= tol);
  CHECK(max_abs_diff(to_double(flash), ref) <= tol);
  CHECK(max_abs_diff(to_double(flash), to_double(mat)) <= tol);
}

TEST_CASE("follower kernel: 16-bit value caches, every tile strategy", "[shared][kernel]") {
  const tile_strategy st =
      GENERATE(tile_strategy::automatic, tile_strategy::streaming, tile_strategy::gemm);
  const std::int64_t tq = GENERATE(1, 24);
  std::mt19937_64 rng(static_cast<std::uint64_t>(90 + tq + static_cast<int>(st)));
  const std::int64_t tk = 333, hkv = 2, dv = 64;  // d_v 64: whole bf16 pair groups
  donor_case c = gqa_donor(rng, tq, tk, st);
  fmat p(tq, c.heads * tk), lse(tq, c.heads);
  attention_options opt = c.opt;
  opt.lse = matrix_view<float>(lse.data(), {tq, c.heads});
  opt.weights = tensor3_view<float>(p.data(), {tq, c.heads, tk});
  serial_executor serial;
  run_donor(c, opt, serial);
  const fmat v = random_matrix(rng, tk, hkv * dv);
  const auto pref = reference::attention_weights(c.q, c.q_pos, c.k, c.k_pos, c.heads,
                                                 c.ref_kv_heads, c.scale, c.rules);
  auto check = [&]<class S>(S) {
    value_cache<S> values({.kv_heads = hkv, .v_head_dim = dv, .capacity = tk});
    values.append(tensor3_view<const float>(v.data(), {tk, hkv, dv}), c.k_pos);
    fmat mat(tq, c.heads * dv), flash(tq, c.heads * dv);
    attend_shared(tensor3_view<const float>(p.data(), {tq, c.heads, tk}), values,
                  tensor3_view<float>(mat.data(), {tq, c.heads, dv}), serial, nullptr, st);
    run_flash(c, lse, values, tensor3_view<float>(flash.data(), {tq, c.heads, dv}), serial);
    const auto ref = reference::weighted_values(pref, to_double(round_trip<S>(v)), c.heads, hkv);
    const double vmax = v.cwiseAbs().maxCoeff(), tol = u * vmax * (4 + 3 * c.a_max);
    CHECK(max_abs_diff(to_double(mat), ref) <= tol);
    CHECK(max_abs_diff(to_double(flash), ref) <= tol);
  };
  check(bf16{});
  check(half{});
}

TEST_CASE(
    "follower kernel: bf16 products on bf16 value caches round the probabilities only, "
    "in both forms",
    "[shared][kernel][bf16]") {
  // Where vdpbf16ps runs, P V takes P rounded to bf16 against the stored values: per output the
  // float tolerance plus 6 u_bf16 |P_row o V_col|_2 (each product off by at most u_bf16 of
  // itself, the errors adding like a random walk; the GQA kernel's bf16 products test uses the
  // same bound), so a tenfold coarser rounding fails. Streaming tiles (decode, few rows) and
  // GEMM tiles; d_v 64 (whole 32-column groups) and 40 (the streaming P V stays f32 then).
  // Elsewhere the answer is the f32 products' bit for bit.
  const int kind = GENERATE(0, 1, 2);
  const std::int64_t tq = GENERATE(1, 3, 24);
  const std::int64_t dv = GENERATE(64, 40);
  std::mt19937_64 rng(static_cast<std::uint64_t>(1100 + kind * 31 + tq * 3 + dv));
  const std::int64_t tk = tq == 1   ? 1500
                          : tq == 3 ? 301
                                    : 1 + static_cast<std::int64_t>(rng() % 400);
  donor_case c = make_donor(kind, rng, tq, tk);
  // Three tokens at falling positions: one worker takes them last token first, so the first key
  // block of each item holds more keys than the one before (61, 151, 301 keys; odd, so a pair is
  // half padding), which a block's packed values must not be reused across.
  if (tq == 3) c.q_pos = {c.k_pos[300], c.k_pos[150], c.k_pos[60]};
  const std::int64_t hkv = rng() % 2 ? 1 : (c.heads == 20 ? 5 : 2);
  INFO(c.name << " Tq=" << tq << " Tk=" << tk << " follower H_kv=" << hkv << " d_v=" << dv
              << " vdpbf16ps: " << detail::bf16_dot_available());
  thread_pool pool(2);  // decode at Tk 1500: key splits
  const donor_outputs donor = run_donor_handing_on(c, pool);
  // Named references, not a structured binding: the lambdas below capture lse (clang 14 cannot).
  const fmat &p = donor.p, &lse = donor.lse;
  const fmat v = random_matrix(rng, tk, hkv * dv);
  value_cache<bf16> values({.kv_heads = hkv, .v_head_dim = dv, .capacity = tk});
  values.append(tensor3_view<const float>(v.data(), {tk, hkv, dv}), c.k_pos);
  const tensor3_view<const float> weights(p.data(), {tq, c.heads, tk});
  const auto pref = reference::attention_weights(c.q, c.q_pos, c.k, c.k_pos, c.heads,
                                                 c.ref_kv_heads, c.scale, c.rules);
  const reference::matrix vr = to_double(round_trip<bf16>(v));
  const auto ref = reference::weighted_values(pref, vr, c.heads, hkv);
  const double tol = u * vr.cwiseAbs().maxCoeff() * (4 + 3 * c.a_max), ub = unit_roundoff<bf16>();
  // The largest error against the bound (rounded: with the probabilities' rounding term).
  auto worst = [&](const fmat& out, bool rounded) {
    double w = 0;
    for (std::int64_t t = 0; t < tq; ++t)
      for (std::int64_t h = 0; h < c.heads; ++h) {
        const std::int64_t j = h / (c.heads / hkv);
        for (std::int64_t i = 0; i < dv; ++i) {
          const auto pv = pref.row(t * c.heads + h).transpose().cwiseProduct(vr.col(j * dv + i));
          const double bound = tol + (rounded ? 6 * ub * pv.norm() : 0.0);
          const std::int64_t o = h * dv + i;
          w = std::max(w, std::abs(out(t, o) - ref(t, o)) / bound);
        }
      }
    return w;
  };
  // Two workers, and one (items in order: a causal item can end a key block early, and the next
  // item's block at the same start holds more keys).
  auto check = [&](auto& exec, const char* name) {
    auto both_forms = [&](product_math products) {
      fmat mat(tq, c.heads * dv), flash(tq, c.heads * dv);
      attend_shared(weights, values, tensor3_view<float>(mat.data(), {tq, c.heads, dv}), exec,
                    nullptr, tile_strategy::automatic, products);
      c.opt.products = products;  // the flash form takes the donor's options
      run_flash(c, lse, values, tensor3_view<float>(flash.data(), {tq, c.heads, dv}), exec);
      return std::pair{mat, flash};
    };
    const auto [mat32, flash32] = both_forms(product_math::f32);
    const auto [mat, flash] = both_forms(product_math::bf16);
    INFO(name << ": f32 products " << worst(mat32, false) << ", " << worst(flash32, false));
    CHECK(worst(mat32, false) <= 1.0);
    CHECK(worst(flash32, false) <= 1.0);
    if (!bf16_products_available()) {
      CHECK(mat == mat32);
      CHECK(flash == flash32);
      return;
    }
    const double worst_mat = worst(mat, true), worst_flash = worst(flash, true);
    INFO("worst error / bound: materialised " << worst_mat << ", flash " << worst_flash);
    CHECK(worst_mat <= 1.0);
    CHECK(worst_flash <= 1.0);
    // Where the bf16 products ran (P rounded): vdpbf16ps on every path of d_v in whole 32-column
    // groups; AMX on the GEMM tiles (24 tokens) of d_v in whole 16-column tiles, in the flash
    // form the MLA donor's rows of each follower value head gathered over the tokens; a TPA
    // donor's item holds one token, whose 4 rows per value head (H_kv 5) stay on FMAs.
    const bool dot = detail::bf16_dot_available(), tiles = tq == 24 && dv % 16 == 0;
    if (dot ? dv % 32 == 0 : tiles) CHECK(mat != mat32);
    if (dot ? dv % 32 == 0 : tiles && (kind != 2 || hkv == 1)) CHECK(flash != flash32);
  };
  check(pool, "2 workers");
  serial_executor serial;
  check(serial, "1 worker");
}

TEST_CASE(
    "follower kernel: f32 products on AMX tiles as the FMA path computes them, inf and NaN "
    "included, in both forms",
    "[shared][kernel][bf16][amx]") {
  // With f32 products on a bf16 cache the AMX tiles take P (and the donor's queries) as three
  // bf16 parts: float products exactly, so each output within the float tolerance of the double
  // reference (a part dropped is about 256 u off); a part of 0 times an infinite key or value is
  // NaN where the float product is +-inf, so such a call runs again on FMAs
  // (splits_products): the answer is the avx2 target's, element for element.
  if (!detail::bf16_amx_available() || !cpu_supports(simd_target::avx2)) {
    SUCCEED("no AMX engine on this CPU (the f32 products stay on FMAs)");
    return;
  }
  const std::int64_t tq = 24, tk = 300, dv = 64;
  // hkv 2: a donor KV head's rows read one value head; 8: each of its 4 query heads its own
  // (the rows gathered over the tokens, value_accumulator::add_gathered).
  for (const std::int64_t hkv : {2, 8})
    for (const int planted : {0, 1, 2}) {  // none, an infinite value, an infinite donor key
      std::mt19937_64 rng(static_cast<std::uint64_t>(77 + planted + hkv));
      donor_case c = gqa_donor(rng, tq, tk, tile_strategy::gemm);
      const std::int64_t d = 32, hd = c.heads / c.ref_kv_heads;
      if (planted == 2) c.fk(200, 9) = -INFINITY;
      // The donor over a bf16 cache, so that its scores run on AMX parts too.
      dense_cache<bf16> keys({c.ref_kv_heads, d, d, tk});
      keys.append(tensor3_view<const float>(c.fk.data(), {tk, c.ref_kv_heads, d}),
                  tensor3_view<const float>(c.fv.data(), {tk, c.ref_kv_heads, d}), c.k_pos);
      const tensor3_view<const float> q(c.fq.data(), {tq, c.heads, d});
      fmat p(tq, c.heads * tk), lse(tq, c.heads), out(tq, c.heads * d);
      attention_options opt = c.opt;
      opt.lse = matrix_view<float>(lse.data(), {tq, c.heads});
      opt.weights = tensor3_view<float>(p.data(), {tq, c.heads, tk});
      thread_pool pool(2);
      attend(q, c.q_pos, keys, tensor3_view<float>(out.data(), {tq, c.heads, d}), opt, pool);
      fmat v = random_matrix(rng, tk, hkv * dv);
      if (planted == 1) v(123, 7) = INFINITY;
      value_cache<bf16> values({.kv_heads = hkv, .v_head_dim = dv, .capacity = tk});
      values.append(tensor3_view<const float>(v.data(), {tk, hkv, dv}), c.k_pos);
      auto both_forms = [&] {
        fmat mat(tq, c.heads * dv), flash(tq, c.heads * dv);
        attend_shared(tensor3_view<const float>(p.data(), {tq, c.heads, tk}), values,
                      tensor3_view<float>(mat.data(), {tq, c.heads, dv}), pool);
        attend_shared(gqa_scores<bf16>{q, keys.view()}, c.q_pos,
                      matrix_view<const float>(lse.data(), {tq, c.heads}), values,
                      tensor3_view<float>(flash.data(), {tq, c.heads, dv}), c.opt, pool);
        return std::pair{mat, flash};
      };
      const auto [mat, flash] = both_forms();
      const simd_target before = active_target();
      set_target(simd_target::avx2);
      const auto [mat_fma, flash_fma] = both_forms();
      set_target(before);
      INFO("planted " << planted << " (1: value, 2: key), donor heads per KV head " << hd
                      << ", follower KV heads " << hkv);
      if (planted == 0) {
        c.k = to_double(round_trip<bf16>(c.fk));
        const auto pref = reference::attention_weights(c.q, c.q_pos, c.k, c.k_pos, c.heads,
                                                       c.ref_kv_heads, c.scale, c.rules);
        const reference::matrix vr = to_double(round_trip<bf16>(v));
        const auto ref = reference::weighted_values(pref, vr, c.heads, hkv);
        const double tol = u * vr.cwiseAbs().maxCoeff() * (4 + 3 * c.a_max);
        const double e_mat = max_abs_diff(to_double(mat), ref),
                     e_flash = max_abs_diff(to_double(flash), ref),
                     e_fma = std::max(max_abs_diff(to_double(mat_fma), ref),
                                      max_abs_diff(to_double(flash_fma), ref));
        INFO("A=" << c.a_max << " tolerance=" << tol << " errors: materialised " << e_mat
                  << ", flash " << e_flash << ", FMAs " << e_fma);
        CHECK(e_mat <= tol);
        CHECK(e_flash <= tol);
        // As accurate as the FMAs (with two parts, 8 times their error).
        CHECK(e_mat <= 2 * e_fma);
        CHECK(e_flash <= 2 * e_fma);
        continue;
      }
      // The infinity reaches the output (a donor key's: through the flash form's scores).
      const std::int64_t mat_non_finite = check_as_fmas(mat, mat_fma);
      if (planted == 1) CHECK(mat_non_finite > 0);
      CHECK(check_as_fmas(flash, flash_fma) > 0);
    }
}

TEST_CASE("follower kernel: the donor's policies (window, soft-cap, sinks, ALiBi, a mask "
          "predicate) carry over to the flash form",
          "[shared][kernel][policy]") {
  const int kind = GENERATE(0, 1, 2);
  const std::int64_t tq = GENERATE(1, 17);
  std::mt19937_64 rng(static_cast<std::uint64_t>(300 + kind * 5 + tq));
  donor_case c = make_donor(kind, rng, tq, 600);
  std::vector<float> sinks, slopes;
  for (std::int64_t h = 0; h < c.heads; ++h) {
    sinks.push_back(float(h % 3) - 1.f);
    slopes.push_back(std::exp2(-8.f * float(h + 1) / float(c.heads)));
  }
  c.opt.window = c.rules.window = 700;
  c.opt.logit_softcap = 4.f, c.rules.softcap = 4.0;
  c.opt.sinks = sinks, c.rules.sinks.assign(sinks.begin(), sinks.end());
  c.opt.alibi_slopes = slopes, c.rules.alibi_slopes.assign(slopes.begin(), slopes.end());
  const auto odd_heads = [](const mask_args& a) { return a.head % 2 == 0 || a.k_pos % 3 != 0; };
  c.rules.mask = [](auto, auto, auto, auto kp, auto h) { return h % 2 == 0 || kp % 3 != 0; };
  const double a = c.a_max + slopes.front() * double(c.k_pos.back() + 2);
  thread_pool pool(2);
  const auto [p, lse] = run_donor_handing_on(c, pool, odd_heads);
  const std::int64_t hkv = 1, dv = 16;
  const fmat v = random_matrix(rng, c.tk, hkv * dv);
  value_cache<float> values({.kv_heads = hkv, .v_head_dim = dv, .capacity = c.tk});
  values.append(tensor3_view<const float>(v.data(), {c.tk, hkv, dv}), c.k_pos);
  fmat mat(tq, c.heads * dv), flash(tq, c.heads * dv);
  attend_shared(tensor3_view<const float>(p.data(), {tq, c.heads, c.tk}), values,
                tensor3_view<float>(mat.data(), {tq, c.heads, dv}), pool);
  run_flash(c, lse, values, tensor3_view<float>(flash.data(), {tq, c.heads, dv}), pool, odd_heads);
  const auto pref = reference::attention_weights(c.q, c.q_pos, c.k, c.k_pos, c.heads,
                                                 c.ref_kv_heads, c.scale, c.rules);
  const auto ref = reference::weighted_values(pref, to_double(v), c.heads, hkv);
  const double tol = u * v.cwiseAbs().maxCoeff() * (4 + 3 * a);
  INFO(c.name << " A=" << a << " tolerance=" << tol);
  CHECK(max_abs_diff(to_double(mat), ref) <= tol);
  CHECK(max_abs_diff(to_double(flash), ref) <= tol);
}

TEST_CASE("follower kernel: a masked key's infinite or NaN value contributes nothing in either "
          "form",
          "[shared][kernel][special]") {
  std::mt19937_64 rng(5);
  const std::int64_t tq = 4, tk = 200, hkv = 2, dv = 32;
  donor_case c = gqa_donor(rng, tq, tk, tile_strategy::automatic);
  for (std::int64_t i = 0; i < tq; ++i) c.q_pos[static_cast<std::size_t>(i)] = c.k_pos[100 + i];
  fmat p(tq, c.heads * tk), lse(tq, c.heads);
  attention_options opt = c.opt;
  opt.lse = matrix_view<float>(lse.data(), {tq, c.heads});
  opt.weights = tensor3_view<float>(p.data(), {tq, c.heads, tk});
  serial_executor serial;
  run_donor(c, opt, serial);
  fmat v = random_matrix(rng, tk, hkv * dv);
  v(150, 3) = INFINITY, v(170, dv + 1) = NAN;  // keys no query sees
  value_cache<float> values({.kv_heads = hkv, .v_head_dim = dv, .capacity = tk});
  values.append(tensor3_view<const float>(v.data(), {tk, hkv, dv}), c.k_pos);
  fmat mat(tq, c.heads * dv), flash(tq, c.heads * dv);
  attend_shared(tensor3_view<const float>(p.data(), {tq, c.heads, tk}), values,
                tensor3_view<float>(mat.data(), {tq, c.heads, dv}), serial);
  run_flash(c, lse, values, tensor3_view<float>(flash.data(), {tq, c.heads, dv}), serial);
  CHECK(mat.allFinite());
  CHECK(flash.allFinite());
  const auto pref = reference::attention_weights(c.q, c.q_pos, c.k, c.k_pos, c.heads,
                                                 c.ref_kv_heads, c.scale, c.rules);
  const auto ref = reference::weighted_values(pref, to_double(v), c.heads, hkv);
  CHECK(max_abs_diff(to_double(mat), ref) <= u * 4 * (4 + 3 * c.a_max));
  CHECK(max_abs_diff(to_double(flash), ref) <= u * 4 * (4 + 3 * c.a_max));
}

TEST_CASE("value cache: the fourth kv_cache model (bytes, append, truncate, caller memory)",
          "[shared][cache]") {
  static_assert(kv_cache<value_cache<bf16>>);
  value_cache<bf16> c({.kv_heads = 4, .v_head_dim = 64, .capacity = 10});
  CHECK(c.bytes_per_token() == 4 * 64 * 2);
  CHECK(value_cache<float>({.kv_heads = 8, .v_head_dim = 128, .capacity = 1}).bytes_per_token() ==
        8 * 128 * 4);
  std::mt19937_64 rng(1);
  const fmat v = random_matrix(rng, 3, 4 * 64);
  const std::vector<std::int64_t> pos{7, 8, 9};
  c.append(tensor3_view<const float>(v.data(), {3, 4, 64}), pos);
  CHECK(c.size() == 3);
  CHECK(c.view().positions()[2] == 9);
  CHECK(static_cast<float>(c.view().values().row(3, 2)[5]) ==
        static_cast<float>(static_cast<bf16>(v(2, 3 * 64 + 5))));
  ATTNKIT_CHECK_INVALID(c.append(tensor3_view<const float>(v.data(), {3, 4, 64}),
                                 std::vector<std::int64_t>{1, 2, 3, 4, 5, 6, 7, 8}),
                        "value_cache::append");
  CHECK(c.size() == 3);
  std::vector<float> mem(2 * 5 * 16);
  std::vector<std::int64_t> mpos(5);
  value_cache<float> wrapped({.kv_heads = 2, .v_head_dim = 16, .capacity = 5}, mem.data(),
                             mpos.data());
  const fmat w = random_matrix(rng, 6, 2 * 16);
  ATTNKIT_CHECK_INVALID(wrapped.append(tensor3_view<const float>(w.data(), {6, 2, 16}),
                                       std::vector<std::int64_t>(6)),
                        "exceeds capacity=5");
  CHECK(wrapped.size() == 0);
  wrapped.append(tensor3_view<const float>(w.data(), {2, 2, 16}), std::vector<std::int64_t>{0, 1});
  CHECK(mem[5 * 16 + 16 + 3] == w(1, 16 + 3));  // head 1, token 1
  wrapped.truncate(1);
  CHECK(wrapped.size() == 1);
  ATTNKIT_CHECK_INVALID(
      value_cache<float>({.kv_heads = 1 << 30, .v_head_dim = 1 << 30, .capacity = 1 << 30}),
      "overflows int64");
  value_cache<float> moved = std::move(wrapped);
  CHECK(moved.size() == 1);
  CHECK(wrapped.capacity() == 0);  // NOLINT(bugprone-use-after-move): the documented state
}

TEST_CASE("follower kernel: bad shapes are rejected by name", "[shared][kernel][invalid]") {
  std::mt19937_64 rng(2);
  donor_case c = gqa_donor(rng, 2, 50, tile_strategy::automatic);
  fmat p(2, c.heads * 50), lse(2, c.heads), out(2, c.heads * 16);
  const fmat v = random_matrix(rng, 50, 3 * 16);
  value_cache<float> three({.kv_heads = 3, .v_head_dim = 16, .capacity = 50});
  three.append(tensor3_view<const float>(v.data(), {50, 3, 16}), c.k_pos);
  const tensor3_view<float> o(out.data(), {2, c.heads, 16});
  ATTNKIT_CHECK_INVALID(attend_shared(tensor3_view<const float>(p.data(), {2, c.heads, 50}), three, o),
                        "heads=8", "kv_heads=3");
  value_cache<float> two({.kv_heads = 2, .v_head_dim = 16, .capacity = 60});
  two.append(tensor3_view<const float>(v.data(), {40, 2, 16}),
             std::span(c.k_pos).subspan(0, 40));
  ATTNKIT_CHECK_INVALID(attend_shared(tensor3_view<const float>(p.data(), {2, c.heads, 50}), two, o),
                        "hold 40 tokens", "cover 50 keys");
  const fmat v2 = random_matrix(rng, 10, 2 * 16);
  two.append(tensor3_view<const float>(v2.data(), {10, 2, 16}), std::vector<std::int64_t>(10, 0));
  serial_executor serial;
  ATTNKIT_CHECK_INVALID(run_flash(c, lse, two, o, serial), "positions differ");
  two.truncate(40);
  two.append(tensor3_view<const float>(v2.data(), {10, 2, 16}), std::span(c.k_pos).subspan(40));
  const fmat lse_bad(3, c.heads);
  ATTNKIT_CHECK_INVALID(run_flash(c, lse_bad.topRows(2).eval(), two,
                                  tensor3_view<float>(out.data(), {2, c.heads, 8}), serial),
                        "out");
  c.opt.lse = matrix_view<float>(lse.data(), {2, c.heads});
  ATTNKIT_CHECK_INVALID(run_flash(c, lse, two, o, serial), "take no lse or weights");
  c.opt.lse = {};
  fmat out32(2, c.heads * 32);
  ATTNKIT_CHECK_INVALID(attend(tensor3_view<const float>(c.fq.data(), {2, c.heads, 32}), c.q_pos,
                               c.dense, tensor3_view<float>(out32.data(), {2, c.heads, 32}),
                               {.weights = tensor3_view<float>(p.data(), {2, c.heads, 49})}),
                        "weights", "49");
}
