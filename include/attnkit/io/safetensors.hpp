#pragma once
// safetensors checkpoints, read memory-mapped and written shard by shard. An optional component
// (needs nlohmann/json, Debian's nlohmann-json3-dev); the core headers never include it.
//
// Format (huggingface/safetensors): an unsigned little-endian 64-bit header length N, N bytes
// of JSON {name: {"dtype", "shape", "data_offsets": [begin, end)}, "__metadata__": {str: str}},
// then the data area; offsets are relative to the data area. A sharded checkpoint is a folder
// with model.safetensors.index.json {"weight_map": {name: shard file}}.
//
// Every offset, shape and size is checked against the file before any byte is read, in 64-bit
// arithmetic that cannot overflow: a truncated or hostile file gets an attnkit::invalid_argument
// naming the file and the tensor, never a read out of bounds.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/storage.hpp"
#include "../core/view.hpp"

static_assert(std::endian::native == std::endian::little,
              "attnkit/io: safetensors data is little-endian; big-endian hosts are not supported");

namespace attnkit::io {

namespace fs = std::filesystem;

/// The safetensors element types.
enum class dtype { f64, f32, f16, bf16, i64, i32, i16, i8, u8, boolean };

/// "F32", "BF16", ... as the header spells them.
inline const char* to_string(dtype t) {
  constexpr const char* names[] = {"F64", "F32", "F16", "BF16", "I64",
                                   "I32", "I16", "I8",  "U8",   "BOOL"};
  return names[static_cast<int>(t)];
}
/// Bytes per element.
inline std::int64_t size_of(dtype t) {
  constexpr std::int64_t sizes[] = {8, 4, 2, 2, 8, 4, 2, 1, 1, 1};
  return sizes[static_cast<int>(t)];
}
/// The dtype named `s` in a safetensors header, or false.
inline bool parse_dtype(std::string_view s, dtype& out) {
  for (int i = 0; i <= static_cast<int>(dtype::boolean); ++i)
    if (s == to_string(static_cast<dtype>(i))) return out = static_cast<dtype>(i), true;
  return false;
}

/// One tensor of a file: where its bytes are in the data area and what they hold.
struct tensor_info {
  std::string name;                 ///< the tensor's key in the header
  dtype type = dtype::f32;          ///< element type as stored
  std::vector<std::int64_t> shape;  ///< dimensions, outermost first (empty: a scalar)
  std::uint64_t begin = 0;          ///< first byte in the data area
  std::uint64_t end = 0;            ///< one past the last byte in the data area
  /// Elements: the product of the shape.
  std::int64_t elements() const {
    std::int64_t n = 1;
    for (auto e : shape) n *= e;  // checked when the header is read
    return n;
  }
};

namespace detail {

using ::attnkit::detail::require;
using ::attnkit::detail::throw_invalid;

/// A read-only memory map of a whole file (closed on destruction; never copied).
class mapped_file {
 public:
  explicit mapped_file(const fs::path& path) : path_(path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    require(fd >= 0, "safetensors: cannot open '", path.string(), "': ", std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      throw_invalid("safetensors: '", path.string(), "' is not a regular file");
    }
    size_ = static_cast<std::uint64_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      ::close(fd);
      require(p != MAP_FAILED, "safetensors: cannot map '", path.string(), "': ",
              std::strerror(errno));
      data_ = static_cast<const std::byte*>(p);
    } else {
      ::close(fd);
    }
  }
  mapped_file(const mapped_file&) = delete;
  mapped_file& operator=(const mapped_file&) = delete;
  ~mapped_file() {
    if (data_) ::munmap(const_cast<std::byte*>(data_), size_);
  }
  const std::byte* data() const { return data_; }
  std::uint64_t size() const { return size_; }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
  const std::byte* data_ = nullptr;
  std::uint64_t size_ = 0;
};

/// bf16 / f16 / f32 / f64 elements -> float.
inline void convert_to_float(dtype t, const std::byte* src, std::int64_t n, float* dst) {
  switch (t) {
    case dtype::f32: std::memcpy(dst, src, static_cast<std::size_t>(n) * 4); return;
    case dtype::bf16:
      for (std::int64_t i = 0; i < n; ++i) {
        std::uint16_t b;
        std::memcpy(&b, src + 2 * i, 2);
        const std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
        std::memcpy(dst + i, &u, 4);
      }
      return;
    case dtype::f16:
      for (std::int64_t i = 0; i < n; ++i) {
        std::uint16_t b;
        std::memcpy(&b, src + 2 * i, 2);
        dst[i] = static_cast<float>(Eigen::numext::bit_cast<half>(b));
      }
      return;
    case dtype::f64:
      for (std::int64_t i = 0; i < n; ++i) {
        double d;
        std::memcpy(&d, src + 8 * i, 8);
        dst[i] = static_cast<float>(d);
      }
      return;
    default: throw_invalid("safetensors: dtype ", to_string(t), " is not a floating-point type");
  }
}

}  // namespace detail

/// A tensor's elements as float: borrowed from the mapped file where it already holds aligned
/// f32 (zero copy; the tensor keeps the mapping alive), converted into owned memory otherwise.
/// Move-only; views of it stay valid while it lives.
class float_tensor {
 public:
  float_tensor() = default;
  /// Borrows `borrowed` [product of shape], kept alive by `owner` (the file mapping).
  float_tensor(std::vector<std::int64_t> shape, const float* borrowed, std::shared_ptr<const void> owner)
      : shape_(std::move(shape)), owner_(std::move(owner)), data_(borrowed) {}
  /// Owns `owned` [product of shape].
  float_tensor(std::vector<std::int64_t> shape, std::vector<float> owned)
      : shape_(std::move(shape)), owned_(std::move(owned)), data_(owned_.data()) {}
  /// Takes o's data; o is left empty.
  float_tensor(float_tensor&& o) noexcept { *this = std::move(o); }
  /// Takes o's data; o is left empty.
  float_tensor& operator=(float_tensor&& o) noexcept {
    const bool borrowed = o.borrowed(), empty = o.empty();
    shape_ = std::move(o.shape_);
    owned_ = std::move(o.owned_);
    owner_ = std::move(o.owner_);
    data_ = empty ? nullptr : borrowed ? o.data_ : owned_.data();
    o.data_ = nullptr;
    return *this;
  }
  float_tensor(const float_tensor&) = delete;
  float_tensor& operator=(const float_tensor&) = delete;

  bool empty() const { return data_ == nullptr; }  ///< holds no tensor
  /// Points into the mapped file (zero copy) rather than owned memory.
  bool borrowed() const { return data_ != nullptr && owned_.empty(); }
  const std::vector<std::int64_t>& shape() const { return shape_; }  ///< dimensions
  /// Elements (0 when empty).
  std::int64_t elements() const {
    std::int64_t n = 1;
    for (auto e : shape_) n *= e;
    return data_ ? n : 0;
  }
  const float* data() const { return data_; }  ///< the elements [elements()], row-major
  /// The elements as a span [elements()].
  std::span<const float> span() const { return {data_, static_cast<std::size_t>(elements())}; }
  /// The tensor as a row-major matrix (1-D: one row).
  matrix_view<const float> matrix() const {
    if (empty()) return {};
    if (shape_.size() <= 1) return matrix_view<const float>(data_, {1, elements()});
    return matrix_view<const float>(data_, {shape_[0], elements() / std::max<std::int64_t>(shape_[0], 1)});
  }

 private:
  std::vector<std::int64_t> shape_;
  std::vector<float> owned_;
  std::shared_ptr<const void> owner_;  // what a borrowed tensor points into
  const float* data_ = nullptr;
};

/// One .safetensors file, memory-mapped, its header parsed and validated.
class safetensors_file {
 public:
  /// Maps `path` and validates its header (JSON, dtypes, shapes, byte ranges inside the file
  /// and not overlapping); attnkit::invalid_argument naming the file otherwise.
  explicit safetensors_file(const fs::path& path) : map_(std::make_shared<const detail::mapped_file>(path)) {
    using detail::require;
    const std::string file = path.string();
    const std::uint64_t size = map_->size();
    require(size >= 8, "safetensors: '", file, "' is truncated: ", size,
            " bytes, not even the 8-byte header length");
    std::uint64_t n = 0;
    std::memcpy(&n, map_->data(), 8);
    // The format caps the header at 100 MB; anything larger is a corrupt length.
    require(n <= 100'000'000 && n <= size - 8, "safetensors: '", file, "' is truncated or corrupt: ",
            "header length ", n, " but the file has ", size, " bytes");
    data_offset_ = 8 + n;
    data_size_ = size - data_offset_;
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(reinterpret_cast<const char*>(map_->data()) + 8,
                                     reinterpret_cast<const char*>(map_->data()) + 8 + n);
    } catch (const nlohmann::json::exception& e) {
      detail::throw_invalid("safetensors: '", file, "': header is not valid JSON (", e.what(), ")");
    }
    require(header.is_object(), "safetensors: '", file, "': header is not a JSON object");
    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") {
        require(entry.is_object(), "safetensors: '", file, "': __metadata__ is not an object");
        for (const auto& [k, v] : entry.items())
          if (v.is_string()) metadata_[k] = v.get<std::string>();
        continue;
      }
      tensors_.push_back(parse_entry(file, name, entry));
    }
    std::sort(tensors_.begin(), tensors_.end(),
              [](const tensor_info& a, const tensor_info& b) { return a.begin < b.begin; });
    for (std::size_t i = 1; i < tensors_.size(); ++i)
      require(tensors_[i].begin >= tensors_[i - 1].end, "safetensors: '", file, "': tensors '",
              tensors_[i - 1].name, "' and '", tensors_[i].name, "' overlap");
    for (std::size_t i = 0; i < tensors_.size(); ++i) index_[tensors_[i].name] = i;
  }

  const fs::path& path() const { return map_->path(); }  ///< the file
  /// The header's __metadata__ string entries.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// Every tensor, in data-area order.
  const std::vector<tensor_info>& tensors() const { return tensors_; }
  /// The tensor called `name`, or nullptr.
  const tensor_info* find(std::string_view name) const {
    const auto it = index_.find(std::string(name));
    return it == index_.end() ? nullptr : &tensors_[it->second];
  }
  /// The tensor called `name`; attnkit::invalid_argument naming the file when absent.
  const tensor_info& info(std::string_view name) const {
    const tensor_info* t = find(name);
    if (!t) detail::throw_invalid("safetensors: '", path().string(), "' has no tensor '", name, "'");
    return *t;
  }
  /// The raw little-endian bytes of a tensor of this file (valid while the file or a tensor
  /// borrowed from it lives).
  std::span<const std::byte> bytes(const tensor_info& t) const {
    return {map_->data() + data_offset_ + t.begin, static_cast<std::size_t>(t.end - t.begin)};
  }
  /// The mapping, shared with the tensors borrowed from it.
  std::shared_ptr<const void> mapping() const { return map_; }
  /// A hint that the tensor's bytes are not needed soon: its whole pages leave this process's
  /// resident memory (they stay in the page cache and are read again if touched). What keeps a
  /// pass over a large checkpoint, a layer at a time, at one layer's memory.
  void release(const tensor_info& t) const {
    const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
    const auto lo = reinterpret_cast<std::uintptr_t>(map_->data() + data_offset_ + t.begin);
    const auto hi = reinterpret_cast<std::uintptr_t>(map_->data() + data_offset_ + t.end);
    const std::uintptr_t first = (lo + page - 1) / page * page, last = hi / page * page;
    if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
  }

 private:
  tensor_info parse_entry(const std::string& file, const std::string& name,
                          const nlohmann::json& e) const {
    using detail::require;
    auto bad = [&](const auto&... why) {
      detail::throw_invalid("safetensors: '", file, "': tensor '", name, "': ", why...);
    };
    if (!e.is_object()) bad("entry is not an object");
    tensor_info t;
    t.name = name;
    const auto dt = e.find("dtype");
    if (dt == e.end() || !dt->is_string()) bad("no dtype string");
    if (!parse_dtype(dt->get<std::string>(), t.type))
      bad("unsupported dtype '", dt->get<std::string>(), "'");
    const auto sh = e.find("shape");
    if (sh == e.end() || !sh->is_array()) bad("no shape array");
    std::int64_t elements = 1;
    for (const auto& d : *sh) {
      if (!d.is_number_unsigned()) bad("shape ", sh->dump(), " holds a non-integer or negative extent");
      const auto v = d.get<std::uint64_t>();
      if (v > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) bad("extent overflows int64");
      t.shape.push_back(static_cast<std::int64_t>(v));
      elements = ::attnkit::detail::checked_mul(elements, t.shape.back(), "safetensors: element count");
    }
    const auto off = e.find("data_offsets");
    if (off == e.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
        !(*off)[1].is_number_unsigned())
      bad("data_offsets is not a pair of non-negative integers");
    t.begin = (*off)[0].get<std::uint64_t>();
    t.end = (*off)[1].get<std::uint64_t>();
    if (t.begin > t.end || t.end > data_size_)
      bad("data_offsets [", t.begin, ", ", t.end, ") lie outside the data area of ", data_size_,
          " bytes (truncated file?)");
    const std::int64_t bytes = ::attnkit::detail::checked_mul(elements, size_of(t.type), "safetensors: tensor bytes");
    if (t.end - t.begin != static_cast<std::uint64_t>(bytes))
      bad("shape ", sh->dump(), " of ", to_string(t.type), " needs ", bytes, " bytes but data_offsets span ",
          t.end - t.begin);
    return t;
  }

  std::shared_ptr<const detail::mapped_file> map_;
  std::uint64_t data_offset_ = 0, data_size_ = 0;
  std::vector<tensor_info> tensors_;
  std::map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

/// A checkpoint: one .safetensors file, a folder holding model.safetensors, or a folder with
/// model.safetensors.index.json and its shards (each opened once).
class checkpoint {
 public:
  /// Opens a .safetensors file, or a directory with model.safetensors or a sharded
  /// model.safetensors.index.json (every shard mapped and validated, the index checked against
  /// the shards).
  explicit checkpoint(const fs::path& path) {
    using detail::require;
    require(fs::exists(path), "checkpoint: '", path.string(), "' does not exist");
    if (!fs::is_directory(path)) {
      open(path);
    } else if (fs::exists(path / "model.safetensors.index.json")) {
      read_index(path / "model.safetensors.index.json");
    } else {
      require(fs::exists(path / "model.safetensors"), "checkpoint: '", path.string(),
              "' holds neither model.safetensors nor model.safetensors.index.json");
      open(path / "model.safetensors");
    }
    for (std::size_t f = 0; f < files_.size(); ++f)
      for (const auto& t : files_[f]->tensors())
        if (!where_.count(t.name)) where_[t.name] = f;
    for (const auto& [name, file] : expected_) {
      const auto it = where_.find(name);
      require(it != where_.end() && files_[it->second]->path().filename() == file,
              "checkpoint: the index names tensor '", name, "' in '", file,
              "' but that shard does not hold it");
    }
  }

  /// Some shard holds a tensor called `name`.
  bool contains(std::string_view name) const { return where_.count(std::string(name)) != 0; }
  /// Every tensor name, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& [n, f] : where_) out.push_back(n);
    return out;
  }
  /// The shard holding `name`; attnkit::invalid_argument when no shard does.
  const safetensors_file& file_of(std::string_view name) const {
    const auto it = where_.find(std::string(name));
    if (it == where_.end())
      detail::throw_invalid("checkpoint: tensor '", name, "' is missing (", describe(), ")");
    return *files_[it->second];
  }
  /// The header entry of `name`; attnkit::invalid_argument when absent.
  const tensor_info& info(std::string_view name) const { return file_of(name).info(name); }

  /// The tensor `name` as float, checked against `shape` (empty: any). Zero copy where the file
  /// holds it as 4-byte-aligned f32.
  float_tensor load(std::string_view name, const std::vector<std::int64_t>& shape = {}) const {
    const auto& f = file_of(name);
    const tensor_info& t = f.info(name);
    if (!shape.empty() && t.shape != shape)
      detail::throw_invalid("checkpoint: tensor '", name, "' in '", f.path().string(), "' has shape ",
                            shape_string(t.shape), " but ", shape_string(shape), " was expected");
    if (t.type != dtype::f32 && t.type != dtype::bf16 && t.type != dtype::f16 && t.type != dtype::f64)
      detail::throw_invalid("checkpoint: tensor '", name, "' in '", f.path().string(), "' is ",
                            to_string(t.type), ", not a floating-point type");
    const auto bytes = f.bytes(t);
    if (t.type == dtype::f32 && reinterpret_cast<std::uintptr_t>(bytes.data()) % alignof(float) == 0)
      return {t.shape, reinterpret_cast<const float*>(bytes.data()), f.mapping()};
    std::vector<float> out(static_cast<std::size_t>(t.elements()));
    detail::convert_to_float(t.type, bytes.data(), t.elements(), out.data());
    return {t.shape, std::move(out)};
  }
  /// safetensors_file::release for the tensor `name` (no-op when absent).
  void release(std::string_view name) const {
    if (contains(name)) file_of(name).release(info(name));
  }
  /// An optional tensor: empty when absent.
  float_tensor load_optional(std::string_view name, const std::vector<std::int64_t>& shape = {}) const {
    return contains(name) ? load(name, shape) : float_tensor{};
  }

  /// "DIR, N tensors in M files", for messages.
  std::string describe() const {
    std::string s = files_.size() == 1 ? files_[0]->path().string() : dir_.string();
    return s + ", " + std::to_string(where_.size()) + " tensors in " + std::to_string(files_.size()) +
           (files_.size() == 1 ? " file" : " files");
  }
  /// "[a, b, c]".
  static std::string shape_string(const std::vector<std::int64_t>& s) {
    std::string o = "[";
    for (std::size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
    return o + "]";
  }

 private:
  void open(const fs::path& p) { files_.push_back(std::make_unique<safetensors_file>(p)); }
  void read_index(const fs::path& index) {
    using detail::require;
    dir_ = index.parent_path();
    nlohmann::json j;
    try {
      std::ifstream in(index);
      j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      detail::throw_invalid("checkpoint: '", index.string(), "' is not valid JSON (", e.what(), ")");
    }
    require(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(), "checkpoint: '",
            index.string(), "' has no weight_map object");
    std::map<std::string, std::size_t> shard_of_file;
    for (const auto& [name, file] : j["weight_map"].items()) {
      require(file.is_string(), "checkpoint: '", index.string(), "': tensor '", name,
              "' maps to a non-string");
      const fs::path rel(file.get<std::string>());
      // Shards live in the checkpoint's folder: no absolute paths, no way out of it.
      require(!rel.empty() && rel.is_relative() &&
                  std::none_of(rel.begin(), rel.end(), [](const fs::path& c) { return c == ".."; }),
              "checkpoint: '", index.string(), "': tensor '", name, "' maps to '", rel.string(),
              "', outside the checkpoint folder");
      if (!shard_of_file.count(rel.string())) {
        shard_of_file[rel.string()] = files_.size();
        open(dir_ / rel);
      }
      expected_[name] = rel.filename().string();
    }
    require(!files_.empty(), "checkpoint: '", index.string(), "' names no tensors");
  }

  fs::path dir_;
  std::vector<std::unique_ptr<safetensors_file>> files_;
  std::map<std::string, std::size_t> where_;
  std::map<std::string, std::string> expected_;  // index: tensor -> shard file name
};

/// Writes a checkpoint shard by shard: tensors are converted to their stored dtype and buffered
/// until the shard reaches max_shard_bytes, then written (header, data) under a temporary name.
/// finish() names the shards model-0000i-of-0000N.safetensors (or model.safetensors when one)
/// and writes model.safetensors.index.json. Memory: one shard.
class checkpoint_writer {
 public:
  /// Writes into `dir` (created), shards of at most max_shard_bytes, with the header metadata.
  explicit checkpoint_writer(fs::path dir, std::uint64_t max_shard_bytes = 2'000'000'000ull,
                             std::map<std::string, std::string> metadata = {{"format", "pt"}})
      : dir_(std::move(dir)), max_shard_(max_shard_bytes), metadata_(std::move(metadata)) {
    fs::create_directories(dir_);
  }

  /// Adds float data stored as `type` (f32, bf16 or f16; bf16 and f16 round to nearest even).
  void add(const std::string& name, std::span<const float> data, std::vector<std::int64_t> shape,
           dtype type) {
    using detail::require;
    std::int64_t n = 1;
    for (auto e : shape) n = ::attnkit::detail::checked_mul(n, e, "checkpoint_writer: elements");
    require(static_cast<std::int64_t>(data.size()) == n, "checkpoint_writer: tensor '", name,
            "' has ", data.size(), " elements but shape ", checkpoint::shape_string(shape), " holds ", n);
    require(type == dtype::f32 || type == dtype::bf16 || type == dtype::f16,
            "checkpoint_writer: tensor '", name, "': dtype must be F32, BF16 or F16, got ",
            to_string(type));
    require(!names_.count(name), "checkpoint_writer: tensor '", name, "' added twice");
    const std::uint64_t bytes = static_cast<std::uint64_t>(n * size_of(type));
    if (!pending_.empty() && pending_bytes_ + bytes > max_shard_) flush();
    pending_.push_back({name, type, std::move(shape), pending_bytes_, pending_bytes_ + bytes});
    data_.resize(pending_bytes_ + bytes);
    std::byte* out = data_.data() + pending_bytes_;
    if (type == dtype::f32) {
      std::memcpy(out, data.data(), bytes);
    } else {
      for (std::int64_t i = 0; i < n; ++i) {
        const std::uint16_t b = type == dtype::bf16
            ? Eigen::numext::bit_cast<std::uint16_t>(from_float<bf16>(data[static_cast<std::size_t>(i)]))
            : Eigen::numext::bit_cast<std::uint16_t>(from_float<half>(data[static_cast<std::size_t>(i)]));
        std::memcpy(out + 2 * i, &b, 2);
      }
    }
    pending_bytes_ += bytes;
    names_.insert(name);
  }

  /// Writes the last shard and the index; returns the files written.
  std::vector<fs::path> finish() {
    if (!pending_.empty() || shards_.empty()) flush();
    const std::size_t n = shards_.size();
    std::vector<fs::path> out;
    nlohmann::json index = {{"metadata", {{"total_size", total_}}}, {"weight_map", nlohmann::json::object()}};
    for (std::size_t i = 0; i < n; ++i) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i + 1, n);
      const fs::path final_name = n == 1 ? dir_ / "model.safetensors" : dir_ / buf;
      fs::rename(shards_[i].first, final_name);
      out.push_back(final_name);
      for (const auto& t : shards_[i].second) index["weight_map"][t] = final_name.filename().string();
    }
    if (n > 1) {
      std::ofstream(dir_ / "model.safetensors.index.json") << index.dump(2) << "\n";
      out.push_back(dir_ / "model.safetensors.index.json");
    } else {
      fs::remove(dir_ / "model.safetensors.index.json");
    }
    return out;
  }

 private:
  void flush() {
    nlohmann::json header = nlohmann::json::object();
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::vector<std::string> names;
    for (const auto& t : pending_) {
      header[t.name] = {{"dtype", to_string(t.type)}, {"shape", t.shape}, {"data_offsets", {t.begin, t.end}}};
      names.push_back(t.name);
    }
    std::string h = header.dump();
    h.append((8 - h.size() % 8) % 8, ' ');  // the data area starts 8-byte aligned
    const fs::path tmp = dir_ / (".shard-" + std::to_string(shards_.size()) + ".tmp");
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    const std::uint64_t n = h.size();
    out.write(reinterpret_cast<const char*>(&n), 8);
    out.write(h.data(), static_cast<std::streamsize>(h.size()));
    out.write(reinterpret_cast<const char*>(data_.data()), static_cast<std::streamsize>(pending_bytes_));
    ::attnkit::detail::require(out.good(), "checkpoint_writer: writing '", tmp.string(), "' failed");
    shards_.emplace_back(tmp, std::move(names));
    total_ += pending_bytes_;
    pending_.clear();
    data_.clear();
    pending_bytes_ = 0;
  }

  fs::path dir_;
  std::uint64_t max_shard_;
  std::map<std::string, std::string> metadata_;
  std::vector<tensor_info> pending_;
  std::vector<std::byte> data_;
  std::uint64_t pending_bytes_ = 0, total_ = 0;
  std::vector<std::pair<fs::path, std::vector<std::string>>> shards_;
  std::set<std::string> names_;
};

}  // namespace attnkit::io
