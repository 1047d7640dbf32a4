// Shared helpers for the libFuzzer targets that read several files (tokenizer, eval, llama2c).
//
// Multi-file inputs: byte 0 is a flags byte the target interprets; the rest is split on the line
// "\n--8<--\n" into sections, section i becoming the target's i-th file. A separator rather than length prefixes
// keeps hand-made seeds readable and lets the fuzzer mutate one file without breaking the others' framing.
// Missing trailing sections are missing files.
//
// Files go to one scratch directory per process (mkdtemp under $TMPDIR or /tmp), emptied before every input and
// removed at exit, so the library's real file-reading paths run unchanged.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace fuzz {

inline const char kSeparator[] = "\n--8<--\n";

struct Input {
  uint8_t flags = 0;
  std::vector<std::string> sections;
  bool has(size_t i) const { return i < sections.size(); }
  const std::string& get(size_t i) const {
    static const std::string empty;
    return i < sections.size() ? sections[i] : empty;
  }
};

inline Input split_input(const uint8_t* data, size_t size) {
  Input in;
  if (size == 0) return in;
  in.flags = data[0];
  const std::string s(reinterpret_cast<const char*>(data) + 1, size - 1);
  const std::string sep(kSeparator);
  size_t pos = 0;
  while (true) {
    const size_t next = s.find(sep, pos);
    in.sections.push_back(s.substr(pos, next == std::string::npos ? std::string::npos : next - pos));
    if (next == std::string::npos) break;
    pos = next + sep.size();
  }
  return in;
}

// The per-process scratch directory, emptied on every call. (Leaked on purpose: the atexit cleanup must not run
// after a static string's destructor.)
inline const std::string& scratch_dir() {
  static const std::string* const dir = [] {
    const char* base = std::getenv("TMPDIR");
    auto* d = new std::string(std::string(base && *base ? base : "/tmp") + "/eqat_fuzz_XXXXXX");
    if (mkdtemp(d->data()) == nullptr) std::abort();
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(*dir, ec);
    });
    return d;
  }();
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(*dir, ec)) std::filesystem::remove_all(e.path(), ec);
  return *dir;
}

// With EQAT_FUZZ_VERBOSE=1 in the environment, prints the InputError an input ended with (to check that seeds
// get past the loaders, and to read a reproducer's outcome).
inline void rejected(const std::exception& e) {
  static const bool verbose = std::getenv("EQAT_FUZZ_VERBOSE") != nullptr;
  if (verbose) fprintf(stderr, "InputError: %s\n", e.what());
}

inline std::string write(const std::string& dir, const std::string& name, const std::string& bytes) {
  const std::string path = dir + "/" + name;
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return path;
}

}  // namespace fuzz
