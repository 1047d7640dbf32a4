// How many CPU threads a compute command uses. Threads that share a core with other work do not add speed: every
// parallel region ends when its slowest thread does, and a thread on a busy core runs in the scheduler's slices of a
// few milliseconds (RTN W4g128 with --threads 2 next to one busy core of two: 15× slower than one thread). So the
// automatic choice counts the cores that are actually idle, and an explicit --threads above that gets a warning.
// (The other half of the fix, OpenMP's passive wait, is set in apps/main.cpp.)
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace eqat {

// The cores this process may run on (sched_getaffinity: taskset, cgroup cpusets), ascending; all online cores when
// the affinity cannot be read.
std::vector<int> usable_cores();

// Per-core jiffies from /proc/stat text: core → {total, idle + iowait}. Lines other than "cpuN ..." are skipped.
std::map<int, std::pair<uint64_t, uint64_t>> parse_proc_stat(const std::string& text);

// Of `cores`, those that were idle at least half of the time between two /proc/stat snapshots. A core missing from
// either snapshot, or without ticks between them, counts as idle (nothing says otherwise).
int idle_cores_between(const std::string& before, const std::string& after, const std::vector<int>& cores);

// Idle usable cores, sampled from /proc/stat over `sample_ms` (at least 1; every usable core when /proc/stat cannot
// be read). EQAT_IDLE_CORES overrides the measurement (tests).
int idle_cores(int sample_ms = 100);

// Sets LibTorch's intra-op threads and returns the count. requested > 0: exactly that, with one warning line on
// stderr when it exceeds the idle cores. requested == 0 (auto): the idle usable cores, at most `auto_cap` when it is
// > 0 (tiny models run fastest on one or two threads), at least 1; no sampling when the cap or the machine allows
// only one. The idle cores are sampled once per process (the first call that needs them) and reused.
int set_compute_threads(int64_t requested, int auto_cap = 0);

}  // namespace eqat
