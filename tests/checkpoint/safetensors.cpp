// safetensors reading and writing: round trips of every stored dtype, single file and shards,
// zero-copy f32, and every malformed-file case named in the checkpoint issue.
#include <attnkit/io/hf_config.hpp>
#include <attnkit/io/safetensors.hpp>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "catch_compat.hpp"
#include "checkpoint_util.hpp"

namespace ak = attnkit;
namespace io = attnkit::io;
namespace fs = std::filesystem;

namespace {

/// Writes a raw safetensors file: header length (declared_length, or the header's), header, data.
void write_raw(const fs::path& p, const std::string& header, const std::vector<char>& data,
               std::uint64_t declared_length = UINT64_MAX) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  const std::uint64_t n = declared_length == UINT64_MAX ? header.size() : declared_length;
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
}

/// The message of the attnkit::invalid_argument that f throws (fails the test if none).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const ak::invalid_argument& e) {
    return e.what();
  }
  FAIL("no attnkit::invalid_argument was thrown");
  return {};
}

}  // namespace

TEST_CASE("safetensors: written f32, bf16 and f16 tensors read back, single file and sharded") {
  const test_dir dir("st-roundtrip");
  std::mt19937_64 rng(3);
  std::normal_distribution<float> normal;
  std::vector<float> a(6 * 5), b(7), c(3 * 2 * 4), scalar{2.5f};
  for (auto* v : {&a, &b, &c}) for (auto& x : *v) x = normal(rng);
  for (const std::uint64_t shard : {std::uint64_t(1) << 30, std::uint64_t(64)}) {
    const fs::path out = dir.path / ("shard" + std::to_string(shard));
    io::checkpoint_writer w(out, shard);
    w.add("a", a, {6, 5}, io::dtype::f32);
    w.add("b", b, {7}, io::dtype::bf16);
    w.add("c", c, {3, 2, 4}, io::dtype::f16);
    w.add("scalar", scalar, {}, io::dtype::f32);
    w.add("empty", {}, {0, 4}, io::dtype::bf16);
    const auto files = w.finish();
    CHECK(fs::exists(out / "model.safetensors.index.json") == (shard == 64));
    // 64-byte shards: [a], [b c], [scalar empty] and the index.
    CHECK(files.size() == (shard == 64 ? 4u : 1u));

    const io::checkpoint ck(out);
    CHECK(ck.names().size() == 5);
    const auto ra = ck.load("a", {6, 5});
    CHECK(ra.borrowed());  // f32, 8-byte aligned data area: zero copy
    for (std::size_t i = 0; i < a.size(); ++i) CHECK(ra.data()[i] == a[i]);
    const auto rb = ck.load("b", {7});
    for (std::size_t i = 0; i < b.size(); ++i)
      CHECK(rb.data()[i] == static_cast<float>(ak::from_float<ak::bf16>(b[i])));
    const auto rc = ck.load("c");
    CHECK(rc.shape() == std::vector<std::int64_t>{3, 2, 4});
    for (std::size_t i = 0; i < c.size(); ++i)
      CHECK(rc.data()[i] == static_cast<float>(ak::from_float<ak::half>(c[i])));
    CHECK(ck.load("scalar").data()[0] == 2.5f);
    CHECK(ck.load("empty").elements() == 0);
    CHECK(ck.info("b").type == io::dtype::bf16);
    CHECK(ck.load_optional("absent").empty());
  }
}

TEST_CASE("safetensors: 64-bit offsets and sizes are checked without overflow") {
  const test_dir dir("st-64bit");
  // Offsets past 4 GiB in a small file: rejected as outside the data area, not wrapped.
  write_raw(dir.path / "big.safetensors",
            R"({"w":{"dtype":"F32","shape":[1073741825],"data_offsets":[0,4294967300]}})", {});
  CHECK_THAT(error_of([&] { io::safetensors_file f(dir.path / "big.safetensors"); }),
             contains("tensor 'w'") && contains("4294967300") &&
                 contains("big.safetensors"));
  // A shape whose element count overflows int64.
  write_raw(dir.path / "overflow.safetensors",
            R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", {});
  CHECK_THAT(error_of([&] { io::safetensors_file f(dir.path / "overflow.safetensors"); }),
             contains("overflows int64"));
  // A header length near 2^64 must not wrap the bounds check.
  write_raw(dir.path / "len.safetensors", "{}", {}, ~std::uint64_t(0) - 4);
  CHECK_THAT(error_of([&] { io::safetensors_file f(dir.path / "len.safetensors"); }),
             contains("truncated or corrupt"));
}

TEST_CASE("safetensors: malformed files get an error naming the file and the tensor") {
  const test_dir dir("st-malformed");
  const std::vector<char> data16(16);
  struct bad_file {
    const char* name;
    std::string header;
    std::vector<char> data;
    std::uint64_t declared;
    const char* expect;
  };
  const std::vector<bad_file> cases = {
      {"short", "", {}, UINT64_MAX, "not even the 8-byte header length"},
      {"header-past-end", R"({"w":{}})", {}, 4096, "header length 4096"},
      {"not-json", "{\"w\": [", data16, UINT64_MAX, "not valid JSON"},
      {"not-object", "[1,2]", data16, UINT64_MAX, "not a JSON object"},
      {"no-dtype", R"({"w":{"shape":[4],"data_offsets":[0,16]}})", data16, UINT64_MAX, "tensor 'w': no dtype"},
      {"bad-dtype", R"({"w":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,16]}})", data16, UINT64_MAX,
       "unsupported dtype 'F8_E4M3'"},
      {"negative-shape", R"({"w":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})", data16, UINT64_MAX,
       "non-integer or negative"},
      {"offsets-past-end", R"({"w":{"dtype":"F32","shape":[8],"data_offsets":[0,32]}})", data16, UINT64_MAX,
       "outside the data area of 16 bytes"},
      {"size-mismatch", R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", data16, UINT64_MAX,
       "needs 12 bytes but data_offsets span 16"},
      {"reversed-offsets", R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", data16, UINT64_MAX,
       "tensor 'w': data_offsets [8, 0)"},
      {"overlap",
       R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},"v":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
       data16, UINT64_MAX, "overlap"},
  };
  for (const auto& c : cases) {
    SECTION(c.name) {
      const fs::path p = dir.path / (std::string(c.name) + ".safetensors");
      if (std::string(c.name) == "short") {
        std::ofstream(p, std::ios::binary) << "abc";
      } else {
        write_raw(p, c.header, c.data, c.declared);
      }
      const std::string msg = error_of([&] { io::checkpoint ck(p); });
      CHECK_THAT(msg, contains(c.expect) && contains(p.filename().string()));
    }
  }
}

TEST_CASE("checkpoint: missing tensors, wrong shapes and dtypes, bad indexes are named") {
  const test_dir dir("ck-errors");
  {
    io::checkpoint_writer w(dir.path / "one");
    const std::vector<float> x(6, 1.f);
    w.add("model.norm.weight", x, {2, 3}, io::dtype::bf16);
    w.finish();
  }
  const io::checkpoint ck(dir.path / "one");
  CHECK_THAT(error_of([&] { (void)ck.load("lm_head.weight"); }),
             contains("tensor 'lm_head.weight' is missing") && contains("model.safetensors"));
  CHECK_THAT(error_of([&] { (void)ck.load("model.norm.weight", {6}); }),
             contains("'model.norm.weight'") && contains("shape [2, 3] but [6] was expected"));
  // An integer tensor is not weights.
  write_raw(dir.path / "ints.safetensors", R"({"ids":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}})",
            std::vector<char>(16));
  const io::checkpoint ints(dir.path / "ints.safetensors");
  CHECK_THAT(error_of([&] { (void)ints.load("ids"); }), contains("'ids'") && contains("I64"));

  // Index: a tensor its shard does not hold; a shard outside the folder; a missing shard.
  fs::create_directories(dir.path / "idx");
  fs::copy_file(dir.path / "one" / "model.safetensors", dir.path / "idx" / "model-00001-of-00001.safetensors");
  auto index = [&](const std::string& map) {
    std::ofstream(dir.path / "idx" / "model.safetensors.index.json") << R"({"metadata":{},"weight_map":)" << map << "}";
  };
  index(R"({"model.norm.weight":"model-00001-of-00001.safetensors","lm_head.weight":"model-00001-of-00001.safetensors"})");
  CHECK_THAT(error_of([&] { io::checkpoint c(dir.path / "idx"); }),
             contains("'lm_head.weight'") && contains("that shard does not hold it"));
  index(R"({"model.norm.weight":"../one/model.safetensors"})");
  CHECK_THAT(error_of([&] { io::checkpoint c(dir.path / "idx"); }), contains("outside the checkpoint folder"));
  index(R"({"model.norm.weight":"model-00002-of-00002.safetensors"})");
  CHECK_THAT(error_of([&] { io::checkpoint c(dir.path / "idx"); }),
             contains("cannot open") && contains("model-00002-of-00002.safetensors"));
  index(R"({"model.norm.weight": 3})");
  CHECK_THAT(error_of([&] { io::checkpoint c(dir.path / "idx"); }), contains("non-string"));
  CHECK_THAT(error_of([&] { io::checkpoint c(dir.path / "nothing-here"); }), contains("does not exist"));
}

TEST_CASE("config: both transformers spellings, every family, and unsupported models named") {
  const auto tiny = io::read_model_config(source_path("models/tiny-llama-bytes"));
  CHECK(tiny.family == io::model_family::llama);
  CHECK(tiny.layers == 4);
  CHECK(tiny.gqa.size() == 4);
  CHECK(tiny.gqa[0].kv_heads == 2);
  CHECK(tiny.gqa[0].head_dim == 64);
  CHECK(tiny.gqa[0].rope.theta == 10000.0);
  CHECK(tiny.rms_eps == 1e-5f);

  // The same model in the 4.x and 5.x spellings parses to the same rope.
  const auto v5 = nlohmann::json::parse(R"({"model_type":"llama","vocab_size":8,"hidden_size":64,
    "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":4,"max_position_embeddings":64,
    "rope_parameters":{"rope_type":"yarn","rope_theta":5000.0,"factor":4.0,"original_max_position_embeddings":16,
    "beta_fast":8.0,"partial_rotary_factor":0.5}})");
  const auto v4 = nlohmann::json::parse(R"({"model_type":"llama","vocab_size":8,"hidden_size":64,
    "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":4,"max_position_embeddings":64,
    "rope_theta":5000.0,"partial_rotary_factor":0.5,
    "rope_scaling":{"type":"yarn","factor":4.0,"original_max_position_embeddings":16,"beta_fast":8.0}})");
  for (const auto& j : {v4, v5}) {
    const auto m = io::parse_model_config(j, "inline");
    const auto& r = m.gqa[0].rope;
    CHECK(r.theta == 5000.0);
    CHECK(r.rotary_dim == 8);
    CHECK(r.scaling.type == ak::rope_scaling_type::yarn);
    CHECK(r.scaling.factor == 4.0);
    CHECK(r.scaling.original_context == 16);
    CHECK(r.scaling.beta_fast == 8.0);
    CHECK(r.scaling.beta_slow == 1.0);
  }

  // Every family the tests ship, as written by transformers (4.x and 5.x spellings).
  for (const char* f : {"llama", "mistral", "qwen2", "qwen3", "deepseek_v2", "deepseek_v3"}) {
    const auto m = io::read_model_config(source_path("tests/data/checkpoints") / f);
    CHECK(std::string(io::to_string(m.family)) == f);
    CHECK(m.is_mla() == (std::string(f).rfind("deepseek", 0) == 0));
  }
  const auto qwen2 = io::read_model_config(source_path("tests/data/checkpoints/qwen2"));
  CHECK((qwen2.qkv_bias && !qwen2.o_bias));
  CHECK(io::read_model_config(source_path("tests/data/checkpoints/qwen3")).qk_norm);
  const auto v3 = io::read_model_config(source_path("tests/data/checkpoints/deepseek_v3"));
  CHECK(v3.mla[0].rope.layout == ak::rope_layout::interleaved);
  CHECK(v3.mla[0].q_lora_rank == 32);
  CHECK(v3.mla[0].mscale == Approx(ak::yarn_mscale(8.0, 0.5)).epsilon(1e-7));

  auto with = [&](const char* key, nlohmann::json v) {
    auto j = v5;
    j[key] = std::move(v);
    return j;
  };
  struct bad {
    nlohmann::json j;
    const char* expect;
  };
  const std::vector<bad> cases = {
      {with("model_type", "gpt2"), "model_type 'gpt2' is not supported"},
      {with("hidden_act", "gelu"), "hidden_act 'gelu'"},
      {with("rope_parameters", {{"rope_type", "longrope"}}), "rope type 'longrope'"},
      {with("num_key_value_heads", 3), "multiple of num_key_value_heads=3"},
      {with("hidden_size", "64"), "field 'hidden_size' must be an integer"},
      {with("rope_parameters", {{"rope_type", "llama3"}, {"factor", 8.0}}), "'low_freq_factor' is missing"},
      {with("rope_parameters", {{"rope_type", "linear"}, {"factor", -1.0}}), "factor must be finite and > 0"},
  };
  for (const auto& c : cases)
    CHECK_THAT(error_of([&] { (void)io::parse_model_config(c.j, "cfg.json"); }),
               contains(c.expect) && contains("cfg.json"));
  auto no_vocab = v5;
  no_vocab.erase("vocab_size");
  CHECK_THAT(error_of([&] { (void)io::parse_model_config(no_vocab, "cfg.json"); }),
             contains("'vocab_size' is missing"));
  std::ifstream in(source_path("tests/data/checkpoints/deepseek_v3/config.json"));
  auto ds = nlohmann::json::parse(in);
  ds["first_k_dense_replace"] = 1;
  CHECK_THAT(error_of([&] { (void)io::parse_model_config(ds, "ds.json"); }),
             contains("mixture-of-experts") && contains("layers 1..1"));
}
