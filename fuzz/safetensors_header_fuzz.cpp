// libFuzzer target for the safetensors header validator (src/data/safetensors_header.cpp).
// Each input is tried two ways:
//   1. as a whole file image (u64 length + header + data) through parse_safetensors_buffer, the exact code
//      SafetensorsFile::open runs on the mmapped bytes;
//   2. bytes [8, end) as a bare header JSON against a data area whose size is the first 8 bytes (LE), which lets
//      the fuzzer explore header semantics without having to get the length prefix right.
// eqat::InputError is the expected outcome for bad bytes. Anything else is a finding: another exception escaping
// (libFuzzer reports the abort), a sanitizer report, or an accepted header that breaks an invariant the reader
// relies on (checked below; violations abort).
#include <cstdint>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>
#include <algorithm>

#include "data/error.h"
#include "data/safetensors_header.h"

namespace {

// What SafetensorsFile::get() assumes of every accepted tensor.
void check_invariants(const std::map<std::string, eqat::TensorInfo>& tensors, uint64_t data_size) {
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const auto& [name, t] : tensors) {
    const size_t elem = eqat::dtype_size(t.dtype);
    if (elem == 0 || t.begin > t.end || t.end > data_size) std::abort();
    unsigned __int128 bytes = elem;
    for (int64_t d : t.shape) {
      if (d < 0) std::abort();
      bytes *= static_cast<uint64_t>(d);
      if (bytes > static_cast<unsigned __int128>(UINT64_MAX)) std::abort();
    }
    if (bytes != t.end - t.begin) std::abort();
    if (t.end > t.begin) ranges.emplace_back(t.begin, t.end);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].first < ranges[i - 1].second) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    eqat::SafetensorsLayout l = eqat::parse_safetensors_buffer(data, size, "fuzz.safetensors");
    if (l.data_start < 8 || l.data_start > size) std::abort();
    check_invariants(l.tensors, size - l.data_start);
  } catch (const eqat::InputError&) {
  }

  if (size >= 8) {
    uint64_t data_size = 0;
    for (int i = 7; i >= 0; --i) data_size = (data_size << 8) | data[i];
    std::map<std::string, eqat::TensorInfo> tensors;
    std::map<std::string, std::string> metadata;
    try {
      eqat::parse_safetensors_header(std::string(reinterpret_cast<const char*>(data) + 8, size - 8), data_size,
                                     "fuzz.safetensors", &tensors, &metadata);
      check_invariants(tensors, data_size);
    } catch (const eqat::InputError&) {
    }
  }
  return 0;
}
