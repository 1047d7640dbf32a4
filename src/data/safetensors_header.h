// safetensors header validation without LibTorch: the part of the reader that sees untrusted bytes, kept in its
// own translation unit (nlohmann_json + error.h only) so the libFuzzer targets can compile it with sanitizers
// and without linking torch. safetensors.h builds the mmap reader and the writer on top of it.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace eqat {

struct TensorInfo {
  std::string dtype;             // safetensors spelling: F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, ...
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;   // byte range relative to the data area
  std::string file;              // which file holds it
};

// Headers above this are rejected before parsing: the largest real headers (a few thousand tensors) are well
// under 1 MB, and the bound keeps a corrupt length from making us parse gigabytes of tensor data as JSON.
constexpr uint64_t kMaxSafetensorsHeaderBytes = 100ull << 20;

// Validates a header (the bytes after the 8-byte length) against a data area of `data_size` bytes. Used by the
// reader and by the header fuzzer. Throws InputError naming `source`. TensorInfo::file is set to `source`.
void parse_safetensors_header(const std::string& header_json, uint64_t data_size, const std::string& source,
                              std::map<std::string, TensorInfo>* tensors,
                              std::map<std::string, std::string>* metadata);

// A whole safetensors file already in memory (e.g. mmapped), validated: length prefix, header, data ranges.
struct SafetensorsLayout {
  uint64_t data_start = 0;  // byte offset of the data area in the file (8 + header length)
  std::map<std::string, TensorInfo> tensors;
  std::map<std::string, std::string> metadata;
};
SafetensorsLayout parse_safetensors_buffer(const void* bytes, uint64_t size, const std::string& source);

size_t dtype_size(const std::string& safetensors_dtype);  // bytes per element; 0 when unknown

}  // namespace eqat
