// Tests for src/data/safetensors.{h,cpp} and safetensors_header.cpp: round trips of every dtype (single file and
// sharded), zero-copy aliasing, alignment fallback, and one test per class of malformed input. Every bad input must
// raise eqat::InputError with a one-line message that names the file.
#include "data/safetensors.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "data/error.h"
#include "data/fs.h"
#include "test_util.h"

namespace safetensors_test {

using eqat::Checkpoint;
using eqat::InputError;
using eqat::SafetensorsFile;
using eqat_test::TempDir;
using Named = std::vector<std::pair<std::string, at::Tensor>>;

// Every dtype the reader accepts, with its ATen type.
const std::vector<std::pair<std::string, c10::ScalarType>> kAllDtypes = {
    {"F64", at::kDouble}, {"F32", at::kFloat},   {"F16", at::kHalf},     {"BF16", at::kBFloat16}, {"I64", at::kLong},
    {"I32", at::kInt},    {"I16", at::kShort},   {"I8", at::kChar},      {"U8", at::kByte},       {"U16", at::kUInt16},
    {"U32", at::kUInt32}, {"U64", at::kUInt64},  {"BOOL", at::kBool},
};

// A tensor of `type` filled with random bytes (valid 0/1 for bool). Raw bytes keep the test independent of which
// ops ATen implements for the barebones unsigned types; comparisons are bytewise too.
at::Tensor random_tensor(c10::ScalarType type, at::IntArrayRef shape, uint32_t seed) {
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(type));
  std::mt19937 rng(seed);
  auto* p = static_cast<unsigned char*>(t.data_ptr());
  for (size_t i = 0; i < t.nbytes(); ++i) p[i] = static_cast<unsigned char>(type == at::kBool ? rng() % 2 : rng());
  return t;
}

bool same_bytes(const at::Tensor& a, const at::Tensor& b) {
  // An empty tensor's data_ptr may be null, and memcmp's arguments must not be even for 0 bytes (UBSan).
  return a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() && a.nbytes() == b.nbytes() &&
         (a.nbytes() == 0 || std::memcmp(a.contiguous().data_ptr(), b.contiguous().data_ptr(), a.nbytes()) == 0);
}

// Writes a file from a raw header and `data_bytes` zero bytes of data, with the length prefix given explicitly
// (defaults to the header's true length).
void write_raw(const std::string& path, const std::string& header, size_t data_bytes, int64_t len_override = -1) {
  uint64_t n = len_override >= 0 ? static_cast<uint64_t>(len_override) : header.size();
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(n >> (8 * i));
  bytes += header;
  bytes.append(data_bytes, '\0');
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Opens `path` and expects an InputError whose message names the file and contains `needle`.
void expect_open_error(const std::string& path, const std::string& needle) {
  try {
    SafetensorsFile::open(path);
    ADD_FAILURE() << "expected InputError containing '" << needle << "' for " << path;
  } catch (const InputError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(std::filesystem::path(path).filename().string()), std::string::npos) << msg;
    EXPECT_NE(msg.find(needle), std::string::npos) << "missing '" << needle << "' in: " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
}

// A header with one tensor entry (JSON text for `entry`) and the data size to go with it.
void expect_bad_entry(const std::string& entry, size_t data_bytes, const std::string& needle) {
  TempDir dir;
  const std::string path = dir.str("model.safetensors");
  write_raw(path, "{\"x\":" + entry + "}", data_bytes);
  expect_open_error(path, needle);
}

TEST(SafetensorsTest, RoundTripEveryDtype) {
  TempDir dir;
  Named in;
  uint32_t seed = 1;
  for (const auto& [name, type] : kAllDtypes) {
    in.emplace_back("t." + name, random_tensor(type, {3, 5}, seed++));  // odd sizes: alignment is the writer's job
    in.emplace_back("scalar." + name, random_tensor(type, {}, seed++));
    in.emplace_back("empty." + name, random_tensor(type, {0, 4}, seed++));
  }
  const std::string path = dir.str("all.safetensors");
  eqat::write_safetensors(path, in, {{"format", "pt"}, {"note", "round trip"}});

  auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f->tensors().size(), in.size());
  EXPECT_EQ(f->metadata(), (std::map<std::string, std::string>{{"format", "pt"}, {"note", "round trip"}, {"producer", "eqat"}}));
  for (const auto& [name, t] : in) {
    ASSERT_TRUE(f->has(name)) << name;
    at::Tensor got = f->get(name);
    EXPECT_TRUE(same_bytes(got, t)) << name;
    EXPECT_EQ(f->tensors().at(name).dtype, eqat::dtype_to_safetensors(t.scalar_type()));
    EXPECT_EQ(f->tensors().at(name).file, path);
    // Zero-copy needs natural alignment; the writer's largest-element-first layout guarantees it.
    EXPECT_EQ(reinterpret_cast<uintptr_t>(got.data_ptr()) % t.element_size(), 0u) << name;
  }
  // The header is space-padded so the data area starts on an 8-byte boundary.
  std::ifstream is(path, std::ios::binary);
  uint64_t n = 0;
  is.read(reinterpret_cast<char*>(&n), 8);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(f->file_size(), std::filesystem::file_size(path));
}

TEST(SafetensorsTest, DtypeNamesMatchBothWays) {
  for (const auto& [name, type] : kAllDtypes) {
    EXPECT_EQ(eqat::dtype_to_safetensors(type), name);
    EXPECT_EQ(eqat::dtype_from_safetensors(name), type);
    EXPECT_EQ(eqat::dtype_size(name), c10::elementSize(type)) << name;
  }
  EXPECT_EQ(eqat::dtype_size("F8_E4M3"), 0u);
  EXPECT_THROW(eqat::dtype_from_safetensors("Q4"), InputError);
  EXPECT_THROW(eqat::dtype_to_safetensors(at::kComplexFloat), InputError);
}

TEST(SafetensorsTest, GetIsZeroCopyAndCopyOnWrite) {
  TempDir dir;
  const std::string path = dir.str("model.safetensors");
  at::Tensor w = at::arange(12, at::kFloat).reshape({3, 4});
  eqat::write_safetensors(path, {{"w", w}});
  auto f = SafetensorsFile::open(path);
  at::Tensor a = f->get("w");
  at::Tensor b = f->get("w");
  // Both alias the same bytes of the mapping: same address, and a write through one shows in the other.
  EXPECT_EQ(a.data_ptr(), b.data_ptr());
  a.fill_(7.0f);
  EXPECT_TRUE(at::equal(b, at::full({3, 4}, 7.0f)));
  // The mapping is private: nothing reached the file.
  auto again = SafetensorsFile::open(path);
  EXPECT_TRUE(at::equal(again->get("w"), w));
}

// release() drops the tensor's resident pages (a loader that converted it keeps only its copy); the bytes read the
// same afterwards, from the file.
TEST(SafetensorsTest, ReleaseDropsResidentPages) {
  TempDir dir;
  const std::string path = dir.str("model.safetensors");
  at::Tensor w = at::rand({16, 1024, 1024});  // 64 MiB
  eqat::write_safetensors(path, {{"w", w}});
  auto f = SafetensorsFile::open(path);
  const double expect = w.sum().item<double>();
  w = at::Tensor();
  const int64_t before = eqat_test::rss_file_kib();
  if (before < 0) GTEST_SKIP() << "no RssFile in /proc/self/status";
  EXPECT_DOUBLE_EQ(f->get("w").sum().item<double>(), expect);  // maps every page in
  const int64_t touched = eqat_test::rss_file_kib();
  EXPECT_GT(touched - before, 48 * 1024) << "reading 64 MiB should map most of it";
  f->release("w");
  EXPECT_LT(eqat_test::rss_file_kib() - before, 16 * 1024) << "release should drop the pages";
  EXPECT_DOUBLE_EQ(f->get("w").sum().item<double>(), expect);  // read again from the file
  f->release("no such tensor");  // a no-op
}

TEST(SafetensorsTest, TensorOutlivesFile) {
  TempDir dir;
  const std::string path = dir.str("model.safetensors");
  at::Tensor w = at::randn({64, 32});
  eqat::write_safetensors(path, {{"w", w}});
  at::Tensor got;
  {
    auto f = SafetensorsFile::open(path);
    got = f->get("w");
  }  // the file object is gone; the tensor's deleter still holds the mapping
  EXPECT_TRUE(at::equal(got, w));
}

TEST(SafetensorsTest, MisalignedTensorIsCopied) {
  // Header of 13 bytes + 8-byte prefix: the data area starts at offset 21, so an F32 at offset 0 is misaligned.
  TempDir dir;
  const std::string path = dir.str("odd.safetensors");
  std::string header = R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  header += std::string((8 - (8 + header.size()) % 8) % 8 + 1, ' ');  // force (8 + N) % 8 == 1
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(static_cast<uint64_t>(header.size()) >> (8 * i));
  const float vals[2] = {1.5f, -2.25f};
  bytes += header + std::string(reinterpret_cast<const char*>(vals), 8);
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));

  auto f = SafetensorsFile::open(path);
  at::Tensor x = f->get("x");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(x.data_ptr()) % 4, 0u);
  EXPECT_FLOAT_EQ(x[0].item<float>(), 1.5f);
  EXPECT_FLOAT_EQ(x[1].item<float>(), -2.25f);
}

TEST(SafetensorsTest, WriterSortsDataForAlignment) {
  TempDir dir;
  const std::string path = dir.str("mixed.safetensors");
  // An odd-length byte tensor first would misalign everything after it if written in the given order.
  Named in = {{"u8", random_tensor(at::kByte, {3}, 1)},
              {"f16", random_tensor(at::kHalf, {3}, 2)},
              {"i64", random_tensor(at::kLong, {1}, 3)},
              {"f32", random_tensor(at::kFloat, {3}, 4)}};
  eqat::write_safetensors(path, in);
  auto f = SafetensorsFile::open(path);
  for (const auto& [name, t] : in) {
    at::Tensor a = f->get(name);
    EXPECT_TRUE(same_bytes(a, t)) << name;
    EXPECT_EQ(a.data_ptr(), f->get(name).data_ptr()) << name << " was copied, not mapped";
  }
  // No holes: the ranges tile the data area exactly (the official reader rejects holes).
  uint64_t total = 0;
  for (const auto& kv : f->tensors()) total += kv.second.end - kv.second.begin;
  EXPECT_EQ(total, 3u + 6u + 8u + 12u);
}

TEST(SafetensorsTest, WriterAcceptsNonContiguousInput) {
  TempDir dir;
  const std::string path = dir.str("model.safetensors");
  at::Tensor w = at::randn({4, 6}).t();  // transposed view
  eqat::write_safetensors(path, {{"w", w}});
  EXPECT_TRUE(at::equal(SafetensorsFile::open(path)->get("w"), w));
}

TEST(SafetensorsTest, WriterRejectsBadArguments) {
  TempDir dir;
  const std::string path = dir.str("model.safetensors");
  EXPECT_THROW(eqat::write_safetensors(path, {{"a", at::ones({2})}, {"a", at::ones({2})}}), InputError);
  EXPECT_THROW(eqat::write_safetensors(path, {{"__metadata__", at::ones({2})}}), InputError);
  EXPECT_THROW(eqat::write_safetensors(path, {{"c", at::ones({2}, at::kComplexFloat)}}), InputError);
  EXPECT_FALSE(eqat::file_exists(path));  // nothing half-written
}

TEST(SafetensorsTest, ShardedCheckpointRoundTrip) {
  TempDir dir;
  Named in;
  uint32_t seed = 10;
  for (const auto& [name, type] : kAllDtypes) in.emplace_back("layer." + name, random_tensor(type, {16, 9}, seed++));
  uint64_t total = 0;
  for (const auto& kv : in) total += kv.second.nbytes();
  // ~4 tensors per shard.
  eqat::write_checkpoint(dir.str(), in, /*max_shard_bytes=*/16 * 9 * 8 * 2);

  std::vector<std::string> shards;
  for (const auto& e : std::filesystem::directory_iterator(dir.path))
    if (e.path().extension() == ".safetensors") shards.push_back(e.path().filename().string());
  std::sort(shards.begin(), shards.end());
  ASSERT_GE(shards.size(), 2u);
  const std::string n = std::to_string(shards.size());
  EXPECT_EQ(shards.front(), "model-00001-of-0000" + n + ".safetensors");
  EXPECT_EQ(shards.back(), "model-0000" + n + "-of-0000" + n + ".safetensors");
  EXPECT_FALSE(eqat::file_exists(dir.str("model.safetensors")));
  const std::string index = eqat::read_file(dir.str("model.safetensors.index.json"));
  EXPECT_NE(index.find("\"total_size\": " + std::to_string(total)), std::string::npos) << index;

  for (const std::string& where : {dir.str(), dir.str("model.safetensors.index.json")}) {
    Checkpoint ck = Checkpoint::open(where);
    EXPECT_EQ(ck.files().size(), shards.size());
    EXPECT_EQ(ck.names().size(), in.size());
    for (const auto& [name, t] : in) {
      ASSERT_TRUE(ck.has(name)) << name;
      EXPECT_TRUE(same_bytes(ck.get(name), t)) << name;
      EXPECT_EQ(ck.info(name).shape, t.sizes().vec());
    }
    uint64_t bytes = 0;
    for (const auto& f : ck.files()) bytes += std::filesystem::file_size(f->path());
    EXPECT_EQ(ck.total_bytes(), bytes);
  }

  // Rewriting small enough for one file replaces the sharded layout (no stale index left to confuse readers).
  eqat::write_checkpoint(dir.str(), {{"only", at::ones({2})}});
  EXPECT_FALSE(eqat::file_exists(dir.str("model.safetensors.index.json")));
  Checkpoint one = Checkpoint::open(dir.str());
  EXPECT_EQ(one.names(), std::vector<std::string>{"only"});
}

TEST(SafetensorsTest, CheckpointSingleFileAndExplicitPath) {
  TempDir dir;
  eqat::write_checkpoint(dir.str(), {{"a", at::ones({2, 2})}, {"b", at::zeros({3}, at::kLong)}});
  ASSERT_TRUE(eqat::file_exists(dir.str("model.safetensors")));
  for (const std::string& where : {dir.str(), dir.str("model.safetensors")}) {
    Checkpoint ck = Checkpoint::open(where);
    EXPECT_EQ(ck.names(), (std::vector<std::string>{"a", "b"}));
    EXPECT_TRUE(at::equal(ck.get("b"), at::zeros({3}, at::kLong)));
    EXPECT_EQ(ck.info("a").dtype, "F32");
  }
  try {
    Checkpoint::open(dir.str()).get("nope");
    ADD_FAILURE();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("'nope'"), std::string::npos) << e.what();
  }
}

// Real files written by Python safetensors (tools/make_fixtures.py), when present.
TEST(SafetensorsTest, ReadsHuggingFaceFixtures) {
  const std::string llama = eqat_test::data_path("fixtures/tiny_llama");
  if (!eqat::file_exists(llama + "/model.safetensors")) GTEST_SKIP() << "fixtures not generated";
  Checkpoint ck = Checkpoint::open(llama);
  ASSERT_TRUE(ck.has("model.embed_tokens.weight"));
  at::Tensor emb = ck.get("model.embed_tokens.weight");
  EXPECT_EQ(emb.scalar_type(), at::kFloat);
  EXPECT_EQ(emb.dim(), 2);
  EXPECT_TRUE(at::isfinite(emb).all().item<bool>());
  const std::string llava = eqat_test::data_path("fixtures/tiny_llava");
  if (eqat::file_exists(llava + "/model.safetensors")) {
    Checkpoint lv = Checkpoint::open(llava);
    EXPECT_TRUE(lv.has("multi_modal_projector.linear_1.weight"));
  }
}

// ------------------------------------------------------------------------------------------- malformed inputs

TEST(SafetensorsTest, RejectsTruncatedFile) {
  TempDir dir;
  const std::string empty = dir.str("empty.safetensors");
  std::ofstream(empty).close();
  expect_open_error(empty, "too short");
  const std::string four = dir.str("four.safetensors");
  std::ofstream(four) << "abcd";
  expect_open_error(four, "too short");
}

TEST(SafetensorsTest, RejectsHeaderLengthBeyondFile) {
  TempDir dir;
  const std::string path = dir.str("model.safetensors");
  write_raw(path, "{}", 0, /*len_override=*/1000);
  expect_open_error(path, "header length 1000 exceeds the file");
  write_raw(path, "{}", 0, /*len_override=*/-1 & 0x7fffffffffffffff);
  expect_open_error(path, "exceeds the file");

  // A full-size file written by a real model is cut short: the header is intact but data is missing.
  Named in = {{"w", at::randn({32, 32})}};
  eqat::write_safetensors(path, in);
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 100);
  expect_open_error(path, "exceed the data area");
}

TEST(SafetensorsTest, RejectsImplausibleHeaderLength) {
  TempDir dir;
  const std::string path = dir.str("huge.safetensors");
  const uint64_t n = eqat::kMaxSafetensorsHeaderBytes + 8;
  write_raw(path, "", 0, static_cast<int64_t>(n));
  std::filesystem::resize_file(path, 8 + n);  // sparse: costs no disk
  expect_open_error(path, "implausible");
}

TEST(SafetensorsTest, RejectsNonJsonHeader) {
  TempDir dir;
  const std::string path = dir.str("model.safetensors");
  write_raw(path, "{\"x\": {\"dtype\": \"F32\",", 0);
  expect_open_error(path, "not valid JSON");
  write_raw(path, std::string("\xff\xfe\x00\x01", 4), 0);
  expect_open_error(path, "not valid JSON");
  write_raw(path, "[1, 2]", 0);
  expect_open_error(path, "must be a JSON object");
  // Fuzzer finding: a number beyond double range made nlohmann throw out_of_range, which escaped as a non-InputError.
  write_raw(path, R"({"__metadata__":{"a":"b"},"x":1e309})", 0);
  expect_open_error(path, "number out of range");
  write_raw(path, std::string(100, '[') + std::string(100, ']'), 0);
  expect_open_error(path, "nested deeper");
}

TEST(SafetensorsTest, RejectsMalformedEntries) {
  expect_bad_entry("[]", 0, "entry must be an object");
  expect_bad_entry(R"({"shape":[1],"data_offsets":[0,4]})", 4, "missing 'dtype'");
  expect_bad_entry(R"({"dtype":"F32","data_offsets":[0,4]})", 4, "missing 'shape'");
  expect_bad_entry(R"({"dtype":"F32","shape":[1]})", 4, "missing 'data_offsets'");
  expect_bad_entry(R"({"dtype":7,"shape":[1],"data_offsets":[0,4]})", 4, "'dtype' must be a string");
  expect_bad_entry(R"({"dtype":"F32","shape":"1","data_offsets":[0,4]})", 4, "'shape' must be a list");
  expect_bad_entry(R"({"dtype":"F32","shape":[1.0],"data_offsets":[0,4]})", 4, "'shape' entries must be integers");
  expect_bad_entry(R"({"dtype":"F32","shape":[1],"data_offsets":[0]})", 4, "'data_offsets' must be a list");
  expect_bad_entry(R"({"dtype":"F32","shape":[1],"data_offsets":[0,-4]})", 4, "two non-negative integers");
  expect_bad_entry(R"({"dtype":"F32","shape":[1],"data_offsets":"0,4"})", 4, "'data_offsets' must be a list");
}

TEST(SafetensorsTest, RejectsUnknownDtype) {
  expect_bad_entry(R"({"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]})", 4, "unknown dtype 'F8_E4M3'");
  expect_bad_entry(R"({"dtype":"f32","shape":[1],"data_offsets":[0,4]})", 4, "unknown dtype");
}

TEST(SafetensorsTest, RejectsBadShapes) {
  expect_bad_entry(R"({"dtype":"F32","shape":[-1],"data_offsets":[0,4]})", 4, "negative dimension -1");
  expect_bad_entry(R"({"dtype":"F32","shape":[2,3],"data_offsets":[0,20]})", 20,
                   "shape x dtype size = 24 bytes but data_offsets [0, 20] span 20 bytes");
  // 2^32 * 2^32 * 4 wraps to 0 in 64 bits; a naive product would accept it against an empty range.
  expect_bad_entry(R"({"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]})", 0,
                   "overflows 64 bits");
  expect_bad_entry(R"({"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,0]})", 0, "too large");
}

TEST(SafetensorsTest, RejectsBadRanges) {
  expect_bad_entry(R"({"dtype":"F32","shape":[1],"data_offsets":[8,4]})", 8, "begin > end");
  expect_bad_entry(R"({"dtype":"F32","shape":[25],"data_offsets":[0,100]})", 64,
                   "tensor 'x' data_offsets [0, 100] exceed the data area (64 bytes)");
  expect_bad_entry(R"({"dtype":"U8","shape":[1],"data_offsets":[18446744073709551615,18446744073709551615]})", 4,
                   "exceed the data area");
}

TEST(SafetensorsTest, RejectsOverlapAndDuplicates) {
  TempDir dir;
  const std::string path = dir.str("model.safetensors");
  write_raw(path,
            R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
            R"("b":{"dtype":"F32","shape":[1],"data_offsets":[20,24]},)"
            R"("c":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
            24);
  expect_open_error(path, "tensors 'a' and 'c' overlap");
  // A range nested inside an earlier, longer one.
  write_raw(path,
            R"({"a":{"dtype":"U8","shape":[100],"data_offsets":[0,100]},)"
            R"("b":{"dtype":"U8","shape":[4],"data_offsets":[10,14]},)"
            R"("c":{"dtype":"U8","shape":[4],"data_offsets":[50,54]}})",
            100);
  expect_open_error(path, "overlap");
  // Empty tensors occupy nothing and may share an offset with anything.
  write_raw(path,
            R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
            R"("e":{"dtype":"F32","shape":[0,3],"data_offsets":[2,2]}})",
            4);
  EXPECT_EQ(SafetensorsFile::open(path)->get("e").sizes(), (std::vector<int64_t>{0, 3}));
  write_raw(path,
            R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
            R"("a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})",
            8);
  expect_open_error(path, "lists tensor 'a' twice");
}

TEST(SafetensorsTest, RejectsBadMetadata) {
  TempDir dir;
  const std::string path = dir.str("model.safetensors");
  write_raw(path, R"({"__metadata__":{"format":"pt","n":3}})", 0);
  expect_open_error(path, "'__metadata__' value for 'n' must be a string");
  write_raw(path, R"({"__metadata__":["pt"]})", 0);
  expect_open_error(path, "'__metadata__' must be an object");
  write_raw(path, R"({"__metadata__":{"format":"pt"}})", 0);  // metadata only: a valid, empty file
  EXPECT_TRUE(SafetensorsFile::open(path)->tensors().empty());
}

TEST(SafetensorsTest, GetMissingTensorNamesFile) {
  TempDir dir;
  const std::string path = dir.str("model.safetensors");
  eqat::write_safetensors(path, {{"a", at::ones({1})}});
  try {
    SafetensorsFile::open(path)->get("missing.weight");
    ADD_FAILURE();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("'missing.weight'"), std::string::npos);
  }
}

TEST(SafetensorsTest, CheckpointErrors) {
  TempDir dir;
  auto expect_error = [](const std::string& where, const std::vector<std::string>& needles) {
    try {
      Checkpoint::open(where);
      ADD_FAILURE() << "expected InputError for " << where;
    } catch (const InputError& e) {
      for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
    }
  };
  expect_error(dir.str(), {dir.str() + ": no model.safetensors or model.safetensors.index.json"});
  expect_error(dir.str("nowhere"), {"nowhere", "no such file"});

  // The index lists a tensor its shard does not hold.
  eqat::write_safetensors(dir.str("model-00001-of-00001.safetensors"), {{"a", at::ones({1})}});
  const std::string index = dir.str("model.safetensors.index.json");
  eqat::write_file_atomic(index, R"({"metadata":{"total_size":4},"weight_map":{
      "a":"model-00001-of-00001.safetensors","b":"model-00001-of-00001.safetensors"}})");
  expect_error(dir.str(), {"model.safetensors.index.json", "'b'", "model-00001-of-00001.safetensors"});

  eqat::write_file_atomic(index, R"({"weight_map":{"a":"model-00002-of-00002.safetensors"}})");
  expect_error(dir.str(), {"model.safetensors.index.json", "model-00002-of-00002.safetensors", "does not exist"});
  eqat::write_file_atomic(index, R"({"weight_map":{"a":"../model-00001-of-00001.safetensors"}})");
  expect_error(dir.str(), {"not a path inside the checkpoint directory"});
  eqat::write_file_atomic(index, R"({"weight_map":{"a":3}})");
  expect_error(dir.str(), {"must be a file name"});
  eqat::write_file_atomic(index, R"({"metadata":{}})");
  expect_error(dir.str(), {"missing 'weight_map'"});
  eqat::write_file_atomic(index, "{not json");
  expect_error(dir.str(), {"model.safetensors.index.json", "not valid JSON"});

  // A corrupt shard is reported with the shard's own name.
  eqat::write_file_atomic(index, R"({"weight_map":{"a":"model-00001-of-00001.safetensors"}})");
  write_raw(dir.str("model-00001-of-00001.safetensors"), "{]", 0);
  expect_error(dir.str(), {"model-00001-of-00001.safetensors", "not valid JSON"});
}

TEST(SafetensorsTest, ParseHeaderDirectly) {
  std::map<std::string, eqat::TensorInfo> tensors;
  std::map<std::string, std::string> meta;
  eqat::parse_safetensors_header(
      R"({"__metadata__":{"format":"pt"},"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]}})", 12, "mem",
      &tensors, &meta);
  ASSERT_EQ(tensors.size(), 1u);
  EXPECT_EQ(tensors["w"].shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(tensors["w"].file, "mem");
  EXPECT_EQ(meta["format"], "pt");
  EXPECT_THROW(eqat::parse_safetensors_header("", 0, "mem", &tensors, &meta), InputError);
}

}  // namespace safetensors_test
