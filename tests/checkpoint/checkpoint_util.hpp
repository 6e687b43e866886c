#pragma once
// Shared by the checkpoint tests: paths into the source tree, temporary folders, substring
// matchers for Catch2 v2 and v3, and the transformers references of tests/data.
#include <attnkit/io/safetensors.hpp>

#include <filesystem>
#include <random>
#include <string>

#include "catch_compat.hpp"

/// A path under the source tree (tests/data, models).
inline std::filesystem::path source_path(const std::string& rel) {
  return std::filesystem::path(ATTNKIT_SOURCE_DIR) / rel;
}

/// A fresh temporary folder, removed with its contents at scope exit.
struct test_dir {
  std::filesystem::path path;
  explicit test_dir(const std::string& name) {
    path = std::filesystem::temp_directory_path() /
           ("attnkit-" + name + "-" + std::to_string(std::random_device{}()));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  test_dir(const test_dir&) = delete;
  test_dir& operator=(const test_dir&) = delete;
  ~test_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

inline auto contains(const std::string& s) {
#if __has_include(<catch2/catch_test_macros.hpp>)
  return Catch::Matchers::ContainsSubstring(s);
#else
  return Catch::Matchers::Contains(s);
#endif
}
