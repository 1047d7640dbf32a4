// eqat serve, the protocol side: OpenAI chat-completions requests parsed and checked, image URLs resolved, responses
// and server-sent-event chunks in OpenAI's schema, stop strings on the streamed text. No HTTP and no model here
// (serve_engine.h renders the prompt with llm/prompt.h and runs the model, serve_http.h speaks HTTP), so all of it is
// testable on plain strings.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "llm/prompt.h"

namespace eqat {

// A request the server refuses: HTTP status + OpenAI's error object
//   {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
struct ApiError : std::runtime_error {
  ApiError(int status, std::string message, std::string param = "", std::string code = "");
  int status;
  std::string param, code;
  std::string type() const;  // invalid_request_error | authentication_error | rate_limit_error | server_error ...
  std::string json() const;
};
std::string api_error_json(int status, const std::string& message, const std::string& param = "",
                           const std::string& code = "");

// Chat messages are llm/prompt.h's ChatMessage: role, text (a message's text parts joined by "\n"), has_image
// (at most one image per request: LLaVA-1.5 sees one).
struct ChatRequest {
  std::string model;                  // empty: the server's first model
  std::vector<ChatMessage> messages;  // at least one; the last is the user's
  std::string image_url;              // the one image_url's url ("" when none)
  std::string image_param;            // where it was, e.g. "messages[0].content[1].image_url"
  double temperature = 1.0;           // OpenAI's defaults
  double top_p = 1.0;
  int64_t max_tokens = -1;            // -1: up to the context
  int64_t seed = -1;                  // -1: a fresh random seed per request
  bool has_seed = false;
  std::vector<std::string> stop;      // up to 4 stop strings
  bool stream = false;
  bool include_usage = false;         // stream_options.include_usage
  bool ignore_eos = false;            // vLLM's extension: generate until max_tokens
};

// Parses and checks a request body. ApiError 400 naming the field for malformed JSON, wrong types, out-of-range
// values, unsupported options (n > 1, tools, logprobs) and a conversation that does not end with a user message.
ChatRequest parse_chat_request(const std::string& body);

// The image bytes of a data: URL (base64 PNG/JPEG/GIF/BMP). http(s) URLs are refused (the server fetches nothing);
// file: URLs and plain paths are read only under `local_dir` (empty: refused), after resolving symlinks and "..".
// ApiError 400 naming `param` otherwise.
std::string fetch_image_bytes(const std::string& url, const std::string& param, const std::string& local_dir,
                              int64_t max_bytes);
std::string base64_decode(const std::string& in);  // ApiError 400 on a character outside the alphabet

// The value of the first series named `name` in Prometheus text (/metrics), -1 when absent (clients of /metrics).
double prometheus_value(const std::string& metrics_text, const std::string& name);

// The answer text as it streams: leading whitespace dropped (LLaVA strips answers), stop strings cut the text
// before them, and text that could still become a stop string is held back until it cannot.
class TextAssembler {
 public:
  explicit TextAssembler(std::vector<std::string> stop) : stop_(std::move(stop)) {}
  // Appends decoded text; returns what may be sent now. After a stop string matched, stopped() is true and
  // later text is ignored.
  std::string push(const std::string& text);
  std::string finish();  // the held-back rest (nothing when stopped)
  bool stopped() const { return stopped_; }
  const std::string& text() const { return sent_; }  // everything returned so far

 private:
  std::vector<std::string> stop_;
  std::string pending_, sent_;
  bool started_ = false, stopped_ = false;
};

// Response bodies (OpenAI's chat.completion and chat.completion.chunk objects).
struct Usage {
  int64_t prompt_tokens = 0, completion_tokens = 0;
};
std::string completion_json(const std::string& id, int64_t created, const std::string& model,
                            const std::string& content, const std::string& finish_reason, const Usage& usage);
// One SSE event "data: {chunk}\n\n". `role` only in the first chunk; `finish_reason` and `usage` only in the
// last (usage: completion_tokens < 0 leaves it out).
std::string chunk_event(const std::string& id, int64_t created, const std::string& model, const std::string& delta,
                        bool role, const std::string& finish_reason, const Usage* usage);
std::string usage_only_event(const std::string& id, int64_t created, const std::string& model, const Usage& usage);

// Constant-time comparison of an Authorization header with "Bearer " + key.
bool bearer_matches(const std::string& header, const std::string& key);

}  // namespace eqat
