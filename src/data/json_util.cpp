#include "data/json_util.h"

#include <cstdio>

#include "data/error.h"
#include "data/fs.h"

namespace eqat {

std::string json_error_message(const std::exception& e) {
  std::string msg = e.what();
  if (msg.rfind("[json.exception.", 0) == 0) {
    const size_t close = msg.find("] ");
    if (close != std::string::npos) msg = msg.substr(close + 2);
  }
  std::string out;
  for (unsigned char c : msg) {
    if (out.size() >= 160) {
      out += "...";
      break;
    }
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02X", c);
      out += buf;
    }
  }
  return out;
}

nlohmann::json parse_json_text(const std::string& text, const std::string& source) {
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw_input_error(str_cat(source, ": not valid JSON (", json_error_message(e), ")"));
  }
}

nlohmann::json parse_json_path(const std::string& path) { return parse_json_text(read_file(path), path); }

}  // namespace eqat
