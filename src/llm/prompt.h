// Prompt templates and prompt tokenization (LLAVA.md §4). The conversation formats of LLaVA's own templates
// (llava/conversation.py), which the LLaVA-1.5 and LLaVA-NeXT checkpoints were trained with:
//   llava-1.5 — vicuna_v1 (LLaVA-1.5, LLaVA-NeXT vicuna): "{system} USER: <image>\n{q} ASSISTANT: {a}</s>USER: …"
//   hf        — llava-hf's chat template for LLaVA-1.5: the same without a default system prompt, and the question's
//               own leading/trailing whitespace kept (LLaVA's conversation strips it)
//   mistral   — mistral_instruct (LLaVA-NeXT mistral): "[INST] <image>\n{q} [/INST] {a} </s>[INST] … [/INST]"
//   chatml    — chatml_direct (LLaVA-NeXT 34B / Yi): "<|im_start|>system\nAnswer the questions.<|im_end|>
//               <|im_start|>user\n<image>\n{q}<|im_end|><|im_start|>assistant\n"
//   llama3    — Meta's Llama-3 chat format (llama3-llava-next): "<|start_header_id|>user<|end_header_id|>\n\n
//               <image>\n{q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n" (its <|begin_of_text|>
//               is the tokenizer's BOS, prepended by tokenize_prompt)
//   none      — the prompt exactly as given; "<image>" marks where the image goes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace eqat {

enum class PromptTemplate { kLlava15, kHf, kNone, kMistral, kChatml, kLlama3, kCount };

extern const char* const kVicunaSystem;
inline constexpr const char* kImageMarker = "<image>";

// InputError naming --template on a bad value. LLaVA's names vicuna_v1, mistral_instruct, chatml_direct and
// llava_llama_3 are accepted too.
PromptTemplate parse_template(const std::string& name);
const char* template_name(PromptTemplate t);

// Renders one user turn. With an image, LLaVA's normalisation applies: "<image>\n" + q without any "<image>",
// stripped; `none` returns `text` unchanged.
std::string render_prompt(PromptTemplate t, const std::string& text, bool with_image);

// One message of a chat (OpenAI / HF roles). An image in a user message is placed LLaVA's way, "<image>\n" before
// its stripped text without any literal "<image>"; text without an image is kept as given.
struct ChatMessage {
  std::string role;  // system | user | assistant
  std::string text;
  bool has_image = false;
};
// Renders a conversation that ends with a user message, ready for the assistant's answer. A system message replaces
// the template's default system prompt (llava-1.5: vicuna's; chatml: "Answer the questions."). Assistant turns end
// with the template's end marker ("</s>" text for the SentencePiece templates, which the tokenizer maps to EOS).
// `none` takes exactly one user message. InputError for a conversation the template cannot hold.
std::string render_chat(PromptTemplate t, const std::vector<ChatMessage>& messages);

// Tokenizes a rendered prompt the way LLaVA's tokenizer_image_token does: split on "<image>", encode each chunk
// separately (each chunk gets SentencePiece's dummy prefix), one BOS at the start, and every "<image>" becomes
// `image_tokens` copies of `image_token_id` (the positions the projector's features fill).
std::vector<int64_t> tokenize_prompt(const Tokenizer& tok, const std::string& prompt, int64_t image_token_id,
                                     int64_t image_tokens);
// How a template's prompt is tokenized: LLaVA's chunk-wise way above for llava-1.5 and none (what LLaVA's own code
// and published scores used); HF's processor way for the others (hf, mistral, chatml, llama3: the whole text in one
// encode with "<image>" as an added token, then expanded), which differs where the tokenizer is non-legacy.
std::vector<int64_t> tokenize_prompt(const Tokenizer& tok, const std::string& prompt, PromptTemplate t,
                                     int64_t image_token_id, int64_t image_tokens);

size_t count_image_markers(const std::string& prompt);

// The template of a model directory: "conv_template" in its config.json (eqat's own models), else the family of
// its HF chat template (tokenizer_config.json "chat_template", chat_template.json or chat_template.jinja:
// Llama-3 headers -> llama3, <|im_start|> -> chatml, [INST] -> mistral, "USER:" -> llava-1.5), else mistral for a
// Mistral decoder, else `fallback`.
std::string model_template(const std::string& dir, const std::string& fallback);

// One user/assistant exchange of a conversation (LLaVA instruction JSON: human/gpt turns).
struct Turn {
  std::string user;
  std::string assistant;
};
struct TokenizedConversation {
  std::vector<int64_t> ids;
  std::vector<uint8_t> is_answer;  // 1 on assistant tokens (answer + its EOS): the positions trained on
};
// THE tokenization for training and calibration on instruction data (train-tiny, Block-AP calibration, E2E-QP),
// so training and inference prompts agree. Renders LLaVA-1.5's vicuna_v1 conversation:
//   "{system} USER: <image>\n{u1} ASSISTANT: {a1}</s>USER: {u2} ASSISTANT: {a2}</s>…"
// The first user turn gets "<image>\n" when with_image (its own "<image>" markers are removed). Each prompt part
// ("… ASSISTANT:") is tokenized with tokenize_prompt rules, each answer separately (its dummy-prefix ▁ is the space
// after "ASSISTANT:"), followed by EOS. The prefix of turn 1 is exactly what `eqat ask` feeds the model.
TokenizedConversation tokenize_conversation(const Tokenizer& tok, const std::vector<Turn>& turns, bool with_image,
                                            int64_t image_token_id, int64_t image_tokens);
// The same in template `t` (the model's own, so training sees the prompts `ask` builds): llava-1.5 and none as above;
// the others render the conversation with render_chat (closed assistant turns end with the template's marker:
// "</s>", "<|im_end|>", "<|eot_id|>"), tokenize it whole as tokenize_prompt does, and mark each answer's tokens and
// its end marker.
TokenizedConversation tokenize_conversation(const Tokenizer& tok, PromptTemplate t, const std::vector<Turn>& turns,
                                            bool with_image, int64_t image_token_id, int64_t image_tokens);

}  // namespace eqat
