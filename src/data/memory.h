// Up-front memory checks: before a large allocation (model weights converted to the compute dtype, a KV cache),
// estimate its size and refuse, in one line, what this machine cannot hold — instead of letting LibTorch's
// allocator abort or the kernel's OOM killer end the process half-way.
#pragma once

#include <cstdint>
#include <string>

namespace eqat {

// Bytes of memory a new allocation can get without swapping: /proc/meminfo MemAvailable (free + reclaimable page
// cache), else physical memory (sysconf _SC_PHYS_PAGES × page size); capped by RLIMIT_AS when one is set. The
// environment variable EQAT_MEMORY_LIMIT_MB overrides the measurement (tests, containers whose cgroup limit
// /proc/meminfo does not show).
int64_t available_memory_bytes();

// "3.2 GiB" / "512.0 MiB".
std::string format_bytes(double bytes);

// InputError "<what> needs about X of memory, but only Y is available[; hint]" when `bytes` exceeds
// available_memory_bytes(). Negative or overflowing estimates (products of hostile sizes) count as too much.
void check_memory_fits(int64_t bytes, const std::string& what, const std::string& hint = "");

// a * b, or INT64_MAX when it overflows (sizes derived from user input are multiplied saturating).
int64_t mul_sat(int64_t a, int64_t b);
int64_t add_sat(int64_t a, int64_t b);

}  // namespace eqat
