#include "data/error.h"

namespace eqat {

[[noreturn]] void throw_input_error(const std::string& msg) {
  // Keep user-facing errors on one line whatever the caller passed in.
  std::string one_line = msg;
  for (char& c : one_line)
    if (c == '\n' || c == '\r') c = ' ';
  throw InputError(one_line);
}

[[noreturn]] void throw_internal_error(const char* file, int line, const std::string& msg) {
  throw std::logic_error(str_cat(file, ":", line, ": ", msg));
}

}  // namespace eqat
