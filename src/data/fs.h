// Small filesystem helpers shared by every writer: whole-file reads and atomic writes
// (temp name in the same directory, fsync, rename), so a killed run never leaves a half-written output.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "data/output.h"

namespace eqat {

// Refuses (InputError naming the file) anything but an existing regular file (after symlinks) of at most
// `max_bytes`: a FIFO or a device (/dev/zero) would hang or never end, a directory is not data. Returns its size.
inline constexpr int64_t kMaxReadBytes = int64_t{4} << 30;  // what read_file takes whole into memory
int64_t check_regular_file(const std::string& path, int64_t max_bytes = kMaxReadBytes);

// Reads a whole regular file (check_regular_file); InputError naming the file when it is missing or unreadable.
std::string read_file(const std::string& path, int64_t max_bytes = kMaxReadBytes);

// Writes `path` atomically: `write` receives an open temp path next to `path`; on success the temp file is
// fsynced and renamed over `path`; on any exception the temp file is removed and the exception rethrown.
void write_file_atomic(const std::string& path, const std::function<void(const std::string& tmp_path)>& write);

// Convenience: atomically writes `bytes` to `path`.
void write_file_atomic(const std::string& path, const std::string& bytes);

// Creates a directory for outputs atomically: `fill` populates a temp sibling directory, the kind's marker is added
// (output.h), and the directory is renamed to `dir`. An existing `dir` is replaced only after `fill` succeeded, and
// only when it is empty or an eqat output of the same kind (checked before `fill` and again at the swap): anything
// else is an InputError and stays untouched. The caller decides --overwrite beforehand (check_replaced_dir).
void write_dir_atomic(const std::string& dir, OutputKind kind,
                      const std::function<void(const std::string& tmp_dir)>& fill);

// Writes `bytes` to `path` in place, with no fsync or rename of its own: for the many files of a write_dir_atomic
// fill (a dataset's images), whose temp directory is flushed as a whole (syncfs) before it is renamed into place, so
// a failed or killed run still leaves nothing behind. InputError naming the file when it cannot be written.
void write_file_in_temp_dir(const std::string& path, const std::string& bytes);

bool file_exists(const std::string& path);
bool is_directory(const std::string& path);
std::string path_join(const std::string& a, const std::string& b);

}  // namespace eqat
