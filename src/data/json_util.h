// JSON from user files: every nlohmann exception becomes an InputError naming the file, with nlohmann's
// "[json.exception.parse_error.101] " prefix removed and any quoted bytes made printable (a binary file must not
// print its bytes to the terminal).
#pragma once

#include <nlohmann/json.hpp>

#include <string>

namespace eqat {

// nlohmann's what() without the "[json.exception.<kind>.<id>] " prefix; bytes outside printable ASCII as \xNN;
// at most 160 characters.
std::string json_error_message(const std::exception& e);

// Parses `text` read from `source`; InputError "<source>: not valid JSON (<reason>)".
nlohmann::json parse_json_text(const std::string& text, const std::string& source);
// read_file + parse_json_text.
nlohmann::json parse_json_path(const std::string& path);

}  // namespace eqat
