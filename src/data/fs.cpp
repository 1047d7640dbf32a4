#include "data/fs.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "data/error.h"

namespace eqat {
namespace fs = std::filesystem;

namespace {
// `PATH.tmp.PID.N`: output.cpp's remove_stale_temps recognises this shape (and the `.old` of a swap).
std::string temp_sibling(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  std::random_device rd;
  return str_cat(path, ".tmp.", ::getpid(), ".", rd() % 1000000);
}

// fsync through a read-only descriptor of path, or with whole_filesystem, syncfs: every file of path's filesystem,
// path itself included. Nothing when path cannot be opened.
void fsync_path(const std::string& path, bool whole_filesystem = false) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd >= 0) {
    whole_filesystem ? ::syncfs(fd) : ::fsync(fd);
    ::close(fd);
  }
}
}  // namespace

namespace {
// "256 MiB" for whole mebibytes, else "9 bytes".
std::string limit_str(int64_t n) {
  return n >= (int64_t{1} << 20) && n % (int64_t{1} << 20) == 0 ? str_cat(n >> 20, " MiB") : str_cat(n, " bytes");
}

// The checks of check_regular_file on a stat result.
int64_t check_stat(const std::string& path, const struct stat& st, int64_t max_bytes) {
  EQAT_CHECK(!S_ISDIR(st.st_mode), path, ": is a directory, not a regular file");
  EQAT_CHECK(S_ISREG(st.st_mode), path, ": not a regular file (a pipe, socket or device); eqat reads only files");
  EQAT_CHECK(st.st_size <= max_bytes, path, ": ", st.st_size, " bytes, more than the ", limit_str(max_bytes),
             " this input may have");
  return static_cast<int64_t>(st.st_size);
}
}  // namespace

int64_t check_regular_file(const std::string& path, int64_t max_bytes) {
  struct stat st;
  EQAT_CHECK(::stat(path.c_str(), &st) == 0, path, ": no such file");
  return check_stat(path, st, max_bytes);
}

std::string read_file(const std::string& path, int64_t max_bytes) {
  // Opened non-blocking, so that a FIFO cannot block the open itself; fstat on the descriptor then decides, with no
  // window between the check and the read.
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  EQAT_CHECK(fd >= 0 || errno != ENOENT, path, ": no such file");
  EQAT_CHECK(fd >= 0, path, ": cannot open for reading (", std::strerror(errno), ")");
  struct stat st {};
  std::string bytes;
  try {
    EQAT_CHECK(::fstat(fd, &st) == 0, path, ": cannot stat (", std::strerror(errno), ")");
    bytes.resize(static_cast<size_t>(check_stat(path, st, max_bytes)));
  } catch (...) {
    ::close(fd);
    throw;
  }
  size_t got = 0;
  while (got < bytes.size()) {
    const ssize_t n = ::read(fd, bytes.data() + got, bytes.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  ::close(fd);
  EQAT_CHECK(got == bytes.size(), path, ": could not read the whole file (", got, " of ", bytes.size(), " bytes)");
  return bytes;
}

void write_file_atomic(const std::string& path, const std::function<void(const std::string&)>& write) {
  const std::string tmp = temp_sibling(path);
  try {
    write(tmp);
    fsync_path(tmp);
    std::error_code ec;
    fs::rename(tmp, path, ec);
    EQAT_CHECK(!ec, path, ": cannot rename temp file into place (", ec.message(), ")");
  } catch (...) {
    std::error_code ec;
    fs::remove(tmp, ec);
    throw;
  }
}

void write_file_in_temp_dir(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  EQAT_CHECK(out.good(), path, ": cannot open for writing (", std::strerror(errno), ")");
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  EQAT_CHECK(out.good(), path, ": write failed (disk full?)");
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  write_file_atomic(path, [&](const std::string& tmp) { write_file_in_temp_dir(tmp, bytes); });
}

void write_dir_atomic(const std::string& dir, OutputKind kind, const std::function<void(const std::string&)>& fill) {
  std::string stripped = dir;
  while (stripped.size() > 1 && stripped.back() == '/') stripped.pop_back();
  const fs::path target = fs::absolute(stripped).lexically_normal();
  std::error_code ec;
  if (target.has_parent_path()) {
    fs::create_directories(target.parent_path(), ec);
    EQAT_CHECK(!ec, dir, ": cannot create parent directory (", ec.message(), ")");
  }
  auto check_replaceable = [&] {
    EQAT_CHECK(replaceable_dir(target.string(), kind), dir, ": exists and is not an eqat ", output_kind_name(kind),
               "; eqat does not replace it");
  };
  check_replaceable();
  const std::string tmp = temp_sibling(target.string());
  fs::create_directory(tmp, ec);
  EQAT_CHECK(!ec, dir, ": cannot create temp directory ", tmp, " (", ec.message(), ")");
  const std::string old = tmp + ".old";
  bool moved_aside = false;
  try {
    fill(tmp);
    write_output_marker(tmp, kind);
    // The files written in place (write_file_in_temp_dir) and the directory reach the disk before the rename: one
    // syncfs for all of them (`eqat data shapes --train 4160`, the default quantize's calibration set: 2.4–2.7 s with
    // an fsync and a rename per image, 1.4–2.0 s so).
    fsync_path(tmp, /*whole_filesystem=*/true);
    check_replaceable();
    if (fs::exists(target) && !fs::is_empty(target)) {
      fs::rename(target, old, ec);
      EQAT_CHECK(!ec, dir, ": cannot move the previous output aside (", ec.message(), ")");
      moved_aside = true;
    }
    fs::rename(tmp, target, ec);  // over a missing or empty directory
    EQAT_CHECK(!ec, dir, ": cannot rename the temp directory into place (", ec.message(), ")");
    if (moved_aside) fs::remove_all(old, ec);
  } catch (...) {
    fs::remove_all(tmp, ec);
    if (moved_aside && !fs::exists(target)) fs::rename(old, target, ec);
    throw;
  }
}

bool file_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

bool is_directory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string path_join(const std::string& a, const std::string& b) { return (fs::path(a) / b).string(); }

}  // namespace eqat
