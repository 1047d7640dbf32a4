// Thread choice (data/cpu.h): /proc/stat parsing, which cores count as idle between two snapshots, and the
// automatic and explicit thread counts. The snapshots are written here, so nothing depends on this machine's load.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <cstdlib>

#include "data/cpu.h"

using namespace eqat;

namespace {
// One /proc/stat "cpuN" line: user nice system idle iowait irq softirq steal.
std::string core(int n, uint64_t user, uint64_t system, uint64_t idle, uint64_t iowait) {
  return "cpu" + std::to_string(n) + " " + std::to_string(user) + " 0 " + std::to_string(system) + " " +
         std::to_string(idle) + " " + std::to_string(iowait) + " 0 0 0 0 0\n";
}
}  // namespace

TEST(Cpu, ParsesPerCoreLinesOnly) {
  const std::string text = "cpu  500 0 100 900 10 0 0 0 0 0\n" + core(0, 100, 50, 400, 5) + core(3, 7, 1, 2, 0) +
                           "intr 12345 0 0\nctxt 99\ncpufreq 1\n";
  const auto m = parse_proc_stat(text);
  ASSERT_EQ(m.size(), 2u);  // the aggregate "cpu " line and non-cpu lines are skipped
  EXPECT_EQ(m.at(0).first, 555u);
  EXPECT_EQ(m.at(0).second, 405u);  // idle + iowait
  EXPECT_EQ(m.at(3).first, 10u);
  EXPECT_TRUE(parse_proc_stat("cpu0 1 2\ngarbage\n").empty());  // fewer than four fields
}

TEST(Cpu, CountsCoresIdleAtLeastHalfTheInterval) {
  const std::string before = core(0, 1000, 0, 1000, 0) + core(1, 1000, 0, 1000, 0) + core(2, 0, 0, 0, 0);
  // core 0: 100 busy, 0 idle of 100 ticks (busy); core 1: 40 busy, 60 idle (idle); core 2: exactly half idle.
  const std::string after = core(0, 1100, 0, 1000, 0) + core(1, 1030, 10, 1050, 10) + core(2, 0, 5, 0, 5);
  EXPECT_EQ(idle_cores_between(before, after, {0}), 0);
  EXPECT_EQ(idle_cores_between(before, after, {1}), 1);
  EXPECT_EQ(idle_cores_between(before, after, {2}), 1);
  EXPECT_EQ(idle_cores_between(before, after, {0, 1, 2}), 2);
  // Cores outside the affinity set do not count; a core missing from a snapshot or without ticks counts as idle.
  EXPECT_EQ(idle_cores_between(before, after, {1, 7}), 2);
  EXPECT_EQ(idle_cores_between(before, before, {0, 1}), 2);
}

TEST(Cpu, AutomaticThreadsFollowTheIdleCores) {
  const int usable = static_cast<int>(usable_cores().size());
  ASSERT_GE(usable, 1);
  ::setenv("EQAT_IDLE_CORES", "1", 1);
  EXPECT_EQ(idle_cores(), 1);
  EXPECT_EQ(set_compute_threads(0), 1);  // one idle core: one thread, whatever the machine has
  EXPECT_EQ(at::get_num_threads(), 1);
  EXPECT_EQ(set_compute_threads(0, 1), 1);
  EXPECT_EQ(set_compute_threads(3), 3);  // explicit: as asked (with a warning when above the idle cores)
  EXPECT_EQ(at::get_num_threads(), 3);
  ::setenv("EQAT_IDLE_CORES", "100000", 1);
  EXPECT_EQ(idle_cores(), usable);  // never more than the usable cores
  ::unsetenv("EQAT_IDLE_CORES");
  at::set_num_threads(1);
}
