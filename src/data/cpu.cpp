#include "data/cpu.h"

#include <ATen/Parallel.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

namespace eqat {

std::vector<int> usable_cores() {
  std::vector<int> out;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof(set), &set) == 0) {
    for (int c = 0; c < CPU_SETSIZE; ++c)
      if (CPU_ISSET(c, &set)) out.push_back(c);
  }
  if (out.empty()) {
    const long n = ::sysconf(_SC_NPROCESSORS_ONLN);
    for (long c = 0; c < std::max(1L, n); ++c) out.push_back(static_cast<int>(c));
  }
  return out;
}

std::map<int, std::pair<uint64_t, uint64_t>> parse_proc_stat(const std::string& text) {
  std::map<int, std::pair<uint64_t, uint64_t>> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.size() < 4 || line.compare(0, 3, "cpu") != 0 || line[3] < '0' || line[3] > '9') continue;
    std::istringstream ls(line.substr(3));
    int core = -1;
    ls >> core;
    // user nice system idle iowait irq softirq steal (guest time is already inside user/nice)
    uint64_t v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int n = 0;
    while (n < 8 && ls >> v[n]) ++n;
    if (core < 0 || n < 4) continue;
    uint64_t total = 0;
    for (int i = 0; i < n; ++i) total += v[i];
    out[core] = {total, v[3] + (n > 4 ? v[4] : 0)};
  }
  return out;
}

int idle_cores_between(const std::string& before, const std::string& after, const std::vector<int>& cores) {
  const auto a = parse_proc_stat(before), b = parse_proc_stat(after);
  int idle = 0;
  for (int c : cores) {
    auto ia = a.find(c), ib = b.find(c);
    if (ia == a.end() || ib == b.end() || ib->second.first <= ia->second.first) {
      ++idle;
      continue;
    }
    const uint64_t total = ib->second.first - ia->second.first;
    const uint64_t free = ib->second.second >= ia->second.second ? ib->second.second - ia->second.second : 0;
    if (2 * free >= total) ++idle;
  }
  return idle;
}

namespace {
std::string read_proc_stat() {
  std::ifstream f("/proc/stat");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}
}  // namespace

int idle_cores(int sample_ms) {
  const std::vector<int> cores = usable_cores();
  if (const char* env = std::getenv("EQAT_IDLE_CORES")) {
    const int n = std::atoi(env);
    if (n >= 1) return std::min(n, static_cast<int>(cores.size()));
  }
  const std::string before = read_proc_stat();
  if (before.empty()) return static_cast<int>(cores.size());
  std::this_thread::sleep_for(std::chrono::milliseconds(sample_ms));
  return std::max(1, idle_cores_between(before, read_proc_stat(), cores));
}

int set_compute_threads(int64_t requested, int auto_cap) {
  static const int kUnmeasured = -1;
  static int idle_at_start = kUnmeasured;  // sampled once per process: a command decides at its start
  auto idle_now = [&] { return idle_at_start == kUnmeasured ? (idle_at_start = idle_cores()) : idle_at_start; };
  const int usable = static_cast<int>(usable_cores().size());
  int n;
  if (requested > 0) {
    n = static_cast<int>(std::min<int64_t>(requested, 1 << 16));
    if (n > 1) {
      const int idle = idle_now();
      if (n > idle)
        std::fprintf(stderr,
                     "warning: --threads %d, but only %d of the %d usable cores are idle; a thread on a busy core "
                     "slows every step (--threads 0 picks the idle cores)\n",
                     n, idle, usable);
    }
  } else {
    const int cap = auto_cap > 0 ? std::min(auto_cap, usable) : usable;
    n = cap <= 1 ? 1 : std::min(cap, idle_now());
  }
  at::set_num_threads(n);
  return n;
}

}  // namespace eqat
