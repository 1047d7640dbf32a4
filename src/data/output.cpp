#include "data/output.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "data/error.h"

namespace eqat {
namespace fs = std::filesystem;

namespace {

constexpr const char* kKindNames[] = {"model",           "dataset",          "eval run",
                                      "train-tiny run",  "train-tiny checkpoint", "quantize state",
                                      "safetensors file", "HTML report",      "Markdown report",
                                      "upload JSON"};
static_assert(sizeof(kKindNames) / sizeof(kKindNames[0]) == static_cast<size_t>(OutputKind::kCount));

std::string strip_trailing_slashes(const std::string& p) {
  size_t end = p.find_last_not_of('/');
  return end == std::string::npos ? (p.empty() ? p : "/") : p.substr(0, end + 1);
}

fs::path canonical_of(const std::string& p) {
  std::error_code ec;
  fs::path abs = fs::absolute(p, ec);
  if (ec) return fs::path(p).lexically_normal();
  fs::path c = fs::weakly_canonical(abs, ec);
  return ec ? abs.lexically_normal() : c;
}

// True when `inner` is `outer` or lies below it (both canonical).
bool is_within(const fs::path& inner, const fs::path& outer) {
  auto i = inner.begin(), o = outer.begin();
  for (; o != outer.end(); ++o, ++i) {
    if (o->empty()) continue;  // a trailing separator
    if (i == inner.end() || *i != *o) return false;
  }
  return true;
}

bool lstat_ok(const std::string& p, struct stat* st) { return ::lstat(p.c_str(), st) == 0; }

bool dir_is_empty(const std::string& d) {
  std::error_code ec;
  return fs::is_empty(d, ec) && !ec;
}

// Parses `BASE.tmp.PID.N` / `BASE.tmp.PID.N.old`: the pid, or -1 when `name` is not an eqat temp name of `base`
// (of any name when `base` is empty).
long temp_owner(const std::string& name, const std::string& base) {
  size_t t;
  if (!base.empty()) {
    if (name.compare(0, base.size(), base) != 0 || name.compare(base.size(), 5, ".tmp.") != 0) return -1;
    t = base.size();
  } else if ((t = name.rfind(".tmp.")) == std::string::npos) {
    return -1;
  }
  const size_t i = t + 5;
  size_t j = i;
  while (j < name.size() && std::isdigit(static_cast<unsigned char>(name[j]))) ++j;
  if (j == i || j - i > 9 || j >= name.size() || name[j] != '.') return -1;
  size_t l = j + 1;
  while (l < name.size() && std::isdigit(static_cast<unsigned char>(name[l]))) ++l;
  if (l == j + 1) return -1;
  const std::string rest = name.substr(l);
  if (!rest.empty() && rest != ".old") return -1;
  return std::stol(name.substr(i, j - i));
}

bool process_gone(long pid) { return pid > 0 && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH; }

std::string read_head(const std::string& path, size_t n) {
  std::ifstream in(path, std::ios::binary);
  std::string s(n, '\0');
  in.read(s.data(), static_cast<std::streamsize>(n));
  s.resize(static_cast<size_t>(in.gcount()));
  return s;
}

// Whether an existing regular file is an eqat output of `kind` (read at most a few MB; never trusts sizes).
bool file_is_eqat_output(const std::string& path, OutputKind kind, uint64_t size) {
  switch (kind) {
    case OutputKind::kTensors: {
      const std::string head = read_head(path, 8);
      if (head.size() < 8) return false;
      uint64_t n = 0;
      std::memcpy(&n, head.data(), 8);
      if (n == 0 || n > (16u << 20) || n + 8 > size) return false;
      const std::string hdr = read_head(path, 8 + n).substr(8);
      auto j = nlohmann::json::parse(hdr, nullptr, /*allow_exceptions=*/false);
      if (!j.is_object() || !j.contains("__metadata__") || !j["__metadata__"].is_object()) return false;
      const auto& m = j["__metadata__"];
      return m.contains("producer") && m["producer"] == "eqat";
    }
    case OutputKind::kReport:
      return read_head(path, 4096).find("<title>eqat report</title>") != std::string::npos;
    case OutputKind::kMarkdown:
      return read_head(path, 64).rfind("<!-- eqat report -->", 0) == 0;
    case OutputKind::kUpload: {
      if (size > (1ull << 30)) return false;
      auto j = nlohmann::json::parse(read_head(path, size), nullptr, /*allow_exceptions=*/false);
      if (!j.is_array()) return false;
      for (const auto& e : j)
        if (!e.is_object() || !((e.contains("question_id") && e.contains("answer")) ||
                                (e.contains("questionId") && e.contains("prediction"))))
          return false;
      return true;
    }
    default:
      return false;
  }
}

// Checks shared by every output: a path, an existing parent, no overlap with an input. Removes the temp names a
// killed run left beside the target (restoring a replaced directory a kill caught halfway through its swap).
fs::path check_common(const OutputTarget& t, std::string* stripped) {
  EQAT_CHECK(!t.path.empty(), t.flag, ": empty path");
  *stripped = strip_trailing_slashes(t.path);
  const fs::path abs = canonical_of(*stripped);
  const fs::path parent = abs.parent_path();
  EQAT_CHECK(fs::is_directory(parent), t.flag, ": directory '", parent.string(), "' of ", t.path, " does not exist");
  for (const auto& in : t.inputs) {
    if (in.empty()) continue;
    const fs::path ci = canonical_of(in);
    EQAT_CHECK(ci != abs, t.flag, ": ", t.path, " is the input ", in, "; write the output somewhere else");
    EQAT_CHECK(!is_within(abs, ci), t.flag, ": ", t.path, " is inside the input ", in,
               "; write the output somewhere else");
    EQAT_CHECK(!is_within(ci, abs), t.flag, ": ", t.path, " contains the input ", in,
               "; write the output somewhere else");
  }
  const std::string base = abs.filename().string();
  std::error_code ec;
  if (!fs::exists(abs, ec)) {
    for (const auto& e : fs::directory_iterator(parent, ec)) {
      const std::string name = e.path().filename().string();
      if (name.size() > 4 && name.compare(name.size() - 4, 4, ".old") == 0 && process_gone(temp_owner(name, base))) {
        std::error_code rc;
        fs::rename(e.path(), abs, rc);
        if (!rc) std::fprintf(stderr, "%s: restored %s, which a killed run had moved aside\n", t.flag.c_str(),
                              abs.c_str());
        break;
      }
    }
  }
  remove_stale_temps(parent.string(), base);
  return abs;
}

std::string kind_str(OutputKind k) { return output_kind_name(k); }

// An existing, non-empty output directory must be an eqat output of the target's kind.
void check_own_kind(const OutputTarget& t, const std::string& p, const char* verb) {
  OutputKind k;
  EQAT_CHECK(read_output_marker(p, &k), t.flag, ": ", t.path, " exists, is not empty and was not written by eqat; ",
             "eqat never ", verb, " it (choose a new directory)");
  EQAT_CHECK(k == t.kind, t.flag, ": ", t.path, " is an eqat ", kind_str(k), ", not a ", kind_str(t.kind),
             "; eqat never ", verb, " it");
}

}  // namespace

const char* output_kind_name(OutputKind k) {
  const auto i = static_cast<size_t>(k);
  return i < static_cast<size_t>(OutputKind::kCount) ? kKindNames[i] : "?";
}

bool read_output_marker(const std::string& dir, OutputKind* kind) {
  const std::string p = (fs::path(dir) / kOutputMarker).string();
  struct stat st;
  if (::stat(p.c_str(), &st) != 0 || !S_ISREG(st.st_mode) || st.st_size > 4096) return false;
  auto j = nlohmann::json::parse(read_head(p, 4096), nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("kind") || !j["kind"].is_string()) return false;
  const std::string name = j["kind"].get<std::string>();
  for (size_t i = 0; i < static_cast<size_t>(OutputKind::kCount); ++i)
    if (name == kKindNames[i]) {
      *kind = static_cast<OutputKind>(i);
      return true;
    }
  return false;
}

void write_output_marker(const std::string& dir, OutputKind kind) {
  const std::string p = (fs::path(dir) / kOutputMarker).string();
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << nlohmann::json({{"kind", output_kind_name(kind)}, {"writer", "eqat"}}).dump() << "\n";
  out.close();
  EQAT_CHECK(out.good(), p, ": cannot write the output marker (", std::strerror(errno), ")");
}

bool replaceable_dir(const std::string& dir, OutputKind kind) {
  struct stat st;
  if (!lstat_ok(dir, &st)) return errno == ENOENT;
  if (!S_ISDIR(st.st_mode)) return false;
  if (dir_is_empty(dir)) return true;
  OutputKind k;
  return read_output_marker(dir, &k) && k == kind;
}

void remove_stale_temps(const std::string& dir, const std::string& prefix) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (!process_gone(temp_owner(name, prefix))) continue;
    std::error_code rc;
    fs::remove_all(e.path(), rc);
  }
}

std::string check_replaced_dir(const OutputTarget& t) {
  std::string p;
  const fs::path abs = check_common(t, &p);
  std::error_code ec;
  const fs::path cwd = canonical_of(fs::current_path(ec).string());
  EQAT_CHECK(!is_within(cwd, abs), t.flag, ": ", t.path,
             " is the working directory or one of its parents; name a new directory");
  struct stat st;
  if (!lstat_ok(p, &st)) return p;
  EQAT_CHECK(!S_ISLNK(st.st_mode), t.flag, ": ", t.path, " is a symbolic link; eqat does not replace it");
  EQAT_CHECK(S_ISDIR(st.st_mode), t.flag, ": ", t.path, " exists and is not a directory; eqat does not replace it");
  if (dir_is_empty(p)) return p;
  check_own_kind(t, p, "replaces");
  EQAT_CHECK(t.overwrite, t.flag, ": ", t.path, " already holds an eqat ", kind_str(t.kind),
             "; pass --overwrite to replace it");
  return p;
}

std::string check_in_place_dir(const OutputTarget& t, bool may_continue) {
  std::string p;
  check_common(t, &p);
  struct stat st;
  if (::stat(p.c_str(), &st) != 0) return p;
  EQAT_CHECK(S_ISDIR(st.st_mode), t.flag, ": ", t.path, " exists and is not a directory");
  if (dir_is_empty(p)) return p;
  check_own_kind(t, p, "writes into");
  EQAT_CHECK(may_continue || t.overwrite, t.flag, ": ", t.path, " holds an earlier eqat ", kind_str(t.kind),
             "; pass --resume to continue it or --overwrite to start over");
  remove_stale_temps(p);
  return p;
}

std::string check_output_file(const OutputTarget& t) {
  EQAT_CHECK(t.path.empty() || t.path.back() != '/', t.flag, ": ", t.path, " names a directory, expected a file");
  std::string p;
  check_common(t, &p);
  struct stat st;
  if (!lstat_ok(p, &st)) return p;
  EQAT_CHECK(!S_ISDIR(st.st_mode), t.flag, ": ", t.path, " is a directory, expected a file");
  EQAT_CHECK(S_ISREG(st.st_mode), t.flag, ": ", t.path,
             " exists and is not a regular file (a link, device or pipe); eqat does not replace it");
  EQAT_CHECK(t.overwrite, t.flag, ": ", t.path, " exists; pass --overwrite to replace it");
  EQAT_CHECK(file_is_eqat_output(p, t.kind, static_cast<uint64_t>(st.st_size)), t.flag, ": ", t.path,
             " exists and is not an eqat ", kind_str(t.kind), "; eqat does not replace it");
  return p;
}

void claim_dir(const std::string& dir, OutputKind kind, bool start_over) {
  std::error_code ec;
  fs::create_directory(dir, ec);
  EQAT_CHECK(!ec || fs::is_directory(dir), dir, ": cannot create the output directory (", ec.message(), ")");
  OutputKind k;
  if (read_output_marker(dir, &k)) {
    EQAT_CHECK(k == kind, dir, ": is an eqat ", kind_str(k), ", not a ", kind_str(kind), "; eqat does not write into it");
    if (!start_over) return;
    for (const auto& e : fs::directory_iterator(dir)) {
      if (e.path().filename().string().rfind(".eqat-", 0) == 0) continue;  // the marker and the lock
      fs::remove_all(e.path(), ec);
      EQAT_CHECK(!ec, e.path().string(), ": cannot remove it to start over (", ec.message(), ")");
    }
    return;
  }
  EQAT_ASSERT(dir_is_empty(dir), dir, ": claimed a directory that is not empty");
  write_output_marker(dir, kind);
}

FileLock::FileLock(const std::string& path, const std::string& what) {
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  EQAT_CHECK(fd_ >= 0, path, ": cannot create the lock file (", std::strerror(errno), ")");
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    char buf[32] = {0};
    const ssize_t n = ::pread(fd_, buf, sizeof(buf) - 1, 0);
    ::close(fd_);
    fd_ = -1;
    std::string pid = n > 0 ? std::string(buf, static_cast<size_t>(n)) : "?";
    while (!pid.empty() && (pid.back() == '\n' || pid.back() == ' ')) pid.pop_back();
    throw_input_error(str_cat(what, ": another eqat run (pid ", pid,
                              ") is writing it; wait for it to finish or choose another output"));
  }
  const std::string me = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd_, 0) == 0) (void)!::pwrite(fd_, me.data(), me.size(), 0);
}

FileLock::~FileLock() {
  if (fd_ >= 0) ::close(fd_);
}

}  // namespace eqat
