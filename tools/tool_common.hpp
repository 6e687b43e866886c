#pragma once
// What the command-line tools share: flag reading with clear errors, the top-level error
// handler, and a key/value summary printed as aligned text or JSON.
#include <attnkit/core/error.hpp>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace tools {

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

inline std::int64_t parse_integer(const std::string& flag, const std::string& v, std::int64_t min,
                                  std::int64_t max = INT64_MAX) {
  std::size_t used = 0;
  long long x = 0;
  try {
    x = std::stoll(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != v.size() || v.empty() || x < min || x > max)
    throw attnkit::invalid_argument(flag + " needs an integer in [" + std::to_string(min) + ", " +
                                    std::to_string(max) + "], got '" + v + "'");
  return x;
}

inline double parse_number(const std::string& flag, const std::string& v) {
  std::size_t used = 0;
  double x = 0;
  try {
    x = std::stod(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != v.size() || v.empty()) throw attnkit::invalid_argument(flag + " needs a number, got '" + v + "'");
  return x;
}

/// Walks argv: next() advances, is(flag) matches, value() takes the flag's argument.
class arg_reader {
 public:
  arg_reader(std::string tool, int argc, char** argv) : tool_(std::move(tool)), argc_(argc), argv_(argv) {}
  bool next() { return ++i_ < argc_; }
  const std::string current() const { return argv_[i_]; }
  bool is(const char* flag) const { return current() == flag; }
  bool positional() const { return current().rfind("--", 0) != 0; }
  std::string value() {
    const std::string flag = current();
    if (i_ + 1 >= argc_) fail(flag + " needs a value");
    return argv_[++i_];
  }
  std::int64_t integer(std::int64_t min, std::int64_t max = INT64_MAX) {
    const std::string flag = current();
    return parse_integer(flag, value(), min, max);
  }
  double number() {
    const std::string flag = current();
    return parse_number(flag, value());
  }
  [[noreturn]] void fail(const std::string& why) const { throw attnkit::invalid_argument(tool_ + ": " + why); }
  [[noreturn]] void unknown(const char* usage) const {
    if (current() == "--help" || current() == "-h") {
      std::cout << usage;
      std::exit(0);
    }
    fail("unknown argument '" + current() + "'\n" + usage);
  }

 private:
  std::string tool_;
  int argc_;
  char** argv_;
  int i_ = 0;
};

/// Ordered key/value results: aligned "key  value" lines, or one JSON object.
class summary {
 public:
  void add(const std::string& key, const std::string& v) { items_.push_back({key, v}); }
  void add(const std::string& key, const char* v) { items_.push_back({key, std::string(v)}); }
  void add(const std::string& key, std::int64_t v) { items_.push_back({key, v}); }
  /// A number with `digits` decimals (null when not finite).
  void add(const std::string& key, double v, int digits) {
    if (!std::isfinite(v)) return items_.push_back({key, nullptr});
    std::ostringstream s;
    s << std::setprecision(digits) << std::fixed << v;
    items_.push_back({key, nlohmann::json::parse(s.str())});
  }
  void print(std::ostream& out, bool json) const {
    if (json) {
      nlohmann::ordered_json j;
      for (const auto& [k, v] : items_) j[k] = v;
      out << j.dump(2) << "\n";
      return;
    }
    std::size_t w = 0;
    for (const auto& [k, v] : items_) w = std::max(w, k.size());
    for (const auto& [k, v] : items_)
      out << std::left << std::setw(static_cast<int>(w) + 2) << k
          << (v.is_string() ? v.get<std::string>() : v.dump()) << "\n";
  }

 private:
  std::vector<std::pair<std::string, nlohmann::json>> items_;
};

/// A token file as sequences of `row_length` tokens (0: the whole file is one sequence; a
/// partial last sequence is dropped). format: "bytes" (one token per byte), "u32" (little-endian
/// uint32 ids) or "" (bytes when vocab <= 256). Every id is checked against the vocabulary.
inline std::vector<std::vector<std::int32_t>> read_token_rows(const std::filesystem::path& file,
                                                              std::string format, std::int64_t row_length,
                                                              std::int64_t vocab) {
  std::ifstream in(file, std::ios::binary);
  if (!in.good()) throw attnkit::invalid_argument("cannot open token file '" + file.string() + "'");
  const std::vector<unsigned char> bytes((std::istreambuf_iterator<char>(in)), {});
  if (format.empty()) format = vocab <= 256 ? "bytes" : "u32";
  if (format != "bytes" && format != "u32")
    throw attnkit::invalid_argument("token format must be bytes or u32, got '" + format + "'");
  const std::size_t width = format == "bytes" ? 1 : 4;
  if (bytes.size() % width != 0)
    throw attnkit::invalid_argument("'" + file.string() + "' has " + std::to_string(bytes.size()) +
                                    " bytes, not a whole number of uint32 tokens");
  const std::int64_t n = static_cast<std::int64_t>(bytes.size() / width), len = row_length > 0 ? row_length : n;
  std::vector<std::vector<std::int32_t>> rows;
  for (std::int64_t r = 0; len > 0 && (r + 1) * len <= n; ++r) {
    auto& row = rows.emplace_back();
    for (std::int64_t i = r * len; i < (r + 1) * len; ++i) {
      std::uint32_t t = 0;
      for (std::size_t b = 0; b < width; ++b)
        t |= static_cast<std::uint32_t>(bytes[static_cast<std::size_t>(i) * width + b]) << (8 * b);
      if (t >= static_cast<std::uint64_t>(vocab))
        throw attnkit::invalid_argument("token " + std::to_string(i) + " of '" + file.string() + "' is " +
                                        std::to_string(t) + ", outside the vocabulary of " + std::to_string(vocab));
      row.push_back(static_cast<std::int32_t>(t));
    }
  }
  return rows;
}

/// Runs a tool's body: an attnkit::invalid_argument or any other exception is printed and
/// exits 2, never a crash.
template <class F>
int run_main(F&& body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 2;
  }
}

}  // namespace tools
