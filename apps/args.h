// Minimal declarative flag parsing for the eqat subcommands: each command declares its flags once, which drives
// both parsing and --help (so they cannot drift apart). Errors are InputErrors naming the argument.
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <vector>

namespace eqat {

struct FlagSpec {
  std::string name;     // without the leading "--"
  std::string metavar;  // empty for boolean switches
  std::string help;
  std::string default_value;  // shown in --help; returned by get() when absent
};

struct CommandSpec {
  std::string name;
  std::string usage;    // e.g. "eqat ask [--model DIR] --image FILE [options] QUESTION"
  std::string summary;  // one line
  std::vector<FlagSpec> flags;
  int min_positional = 0, max_positional = 0;
};

// Thrown when --help was printed; main returns 0.
struct HelpShown {};

class ParsedArgs {
 public:
  bool has(const std::string& name) const { return values_.count(name) != 0; }
  bool flag(const std::string& name) const { return has(name); }
  std::string str(const std::string& name) const;
  // Numeric flags, range-checked here and only here: every numeric flag is read through one of these, so no
  // value is cut to 32 bits or used out of range. InputError "--name must be in [lo, hi], got V" otherwise;
  // non-numbers, trailing junk, values beyond 64 bits and non-finite numbers are refused the same way.
  int64_t i64(const std::string& name, int64_t lo, int64_t hi) const;
  int i32(const std::string& name, int lo, int hi) const { return static_cast<int>(i64(name, lo, hi)); }
  double f64(const std::string& name, double lo, double hi) const;
  // --threads: 0 (auto) up to the machine's cores; more threads than cores only spin on a 2-core machine.
  int threads() const;
  // Every value of a flag given more than once, in order (str() returns the last).
  std::vector<std::string> all(const std::string& name) const;
  const std::vector<std::string>& positional() const { return positional_; }
  std::string require(const std::string& name) const;  // InputError "--name is required"

 private:
  friend ParsedArgs parse_args(const CommandSpec&, const std::vector<std::string>&);
  const CommandSpec* spec_ = nullptr;
  std::map<std::string, std::string> values_;
  std::map<std::string, std::vector<std::string>> repeated_;
  std::vector<std::string> positional_;
};

ParsedArgs parse_args(const CommandSpec& spec, const std::vector<std::string>& argv);
std::string format_help(const CommandSpec& spec);

}  // namespace eqat
