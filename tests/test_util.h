// Helpers shared by the test areas.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>

namespace eqat_test {

inline std::string data_path(const std::string& rel) { return std::string(EQAT_TEST_DATA) + "/" + rel; }

// A fresh empty directory under the system temp dir, removed by the destructor.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    char tmpl[] = "/tmp/eqat_test_XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string str(const std::string& rel = "") const { return rel.empty() ? path.string() : (path / rel).string(); }
};

// RssFile of this process in KiB (/proc/self/status): the file-backed pages mapped in; -1 when unknown.
inline int64_t rss_file_kib() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("RssFile:", 0) == 0) return std::stoll(line.substr(8));
  return -1;
}

// Pages lying wholly inside [p, p + n) that are mapped into this process, and how many such pages there are, from the
// present bit of /proc/self/pagemap: the page-table entries RSS counts (mincore would report the page cache, which
// keeps a file's pages after they leave the process). {-1, -1} when pagemap cannot be read.
inline std::pair<int64_t, int64_t> present_pages(const void* p, size_t n) {
  constexpr uintptr_t kPage = 4096;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), b = (a + kPage - 1) / kPage, e = (a + n) / kPage;
  const int fd = ::open("/proc/self/pagemap", O_RDONLY);
  if (fd < 0) return {-1, -1};
  int64_t present = 0;
  for (uintptr_t i = b; i < e; ++i) {
    uint64_t entry = 0;
    if (::pread(fd, &entry, sizeof entry, static_cast<off_t>(i * sizeof entry)) != sizeof entry) {
      ::close(fd);
      return {-1, -1};
    }
    present += static_cast<int64_t>(entry >> 63);
  }
  ::close(fd);
  return {present, e > b ? static_cast<int64_t>(e - b) : 0};
}

}  // namespace eqat_test
