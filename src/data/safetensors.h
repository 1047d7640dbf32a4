// safetensors reading (mmap, zero-copy) and writing (atomic, sharded).
// Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets:[b,e]},
// "__metadata__": {str: str}}, then the data; offsets are relative to the first byte after the header.
// The reader validates everything before any tensor is handed out: header length within the file, JSON object,
// known dtype, shape product x dtype size == byte range, ranges inside the data area and non-overlapping.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "data/safetensors_header.h"  // TensorInfo, parse_safetensors_header, dtype_size

namespace eqat {

// One .safetensors file, memory-mapped. Tensors returned by get() alias the mapping (copy-on-write private
// mapping, so writes never reach the file) and keep it alive.
class SafetensorsFile {
 public:
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  at::Tensor get(const std::string& name) const;  // InputError naming file + tensor when absent
  // Drops the resident pages that lie wholly inside the tensor's bytes (madvise MADV_DONTNEED): for a loader that
  // has made its own copy (another dtype or device), so a 14 GB fp16 checkpoint loaded as bf16 does not keep both
  // in RSS. Tensors still aliasing those pages see the file's bytes again on their next read (a private mapping's
  // untouched pages); writes made through them would be lost, so release only what nobody aliases.
  void release(const std::string& name) const;
  const std::string& path() const { return path_; }
  uint64_t file_size() const { return size_; }
  ~SafetensorsFile();

 private:
  struct Mapping;  // the mmap; shared with every tensor handed out, so it outlives this object if they do
  SafetensorsFile() = default;
  std::string path_;
  std::shared_ptr<Mapping> map_;
  uint64_t size_ = 0;
  uint64_t data_start_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
  friend std::shared_ptr<SafetensorsFile> open_safetensors_impl(const std::string&);
};

// The same for any bytes [p, p + n) that lie inside one live SafetensorsFile mapping (e.g. a tensor get() handed
// out, after its owner converted it); false, and nothing done, for memory that is not such a mapping.
bool release_mapped_bytes(const void* p, size_t n);

// A checkpoint: a directory holding model.safetensors (preferred, as in transformers) or
// model.safetensors.index.json + its shards; or an explicit .safetensors file; or an explicit index .json path.
// With an index, each shard is mapped once and only the tensors the weight_map lists are visible; a listed tensor
// missing from its shard is an InputError naming both files.
class Checkpoint {
 public:
  static Checkpoint open(const std::string& dir_or_file);
  bool has(const std::string& name) const { return index_.count(name) != 0; }
  at::Tensor get(const std::string& name) const;
  void release(const std::string& name) const;  // SafetensorsFile::release on the file that holds it
  const TensorInfo& info(const std::string& name) const;
  std::vector<std::string> names() const;
  const std::vector<std::shared_ptr<SafetensorsFile>>& files() const { return files_; }
  uint64_t total_bytes() const;  // sum of file sizes
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> index_;  // tensor name -> files_ index
};

// Writes one safetensors file atomically. The header lists tensors in the given order; the data area holds them
// contiguous and without holes (the format forbids holes), stably sorted by element size, largest first, so that
// every tensor starts aligned for its dtype (the header is padded to a multiple of 8) and maps zero-copy.
// Tensors may live on any device / be non-contiguous; each is copied to contiguous CPU as it is written. The metadata gets
// "producer": "eqat" unless it names a producer.
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Writes `dir`/model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json when the
// total exceeds `max_shard_bytes`. Each file is written atomically; `dir` must exist.
void write_checkpoint(const std::string& dir, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      uint64_t max_shard_bytes = 5ull << 30,
                      const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

// A tensor written as a stream: its dtype and shape are declared up front (they go into the header), and make() is
// called once, when its bytes are due, so a writer holds one tensor in memory at a time (random 13B checkpoints,
// exports). make() must return exactly the declared dtype and shape (any device, any strides).
struct TensorSource {
  std::string name;
  c10::ScalarType dtype;
  std::vector<int64_t> shape;
  std::function<at::Tensor()> make;
};
void write_safetensors_streamed(const std::string& path, const std::vector<TensorSource>& tensors,
                                const std::map<std::string, std::string>& metadata = {});
// write_checkpoint's sharding (same names, same greedy split, index last) over streamed tensors.
void write_checkpoint_streamed(const std::string& dir, const std::vector<TensorSource>& tensors,
                               uint64_t max_shard_bytes = 5ull << 30,
                               const std::map<std::string, std::string>& metadata = {{"format", "pt"}});
// "model-00002-of-00003.safetensors" for i = 1, n = 3 (HF's shard names).
std::string shard_name(size_t i, size_t n);

// dtype helpers: safetensors spelling <-> ATen scalar type (dtype_size is in safetensors_header.h).
std::string dtype_to_safetensors(c10::ScalarType t);  // InputError for types safetensors cannot hold
c10::ScalarType dtype_from_safetensors(const std::string& s);  // InputError on unknown

}  // namespace eqat
