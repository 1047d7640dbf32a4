#include "serve_api.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>

#include "data/fs.h"

namespace eqat {

using nlohmann::json;

ApiError::ApiError(int status_, std::string message, std::string param_, std::string code_)
    : std::runtime_error(std::move(message)), status(status_), param(std::move(param_)), code(std::move(code_)) {}

namespace {
std::string error_type(int status) {
  switch (status) {
    case 401: return "authentication_error";
    case 403: return "permission_error";
    case 404: return "not_found_error";
    case 429: return "rate_limit_error";
    default: return status >= 500 ? "server_error" : "invalid_request_error";
  }
}
}  // namespace

std::string ApiError::type() const { return error_type(status); }

std::string api_error_json(int status, const std::string& message, const std::string& param, const std::string& code) {
  json e = {{"message", message}, {"type", error_type(status)}};
  e["param"] = param.empty() ? json(nullptr) : json(param);
  e["code"] = code.empty() ? json(nullptr) : json(code);
  return json{{"error", e}}.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string ApiError::json() const { return api_error_json(status, what(), param, code); }

// ---------------------------------------------------------------------------------------------------------------
namespace {

[[noreturn]] void bad(const std::string& param, const std::string& msg) { throw ApiError(400, param + ": " + msg, param); }

double number_in(const json& j, const char* key, double lo, double hi, double dflt) {
  if (!j.contains(key) || j[key].is_null()) return dflt;
  if (!j[key].is_number()) bad(key, "must be a number");
  const double v = j[key].get<double>();
  if (!std::isfinite(v) || v < lo || v > hi) bad(key, "must be in [" + json(lo).dump() + ", " + json(hi).dump() + "]");
  return v;
}

int64_t integer_in(const json& j, const char* key, int64_t lo, int64_t hi, int64_t dflt) {
  if (!j.contains(key) || j[key].is_null()) return dflt;
  if (!j[key].is_number_integer()) bad(key, "must be an integer");
  // Integers beyond int64 arrive as unsigned or fail is_number_integer; both are out of range.
  if (j[key].is_number_unsigned() && j[key].get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
    bad(key, "is out of range");
  const int64_t v = j[key].get<int64_t>();
  if (v < lo || v > hi) bad(key, "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return v;
}

void parse_content(const json& content, const std::string& where, ChatMessage* msg, ChatRequest* req) {
  if (content.is_string()) {
    msg->text = content.get<std::string>();
    return;
  }
  if (content.is_null() && msg->role == "assistant") return;
  if (!content.is_array()) bad(where, "must be a string or an array of content parts");
  for (size_t k = 0; k < content.size(); ++k) {
    const json& part = content[k];
    const std::string p = where + "[" + std::to_string(k) + "]";
    if (!part.is_object() || !part.contains("type") || !part["type"].is_string())
      bad(p, "must be an object with a \"type\"");
    const std::string type = part["type"].get<std::string>();
    if (type == "text") {
      if (!part.contains("text") || !part["text"].is_string()) bad(p + ".text", "must be a string");
      if (!msg->text.empty()) msg->text += "\n";
      msg->text += part["text"].get<std::string>();
    } else if (type == "image_url") {
      if (msg->role != "user") bad(p, "images belong in user messages");
      const json& iu = part.contains("image_url") ? part["image_url"] : json();
      std::string url;
      if (iu.is_string()) url = iu.get<std::string>();  // a shorthand some clients send
      else if (iu.is_object() && iu.contains("url") && iu["url"].is_string()) url = iu["url"].get<std::string>();
      else bad(p + ".image_url", "must be an object with a string \"url\"");
      if (!req->image_url.empty())
        throw ApiError(400, p + ": this model takes one image per conversation (LLaVA-1.5), found a second",
                       p + ".image_url");
      req->image_url = url;
      req->image_param = p + ".image_url";
      msg->has_image = true;
    } else {
      bad(p + ".type", "unsupported content part '" + type + "' (text and image_url are)");
    }
  }
}

}  // namespace

ChatRequest parse_chat_request(const std::string& body) {
  json j;
  try {
    j = json::parse(body);
  } catch (const json::parse_error& e) {
    throw ApiError(400, std::string("request body is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) throw ApiError(400, "request body must be a JSON object");
  ChatRequest r;
  if (j.contains("model") && !j["model"].is_null()) {
    if (!j["model"].is_string()) bad("model", "must be a string");
    r.model = j["model"].get<std::string>();
  }
  if (!j.contains("messages") || !j["messages"].is_array() || j["messages"].empty())
    bad("messages", "must be a non-empty array");
  const json& ms = j["messages"];
  for (size_t i = 0; i < ms.size(); ++i) {
    const std::string where = "messages[" + std::to_string(i) + "]";
    if (!ms[i].is_object() || !ms[i].contains("role") || !ms[i]["role"].is_string())
      bad(where, "must be an object with a string \"role\"");
    ChatMessage m;
    m.role = ms[i]["role"].get<std::string>();
    if (m.role == "developer") m.role = "system";
    if (m.role != "system" && m.role != "user" && m.role != "assistant")
      bad(where + ".role", "must be system, user or assistant, got '" + m.role + "'");
    if (!ms[i].contains("content")) bad(where + ".content", "is required");
    parse_content(ms[i]["content"], where + ".content", &m, &r);
    if (m.role == "system" && m.has_image) bad(where, "a system message cannot carry an image");
    r.messages.push_back(std::move(m));
  }
  if (r.messages.back().role != "user") bad("messages", "the last message must be the user's");
  r.temperature = number_in(j, "temperature", 0, 2, 1.0);
  r.top_p = number_in(j, "top_p", 0, 1, 1.0);
  if (r.top_p <= 0) bad("top_p", "must be > 0");
  // max_completion_tokens is the newer name; either bounds the answer.
  r.max_tokens = integer_in(j, "max_completion_tokens", 1, INT32_MAX, -1);
  r.max_tokens = integer_in(j, "max_tokens", 1, INT32_MAX, r.max_tokens);
  r.has_seed = j.contains("seed") && !j["seed"].is_null();
  r.seed = integer_in(j, "seed", INT64_MIN, INT64_MAX, -1);
  if (integer_in(j, "n", 1, 1, 1) != 1) bad("n", "only n = 1 is supported");
  if (j.contains("stop") && !j["stop"].is_null()) {
    const json& s = j["stop"];
    if (s.is_string()) r.stop.push_back(s.get<std::string>());
    else if (s.is_array() && s.size() <= 4) {
      for (const auto& x : s) {
        if (!x.is_string()) bad("stop", "must be a string or an array of up to 4 strings");
        r.stop.push_back(x.get<std::string>());
      }
    } else {
      bad("stop", "must be a string or an array of up to 4 strings");
    }
    for (const auto& x : r.stop)
      if (x.empty()) bad("stop", "stop strings must not be empty");
  }
  if (j.contains("stream") && !j["stream"].is_null()) {
    if (!j["stream"].is_boolean()) bad("stream", "must be a boolean");
    r.stream = j["stream"].get<bool>();
  }
  if (j.contains("stream_options") && j["stream_options"].is_object() && j["stream_options"].contains("include_usage"))
    r.include_usage = j["stream_options"]["include_usage"].is_boolean() && j["stream_options"]["include_usage"].get<bool>();
  if (j.contains("ignore_eos") && !j["ignore_eos"].is_null()) {
    if (!j["ignore_eos"].is_boolean()) bad("ignore_eos", "must be a boolean");
    r.ignore_eos = j["ignore_eos"].get<bool>();
  }
  for (const char* unsupported : {"tools", "functions", "logprobs", "top_logprobs"})
    if (j.contains(unsupported) && !j[unsupported].is_null() && j[unsupported] != json(false))
      bad(unsupported, "is not supported by this server");
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
std::string base64_decode(const std::string& in) {
  auto val = [](unsigned char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+' || c == '-') return 62;  // standard and URL-safe alphabets
    if (c == '/' || c == '_') return 63;
    return -1;
  };
  std::string out;
  out.reserve(in.size() / 4 * 3);
  uint32_t acc = 0;
  int bits = 0;
  size_t pad = 0;
  for (unsigned char c : in) {
    if (c == '=') {
      ++pad;
      continue;
    }
    if (c == '\n' || c == '\r' || c == ' ') continue;
    const int v = val(c);
    if (v < 0 || pad > 0) throw ApiError(400, "invalid base64 data");
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xFF));
    }
  }
  if (pad > 2 || bits >= 6) throw ApiError(400, "invalid base64 data (truncated)");
  return out;
}

double prometheus_value(const std::string& text, const std::string& name) {
  // A sample line: NAME{labels} VALUE, at the start of a line.
  for (size_t p = text.find(name + "{"); p != std::string::npos; p = text.find(name + "{", p + 1)) {
    if (p > 0 && text[p - 1] != '\n') continue;
    const size_t close = text.find("} ", p);
    const size_t eol = text.find('\n', p);
    if (close == std::string::npos || close > eol) continue;
    try {
      return std::stod(text.substr(close + 2, eol == std::string::npos ? std::string::npos : eol - close - 2));
    } catch (const std::exception&) {
      return -1;
    }
  }
  return -1;
}

std::string fetch_image_bytes(const std::string& url, const std::string& param, const std::string& local_dir,
                              int64_t max_bytes) {
  auto starts = [&](const char* p) { return url.rfind(p, 0) == 0; };
  if (starts("data:")) {
    const size_t comma = url.find(',');
    if (comma == std::string::npos) bad(param, "malformed data: URL (no comma)");
    const std::string meta = url.substr(5, comma - 5);
    if (meta.size() < 7 || meta.compare(meta.size() - 7, 7, ";base64") != 0)
      bad(param, "data: URLs must be base64-encoded (data:image/png;base64,...)");
    if (static_cast<int64_t>(url.size() - comma - 1) / 4 * 3 > max_bytes)
      throw ApiError(413, param + ": image larger than the server's limit of " + std::to_string(max_bytes) + " bytes",
                     param);
    try {
      return base64_decode(url.substr(comma + 1));
    } catch (const ApiError& e) {
      bad(param, e.what());
    }
  }
  if (starts("http://") || starts("https://"))
    bad(param, "this server does not fetch remote images; send the image inline as a data: URL "
               "(data:image/jpeg;base64,...)");
  if (local_dir.empty())
    bad(param, "expected a data: URL; local files are served only when the server runs with --allow-local-files DIR");
  std::string path = starts("file://") ? url.substr(7) : url;
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path real = fs::weakly_canonical(fs::path(path), ec);
  const fs::path root = fs::weakly_canonical(fs::path(local_dir), ec);
  const std::string r = root.string(), p = real.string();
  const bool inside = !ec && p.size() > r.size() && p.compare(0, r.size(), r) == 0 &&
                      (r.back() == '/' || p[r.size()] == '/');
  if (!inside) bad(param, "local image '" + path + "' is outside the --allow-local-files directory");
  try {
    return read_file(p, max_bytes);
  } catch (const std::exception& e) {
    bad(param, e.what());
  }
}

// ---------------------------------------------------------------------------------------------------------------
// ---------------------------------------------------------------------------------------------------------------
std::string TextAssembler::push(const std::string& text) {
  if (stopped_) return "";
  std::string t = text;
  if (!started_) {
    const size_t b = t.find_first_not_of(" \t\n\r");
    if (b == std::string::npos) return "";
    t = t.substr(b);
    started_ = true;
  }
  pending_ += t;
  // A stop string inside pending_: cut there and stop.
  size_t cut = std::string::npos;
  for (const auto& s : stop_) cut = std::min(cut, pending_.find(s));
  if (cut != std::string::npos) {
    std::string out = pending_.substr(0, cut);
    pending_.clear();
    stopped_ = true;
    sent_ += out;
    return out;
  }
  // Hold back the longest suffix of pending_ that begins a stop string.
  size_t hold = 0;
  for (const auto& s : stop_)
    for (size_t k = std::min(s.size() - 1, pending_.size()); k > hold; --k)
      if (pending_.compare(pending_.size() - k, k, s, 0, k) == 0) {
        hold = k;
        break;
      }
  std::string out = pending_.substr(0, pending_.size() - hold);
  pending_.erase(0, pending_.size() - hold);
  sent_ += out;
  return out;
}

std::string TextAssembler::finish() {
  if (stopped_) return "";
  std::string out = std::move(pending_);
  pending_.clear();
  sent_ += out;
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
namespace {
json usage_json(const Usage& u) {
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens}};
}
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }
}  // namespace

std::string completion_json(const std::string& id, int64_t created, const std::string& model,
                            const std::string& content, const std::string& finish_reason, const Usage& usage) {
  json choice = {{"index", 0},
                 {"message", {{"role", "assistant"}, {"content", content}}},
                 {"finish_reason", finish_reason},
                 {"logprobs", nullptr}};
  return dump({{"id", id},
               {"object", "chat.completion"},
               {"created", created},
               {"model", model},
               {"choices", json::array({choice})},
               {"usage", usage_json(usage)}});
}

std::string chunk_event(const std::string& id, int64_t created, const std::string& model, const std::string& delta,
                        bool role, const std::string& finish_reason, const Usage* usage) {
  json d = json::object();
  if (role) d["role"] = "assistant";
  if (!delta.empty() || role) d["content"] = delta;
  json choice = {{"index", 0}, {"delta", d}, {"logprobs", nullptr}};
  choice["finish_reason"] = finish_reason.empty() ? json(nullptr) : json(finish_reason);
  json c = {{"id", id},
            {"object", "chat.completion.chunk"},
            {"created", created},
            {"model", model},
            {"choices", json::array({choice})}};
  if (usage) c["usage"] = usage_json(*usage);
  return "data: " + dump(c) + "\n\n";
}

std::string usage_only_event(const std::string& id, int64_t created, const std::string& model, const Usage& usage) {
  json c = {{"id", id},         {"object", "chat.completion.chunk"}, {"created", created},
            {"model", model},   {"choices", json::array()},          {"usage", usage_json(usage)}};
  return "data: " + dump(c) + "\n\n";
}

bool bearer_matches(const std::string& header, const std::string& key) {
  const std::string want = "Bearer " + key;
  // Every byte of the longer string is visited whatever matches, so the time does not reveal a prefix.
  const size_t n = std::max(header.size(), want.size());
  unsigned diff = header.size() == want.size() ? 0u : 1u;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char a = i < header.size() ? static_cast<unsigned char>(header[i]) : 0;
    const unsigned char b = i < want.size() ? static_cast<unsigned char>(want[i]) : 0;
    diff |= static_cast<unsigned>(a ^ b);
  }
  return diff == 0;
}

}  // namespace eqat
