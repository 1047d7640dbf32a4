// Argument lists of `eqat bench` (cmd_bench.cpp, bench_decode.cpp, bench_quant.cpp): every number is parsed in
// full and range-checked, so a zero, negative or absurd size is one InputError naming the flag — never a division
// by zero, a std::stoll exception or an allocation of terabytes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace eqat {

// One decimal integer in [lo, hi]; `flag` and the whole list `context` name it in the message.
int64_t bench_int(const std::string& flag, const std::string& item, int64_t lo, int64_t hi);
// A comma-separated list of such integers (empty entries are an error, the list must not be empty).
std::vector<int64_t> bench_int_list(const std::string& flag, const std::string& list, int64_t lo, int64_t hi);

// A packed format "W<bits>g<group>": bits 2, 3 or 4; group a positive multiple of 32 up to kMaxBenchDim.
struct BenchFormat {
  std::string name;
  int bits = 0;
  int64_t group = 0;
};
BenchFormat bench_format(const std::string& flag, const std::string& item);

// Matrix sides: 1 .. 65536 (2^16; a 65536 x 65536 fp32 weight is already 16 GiB).
constexpr int64_t kMaxBenchDim = int64_t{1} << 16;

}  // namespace eqat
