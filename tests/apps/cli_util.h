// Helpers for the tests that run the eqat binary (EQAT_BIN): run it, capture stdout/stderr, check the bad-input
// contract (exit 2, one line on stderr naming the argument or file).
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "model_test_util.h"

namespace eqat_test {

struct RunResult {
  int code = -1;
  std::string out, err;
};

inline std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += (c == '\'') ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

inline RunResult run_eqat(const std::vector<std::string>& args) {
  TempDir io;
  std::string cmd = quote(EQAT_BIN);
  for (const auto& a : args) cmd += " " + quote(a);
  cmd += " >" + io.str("out") + " 2>" + io.str("err");
  int st = std::system(cmd.c_str());
  RunResult r;
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  r.out = slurp(io.str("out"));
  r.err = slurp(io.str("err"));
  return r;
}

// The contract for bad input: exit 2 and exactly one line on stderr that mentions `needle`.
inline void expect_input_error(const RunResult& r, const std::string& needle) {
  EXPECT_EQ(r.code, 2) << r.err;
  ASSERT_FALSE(r.err.empty());
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find(needle), std::string::npos) << "stderr: " << r.err << " lacks " << needle;
}

inline std::string copy_fixture(const TempDir& t, const std::string& name) {
  std::filesystem::path dst = t.path / name;
  std::filesystem::copy(fixture(name), dst, std::filesystem::copy_options::recursive);
  return dst.string();
}

inline void write_text(const std::string& path, const std::string& s) {
  std::ofstream(path, std::ios::binary) << s;
}

inline std::string strip(const std::string& s) {
  size_t b = s.find_first_not_of(" \n"), e = s.find_last_not_of(" \n");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

}  // namespace eqat_test
