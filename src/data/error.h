// Error handling for eqat (HOUSE_STYLE.md rule 14): two kinds of checks, never mixed.
//   EQAT_CHECK  — bad input (a file, an argument, a config value). Throws eqat::InputError; the CLI prints
//                 its one-line message and exits with code 2. The message names the file/argument and the problem.
//   EQAT_ASSERT — a broken internal invariant (a bug). Throws std::logic_error; the CLI exits with code 1.
// Library code never calls exit(); apps catch at main.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace eqat {

// Bad user input. what() is a complete, single-line message.
class InputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
inline void str_append(std::ostringstream&) {}
template <typename T, typename... Rest>
void str_append(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << v;
  str_append(os, rest...);
}
}  // namespace detail

// Concatenates its arguments with operator<<.
template <typename... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  detail::str_append(os, args...);
  return os.str();
}

[[noreturn]] void throw_input_error(const std::string& msg);
[[noreturn]] void throw_internal_error(const char* file, int line, const std::string& msg);

}  // namespace eqat

#define EQAT_CHECK(cond, ...)                                    \
  do {                                                           \
    if (!(cond)) ::eqat::throw_input_error(::eqat::str_cat(__VA_ARGS__)); \
  } while (0)

#define EQAT_ASSERT(cond, ...)                                                          \
  do {                                                                                  \
    if (!(cond))                                                                        \
      ::eqat::throw_internal_error(__FILE__, __LINE__,                                  \
                                   ::eqat::str_cat("assertion failed: " #cond ". ", ##__VA_ARGS__)); \
  } while (0)
