#include "llm/prompt.h"

#include "data/error.h"
#include "data/fs.h"
#include "data/json_util.h"

namespace eqat {

const char* const kVicunaSystem =
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.";

PromptTemplate parse_template(const std::string& name) {
  if (name == "llava-1.5" || name == "vicuna_v1") return PromptTemplate::kLlava15;
  if (name == "hf") return PromptTemplate::kHf;
  if (name == "none") return PromptTemplate::kNone;
  if (name == "mistral" || name == "mistral_instruct") return PromptTemplate::kMistral;
  if (name == "chatml" || name == "chatml_direct") return PromptTemplate::kChatml;
  if (name == "llama3" || name == "llava_llama_3") return PromptTemplate::kLlama3;
  throw_input_error(str_cat("--template: unknown template '", name,
                            "' (choose llava-1.5, hf, mistral, chatml, llama3 or none)"));
}

const char* template_name(PromptTemplate t) {
  switch (t) {
    case PromptTemplate::kLlava15: return "llava-1.5";
    case PromptTemplate::kHf: return "hf";
    case PromptTemplate::kNone: return "none";
    case PromptTemplate::kMistral: return "mistral";
    case PromptTemplate::kChatml: return "chatml";
    case PromptTemplate::kLlama3: return "llama3";
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
  const std::string cfg_path = path_join(dir, "config.json");
  const nlohmann::json cfg = file_exists(cfg_path) ? parse_json_path(cfg_path) : nlohmann::json::object();
  auto it = cfg.find("conv_template");
  if (it != cfg.end() && it->is_string()) return it->get<std::string>();
  // The HF chat template's family, told by its markers.
  std::string chat;
  const std::string tc = path_join(dir, "tokenizer_config.json"), cj = path_join(dir, "chat_template.json"),
                    jinja = path_join(dir, "chat_template.jinja");
  auto take = [&chat](const nlohmann::json& j) {
    if (!j.is_object() || !j.contains("chat_template")) return;
    const nlohmann::json& t = j["chat_template"];
    if (t.is_string()) chat += t.get<std::string>();
    if (t.is_array())  // [{"name": "default", "template": "..."}, ...]
      for (const auto& e : t)
        if (e.is_object() && e.contains("template") && e["template"].is_string()) chat += e["template"].get<std::string>();
  };
  if (file_exists(tc)) take(parse_json_path(tc));
  if (file_exists(cj)) take(parse_json_path(cj));
  if (file_exists(jinja)) chat += read_file(jinja);
  if (chat.find("<|start_header_id|>") != std::string::npos) return "llama3";
  if (chat.find("<|im_start|>") != std::string::npos) return "chatml";
  if (chat.find("[INST]") != std::string::npos) return "mistral";
  if (chat.find("USER:") != std::string::npos) return "llava-1.5";
  const nlohmann::json* text = &cfg;
  if (cfg.contains("text_config") && cfg["text_config"].is_object()) text = &cfg["text_config"];
  if (text->contains("model_type") && (*text)["model_type"] == "mistral") return "mistral";
  return fallback;
}

std::string render_prompt(PromptTemplate t, const std::string& text, bool with_image) {
  if (t == PromptTemplate::kNone) return text;
  return render_chat(t, {ChatMessage{"user", text, with_image}});
}

namespace {
// What follows a template's generation prompt for a closed assistant turn: the answer and its end marker.
std::string answer_body(PromptTemplate t, const std::string& text) {
  switch (t) {
    case PromptTemplate::kMistral: return " " + text + " </s>";
    case PromptTemplate::kChatml: return text + "<|im_end|>";
    case PromptTemplate::kLlama3: return strip(text) + "<|eot_id|>";
    default: return " " + text + "</s>";  // llava-1.5, hf
  }
}
}  // namespace

std::string render_chat(PromptTemplate t, const std::vector<ChatMessage>& messages) {
  EQAT_CHECK(!messages.empty() && messages.back().role == "user", "a chat must end with a user message");
  if (t == PromptTemplate::kNone) {
    const ChatMessage* user = nullptr;
    for (const auto& m : messages) {
      if (m.role == "system") continue;
      EQAT_CHECK(m.role == "user" && !user, "template 'none' takes exactly one user message (the raw prompt)");
      user = &m;
    }
    std::string text = user->text;
    if (user->has_image && text.find(kImageMarker) == std::string::npos) text = std::string(kImageMarker) + "\n" + text;
    return text;
  }
  std::string system;
  switch (t) {
    case PromptTemplate::kLlava15: system = kVicunaSystem; break;
    case PromptTemplate::kChatml: system = "Answer the questions."; break;  // LLaVA's chatml_direct
    default: break;
  }
  std::vector<const ChatMessage*> turns;
  for (const auto& m : messages) {
    if (m.role == "system") {
      system = m.text;
      continue;
    }
    EQAT_CHECK(m.role == "user" || m.role == "assistant", "unknown chat role '", m.role, "'");
    EQAT_CHECK(turns.empty() ? m.role == "user" : m.role != turns.back()->role,
               "a chat must alternate user and assistant messages, starting with the user");
    turns.push_back(&m);
  }
  // Without an image, the text as given (callers refuse a marker). With one, LLaVA's conversation strips the
  // question; llava-hf's chat template keeps its whitespace ("USER: <image>\n" + text + " ASSISTANT:").
  auto user_text = [t](const ChatMessage& m) {
    if (!m.has_image) return m.text;
    const std::string q = remove_all(m.text, kImageMarker);
    return std::string(kImageMarker) + "\n" + (t == PromptTemplate::kHf ? q : strip(q));
  };
  std::string out;
  switch (t) {
    case PromptTemplate::kLlava15:
    case PromptTemplate::kHf:  // "{system} USER: {u} ASSISTANT: {a}</s>USER: ..."
      if (!system.empty()) out = system + " ";
      for (const ChatMessage* m : turns)
        out += m->role == "user" ? "USER: " + user_text(*m) + " ASSISTANT:" : answer_body(t, m->text);
      return out;
    case PromptTemplate::kMistral:  // LLaVA's LLAMA_2 style with sep "" and sep2 "</s>"
      for (size_t i = 0; i < turns.size(); ++i) {
        if (turns[i]->role == "user") {
          std::string msg = user_text(*turns[i]);
          if (i == 0 && !system.empty()) msg = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + msg;
          out += "[INST] " + msg + " [/INST]";
        } else {
          out += answer_body(t, turns[i]->text);
        }
      }
      return out;
    case PromptTemplate::kChatml:  // LLaVA's MPT style: system + sep, then role + message + sep
      out = "<|im_start|>system\n" + system + "<|im_end|>";
      for (const ChatMessage* m : turns)
        out += m->role == "user" ? "<|im_start|>user\n" + user_text(*m) + "<|im_end|>"
                                 : "<|im_start|>assistant\n" + answer_body(t, m->text);
      return out + "<|im_start|>assistant\n";
    case PromptTemplate::kLlama3:  // Meta's template (content trimmed), without the BOS text
      if (!system.empty()) out = "<|start_header_id|>system<|end_header_id|>\n\n" + strip(system) + "<|eot_id|>";
      for (const ChatMessage* m : turns)
        out += "<|start_header_id|>" + m->role + "<|end_header_id|>\n\n" +
               (m->role == "user" ? strip(user_text(*m)) + "<|eot_id|>" : answer_body(t, m->text));
      return out + "<|start_header_id|>assistant<|end_header_id|>\n\n";
    default: break;
  }
  EQAT_ASSERT(false, "unhandled template ", template_name(t));
  return "";
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

std::vector<int64_t> tokenize_prompt(const Tokenizer& tok, const std::string& prompt, PromptTemplate t,
                                     int64_t image_token_id, int64_t image_tokens) {
  if (t == PromptTemplate::kLlava15 || t == PromptTemplate::kNone || count_image_markers(prompt) == 0)
    return tokenize_prompt(tok, prompt, image_token_id, image_tokens);
  EQAT_CHECK(image_token_id >= 0 && tok.added_token_id(kImageMarker) == image_token_id,
             "the prompt contains <image> but the tokenizer has no <image> token with the model's id ", image_token_id);
  std::vector<int64_t> ids;
  for (int64_t id : tok.encode(prompt, /*add_bos=*/true)) {
    if (id == image_token_id) ids.insert(ids.end(), static_cast<size_t>(image_tokens), image_token_id);
    else ids.push_back(id);
  }
  return ids;
}

namespace {
size_t common_prefix(const std::vector<int64_t>& a, const std::vector<int64_t>& b) {
  size_t n = 0;
  while (n < a.size() && n < b.size() && a[n] == b[n]) ++n;
  return n;
}
}  // namespace

TokenizedConversation tokenize_conversation(const Tokenizer& tok, PromptTemplate t, const std::vector<Turn>& turns,
                                            bool with_image, int64_t image_token_id, int64_t image_tokens) {
  if (t == PromptTemplate::kLlava15 || t == PromptTemplate::kNone)
    return tokenize_conversation(tok, turns, with_image, image_token_id, image_tokens);
  EQAT_CHECK(!turns.empty(), "conversation has no turns");
  // The whole conversation is tokenized once, as inference tokenizes a prompt; answer i's tokens are those where
  // the tokens of the conversation up to its generation prompt, and up to its end marker, first differ from it.
  std::vector<ChatMessage> msgs;
  std::vector<std::string> prompts, closed;
  for (size_t i = 0; i < turns.size(); ++i) {
    msgs.push_back({"user", turns[i].user, i == 0 && with_image});
    prompts.push_back(render_chat(t, msgs));
    closed.push_back(prompts.back() + answer_body(t, turns[i].assistant));
    msgs.push_back({"assistant", turns[i].assistant, false});
  }
  auto ids_of = [&](const std::string& text) { return tokenize_prompt(tok, text, t, image_token_id, image_tokens); };
  TokenizedConversation out;
  out.ids = ids_of(closed.back());
  out.is_answer.assign(out.ids.size(), 0);
  for (size_t i = 0; i < turns.size(); ++i) {
    const size_t from = common_prefix(ids_of(prompts[i]), out.ids), to = common_prefix(ids_of(closed[i]), out.ids);
    std::fill(out.is_answer.begin() + static_cast<std::ptrdiff_t>(from), out.is_answer.begin() + static_cast<std::ptrdiff_t>(to), 1);
  }
  return out;
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
