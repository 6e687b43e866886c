// Shared attention at the layer level: a stack of GQA, MLA and TPA layers with followers, in
// both weights forms, against the double-precision reference stack; identity I9 (an empty plan
// is the unshared stack exactly); prefill == chunked == token-by-token decode; the stack's cache
// bytes; plan validation.
#include <attnkit/reference/shared.hpp>

#include <deque>

#include "layer_fixture.hpp"
#include "mla_fixture.hpp"
#include "tpa_fixture.hpp"

using namespace attnkit;
using namespace attnkit::test;

namespace {

constexpr std::int64_t D = 64, H = 4;

struct follower_data {
  follower_config cfg;
  fmat v, o;
  std::vector<float> vb, ob;
  follower_weights weights() const { return {view_of(v), view_of(o), vb, ob}; }
};

/// A random stack described by a string, one letter per layer: G (GQA, H_kv 2), M (MLA), T
/// (TPA), F (follower; its KV heads cycle through 1, 2, 4). Float layers for attnkit and double
/// layers for the reference, with the same weights. Output projections are scaled by 1/4 so
/// that the residual stream keeps its scale through the stack (it has no norms), which keeps
/// the scores, and so the conditioning of the softmax, at every layer's like the first's.
struct stack_fixture {
  std::deque<gqa_layer_data> gqa;  // deques: the layers hold views of these weights
  std::deque<mla_data> mla;
  std::deque<tpa_data> tpa;
  std::deque<follower_data> followers;
  std::vector<reference::shared_layer> ref;
  std::vector<double> a_max;  // per full layer: scale max|q| max|k| of the reference heads
  product_math products = product_math::f32;  // of every full layer

  std::vector<stack_layer> layers(std::mt19937_64& rng, const std::string& kinds,
                                  const std::vector<sharing_span>& plan) {
    std::vector<stack_layer> out;
    for (std::size_t i = 0; i < kinds.size(); ++i) {
      reference::shared_layer r;
      r.query_heads = H;
      if (kinds[i] == 'G') {
        gqa_config c{.model_dim = D, .heads = H, .kv_heads = 2, .head_dim = 16};
        c.products = products;
        auto& w = gqa.emplace_back(make_layer_data(rng, c, true));
        w.o *= 0.25f;
        out.emplace_back(gqa_layer(c, w.weights()));
        const auto rw = w.reference_weights();
        r.heads = [rw, c](const reference::matrix& x, std::span<const std::int64_t> p) {
          return reference::gqa_heads(x, p, rw, c.heads, c.kv_heads, c.head_dim, c.rope);
        };
        r.kv_heads = 2, r.scale = 0.25, r.o_proj = rw.o, r.o_bias = rw.o_bias;
      } else if (kinds[i] == 'M') {
        mla_config c{.model_dim = D, .heads = H, .latent_dim = 32, .nope_dim = 16, .rope_dim = 8,
                     .v_head_dim = 16};
        c.products = products;
        auto& w = mla.emplace_back(make_mla(rng, c, false, true));
        w.o_proj *= 0.25f;
        out.emplace_back(mla_layer(c, w.weights()));
        const auto rw = w.reference_weights();
        const auto sh = w.shape();
        r.heads = [rw, sh, c](const reference::matrix& x, std::span<const std::int64_t> p) {
          return reference::mla_materialise(x, p, rw, sh, c.rope);
        };
        r.kv_heads = H, r.scale = w.scale(), r.o_proj = rw.o_proj, r.o_bias = rw.o_proj_bias;
      } else if (kinds[i] == 'T') {
        tpa_config c{.model_dim = D, .heads = H, .head_dim = 16, .q_rank = 2, .k_rank = 2,
                     .v_rank = 2};
        c.products = products;
        auto& w = tpa.emplace_back(make_tpa(rng, c, false));
        w.o_proj *= 0.25f;
        const tpa_layer& l = std::get<tpa_layer>(out.emplace_back(tpa_layer(c, w.weights())));
        const auto rw = w.reference_weights();
        const auto sh = w.shape(l.scales());
        r.heads = [rw, sh, c](const reference::matrix& x, std::span<const std::int64_t> p) {
          return reference::tpa_heads(x, p, rw, sh, c.rope);
        };
        r.kv_heads = H, r.scale = 0.25, r.o_proj = rw.o_proj;
      } else {
        const std::int64_t hkv = std::int64_t{1} << (followers.size() % 3);
        follower_data& f = followers.emplace_back();
        f.cfg = {.model_dim = D, .heads = H, .kv_heads = hkv, .v_head_dim = 16};
        f.v = random_matrix(rng, hkv * 16, D, 1.f / std::sqrt(float(D)));
        f.o = random_matrix(rng, D, H * 16, 0.25f / std::sqrt(float(H * 16)));
        const fmat vb = random_matrix(rng, 1, hkv * 16, 0.5f), ob = random_matrix(rng, 1, D, 0.5f);
        f.vb.assign(vb.data(), vb.data() + vb.size());
        f.ob.assign(ob.data(), ob.data() + ob.size());
        out.emplace_back(follower_layer(f.cfg, f.weights()));
        r.kv_heads = hkv, r.v_proj = to_double(f.v), r.v_bias = to_double(vb).transpose();
        r.o_proj = to_double(f.o), r.o_bias = to_double(ob).transpose();
        for (const auto& s : plan)
          if (std::int64_t(i) >= s.first && std::int64_t(i) <= s.last) r.donor = s.donor;
      }
      ref.push_back(r);
    }
    return out;
  }

  /// The reference stack's output, recording each full layer's A.
  reference::matrix reference_forward(const fmat& x, std::span<const std::int64_t> pos) {
    std::vector<reference::shared_layer> layers = ref;
    a_max.assign(ref.size(), 0);
    for (std::size_t i = 0; i < layers.size(); ++i) {
      if (!layers[i].heads) continue;
      const auto inner = layers[i].heads;
      const std::int64_t hkv = layers[i].kv_heads;
      const double scale = layers[i].scale;
      layers[i].heads = [this, i, inner, hkv, scale](const reference::matrix& xx,
                                                     std::span<const std::int64_t> p) {
        auto a = inner(xx, p);
        const std::int64_t dq = a.q.cols() / H, dk = a.k.cols() / hkv;
        double qn = 0, kn = 0;
        for (std::int64_t t = 0; t < a.q.rows(); ++t) {
          for (std::int64_t h = 0; h < H; ++h) qn = std::max(qn, a.q.row(t).segment(h * dq, dq).norm());
          for (std::int64_t h = 0; h < hkv; ++h) kn = std::max(kn, a.k.row(t).segment(h * dk, dk).norm());
        }
        a_max[i] = scale * qn * kn;
        return a;
      };
    }
    return reference::shared_stack_forward(to_double(x), pos, layers);
  }

  /// Norm-wise relative tolerance of the stack's output: each layer's float GEMMs and attention
  /// (layer_fixture.hpp's terms, a follower carrying its donor's A), summed over the layers.
  double tolerance(std::int64_t t) const {
    double tol = 0;
    for (std::size_t i = 0; i < ref.size(); ++i) {
      const double a = ref[i].heads ? a_max[i] : a_max[static_cast<std::size_t>(ref[i].donor)];
      tol += 4 * u * (2 * std::sqrt(double(D)) + std::sqrt(double(H * 16)) + 2 * 4 * a +
                      std::sqrt(double(t)) + 8);
    }
    return tol;
  }

  /// Norm-wise relative bound on the difference of the two weights forms over the same caches:
  /// only the followers differ, taking the donor's P as its call wrote it, or exp(s - lse) with
  /// the donor's scores recomputed by the same products (u (1 + 2 A) per probability), then
  /// accumulating P V in their own orders (sqrt(T) u); safety factor 4.
  double forms_tolerance(std::int64_t t) const {
    double tol = 0;
    for (const auto& r : ref)
      if (!r.heads)
        tol +=
            4 * u * (1 + 2 * a_max[static_cast<std::size_t>(r.donor)] + std::sqrt(double(t)) + 8);
    return tol;
  }
};

double rel_error(const fmat& x, const reference::matrix& ref) {
  return (to_double(x) - ref).norm() / ref.norm();
}

/// Runs the token sequence x through the stack in blocks of `chunk` tokens.
template <storage_type S>
fmat run_stack(shared_stack& stack, fmat x, std::span<const std::int64_t> pos, std::int64_t chunk,
               weights_form form, thread_pool& pool) {
  auto caches = stack.make_caches<S>(x.rows());
  for (std::int64_t t0 = 0; t0 < x.rows(); t0 += chunk) {
    const std::int64_t n = std::min(chunk, x.rows() - t0);
    stack.forward(matrix_view<float>(x.data() + t0 * D, {n, D}), pos.subspan(t0, n), caches, pool,
                  form);
  }
  return x;
}

}  // namespace

TEST_CASE("shared stack I9: an empty sharing plan is the unshared stack exactly",
          "[shared][stack]") {
  std::mt19937_64 rng(9);
  stack_fixture fx;
  shared_stack stack(fx.layers(rng, "GMTG", {}), {});
  const std::int64_t t = 12;
  const fmat x0 = random_matrix(rng, t, D);
  const auto pos = gapped_positions(rng, t, 3, 2);
  thread_pool pool(2);
  auto caches = stack.make_caches<float>(t);
  fmat x = x0;
  stack.forward(view_of(x), pos, caches, pool);

  // The same layers one by one, each over its own cache: x += layer(x).
  fmat y = x0, out(t, D);
  dense_cache<float> c0 = std::get<gqa_layer>(stack.layer(0)).make_cache<float>(t);
  latent_cache<float> c1 = std::get<mla_layer>(stack.layer(1)).make_cache<float>(t);
  factorized_cache<float> c2 = std::get<tpa_layer>(stack.layer(2)).make_cache<float>(t);
  dense_cache<float> c3 = std::get<gqa_layer>(stack.layer(3)).make_cache<float>(t);
  gqa_layer g0(fx.gqa[0].cfg, fx.gqa[0].weights()), g3(fx.gqa[1].cfg, fx.gqa[1].weights());
  mla_layer m1(fx.mla[0].cfg, fx.mla[0].weights());
  tpa_layer t2(fx.tpa[0].cfg, fx.tpa[0].weights());
  g0.forward(view_of(y), pos, c0, view_of(out), pool);
  y += out;
  m1.forward(view_of(y), pos, c1, view_of(out), pool);
  y += out;
  t2.forward(view_of(y), pos, c2, view_of(out), pool);
  y += out;
  g3.forward(view_of(y), pos, c3, view_of(out), pool);
  y += out;
  CHECK(x == y);
  CHECK(stack.bytes_per_token<float>() ==
        c0.bytes_per_token() + c1.bytes_per_token() + c2.bytes_per_token() + c3.bytes_per_token());
}

TEST_CASE("shared stack: GQA, MLA and TPA donors with followers equal the double reference in "
          "both forms, prefill == chunked == token-by-token decode, flash == materialised",
          "[shared][stack]") {
  const std::uint64_t seed = GENERATE(1, 2);
  std::mt19937_64 rng(seed);
  stack_fixture fx;
  // donor 1 (GQA) -> 2..3; donor 4 (MLA) -> 5; donor 6 (TPA) -> 7..8
  const std::vector<sharing_span> plan{{1, 2, 3}, {4, 5, 5}, {6, 7, 8}};
  shared_stack stack(fx.layers(rng, "GGFFMFTFFG", plan), plan);
  const std::int64_t t = 40;
  const fmat x = random_matrix(rng, t, D);
  const auto pos = gapped_positions(rng, t, static_cast<std::int64_t>(seed) * 100, 3);
  const auto ref = fx.reference_forward(x, pos);
  const double tol = fx.tolerance(t);
  thread_pool pool(2);
  std::vector<fmat> results;
  for (const weights_form form : {weights_form::materialised, weights_form::flash})
    for (const std::int64_t chunk : {t, std::int64_t{7}, std::int64_t{1}}) {
      INFO("form " << (form == weights_form::flash ? "flash" : "materialised") << ", blocks of "
                   << chunk << " tokens; tolerance " << tol);
      results.push_back(run_stack<float>(stack, x, pos, chunk, form, pool));
      CHECK(rel_error(results.back(), ref) <= tol);
      CHECK(rel_error(results.back(), to_double(results.front())) <= 2 * tol);
    }
  // The automatic rule: materialised while T x H x Tk weights fit the limit; a limit of zero
  // bytes makes every block take the flash form.
  shared_stack flash_only(fx.layers(rng, "", {}), {}, {.materialise_max_bytes = 0});
  CHECK(flash_only.form_for(1, H, 100) == weights_form::flash);
  CHECK(stack.form_for(1, 32, 16384) == weights_form::materialised);
  CHECK(stack.form_for(2048, 32, 2048) == weights_form::flash);
  CHECK(rel_error(run_stack<float>(stack, x, pos, 5, weights_form::automatic, pool), ref) <= tol);
}

TEST_CASE("shared stack: bf16 caches stay within the storage bound, with f32 and bf16 products",
          "[shared][stack]") {
  std::mt19937_64 rng(77);
  stack_fixture fx;
  const bool products = GENERATE(false, true);
  if (products) fx.products = product_math::bf16;
  // donor 0 (GQA) -> 1..2; donor 3 (MLA) -> 4; donor 5 (TPA) -> 6
  const std::vector<sharing_span> plan{{0, 1, 2}, {3, 4, 4}, {5, 6, 6}};
  shared_stack stack(fx.layers(rng, "GFFMFTFG", plan), plan);
  const std::int64_t t = 24;
  const fmat x = random_matrix(rng, t, D);
  const auto pos = gapped_positions(rng, t, 0, 1);
  const auto ref = fx.reference_forward(x, pos);
  thread_pool pool(2);
  double a = 0;
  for (double v : fx.a_max) a = std::max(a, v);
  // K and V rounded to bf16: u_bf16 (1 + 2 A) per layer reading them (layer_fixture.hpp), twice
  // with bf16 products (rounding_terms); 8 layers.
  const double tol = fx.tolerance(t) + 4 * unit_roundoff<bf16>() * (1 + 2 * a) * 8 *
                                           rounding_terms<bf16>(fx.products);
  for (const std::int64_t chunk : {t, std::int64_t{6}, std::int64_t{1}}) {
    INFO("products " << products << ", blocks of " << chunk << " tokens; tolerance " << tol);
    const fmat materialised =
        run_stack<bf16>(stack, x, pos, chunk, weights_form::materialised, pool);
    const fmat flash = run_stack<bf16>(stack, x, pos, chunk, weights_form::flash, pool);
    CHECK(rel_error(materialised, ref) <= tol);
    CHECK(rel_error(flash, ref) <= tol);
    // The flash follower recomputes its donor's scores with the donor's options, products
    // included: with f32 products the two forms differ by float round-off only. With bf16
    // products each follower's P V may also round its probabilities to bf16 in one form and not
    // in the other (the forms pick their tiles differently, and the streaming P V keeps float
    // probabilities unless d_v is whole 32-column groups: 16 here): at most u_bf16 of the
    // follower's output each. The rounding's own precision is tested per element in
    // shared/kernels.cpp.
    CHECK(rel_error(flash, to_double(materialised)) <=
          fx.forms_tolerance(t) +
              (products ? double(fx.followers.size()) * unit_roundoff<bf16>() : 0.0));
  }
}

TEST_CASE("shared stack: cache bytes per token (Llama-2-7B shape, followers 23-26 of donor 22)",
          "[shared][stack]") {
  std::mt19937_64 rng(3);
  // Small weights, real head counts: 8 layers sharing 4..6 with donor 3 (the paper's plan in
  // miniature), H 32, H_kv 32, d 128 on a model_dim of 32.
  const std::int64_t h = 32, d = 128, dm = 32;
  std::deque<gqa_layer_data> gw;
  std::deque<follower_data> fw;
  std::vector<stack_layer> layers;
  for (int i = 0; i < 8; ++i) {
    if (i >= 4 && i <= 6) {
      follower_data& f = fw.emplace_back();
      f.cfg = {.model_dim = dm, .heads = h, .kv_heads = h, .v_head_dim = d};
      f.v = random_matrix(rng, h * d, dm), f.o = random_matrix(rng, dm, h * d);
      layers.emplace_back(follower_layer(f.cfg, f.weights()));
    } else {
      gqa_config c{.model_dim = dm, .heads = h, .kv_heads = h, .head_dim = d};
      layers.emplace_back(gqa_layer(c, gw.emplace_back(make_layer_data(rng, c, false)).weights()));
    }
  }
  const shared_stack stack(std::move(layers), {{3, 4, 6}});
  CHECK(stack.bytes_per_token<bf16>() == (5 * 2 + 3) * h * d * 2);
  CHECK(stack.bytes_per_token<float>() == (5 * 2 + 3) * h * d * 4);
  CHECK(stack.donor_of(5) == 3);
  CHECK(stack.donor_of(3) == -1);
}

TEST_CASE("shared stack: bad plans and out-of-order layers are rejected, naming the layers",
          "[shared][stack][invalid]") {
  std::mt19937_64 rng(4);
  stack_fixture fx;
  auto make = [&](const std::string& kinds, std::vector<sharing_span> plan) {
    return shared_stack(fx.layers(rng, kinds, plan), plan);
  };
  ATTNKIT_CHECK_INVALID(make("FGF", {{1, 0, 0}, {1, 2, 2}}), "follower 0", "donor 1");
  ATTNKIT_CHECK_INVALID(make("GFF", {{0, 1, 2}, {0, 2, 2}}), "overlaps", "layer 2");
  ATTNKIT_CHECK_INVALID(make("GFG", {{0, 1, 2}}), "layer 2", "not a follower_layer");
  ATTNKIT_CHECK_INVALID(make("GFF", {{0, 1, 1}}), "layer 2", "no sharing span");
  ATTNKIT_CHECK_INVALID(make("GFF", {{0, 1, 1}, {1, 2, 2}}), "layer 1", "computes no weights");
  ATTNKIT_CHECK_INVALID(make("GF", {{0, 1, 5}}), "span 0", "outside [0, 2)");
  {  // a donor with a different query-head count
    std::vector<stack_layer> layers = fx.layers(rng, "G", {});
    follower_data& f = fx.followers.emplace_back();
    f.cfg = {.model_dim = D, .heads = 2 * H, .kv_heads = 1, .v_head_dim = 16};
    f.v = random_matrix(rng, 16, D), f.o = random_matrix(rng, D, 2 * H * 16);
    layers.emplace_back(follower_layer(f.cfg, f.weights()));
    ATTNKIT_CHECK_INVALID(shared_stack(std::move(layers), {{0, 1, 1}}), "donor 0 has 4",
                          "follower 1 has 8");
  }
  const std::vector<sharing_span> plan{{0, 1, 1}};
  shared_stack stack = make("GFG", plan);
  auto caches = stack.make_caches<float>(8);
  const fmat x = random_matrix(rng, 2, D);
  fmat out(2, D);
  const std::vector<std::int64_t> pos{0, 1};
  ATTNKIT_CHECK_INVALID(stack.forward_layer(1, view_of(x), pos, caches, view_of(out)),
                        "layer 1 run out of order");
  stack.forward_layer(0, view_of(x), pos, caches, view_of(out));
  ATTNKIT_CHECK_INVALID(stack.forward_layer(2, view_of(x), pos, caches, view_of(out)),
                        "layer 2 run out of order", "next layer is 1");
  const std::vector<std::int64_t> other{5, 6};
  ATTNKIT_CHECK_INVALID(stack.forward_layer(1, view_of(x), other, caches, view_of(out)),
                        "layer 1 is given other positions");
  std::swap(caches[1], caches[2]);
  ATTNKIT_CHECK_INVALID(stack.forward_layer(1, view_of(x), pos, caches, view_of(out)),
                        "layer 1 is a follower and needs a value_cache");
  std::swap(caches[1], caches[2]);
  stack.forward_layer(1, view_of(x), pos, caches, view_of(out));
  // A layer's own error names the layer: a follower cache of the wrong head count.
  auto wrong = stack.make_caches<float>(8);
  wrong[1] = value_cache<float>({.kv_heads = 3, .v_head_dim = 16, .capacity = 8});
  stack.forward_layer(0, view_of(x), pos, wrong, view_of(out));
  ATTNKIT_CHECK_INVALID(stack.forward_layer(1, view_of(x), pos, wrong, view_of(out)),
                        "shared_stack: layer 1: follower_layer::forward: cache has kv_heads=3");

  // A follower given a weights buffer of the wrong shape throws and leaves its cache unchanged.
  follower_layer fl(fx.followers.back().cfg, fx.followers.back().weights());
  value_cache<float> vc = fl.make_cache<float>(8);
  std::vector<float> p(2 * H * 3);
  ATTNKIT_CHECK_INVALID(fl.forward(view_of(x), pos, vc, tensor3_view<const float>(p.data(), {2, H, 3}),
                                   view_of(out)),
                        "hold 2 tokens", "cover 3 keys");
  CHECK(vc.size() == 0);
}

TEST_CASE("shared stack: the per-layer callback sees the residual stream after every layer",
          "[shared][stack]") {
  std::mt19937_64 rng(8);
  stack_fixture fx;
  const std::vector<sharing_span> plan{{0, 1, 1}};
  shared_stack stack(fx.layers(rng, "GFG", plan), plan);
  auto caches = stack.make_caches<float>(4);
  fmat x = random_matrix(rng, 3, D);
  const std::vector<std::int64_t> pos{0, 1, 2};
  std::vector<std::int64_t> seen;
  stack.forward(view_of(x), pos, caches, serial_executor{}, weights_form::automatic,
                [&](std::int64_t i, matrix_view<float> xs) {
                  seen.push_back(i);
                  CHECK(xs.data_handle() == x.data());
                });
  CHECK(seen == std::vector<std::int64_t>{0, 1, 2});
  for (const auto& c : caches) std::visit([](const auto& cc) { CHECK(cc.size() == 3); }, c);
}
