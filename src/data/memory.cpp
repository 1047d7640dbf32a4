#include "data/memory.h"

#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>

#include "data/error.h"

namespace eqat {

int64_t mul_sat(int64_t a, int64_t b) {
  if (a < 0 || b < 0) return std::numeric_limits<int64_t>::max();
  int64_t r = 0;
  return __builtin_mul_overflow(a, b, &r) ? std::numeric_limits<int64_t>::max() : r;
}

int64_t add_sat(int64_t a, int64_t b) {
  if (a < 0 || b < 0) return std::numeric_limits<int64_t>::max();
  int64_t r = 0;
  return __builtin_add_overflow(a, b, &r) ? std::numeric_limits<int64_t>::max() : r;
}

int64_t available_memory_bytes() {
  if (const char* env = std::getenv("EQAT_MEMORY_LIMIT_MB")) {
    char* end = nullptr;
    const long long mb = std::strtoll(env, &end, 10);
    if (end != env && *end == '\0' && mb > 0) return mul_sat(mb, int64_t{1} << 20);
  }
  int64_t avail = -1;
  std::ifstream f("/proc/meminfo");
  std::string key;
  int64_t kb = 0;
  std::string unit;
  while (f >> key >> kb >> unit) {
    if (key == "MemAvailable:") {
      avail = mul_sat(kb, 1024);
      break;
    }
  }
  if (avail < 0) {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    avail = pages > 0 && page > 0 ? mul_sat(pages, page) : std::numeric_limits<int64_t>::max();
  }
  struct rlimit rl {};
  if (getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
      rl.rlim_cur < static_cast<rlim_t>(std::numeric_limits<int64_t>::max()))
    avail = std::min<int64_t>(avail, static_cast<int64_t>(rl.rlim_cur));
  return avail;
}

std::string format_bytes(double bytes) {
  char buf[64];
  if (bytes >= 1024.0 * 1024 * 1024 * 1024 * 1024)
    std::snprintf(buf, sizeof buf, "%.3g PiB", bytes / (1024.0 * 1024 * 1024 * 1024 * 1024));
  else if (bytes >= 1024.0 * 1024 * 1024)
    std::snprintf(buf, sizeof buf, "%.1f GiB", bytes / (1024.0 * 1024 * 1024));
  else
    std::snprintf(buf, sizeof buf, "%.1f MiB", bytes / (1024.0 * 1024));
  return buf;
}

void check_memory_fits(int64_t bytes, const std::string& what, const std::string& hint) {
  const int64_t avail = available_memory_bytes();
  if (bytes >= 0 && bytes <= avail) return;
  const std::string need = bytes >= 0 && bytes < std::numeric_limits<int64_t>::max()
                               ? format_bytes(static_cast<double>(bytes))
                               : std::string("more than 8 EiB");
  throw_input_error(str_cat(what, " needs about ", need, " of memory, but only ", format_bytes(static_cast<double>(avail)),
                            " is available", hint.empty() ? "" : "; " + hint));
}

}  // namespace eqat
