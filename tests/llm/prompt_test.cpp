// Chat templates (llm/prompt.h): LLaVA's conversation formats for every family LLaVA-1.5 and LLaVA-NeXT ship with,
// Meta's Llama-3 format against transformers' own rendering, and the template a checkpoint's files select.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <algorithm>
#include <fstream>

#include "data/error.h"
#include "llm/prompt.h"
#include "model_test_util.h"

using namespace eqat;
using namespace eqat_test;

namespace {
const std::vector<ChatMessage> kMulti{{"user", " What colour? <image>", true}, {"assistant", "Red.", false},
                                      {"user", "And the shape?", false}};
}

TEST(Prompt, EachFamilyRendersLlavasConversationFormat) {
  const std::string sys = kVicunaSystem;
  EXPECT_EQ(render_chat(PromptTemplate::kLlava15, kMulti),
            sys + " USER: <image>\nWhat colour? ASSISTANT: Red.</s>USER: And the shape? ASSISTANT:");
  EXPECT_EQ(render_chat(PromptTemplate::kHf, kMulti),  // the question's own spaces kept
            "USER: <image>\n What colour?  ASSISTANT: Red.</s>USER: And the shape? ASSISTANT:");
  EXPECT_EQ(render_chat(PromptTemplate::kMistral, kMulti),
            "[INST] <image>\nWhat colour? [/INST] Red. </s>[INST] And the shape? [/INST]");
  EXPECT_EQ(render_chat(PromptTemplate::kChatml, kMulti),
            "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat colour?<|im_end|>"
            "<|im_start|>assistant\nRed.<|im_end|><|im_start|>user\nAnd the shape?<|im_end|><|im_start|>assistant\n");
  // A system message replaces the default one; Mistral wraps it LLaVA's LLAMA_2 way.
  std::vector<ChatMessage> with_sys{{"system", "Be brief.", false}, {"user", "Q?", true}};
  EXPECT_EQ(render_chat(PromptTemplate::kLlava15, with_sys), "Be brief. USER: <image>\nQ? ASSISTANT:");
  EXPECT_EQ(render_chat(PromptTemplate::kMistral, with_sys), "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nQ? [/INST]");
  EXPECT_EQ(render_chat(PromptTemplate::kChatml, with_sys),
            "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n<image>\nQ?<|im_end|><|im_start|>assistant\n");
  // The one-turn form is what `eqat ask` uses; `none` is the prompt as given.
  EXPECT_EQ(render_prompt(PromptTemplate::kMistral, "  What is this?  ", true), "[INST] <image>\nWhat is this? [/INST]");
  EXPECT_EQ(render_prompt(PromptTemplate::kNone, "raw <image> text", true), "raw <image> text");
  // llava-hf's template keeps the question's whitespace, LLaVA's conversation strips it.
  EXPECT_EQ(render_prompt(PromptTemplate::kHf, "  What is this?\n", true), "USER: <image>\n  What is this?\n ASSISTANT:");
  EXPECT_EQ(render_prompt(PromptTemplate::kLlava15, "  What is this?\n", true),
            std::string(kVicunaSystem) + " USER: <image>\nWhat is this? ASSISTANT:");
  // Conversations a template cannot hold.
  EXPECT_THROW(render_chat(PromptTemplate::kLlava15, {{"assistant", "hi", false}, {"user", "x", false}}), InputError);
  EXPECT_THROW(render_chat(PromptTemplate::kLlava15, {{"user", "a", false}, {"user", "b", false}}), InputError);
  EXPECT_THROW(render_chat(PromptTemplate::kNone, kMulti), InputError);
  EXPECT_THROW(parse_template("alpaca"), InputError);
  EXPECT_EQ(parse_template("mistral_instruct"), PromptTemplate::kMistral);
  EXPECT_EQ(parse_template("chatml_direct"), PromptTemplate::kChatml);
  EXPECT_EQ(parse_template("vicuna_v1"), PromptTemplate::kLlava15);
}

// Meta's template as transformers renders it (fixtures/bpe_llama3/golden.json "chats"), less the <|begin_of_text|>
// text that tokenize_prompt adds as the BOS id.
TEST(Prompt, Llama3MatchesTransformersChatTemplate) {
  const nlohmann::json g = load_json(fixture("bpe_llama3/golden.json"));
  ASSERT_GE(g["chats"].size(), 2u);
  for (const auto& c : g["chats"]) {
    std::vector<ChatMessage> msgs;
    for (const auto& m : c["messages"]) {
      std::string text = m["content"].get<std::string>();
      const bool image = text.rfind("<image>\n", 0) == 0;
      if (image) text = text.substr(8);
      msgs.push_back({m["role"].get<std::string>(), text, image});
    }
    std::string want = c["rendered"].get<std::string>();
    ASSERT_EQ(want.rfind("<|begin_of_text|>", 0), 0u);
    EXPECT_EQ(render_chat(PromptTemplate::kLlama3, msgs), want.substr(17));
  }
}

TEST(Prompt, ACheckpointsFilesSelectItsTemplate) {
  TempDir t;
  auto dir_with = [&](const std::string& name, const std::string& config, const std::string& tok_config) {
    const std::string d = t.str(name);
    std::filesystem::create_directories(d);
    std::ofstream(d + "/config.json") << config;
    if (!tok_config.empty()) std::ofstream(d + "/tokenizer_config.json") << tok_config;
    return d;
  };
  const std::string llava = R"({"model_type": "llava"})";
  auto chat = [](const std::string& tmpl) { return nlohmann::json{{"chat_template", tmpl}}.dump(); };
  EXPECT_EQ(model_template(dir_with("a", llava, chat("{{ '<|im_start|>' + m }}")), "x"), "chatml");
  EXPECT_EQ(model_template(dir_with("b", llava, chat("{{ '[INST] ' + m + ' [/INST]' }}")), "x"), "mistral");
  EXPECT_EQ(model_template(dir_with("c", llava, chat("USER: {{ m }} ASSISTANT:")), "x"), "llava-1.5");
  EXPECT_EQ(model_template(dir_with("d", llava, ""), "llava-1.5"), "llava-1.5");  // nothing said: the fallback
  EXPECT_EQ(model_template(dir_with("e", R"({"model_type": "llava", "text_config": {"model_type": "mistral"}})", ""),
                           "x"),
            "mistral");
  // eqat's own conv_template wins; the Llama-3 fixture's Meta template says llama3; chat_template.json counts too.
  EXPECT_EQ(model_template(dir_with("f", R"({"conv_template": "hf"})", chat("<|im_start|>")), "x"), "hf");
  EXPECT_EQ(model_template(fixture("bpe_llama3"), "x"), "llama3");
  const std::string g = dir_with("g", llava, "");
  std::ofstream(g + "/chat_template.json") << chat("<|start_header_id|>");
  EXPECT_EQ(model_template(g, "x"), "llama3");
}

// An assistant turn's "</s>" (vicuna, mistral) is the EOS id after tokenization, as LLaVA's training saw it, and
// the image expands to its positions once.
TEST(Prompt, MultiTurnTokenizationEndsAssistantTurnsWithEos) {
  Tokenizer tok = Tokenizer::load(fixture("tiny_llava"));
  const int64_t image_id = tok.added_token_id("<image>");
  ASSERT_GE(image_id, 0);
  for (auto t : {PromptTemplate::kLlava15, PromptTemplate::kMistral}) {
    std::vector<int64_t> ids = tokenize_prompt(tok, render_chat(t, kMulti), image_id, 5);
    EXPECT_EQ(std::count(ids.begin(), ids.end(), tok.eos_id()), 1) << template_name(t);
    EXPECT_EQ(std::count(ids.begin(), ids.end(), image_id), 5) << template_name(t);
    EXPECT_EQ(ids.front(), tok.bos_id());
  }
}

// With a non-legacy tokenizer, llava-hf's processor (hf and the LLaVA-NeXT templates) tokenizes the prompt whole,
// so the text after <image> has no "▁"; LLaVA's own llava-1.5 tokenization encodes each chunk with it. The two
// differ by exactly that one piece (with a legacy tokenizer they agree).
TEST(Prompt, HfTemplatesTokenizeWholeTextLlavaChunkWise) {
  TempDir t;
  for (const char* f : {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"})
    std::filesystem::copy(fixture(std::string("tiny_llava/") + f), t.path / f);
  const std::string prompt = render_prompt(PromptTemplate::kHf, "What is it?", true);
  for (bool legacy : {true, false}) {
    nlohmann::json tc = load_json(t.str("tokenizer_config.json"));
    tc["legacy"] = legacy;
    std::ofstream(t.str("tokenizer_config.json")) << tc.dump();
    Tokenizer tok = Tokenizer::load(t.str());
    const int64_t img = tok.added_token_id("<image>");
    const auto hf = tokenize_prompt(tok, prompt, PromptTemplate::kHf, img, 3);
    const auto llava = tokenize_prompt(tok, prompt, PromptTemplate::kLlava15, img, 3);
    EXPECT_EQ(std::count(hf.begin(), hf.end(), img), 3);
    EXPECT_EQ(llava.size(), hf.size() + (legacy ? 0 : 1)) << "legacy " << legacy;
  }
}

// Calibration and E2E-QP conversations in the model's own template: the ids are the whole conversation's as
// inference tokenizes it, turn 0's prompt is exactly what `eqat ask` feeds the model, and the answer mask covers
// each answer with its end marker (EOS for mistral, <|eot_id|> for Llama-3) and nothing of the prompts.
TEST(Prompt, ConversationsTrainInTheModelsOwnTemplate) {
  const std::vector<Turn> turns{{"What colour is it?", "It is red."}, {"And the shape?", "A circle."}};
  struct Case {
    const char* fixture;
    PromptTemplate t;
    const char* end_marker;
  };
  for (const Case& c : {Case{"tiny_llava_next_mistral", PromptTemplate::kMistral, "</s>"},
                        Case{"tiny_llava_next_llama3", PromptTemplate::kLlama3, "<|eot_id|>"},
                        Case{"tiny_llava", PromptTemplate::kHf, "</s>"}}) {
    SCOPED_TRACE(template_name(c.t));
    Tokenizer tok = Tokenizer::load(fixture(c.fixture));
    const int64_t img = tok.added_token_id("<image>");
    const TokenizedConversation tc = tokenize_conversation(tok, c.t, turns, true, img, 7);
    ASSERT_EQ(tc.ids.size(), tc.is_answer.size());
    EXPECT_EQ(std::count(tc.ids.begin(), tc.ids.end(), img), 7);
    const std::vector<ChatMessage> all{{"user", turns[0].user, true}, {"assistant", turns[0].assistant, false},
                                       {"user", turns[1].user, false}, {"assistant", turns[1].assistant, false},
                                       {"user", "x", false}};
    // The whole conversation: the render of both closed turns is a prefix of a third turn's prompt.
    const std::string third = render_chat(c.t, all);
    const std::vector<int64_t> ask = tokenize_prompt(tok, render_prompt(c.t, turns[0].user, true), c.t, img, 7);
    ASSERT_GT(tc.ids.size(), ask.size());
    EXPECT_TRUE(std::equal(ask.begin(), ask.end(), tc.ids.begin()));
    EXPECT_EQ(std::count(tc.is_answer.begin(), tc.is_answer.begin() + static_cast<std::ptrdiff_t>(ask.size()), 1), 0);
    // The answer tokens, in order, decode to the two answers and their end markers.
    std::vector<int64_t> answer_ids;
    for (size_t i = 0; i < tc.ids.size(); ++i)
      if (tc.is_answer[i]) answer_ids.push_back(tc.ids[i]);
    const std::string decoded = tok.decode(answer_ids, /*skip_special=*/false);
    EXPECT_NE(decoded.find("It is red."), std::string::npos) << decoded;
    EXPECT_NE(decoded.find("A circle."), std::string::npos) << decoded;
    EXPECT_EQ(decoded.find("shape"), std::string::npos) << decoded;  // no prompt text in the mask
    const std::vector<int64_t> whole = tokenize_prompt(tok, third, c.t, img, 7);
    EXPECT_TRUE(std::equal(tc.ids.begin(), tc.ids.end(), whole.begin())) << third;
    const std::string marker = c.end_marker;
    const int64_t end_id = marker == "</s>" ? tok.eos_id() : tok.added_token_id(marker);
    ASSERT_GE(end_id, 0);
    EXPECT_EQ(tc.ids.back(), end_id);
    EXPECT_EQ(tc.is_answer.back(), 1);
    EXPECT_EQ(std::count(answer_ids.begin(), answer_ids.end(), end_id), 2);
  }
}
