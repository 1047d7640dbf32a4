#include "llm/prompt.h"

#include "data/error.h"
#include "data/fs.h"
#include "data/json_util.h"

namespace eqat {

const char* const kVicunaSystem =
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.";

PromptTemplate parse_template(const std::string& name) {
  if (name == "llava-1.5") return PromptTemplate::kLlava15;
  if (name == "hf") return PromptTemplate::kHf;
  if (name == "none") return PromptTemplate::kNone;
  throw_input_error(str_cat("--template: unknown template '", name, "' (choose llava-1.5, hf or none)"));
}

const char* template_name(PromptTemplate t) {
  switch (t) {
    case PromptTemplate::kLlava15: return "llava-1.5";
    case PromptTemplate::kHf: return "hf";
    case PromptTemplate::kNone: return "none";
    case PromptTemplate::kCount: break;
  }
  return "?";
}

namespace {
std::string strip(const std::string& s) {
  const char* ws = " \t\n\r\f\v";
  size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  size_t e = s.find_last_not_of(ws);
  return s.substr(b, e - b + 1);
}

std::string remove_all(std::string s, const std::string& what) {
  for (size_t p; (p = s.find(what)) != std::string::npos;) s.erase(p, what.size());
  return s;
}
}  // namespace

size_t count_image_markers(const std::string& prompt) {
  size_t n = 0;
  for (size_t p = prompt.find(kImageMarker); p != std::string::npos; p = prompt.find(kImageMarker, p + 1)) ++n;
  return n;
}

std::string model_template(const std::string& dir, const std::string& fallback) {
  const nlohmann::json cfg = parse_json_path(path_join(dir, "config.json"));
  auto it = cfg.find("conv_template");
  return it != cfg.end() && it->is_string() ? it->get<std::string>() : fallback;
}

std::string render_prompt(PromptTemplate t, const std::string& text, bool with_image) {
  if (t == PromptTemplate::kNone) return text;
  std::string msg = with_image ? std::string(kImageMarker) + "\n" + strip(remove_all(text, kImageMarker)) : text;
  if (t == PromptTemplate::kLlava15) return std::string(kVicunaSystem) + " USER: " + msg + " ASSISTANT:";
  return "USER: " + msg + " ASSISTANT:";
}

std::vector<int64_t> tokenize_prompt(const Tokenizer& tok, const std::string& prompt, int64_t image_token_id,
                                     int64_t image_tokens) {
  std::vector<int64_t> ids{tok.bos_id()};
  size_t start = 0;
  const std::string marker = kImageMarker;
  while (true) {
    size_t p = prompt.find(marker, start);
    std::string chunk = prompt.substr(start, p == std::string::npos ? std::string::npos : p - start);
    if (!chunk.empty()) {
      std::vector<int64_t> c = tok.encode(chunk, /*add_bos=*/false);
      ids.insert(ids.end(), c.begin(), c.end());
    }
    if (p == std::string::npos) break;
    EQAT_CHECK(image_token_id >= 0, "the prompt contains <image> but the model has no image token");
    ids.insert(ids.end(), static_cast<size_t>(image_tokens), image_token_id);
    start = p + marker.size();
  }
  return ids;
}

TokenizedConversation tokenize_conversation(const Tokenizer& tok, const std::vector<Turn>& turns, bool with_image,
                                            int64_t image_token_id, int64_t image_tokens) {
  EQAT_CHECK(!turns.empty(), "conversation has no turns");
  TokenizedConversation out;
  for (size_t i = 0; i < turns.size(); ++i) {
    std::vector<int64_t> prompt_ids;
    if (i == 0) {
      prompt_ids = tokenize_prompt(tok, render_prompt(PromptTemplate::kLlava15, turns[0].user, with_image),
                                   image_token_id, image_tokens);
    } else {
      prompt_ids = tok.encode("USER: " + turns[i].user + " ASSISTANT:", /*add_bos=*/false);
    }
    out.ids.insert(out.ids.end(), prompt_ids.begin(), prompt_ids.end());
    out.is_answer.insert(out.is_answer.end(), prompt_ids.size(), 0);
    std::vector<int64_t> answer = tok.encode(turns[i].assistant, /*add_bos=*/false);
    answer.push_back(tok.eos_id());
    out.ids.insert(out.ids.end(), answer.begin(), answer.end());
    out.is_answer.insert(out.is_answer.end(), answer.size(), 1);
  }
  return out;
}

}  // namespace eqat
