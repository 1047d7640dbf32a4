// Files of the sizes 7B/13B checkpoints have, without writing them: sparse files (holes read as zeros and take no
// disk) put tensors at data offsets beyond 4 GiB, make shards beyond 2 GiB and tensors with more than 2^31
// elements, and check that the reader's 64-bit arithmetic (header offsets, mmap sizes, get()) holds everywhere.
#include <ATen/ATen.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <string>

#include "data/error.h"
#include "data/fs.h"
#include "data/safetensors.h"
#include "test_util.h"

using namespace eqat;
using eqat_test::TempDir;

namespace {
constexpr uint64_t kGiB = 1ull << 30;

// Writes the 8-byte length and `header`, sizes the file to hold `data_bytes` of data (a hole), then writes
// `bytes` at data offset `at`. Returns false when the file system cannot hold such a file (then the test skips).
bool write_sparse(const std::string& path, const std::string& header, uint64_t data_bytes, uint64_t at,
                  const std::string& bytes) {
  const int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0644);
  if (fd < 0) return false;
  std::string prefix(8, '\0');
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<char>(static_cast<uint64_t>(header.size()) >> (8 * i));
  prefix += header;
  bool ok = ::write(fd, prefix.data(), prefix.size()) == static_cast<ssize_t>(prefix.size()) &&
            ::ftruncate(fd, static_cast<off_t>(prefix.size() + data_bytes)) == 0 &&
            ::pwrite(fd, bytes.data(), bytes.size(), static_cast<off_t>(prefix.size() + at)) ==
                static_cast<ssize_t>(bytes.size());
  ::close(fd);
  return ok;
}
}  // namespace

// A 4.5 GiB byte tensor (4.8e9 elements > 2^31) followed by a float tensor whose data starts beyond 4 GiB.
TEST(LargeFiles, OffsetsBeyond4GiBAndElementCountsBeyond2To31) {
  TempDir t;
  const std::string path = t.str("model-00001-of-00002.safetensors");
  const uint64_t big = 4 * kGiB + kGiB / 2;
  const std::string header = "{\"big\":{\"dtype\":\"U8\",\"shape\":[" + std::to_string(big) +
                             "],\"data_offsets\":[0," + std::to_string(big) + "]},\"tail\":{\"dtype\":\"F32\","
                             "\"shape\":[2,2],\"data_offsets\":[" + std::to_string(big) + "," +
                             std::to_string(big + 16) + "]}}";
  const float tail[4] = {1.5f, -2.f, 3.25f, 1e30f};
  std::string bytes(reinterpret_cast<const char*>(tail), 16);
  if (!write_sparse(path, header, big + 16, big, bytes)) GTEST_SKIP() << "no sparse files of 4.5 GiB here";
  // A marker inside the big tensor, past element 2^32 (an index cut to 32 bits would land on element 7).
  {
    const int fd = ::open(path.c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    const char marker = 42;
    ASSERT_EQ(::pwrite(fd, &marker, 1, static_cast<off_t>(8 + header.size() + (1ull << 32) + 7)), 1);
    ::close(fd);
  }
  auto f = SafetensorsFile::open(path);
  EXPECT_GT(f->file_size(), 4 * kGiB);
  at::Tensor b = f->get("big");
  EXPECT_EQ(b.numel(), static_cast<int64_t>(big));
  EXPECT_GT(b.numel(), int64_t{1} << 31);
  EXPECT_EQ(b[static_cast<int64_t>((1ull << 32) + 7)].item<uint8_t>(), 42);
  EXPECT_EQ(b[7].item<uint8_t>(), 0);
  at::Tensor tl = f->get("tail");
  EXPECT_TRUE(at::equal(tl, at::tensor({1.5f, -2.f, 3.25f, 1e30f}).view({2, 2})));

  // The same shard through an index, next to a small second shard: a Checkpoint over a > 2 GiB file.
  const std::string small = t.str("model-00002-of-00002.safetensors");
  write_safetensors(small, {{"w", at::arange(6, at::kFloat)}});
  write_file_atomic(t.str("model.safetensors.index.json"),
                    "{\"metadata\":{\"total_size\":" + std::to_string(big + 40) + "},\"weight_map\":{\"big\":"
                    "\"model-00001-of-00002.safetensors\",\"tail\":\"model-00001-of-00002.safetensors\",\"w\":"
                    "\"model-00002-of-00002.safetensors\"}}");
  Checkpoint ck = Checkpoint::open(t.str());
  EXPECT_EQ(ck.info("big").shape[0], static_cast<int64_t>(big));
  EXPECT_EQ(ck.get("tail")[1][1].item<float>(), 1e30f);
  EXPECT_EQ(ck.get("w")[5].item<float>(), 5.f);
  EXPECT_GT(ck.total_bytes(), 4 * kGiB);
}

// A header whose offsets pass 2^64 when added, or end beyond a > 4 GiB file: refused, not wrapped.
TEST(LargeFiles, RangesThatOverflowOrPassTheEndAreRefused) {
  TempDir t;
  const std::string path = t.str("x.safetensors");
  const uint64_t big = 5 * kGiB;
  const std::string h1 = "{\"x\":{\"dtype\":\"F32\",\"shape\":[" + std::to_string(big / 4 + 1) +
                         "],\"data_offsets\":[0," + std::to_string(big + 4) + "]}}";
  if (!write_sparse(path, h1, big, 0, "")) GTEST_SKIP() << "no sparse files of 5 GiB here";
  EXPECT_THROW(SafetensorsFile::open(path), InputError);  // ends 4 bytes past the data
  const std::string h2 = "{\"x\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904],\"data_offsets\":[0,0]}}";
  ASSERT_TRUE(write_sparse(path, h2, big, 0, ""));
  EXPECT_THROW(SafetensorsFile::open(path), InputError);  // 2^62 × 4 bytes wraps to 0 in 64 bits
}
