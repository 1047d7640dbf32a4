// safetensors reader (mmap, zero-copy) and writer (atomic, sharded). Header validation lives in
// safetensors_header.cpp; by the time a SafetensorsFile exists every tensor's byte range is known to be inside the
// mapping, so get() does no further bounds checks.
#include "data/safetensors.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <mutex>
#include <filesystem>
#include <fstream>
#include <set>

#include "data/error.h"
#include "data/fs.h"

namespace eqat {
namespace {

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

struct DtypePair {
  const char* name;
  c10::ScalarType type;
};
// Must agree with kDtypes in safetensors_header.cpp (checked by the round-trip test over every dtype).
constexpr DtypePair kDtypePairs[] = {
    {"F64", c10::kDouble}, {"F32", c10::kFloat},    {"F16", c10::kHalf},     {"BF16", c10::kBFloat16},
    {"I64", c10::kLong},   {"I32", c10::kInt},      {"I16", c10::kShort},    {"I8", c10::kChar},
    {"U8", c10::kByte},    {"U16", c10::kUInt16},   {"U32", c10::kUInt32},   {"U64", c10::kUInt64},
    {"BOOL", c10::kBool},
};

// Shard file names come from an index json; refuse anything that would leave the checkpoint directory.
bool is_plain_relative(const std::string& name) {
  std::filesystem::path p(name);
  if (name.empty() || p.is_absolute()) return false;
  for (const auto& part : p)
    if (part == "..") return false;
  return true;
}

void write_all(std::FILE* f, const void* data, size_t n, const std::string& path) {
  EQAT_CHECK(n == 0 || std::fwrite(data, 1, n, f) == n, path, ": write failed (", std::strerror(errno),
             "; disk full?)");
}

}  // namespace

// The mapping is private (copy-on-write) and writable, so callers may modify the tensors in place (e.g.
// quantize-in-place) without the changes ever reaching the file, and ATen never sees a read-only page.
namespace {
// Every live mapping, so release_mapped_bytes only ever advises file-backed pages (MADV_DONTNEED on anonymous
// memory would zero it).
std::mutex g_maps_mu;
std::map<uintptr_t, size_t>& live_maps() {
  static std::map<uintptr_t, size_t> m;
  return m;
}
void madvise_interior(uintptr_t begin, uintptr_t end) {
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t b = (begin + page - 1) / page * page, e = end / page * page;
  if (e > b) ::madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);
}
}  // namespace

struct SafetensorsFile::Mapping {
  void* addr = nullptr;
  size_t size = 0;
  void track() {
    std::lock_guard<std::mutex> lock(g_maps_mu);
    live_maps()[reinterpret_cast<uintptr_t>(addr)] = size;
  }
  ~Mapping() {
    if (addr == nullptr) return;
    {
      std::lock_guard<std::mutex> lock(g_maps_mu);
      live_maps().erase(reinterpret_cast<uintptr_t>(addr));
    }
    ::munmap(addr, size);
  }
};

bool release_mapped_bytes(const void* p, size_t n) {
  const uintptr_t b = reinterpret_cast<uintptr_t>(p), e = b + n;
  std::lock_guard<std::mutex> lock(g_maps_mu);
  auto it = live_maps().upper_bound(b);
  if (it == live_maps().begin()) return false;
  --it;
  if (e > it->first + it->second) return false;  // not inside one mapping: not ours
  madvise_interior(b, e);
  return true;
}

SafetensorsFile::~SafetensorsFile() = default;

std::shared_ptr<SafetensorsFile> open_safetensors_impl(const std::string& path) {
  EQAT_CHECK(!is_directory(path), path, ": is a directory, expected a .safetensors file");
  check_regular_file(path, std::numeric_limits<int64_t>::max());  // mapped, not read: any size
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  EQAT_CHECK(fd >= 0, path, ": cannot open (", std::strerror(errno), ")");
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    EQAT_CHECK(false, path, ": cannot stat (", std::strerror(err), ")");
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {  // mmap of 0 bytes fails; report the real problem instead
    ::close(fd);
    EQAT_CHECK(false, path, ": file is ", size, " bytes, too short for the 8-byte header length");
  }
  auto map = std::make_shared<SafetensorsFile::Mapping>();
  void* addr = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  ::close(fd);  // the mapping keeps its own reference to the file
  EQAT_CHECK(addr != MAP_FAILED, path, ": mmap failed (", std::strerror(map_err), ")");
  map->addr = addr;
  map->size = size;
  map->track();

  SafetensorsLayout layout = parse_safetensors_buffer(addr, size, path);
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->map_ = std::move(map);
  f->size_ = size;
  f->data_start_ = layout.data_start;
  f->tensors_ = std::move(layout.tensors);
  f->metadata_ = std::move(layout.metadata);
  return f;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) { return open_safetensors_impl(path); }

at::Tensor SafetensorsFile::get(const std::string& name) const {
  auto it = tensors_.find(name);
  EQAT_CHECK(it != tensors_.end(), path_, ": no tensor '", name, "' (file holds ", tensors_.size(), " tensors)");
  const TensorInfo& info = it->second;
  const auto opts = at::TensorOptions().dtype(dtype_from_safetensors(info.dtype)).device(at::kCPU);
  if (info.end == info.begin) return at::empty(info.shape, opts);  // no bytes to alias

  char* ptr = static_cast<char*>(map_->addr) + data_start_ + info.begin;
  const size_t elem = dtype_size(info.dtype);
  if (reinterpret_cast<uintptr_t>(ptr) % elem != 0) {
    // Misaligned for its dtype (a header length not a multiple of 8, or a writer that packs odd-sized tensors
    // first): ATen kernels assume natural alignment, so hand out an aligned copy instead of an alias.
    at::Tensor t = at::empty(info.shape, opts);
    std::memcpy(t.data_ptr(), ptr, info.end - info.begin);
    return t;
  }
  std::shared_ptr<Mapping> keep = map_;
  return at::from_blob(ptr, info.shape, [keep](void*) mutable { keep.reset(); }, opts);
}

void SafetensorsFile::release(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) return;
  const uintptr_t base = reinterpret_cast<uintptr_t>(map_->addr) + data_start_;
  madvise_interior(base + it->second.begin, base + it->second.end);
}

// ------------------------------------------------------------------------------------------------ Checkpoint

Checkpoint Checkpoint::open(const std::string& dir_or_file) {
  Checkpoint ck;
  ck.path_ = dir_or_file;
  EQAT_CHECK(file_exists(dir_or_file), dir_or_file, ": no such file or directory");

  std::string single, index;
  if (is_directory(dir_or_file)) {
    // Same precedence as transformers: a single model.safetensors wins over an index.
    const std::string s = path_join(dir_or_file, "model.safetensors");
    const std::string i = path_join(dir_or_file, "model.safetensors.index.json");
    if (file_exists(s)) {
      single = s;
    } else if (file_exists(i)) {
      index = i;
    } else {
      EQAT_CHECK(false, dir_or_file, ": no model.safetensors or model.safetensors.index.json");
    }
  } else if (dir_or_file.size() >= 5 && dir_or_file.compare(dir_or_file.size() - 5, 5, ".json") == 0) {
    index = dir_or_file;
  } else {
    single = dir_or_file;
  }

  if (!single.empty()) {
    ck.files_.push_back(SafetensorsFile::open(single));
    for (const auto& kv : ck.files_[0]->tensors()) ck.index_[kv.first] = 0;
    return ck;
  }

  const std::string text = read_file(index);
  json j;
  try {
    j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  } catch (const json::exception&) {
    j = json(json::value_t::discarded);
  }
  EQAT_CHECK(!j.is_discarded(), index, ": not valid JSON");
  EQAT_CHECK(j.is_object(), index, ": must be a JSON object");
  auto wm = j.find("weight_map");
  EQAT_CHECK(wm != j.end() && wm->is_object(), index, ": missing 'weight_map' object");
  EQAT_CHECK(!wm->empty(), index, ": 'weight_map' is empty");
  const std::string dir = std::filesystem::path(index).parent_path().string();

  std::map<std::string, size_t> shard_index;  // shard file name -> files_ index; each shard is mapped once
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    EQAT_CHECK(it.value().is_string(), index, ": weight_map entry for '", it.key(), "' must be a file name");
    const std::string shard = it.value().get<std::string>();
    EQAT_CHECK(is_plain_relative(shard), index, ": weight_map entry for '", it.key(), "' names '", shard,
               "', which is not a path inside the checkpoint directory");
    auto s = shard_index.find(shard);
    if (s == shard_index.end()) {
      const std::string shard_path = dir.empty() ? shard : path_join(dir, shard);
      EQAT_CHECK(file_exists(shard_path), index, ": shard '", shard, "' (listed for '", it.key(),
                 "') does not exist");
      ck.files_.push_back(SafetensorsFile::open(shard_path));
      s = shard_index.emplace(shard, ck.files_.size() - 1).first;
    }
    EQAT_CHECK(ck.files_[s->second]->has(it.key()), index, ": tensor '", it.key(), "' is listed for shard '", shard,
               "' but ", ck.files_[s->second]->path(), " does not contain it");
    ck.index_[it.key()] = s->second;
  }
  // Tensors a shard holds but the index does not list are ignored, as transformers' sharded loading does.
  return ck;
}

const TensorInfo& Checkpoint::info(const std::string& name) const {
  auto it = index_.find(name);
  EQAT_CHECK(it != index_.end(), path_, ": no tensor '", name, "' in checkpoint (", index_.size(), " tensors)");
  return files_[it->second]->tensors().at(name);
}

at::Tensor Checkpoint::get(const std::string& name) const {
  auto it = index_.find(name);
  EQAT_CHECK(it != index_.end(), path_, ": no tensor '", name, "' in checkpoint (", index_.size(), " tensors)");
  return files_[it->second]->get(name);
}

void Checkpoint::release(const std::string& name) const {
  auto it = index_.find(name);
  if (it != index_.end()) files_[it->second]->release(name);
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(index_.size());
  for (const auto& kv : index_) out.push_back(kv.first);
  return out;
}

uint64_t Checkpoint::total_bytes() const {
  uint64_t total = 0;
  for (const auto& f : files_) total += f->file_size();
  return total;
}

// ------------------------------------------------------------------------------------------------ dtypes

std::string dtype_to_safetensors(c10::ScalarType t) {
  for (const DtypePair& d : kDtypePairs)
    if (d.type == t) return d.name;
  EQAT_CHECK(false, "dtype ", c10::toString(t), " cannot be stored in safetensors by eqat");
  return {};
}

c10::ScalarType dtype_from_safetensors(const std::string& s) {
  for (const DtypePair& d : kDtypePairs)
    if (s == d.name) return d.type;
  EQAT_CHECK(false, "unknown safetensors dtype '", s, "'");
  return c10::kFloat;
}

// ------------------------------------------------------------------------------------------------ writer

namespace {
uint64_t source_bytes(const TensorSource& t) {
  uint64_t n = c10::elementSize(t.dtype);
  for (int64_t d : t.shape) n *= static_cast<uint64_t>(d);
  return n;
}

std::vector<TensorSource> as_sources(const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                                     const std::string& what) {
  std::vector<TensorSource> out;
  out.reserve(tensors.size());
  for (const auto& [name, t] : tensors) {
    EQAT_CHECK(t.defined(), what, ": tensor '", name, "' is undefined");
    out.push_back({name, t.scalar_type(), t.sizes().vec(), [t] { return t; }});
  }
  return out;
}
}  // namespace

void write_safetensors_streamed(const std::string& path, const std::vector<TensorSource>& tensors,
                                const std::map<std::string, std::string>& metadata) {
  std::set<std::string> names;
  for (const auto& t : tensors) {
    EQAT_CHECK(t.name != "__metadata__", path, ": '__metadata__' is reserved and cannot name a tensor");
    EQAT_CHECK(names.insert(t.name).second, path, ": tensor '", t.name, "' given twice");
    dtype_to_safetensors(t.dtype);  // reject unsupported dtypes before writing anything
    for (int64_t d : t.shape) EQAT_CHECK(d >= 0, path, ": tensor '", t.name, "' has a negative dimension");
  }

  // Data order: stable sort by element size, largest first. With the header padded to 8 bytes this aligns every
  // tensor without holes (sizes of 8-byte tensors are multiples of 8, then 4, ...).
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return c10::elementSize(tensors[a].dtype) > c10::elementSize(tensors[b].dtype);
  });
  std::vector<std::pair<uint64_t, uint64_t>> offs(tensors.size());
  uint64_t pos = 0;
  for (size_t i : order) {
    offs[i] = {pos, pos + source_bytes(tensors[i])};
    pos = offs[i].second;
  }

  ordered_json h = ordered_json::object();
  {
    // "producer": "eqat" marks the file as eqat's own: a later --overwrite may replace it (data/output.h).
    ordered_json m = ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    if (!m.contains("producer")) m["producer"] = "eqat";
    h["__metadata__"] = std::move(m);
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    ordered_json e = ordered_json::object();
    e["dtype"] = dtype_to_safetensors(tensors[i].dtype);
    e["shape"] = tensors[i].shape;
    e["data_offsets"] = {offs[i].first, offs[i].second};
    h[tensors[i].name] = std::move(e);
  }
  std::string header;
  try {
    header = h.dump(-1, ' ', /*ensure_ascii=*/false, json::error_handler_t::strict);
  } catch (const json::type_error&) {
    EQAT_CHECK(false, path, ": a tensor name or metadata string is not valid UTF-8");
  }
  header.append((8 - header.size() % 8) % 8, ' ');  // spaces are JSON whitespace; keeps the data area 8-aligned
  const uint64_t n = header.size();
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));

  write_file_atomic(path, [&](const std::string& tmp) {
    std::FILE* f = std::fopen(tmp.c_str(), "wb");
    EQAT_CHECK(f != nullptr, tmp, ": cannot open for writing (", std::strerror(errno), ")");
    try {
      write_all(f, len, 8, path);
      write_all(f, header.data(), header.size(), path);
      for (size_t i : order) {  // one tensor in memory at a time: made, copied to contiguous CPU, written, dropped
        const TensorSource& src = tensors[i];
        at::Tensor t = src.make().to(at::kCPU).contiguous();
        EQAT_ASSERT(t.scalar_type() == src.dtype && t.sizes() == at::IntArrayRef(src.shape), path, ": tensor '",
                    src.name, "' was made as ", t.scalar_type(), " ", t.sizes(), ", declared ", src.dtype, " ",
                    at::IntArrayRef(src.shape));
        write_all(f, t.data_ptr(), t.nbytes(), path);
      }
    } catch (...) {
      std::fclose(f);
      throw;
    }
    EQAT_CHECK(std::fclose(f) == 0, path, ": close failed (", std::strerror(errno), "; disk full?)");
  });
}

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  write_safetensors_streamed(path, as_sources(tensors, path), metadata);
}

std::string shard_name(size_t i, size_t n) {
  char name[64];
  std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", i + 1, n);
  return name;
}

void write_checkpoint_streamed(const std::string& dir, const std::vector<TensorSource>& tensors,
                               uint64_t max_shard_bytes, const std::map<std::string, std::string>& metadata) {
  EQAT_CHECK(is_directory(dir), dir, ": output directory does not exist");
  EQAT_CHECK(max_shard_bytes > 0, dir, ": max_shard_bytes must be positive");
  uint64_t total = 0;
  for (const auto& t : tensors) total += source_bytes(t);
  // A leftover file of the other layout would shadow or contradict the new one (Checkpoint::open prefers
  // model.safetensors), so it is removed once the new files are in place.
  std::error_code ec;
  if (total <= max_shard_bytes) {
    write_safetensors_streamed(path_join(dir, "model.safetensors"), tensors, metadata);
    std::filesystem::remove(path_join(dir, "model.safetensors.index.json"), ec);
    return;
  }

  // Greedy split in the given order, as transformers' shard_checkpoint does: a new shard starts when the next
  // tensor would overflow the current one; a tensor larger than the limit gets a shard of its own.
  std::vector<std::vector<TensorSource>> shards(1);
  uint64_t cur = 0;
  for (const auto& t : tensors) {
    const uint64_t b = source_bytes(t);
    if (!shards.back().empty() && cur + b > max_shard_bytes) {
      shards.emplace_back();
      cur = 0;
    }
    shards.back().push_back(t);
    cur += b;
  }
  const size_t n = shards.size();
  json weight_map = json::object();
  for (size_t i = 0; i < n; ++i) {
    write_safetensors_streamed(path_join(dir, shard_name(i, n)), shards[i], metadata);
    for (const auto& t : shards[i]) weight_map[t.name] = shard_name(i, n);
  }
  // The index goes last, so its presence implies every shard it names is complete.
  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", std::move(weight_map)}};
  write_file_atomic(path_join(dir, "model.safetensors.index.json"), index.dump(2) + "\n");
  std::filesystem::remove(path_join(dir, "model.safetensors"), ec);
}

void write_checkpoint(const std::string& dir, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      uint64_t max_shard_bytes, const std::map<std::string, std::string>& metadata) {
  write_checkpoint_streamed(dir, as_sources(tensors, dir), max_shard_bytes, metadata);
}

}  // namespace eqat
