// A small serving loop over attnkit's public API: a page pool shared by every sequence, requests
// arriving and finishing, a system prompt whose pages every request shares (written once, then
// forked), chunked prefill mixed with decodes in one batch step, speculative decoding with
// rollback (truncate) of rejected draft tokens, and one forward_batch call per layer per step
// with a plan made by the step's first layer. The "model" is two GQA layers with random weights
// and a toy sampler: the point is the bookkeeping an engine does around attnkit.
//
// At the end every sequence is checked against a replay of its own tokens through the plain
// single-sequence forward path on contiguous caches: the batched, paged, shared, rolled-back run
// must give the same hidden states (to float round-off).
//   attnkit-serving-loop [--steps N] [--threads N] [--page-size N]
#include <attnkit/attention.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace ak = attnkit;

namespace {

constexpr std::int64_t D = 128, H = 8, HKV = 2, DH = 16, LAYERS = 2;

using mat = ak::row_matrix<float>;

mat random_mat(std::mt19937& rng, std::int64_t r, std::int64_t c, float s) {
  std::normal_distribution<float> nd(0.f, s);
  mat m(r, c);
  for (std::int64_t i = 0; i < m.size(); ++i) m.data()[i] = nd(rng);
  return m;
}

/// The toy model: LAYERS GQA layers on a residual stream, tokens embedded by a fixed table.
struct model {
  std::vector<mat> wq, wk, wv, wo;
  mat embed;
  std::vector<std::unique_ptr<ak::gqa_layer>> layers;
  explicit model(std::mt19937& rng) : embed(random_mat(rng, 256, D, 1.f)) {
    const float s = 1.f / std::sqrt(float(D));
    for (std::int64_t l = 0; l < LAYERS; ++l) {
      wq.push_back(random_mat(rng, H * DH, D, s));
      wk.push_back(random_mat(rng, HKV * DH, D, s));
      wv.push_back(random_mat(rng, HKV * DH, D, s));
      wo.push_back(random_mat(rng, D, H * DH, s));
    }
    for (std::int64_t l = 0; l < LAYERS; ++l) {
      const auto i = static_cast<std::size_t>(l);
      layers.push_back(std::make_unique<ak::gqa_layer>(
          ak::gqa_config{.model_dim = D, .heads = H, .kv_heads = HKV, .head_dim = DH,
                         .rope = {.theta = 10000.0}},
          ak::gqa_weights{ak::view_of(wq[i]), ak::view_of(wk[i]), ak::view_of(wv[i]),
                          ak::view_of(wo[i])}));
    }
  }
  /// x [T, D] for the given tokens.
  mat embed_tokens(const std::vector<int>& tokens) const {
    mat x(static_cast<std::int64_t>(tokens.size()), D);
    for (std::size_t i = 0; i < tokens.size(); ++i)
      x.row(static_cast<std::int64_t>(i)) = embed.row(tokens[i]);
    return x;
  }
  /// A deterministic toy "next token" from a hidden state.
  static int next_token(const float* h) {
    float best = -1e30f;
    int arg = 0;
    for (int i = 0; i < 64; ++i)
      if (h[i] > best) best = h[i], arg = i;
    return arg * 4 + 1;
  }
};

using paged = ak::paged_cache<float, ak::paged_dense>;

struct sequence {
  int id;
  std::vector<int> tokens;        // every token accepted so far (prompt + generated)
  std::vector<int> pending;       // tokens to feed this step (a prefill chunk, or a decode)
  std::int64_t prompt_left = 0;   // prompt tokens not yet prefilled
  std::int64_t to_generate = 0;
  std::vector<paged> caches;      // one per layer
  std::vector<mat> hidden;        // the last layer's output for every accepted token
};

struct options {
  int steps = 40, threads = 2;
  std::int64_t page_size = 16;
};

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) throw ak::invalid_argument("attnkit-serving-loop: " + a + " needs a value");
    const long v = std::stol(argv[++i]);
    if (a == "--steps") o.steps = static_cast<int>(v);
    else if (a == "--threads") o.threads = static_cast<int>(v);
    else if (a == "--page-size") o.page_size = v;
    else throw ak::invalid_argument("attnkit-serving-loop: unknown flag " + a);
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) try {
  const options o = parse(argc, argv);
  std::mt19937 rng(7);
  model m(rng);
  ak::thread_pool pool(o.threads);
  // One pool for every layer's pages: 2 x 2 heads x 16 dims per token and layer.
  ak::page_pool<float> pages({.num_pages = 4096, .page_size = o.page_size,
                              .token_elements = HKV * 2 * DH});
  const ak::paged_dense layout{HKV, DH, DH};

  // The system prompt: prefilled once into "root" caches whose pages every request shares.
  const std::vector<int> system_prompt = {3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38,
                                          32, 79, 50, 28, 84, 19, 71, 69, 39, 93, 75, 10, 58, 20,
                                          97, 49, 44, 59, 23, 7, 81, 64, 6, 28, 62, 8};
  std::vector<paged> root;
  mat root_hidden;
  {
    mat x = m.embed_tokens(system_prompt), y(x.rows(), D);
    std::vector<std::int64_t> pos(system_prompt.size());
    for (std::size_t i = 0; i < pos.size(); ++i) pos[i] = static_cast<std::int64_t>(i);
    for (std::int64_t l = 0; l < LAYERS; ++l) {
      root.emplace_back(pages, layout);
      m.layers[static_cast<std::size_t>(l)]->forward(ak::view_of(std::as_const(x)), pos, root.back(),
                                                     ak::view_of(y), pool);
      x += y;
    }
    root_hidden = x;
  }
  const std::int64_t shared_pages = pages.num_pages() - pages.free_pages();

  std::vector<std::unique_ptr<sequence>> live, finished;
  int next_id = 0;
  std::uniform_int_distribution<int> tok(0, 255), prompt_len(5, 70), gen_len(3, 12);
  std::int64_t decoded = 0, rolled_back = 0, chunks = 0;
  for (int step = 0; step < o.steps; ++step) {
    // Arrivals: a new request now and then, sharing the system prompt's pages.
    if (step % 3 == 0 && next_id < 10) {
      auto s = std::make_unique<sequence>();
      s->id = next_id++;
      s->tokens = system_prompt;
      const int n = prompt_len(rng);
      for (int i = 0; i < n; ++i) s->tokens.push_back(tok(rng));
      s->prompt_left = n;
      s->to_generate = gen_len(rng);
      for (auto& c : root) s->caches.push_back(c.fork());
      s->hidden.push_back(root_hidden);
      live.push_back(std::move(s));
    }
    if (live.empty()) continue;
    // What each sequence feeds this step: a prefill chunk of up to 16 prompt tokens, or its last
    // token plus (every other step) two speculative draft tokens.
    std::vector<std::int64_t> indptr = {0}, positions;
    std::vector<int> feed;
    std::vector<int> drafts(live.size(), 0);
    for (std::size_t i = 0; i < live.size(); ++i) {
      sequence& s = *live[i];
      const auto have = static_cast<std::int64_t>(s.caches[0].size());
      s.pending.clear();
      if (s.prompt_left > 0) {
        const std::int64_t n = std::min<std::int64_t>(16, s.prompt_left);
        for (std::int64_t t = 0; t < n; ++t)
          s.pending.push_back(s.tokens[static_cast<std::size_t>(have + t)]);
        ++chunks;
      } else {
        s.pending.push_back(s.tokens.back());
        if (step % 2 == 0) {  // a draft model's guesses, verified by this step
          drafts[i] = 2;
          s.pending.push_back(tok(rng)), s.pending.push_back(tok(rng));
        }
      }
      // The last accepted token is already cached once its step ran: a decode feeds the token
      // the previous step produced, at the next position.
      for (std::size_t t = 0; t < s.pending.size(); ++t)
        positions.push_back(have + static_cast<std::int64_t>(t));
      feed.insert(feed.end(), s.pending.begin(), s.pending.end());
      indptr.push_back(indptr.back() + static_cast<std::int64_t>(s.pending.size()));
    }
    // One model step: one forward_batch per layer, one plan for the step.
    mat x = m.embed_tokens(feed), y(x.rows(), D);
    ak::batch_plan plan;
    for (std::int64_t l = 0; l < LAYERS; ++l) {
      std::vector<paged*> caches;
      for (auto& s : live) caches.push_back(&s->caches[static_cast<std::size_t>(l)]);
      m.layers[static_cast<std::size_t>(l)]->forward_batch(
          ak::view_of(std::as_const(x)), positions, indptr, std::span(caches), ak::view_of(y), plan,
          pool);
      x += y;
    }
    // Accept or reject: a draft token is kept when it equals the model's own next token.
    std::vector<std::unique_ptr<sequence>> still;
    for (std::size_t i = 0; i < live.size(); ++i) {
      sequence& s = *live[i];
      const std::int64_t b = indptr[i], n = indptr[i + 1] - b;
      if (s.prompt_left > 0) {
        s.prompt_left -= n;
        s.hidden.push_back(x.middleRows(b, n));
        if (s.prompt_left == 0) s.tokens.push_back(model::next_token(x.row(b + n - 1).data()));
      } else {
        std::int64_t keep = 1;  // the fed token itself
        int next = model::next_token(x.row(b).data());
        for (int d = 0; d < drafts[i] && s.pending[static_cast<std::size_t>(1 + d)] == next; ++d) {
          ++keep;
          s.tokens.push_back(next);
          next = model::next_token(x.row(b + keep - 1).data());
        }
        if (keep < n) {  // rejected drafts leave every layer's cache
          for (auto& c : s.caches) c.truncate(c.size() - (n - keep));
          rolled_back += n - keep;
        }
        s.hidden.push_back(x.middleRows(b, keep));
        s.tokens.push_back(next);
        decoded += keep;
        --s.to_generate;
      }
      if (s.prompt_left == 0 && s.to_generate <= 0) {
        finished.push_back(std::move(live[i]));  // its caches kept for the replay check below
      } else {
        still.push_back(std::move(live[i]));
      }
    }
    live = std::move(still);
    std::printf("step %2d: %2zu live, %3lld tokens in the batch, pages in use %4lld of %lld\n", step,
                live.size(), (long long)indptr.back(),
                (long long)(pages.num_pages() - pages.free_pages()), (long long)pages.num_pages());
  }

  // Replay: each finished sequence's cached tokens through single-sequence forward calls on
  // contiguous caches must give the hidden states the serving loop saw.
  double worst = 0;
  for (const auto& s : finished) {
    const std::int64_t n = s->caches[0].size();
    std::vector<int> toks(s->tokens.begin(), s->tokens.begin() + n);
    mat x = m.embed_tokens(toks), y(n, D);
    std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) pos[static_cast<std::size_t>(i)] = i;
    for (std::int64_t l = 0; l < LAYERS; ++l) {
      auto cache = m.layers[static_cast<std::size_t>(l)]->make_cache<float>(n);
      m.layers[static_cast<std::size_t>(l)]->forward(ak::view_of(std::as_const(x)), pos, cache,
                                                     ak::view_of(y), pool);
      x += y;
    }
    mat seen(n, D);
    std::int64_t r = 0;
    for (const auto& hpart : s->hidden) seen.middleRows(r, hpart.rows()) = hpart, r += hpart.rows();
    worst = std::max<double>(worst, (seen - x).cwiseAbs().maxCoeff() / x.cwiseAbs().maxCoeff());
  }
  std::printf("\n%zu requests finished, %zu live; %lld tokens decoded, %lld draft tokens rolled "
              "back, %lld prefill chunks\n",
              finished.size(), live.size(), (long long)decoded, (long long)rolled_back,
              (long long)chunks);
  std::printf("system prompt: %zu tokens in %lld pages (%lld layers), written once, shared by "
              "every request\n",
              system_prompt.size(), (long long)shared_pages, (long long)LAYERS);
  std::printf("replay through single-sequence calls: max relative difference %.2e\n", worst);
  finished.clear(), live.clear(), root.clear();
  std::printf("pages in use after every sequence ended: %lld\n",
              (long long)(pages.num_pages() - pages.free_pages()));
  if (worst > 1e-4 || pages.free_pages() != pages.num_pages()) {
    std::fprintf(stderr, "attnkit-serving-loop: replay mismatch or leaked pages\n");
    return 1;
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 2;
}
