#include "args.h"

#include <sched.h>

#include <cerrno>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <thread>
#include <iostream>
#include <sstream>

#include "data/error.h"

namespace eqat {

namespace {
const FlagSpec* find_flag(const CommandSpec& spec, const std::string& name) {
  for (const auto& f : spec.flags)
    if (f.name == name) return &f;
  return nullptr;
}
}  // namespace

std::string format_help(const CommandSpec& spec) {
  std::ostringstream os;
  os << "usage: " << spec.usage << "\n\n" << spec.summary << "\n";
  if (!spec.flags.empty()) os << "\noptions:\n";
  for (const auto& f : spec.flags) {
    std::string lhs = "  --" + f.name + (f.metavar.empty() ? "" : " " + f.metavar);
    os << lhs << std::string(lhs.size() < 30 ? 30 - lhs.size() : 1, ' ') << f.help;
    if (!f.default_value.empty()) os << " (default: " << f.default_value << ")";
    os << "\n";
  }
  os << "  --help" << std::string(24, ' ') << "show this help\n";
  return os.str();
}

ParsedArgs parse_args(const CommandSpec& spec, const std::vector<std::string>& argv) {
  ParsedArgs out;
  out.spec_ = &spec;
  bool only_positional = false;
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& a = argv[i];
    if (!only_positional && a == "--") {
      only_positional = true;
    } else if (!only_positional && (a == "--help" || a == "-h")) {
      std::cout << format_help(spec);
      throw HelpShown{};
    } else if (!only_positional && a.size() > 2 && a.compare(0, 2, "--") == 0) {
      std::string name = a.substr(2), value;
      bool inline_value = false;
      if (size_t eq = name.find('='); eq != std::string::npos) {
        value = name.substr(eq + 1);
        name = name.substr(0, eq);
        inline_value = true;
      }
      const FlagSpec* f = find_flag(spec, name);
      EQAT_CHECK(f, "unknown option --", name, " for 'eqat ", spec.name, "' (see eqat ", spec.name, " --help)");
      if (f->metavar.empty()) {
        EQAT_CHECK(!inline_value, "--", name, " takes no value");
        value = "1";
      } else if (!inline_value) {
        EQAT_CHECK(i + 1 < argv.size(), "--", name, " needs a value (", f->metavar, ")");
        value = argv[++i];
      }
      out.values_[name] = value;
      out.repeated_[name].push_back(value);
    } else {
      out.positional_.push_back(a);
    }
  }
  const int n = static_cast<int>(out.positional_.size());
  EQAT_CHECK(n >= spec.min_positional, "'eqat ", spec.name, "' is missing an argument; usage: ", spec.usage);
  EQAT_CHECK(n <= spec.max_positional, "'eqat ", spec.name, "': unexpected argument '",
             out.positional_[spec.max_positional], "'; usage: ", spec.usage);
  return out;
}

std::string ParsedArgs::str(const std::string& name) const {
  auto it = values_.find(name);
  if (it != values_.end()) return it->second;
  const FlagSpec* f = find_flag(*spec_, name);
  return f ? f->default_value : "";
}

std::vector<std::string> ParsedArgs::all(const std::string& name) const {
  auto it = repeated_.find(name);
  return it == repeated_.end() ? std::vector<std::string>{} : it->second;
}

std::string ParsedArgs::require(const std::string& name) const {
  EQAT_CHECK(has(name), "--", name, " is required (see eqat ", spec_->name, " --help)");
  return str(name);
}

int64_t ParsedArgs::i64(const std::string& name, int64_t lo, int64_t hi) const {
  const std::string v = str(name);
  errno = 0;
  char* end = nullptr;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  EQAT_CHECK(!v.empty() && end && *end == '\0', "--", name, ": expected an integer, got '", v, "'");
  EQAT_CHECK(errno != ERANGE && x >= lo && x <= hi, "--", name, " must be in [", lo, ", ", hi, "], got ", v);
  return x;
}

double ParsedArgs::f64(const std::string& name, double lo, double hi) const {
  const std::string v = str(name);
  errno = 0;
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  EQAT_CHECK(!v.empty() && end && *end == '\0', "--", name, ": expected a number, got '", v, "'");
  EQAT_CHECK(errno != ERANGE && std::isfinite(x) && x >= lo && x <= hi, "--", name, " must be in [", lo, ", ", hi,
             "], got ", v);
  return x;
}

int ParsedArgs::threads() const {
  cpu_set_t set;  // the cores this process may run on (taskset / cgroup cpusets), not the machine's total
  CPU_ZERO(&set);
  const int cores = ::sched_getaffinity(0, sizeof(set), &set) == 0
                        ? std::max(1, CPU_COUNT(&set))
                        : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (!has("threads")) return std::min(static_cast<int>(i64("threads", 0, INT32_MAX)), cores);  // the default
  return i32("threads", 0, cores);
}

}  // namespace eqat
