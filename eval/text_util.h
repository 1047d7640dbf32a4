// Small string and directory helpers shared by the eval/ sources (no LibTorch).
#pragma once

#include <string>
#include <vector>

namespace eqat {

std::string trim(const std::string& s);                            // strips " \t\r\n"
std::vector<std::string> split(const std::string& s, char sep);    // keeps empty fields
std::vector<std::string> list_dir(const std::string& dir);         // sorted entry names; InputError when unreadable
std::string html_escape(const std::string& s);
// Tab-separated file with pandas-style quoting; rows of fields (the header is row 0).
std::vector<std::vector<std::string>> read_tsv(const std::string& path);
std::string base64_decode(const std::string& in, const std::string& what);  // InputError naming `what`

}  // namespace eqat
