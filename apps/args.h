// Minimal declarative flag parsing for the eqat subcommands: each command declares its flags once, which drives
// both parsing and --help (so they cannot drift apart). Errors are InputErrors naming the argument.
#pragma once

#include <cstdint>
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
  int64_t i64(const std::string& name) const;
  double f64(const std::string& name) const;
  const std::vector<std::string>& positional() const { return positional_; }
  std::string require(const std::string& name) const;  // InputError "--name is required"

 private:
  friend ParsedArgs parse_args(const CommandSpec&, const std::vector<std::string>&);
  const CommandSpec* spec_ = nullptr;
  std::map<std::string, std::string> values_;
  std::vector<std::string> positional_;
};

ParsedArgs parse_args(const CommandSpec& spec, const std::vector<std::string>& argv);
std::string format_help(const CommandSpec& spec);

}  // namespace eqat
