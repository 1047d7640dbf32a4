// Validation of safetensors headers. Everything here treats the bytes as hostile (fuzzed by
// fuzz/safetensors_header_fuzz.cpp): every size is checked before use, arithmetic on file-provided numbers is
// overflow-checked, and every failure is an InputError naming the file.
#include "data/safetensors_header.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <limits>
#include <set>
#include <tuple>

#include "data/error.h"

namespace eqat {
namespace {

using json = nlohmann::json;

// A header is {name: {dtype, shape: [...], data_offsets: [b, e]}, "__metadata__": {k: v}}: depth 3. The limit
// only has to stop pathological nesting ("[[[[...") from costing deep recursion when the value is destroyed.
constexpr int kMaxJsonDepth = 16;

struct DtypeEntry {
  const char* name;
  size_t size;
};
// Every dtype the safetensors format defines that ATen can represent. F8 types and complex are left out on
// purpose: nothing in a LLaVA/Llama checkpoint uses them, and an explicit "unknown dtype" beats a half-supported one.
constexpr DtypeEntry kDtypes[] = {
    {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4}, {"I16", 2},
    {"I8", 1},  {"U8", 1},  {"U16", 2}, {"U32", 4},  {"U64", 8}, {"BOOL", 1},
};

// Names come from the file; keep messages one readable line even for a 1 MB tensor name.
std::string quote_name(const std::string& s) {
  constexpr size_t kMax = 120;
  return "'" + (s.size() <= kMax ? s : s.substr(0, kMax) + "...") + "'";
}

const char* json_type(const json& j) { return j.type_name(); }

// Reads a non-negative JSON integer; false when `j` is anything else (float, negative, string, ...).
bool as_u64(const json& j, uint64_t* out) {
  if (!j.is_number_unsigned()) return false;  // nlohmann stores every non-negative integer literal as unsigned
  *out = j.get<uint64_t>();
  return true;
}

void parse_entry(const std::string& name, const json& e, uint64_t data_size, const std::string& source,
                 TensorInfo* info) {
  const std::string where = str_cat(source, ": tensor ", quote_name(name));
  EQAT_CHECK(e.is_object(), where, " entry must be an object, got ", json_type(e));

  auto dt = e.find("dtype");
  EQAT_CHECK(dt != e.end(), where, " missing 'dtype'");
  EQAT_CHECK(dt->is_string(), where, " 'dtype' must be a string, got ", json_type(*dt));
  info->dtype = dt->get<std::string>();
  const size_t elem = dtype_size(info->dtype);
  EQAT_CHECK(elem != 0, where, " unknown dtype ", quote_name(info->dtype),
             " (supported: F64 F32 F16 BF16 I64 I32 I16 I8 U8 U16 U32 U64 BOOL)");

  auto sh = e.find("shape");
  EQAT_CHECK(sh != e.end(), where, " missing 'shape'");
  EQAT_CHECK(sh->is_array(), where, " 'shape' must be a list, got ", json_type(*sh));
  // numel * elem is computed in u64 with overflow checks: a header may claim [2^40, 2^40] to wrap the product.
  uint64_t nbytes = elem;
  bool overflow = false;
  info->shape.clear();
  for (const json& d : *sh) {
    if (d.is_number_integer() && !d.is_number_unsigned()) {
      EQAT_CHECK(false, where, " negative dimension ", d.get<int64_t>(), " in 'shape'");
    }
    uint64_t v = 0;
    EQAT_CHECK(as_u64(d, &v), where, " 'shape' entries must be integers, got ", json_type(d));
    EQAT_CHECK(v <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), where, " dimension ", v,
               " too large");
    info->shape.push_back(static_cast<int64_t>(v));
    overflow = overflow || __builtin_mul_overflow(nbytes, v, &nbytes);
  }

  auto off = e.find("data_offsets");
  EQAT_CHECK(off != e.end(), where, " missing 'data_offsets'");
  EQAT_CHECK(off->is_array() && off->size() == 2, where, " 'data_offsets' must be a list [begin, end]");
  EQAT_CHECK(as_u64((*off)[0], &info->begin) && as_u64((*off)[1], &info->end), where,
             ": 'data_offsets' must hold two non-negative integers");
  EQAT_CHECK(info->begin <= info->end, where, " data_offsets [", info->begin, ", ", info->end,
             "] have begin > end");
  EQAT_CHECK(info->end <= data_size, where, " data_offsets [", info->begin, ", ", info->end,
             "] exceed the data area (", data_size, " bytes)");
  const uint64_t range = info->end - info->begin;
  EQAT_CHECK(!overflow && nbytes == range, where, " shape x dtype size ",
             overflow ? std::string("overflows 64 bits") : str_cat("= ", nbytes, " bytes"),
             " but data_offsets [", info->begin, ", ", info->end, "] span ", range, " bytes");
  info->file = source;
}

}  // namespace

size_t dtype_size(const std::string& safetensors_dtype) {
  for (const DtypeEntry& d : kDtypes)
    if (safetensors_dtype == d.name) return d.size;
  return 0;
}

void parse_safetensors_header(const std::string& header_json, uint64_t data_size, const std::string& source,
                              std::map<std::string, TensorInfo>* tensors,
                              std::map<std::string, std::string>* metadata) {
  tensors->clear();
  metadata->clear();
  // nlohmann keeps the last of duplicate keys silently; two entries with one name mean a corrupt writer, so the
  // callback rejects them (depth 1 = keys of the top-level object) and bounds the nesting depth.
  std::set<std::string> seen;
  auto cb = [&](int depth, json::parse_event_t ev, json& parsed) {
    EQAT_CHECK(depth <= kMaxJsonDepth, source, ": header JSON nested deeper than ", kMaxJsonDepth, " levels");
    if (ev == json::parse_event_t::key && depth == 1) {
      const std::string& k = parsed.get_ref<const std::string&>();
      EQAT_CHECK(seen.insert(k).second, source, ": header lists tensor ", quote_name(k), " twice");
    }
    return true;
  };
  json h;
  try {
    h = json::parse(header_json, cb);
  } catch (const json::parse_error& e) {
    // e.what() quotes the offending bytes, which may be binary; the byte position is enough to find the problem.
    EQAT_CHECK(false, source, ": header is not valid JSON (parse error at byte ", e.byte, " of ",
               header_json.size(), ")");
  } catch (const json::exception& e) {
    // Found by the fuzzer: a number literal beyond double range ("1e309") throws out_of_range, not parse_error.
    EQAT_CHECK(false, source, ": header is not valid JSON (", e.id == 406 ? "number out of range" : "malformed", ")");
  }
  EQAT_CHECK(h.is_object(), source, ": header must be a JSON object, got ", json_type(h));

  std::vector<std::tuple<uint64_t, uint64_t, const std::string*>> ranges;  // (begin, end, name), non-empty only
  for (auto it = h.begin(); it != h.end(); ++it) {
    if (it.key() == "__metadata__") {
      const json& m = it.value();
      EQAT_CHECK(m.is_object(), source, ": '__metadata__' must be an object of strings, got ", json_type(m));
      for (auto mi = m.begin(); mi != m.end(); ++mi) {
        EQAT_CHECK(mi.value().is_string(), source, ": '__metadata__' value for ", quote_name(mi.key()),
                   " must be a string, got ", json_type(mi.value()));
        (*metadata)[mi.key()] = mi.value().get<std::string>();
      }
      continue;
    }
    TensorInfo info;
    parse_entry(it.key(), it.value(), data_size, source, &info);
    auto ins = tensors->emplace(it.key(), std::move(info));
    const TensorInfo& ti = ins.first->second;
    if (ti.end > ti.begin) ranges.emplace_back(ti.begin, ti.end, &ins.first->first);
  }

  // Overlap: after sorting by begin, a range overlaps an earlier one iff it starts before the furthest end seen.
  // Empty tensors occupy no bytes and may sit anywhere. Holes are tolerated (the official writer makes none, but
  // a reader gains nothing by refusing them).
  std::sort(ranges.begin(), ranges.end(), [](const auto& a, const auto& b) {
    return std::tie(std::get<0>(a), std::get<1>(a)) < std::tie(std::get<0>(b), std::get<1>(b));
  });
  uint64_t max_end = 0;
  const std::string* max_name = nullptr;
  for (const auto& [b, e, name] : ranges) {
    EQAT_CHECK(max_name == nullptr || b >= max_end, source, ": tensors ", quote_name(*max_name), " and ", quote_name(*name),
               " overlap (", quote_name(*name), " starts at ", b, ", before ", max_end, ")");
    if (e > max_end) {
      max_end = e;
      max_name = name;
    }
  }
}

SafetensorsLayout parse_safetensors_buffer(const void* bytes, uint64_t size, const std::string& source) {
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors data is little-endian; mmap needs a LE host");
  EQAT_CHECK(size >= 8, source, ": file is ", size, " bytes, too short for the 8-byte header length");
  const auto* p = static_cast<const unsigned char*>(bytes);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | p[i];  // u64 little-endian
  EQAT_CHECK(n <= size - 8, source, ": header length ", n, " exceeds the file (", size,
             " bytes; truncated download?)");
  EQAT_CHECK(n <= kMaxSafetensorsHeaderBytes, source, ": header length ", n, " is implausible (limit ",
             kMaxSafetensorsHeaderBytes, " bytes)");
  SafetensorsLayout out;
  out.data_start = 8 + n;
  parse_safetensors_header(std::string(reinterpret_cast<const char*>(p + 8), n), size - out.data_start, source,
                           &out.tensors, &out.metadata);
  return out;
}

}  // namespace eqat
