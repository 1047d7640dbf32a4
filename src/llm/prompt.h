// Prompt templates and prompt tokenization (LLAVA.md §4).
//   llava-1.5 — LLaVA's vicuna_v1 conversation (what every published LLaVA-1.5 score used):
//               "{system} USER: <image>\n{q} ASSISTANT:"
//   hf        — the llava-hf chat template: "USER: <image>\n{q} ASSISTANT:" (no system prompt)
//   none      — the prompt exactly as given; "<image>" marks where the image goes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace eqat {

enum class PromptTemplate { kLlava15, kHf, kNone, kCount };

extern const char* const kVicunaSystem;
inline constexpr const char* kImageMarker = "<image>";

PromptTemplate parse_template(const std::string& name);  // InputError naming --template on a bad value
const char* template_name(PromptTemplate t);

// Renders one user turn. With an image, LLaVA's normalisation applies: "<image>\n" + q without any "<image>",
// stripped (llava-1.5 and hf); `none` returns `text` unchanged.
std::string render_prompt(PromptTemplate t, const std::string& text, bool with_image);

// Tokenizes a rendered prompt the way LLaVA's tokenizer_image_token does: split on "<image>", encode each chunk
// separately (each chunk gets SentencePiece's dummy prefix), one BOS at the start, and every "<image>" becomes
// `image_tokens` copies of `image_token_id` (the positions the projector's features fill).
std::vector<int64_t> tokenize_prompt(const Tokenizer& tok, const std::string& prompt, int64_t image_token_id,
                                     int64_t image_tokens);

size_t count_image_markers(const std::string& prompt);

// The template a model directory names ("conv_template" in its config.json, as eqat's own models write it), else
// `fallback`.
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

}  // namespace eqat
