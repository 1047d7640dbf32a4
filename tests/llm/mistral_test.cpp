// Mistral (MistralForCausalLM: Llama's layout plus a sliding window) vs transformers: fixtures/tiny_mistral has a
// window of 8 under a 60-token prompt, so the window cuts every layer's attention in the prompt and in each step.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <gtest/gtest.h>

#include <map>

#include "data/config.h"
#include "llm/batch_decoder.h"
#include "llm/generate.h"
#include "model_test_util.h"
#include "vision/llava.h"

using namespace eqat;
using namespace eqat_test;

namespace {
GenerateResult greedy(Model& m, const std::vector<int64_t>& ids, int64_t n, GenerateOptions::Decode decode) {
  c10::NoGradGuard g;
  auto [t, valid] = left_pad({ids}, 0);
  GenerateOptions o;
  o.max_new_tokens = n;
  o.decode = decode;
  o.keep_logits = true;
  return generate(m.lm, m.lm->embed(t), valid, o);
}
}  // namespace

TEST(Mistral, ConfigReadsAndWritesTheSlidingWindow) {
  ModelConfig c = load_model_config(fixture("tiny_mistral"));
  EXPECT_EQ(c.arch, Arch::kLlama);
  EXPECT_EQ(c.text.model_type, "mistral");
  EXPECT_EQ(c.text.sliding_window, 8);
  ModelConfig back = parse_model_config(model_config_to_json(c), "round trip");
  EXPECT_EQ(back.text.model_type, "mistral");
  EXPECT_EQ(back.text.sliding_window, 8);
  EXPECT_NE(model_config_to_json(c).find("MistralForCausalLM"), std::string::npos);
  // Mistral v0.2+ disables the window with null.
  ModelConfig none = parse_model_config(R"({"architectures": ["MistralForCausalLM"], "sliding_window": null})", "t");
  EXPECT_EQ(none.text.sliding_window, 0);
  EXPECT_THROW(parse_model_config(R"({"model_type": "mistral", "sliding_window": -3})", "t"), InputError);
}

TEST(Mistral, PromptLogitsAndGreedyStepsMatchTransformers) {
  Model m = load_model(fixture("tiny_mistral"));
  auto g = Checkpoint::open(fixture("tiny_mistral/golden.safetensors"));
  const std::vector<int64_t> ids = to_ids(g.get("prompt.input_ids"));
  ASSERT_GT(ids.size(), 24u);
  {
    c10::NoGradGuard ng;
    at::Tensor t = at::tensor(ids, at::kLong).view({1, -1});
    at::Tensor pos = at::arange(t.size(1), at::kLong).view({1, -1});
    at::Tensor logits = m.lm->forward(m.lm->embed(t), pos, {}, nullptr).squeeze(0);
    EXPECT_LE(max_abs_diff(logits, g.get("prompt.logits")), kLogitTol);
  }
  // Growing-shape steps, then static-shape steps (mask over the whole cache): both cut by the window.
  for (auto mode : {GenerateOptions::Decode::Eager, GenerateOptions::Decode::Static}) {
    GenerateResult r = greedy(m, ids, 16, mode);
    EXPECT_EQ(r.tokens[0], to_ids(g.get("prompt.greedy_ids")));
    EXPECT_LE(max_abs_diff(at::cat(r.step_logits, 0), g.get("prompt.greedy_logits")), kLogitTol);
  }
}

// The batch decoder's per-row slots: two rows at different lengths, each windowed at its own position.
TEST(Mistral, BatchDecoderRowsAreWindowedAtTheirOwnPositions) {
  Model m = load_model(fixture("tiny_mistral"));
  auto g = Checkpoint::open(fixture("tiny_mistral/golden.safetensors"));
  const std::vector<int64_t> ids = to_ids(g.get("prompt.input_ids"));
  const std::vector<int64_t> want = to_ids(g.get("prompt.greedy_ids"));
  c10::NoGradGuard ng;
  BatchDecoder dec(m.lm, 2, 128, at::kFloat, at::kCPU);
  SequenceOptions o;
  o.max_new_tokens = 16;
  auto embed = [&](const std::vector<int64_t>& v) { return m.lm->embed(at::tensor(v, at::kLong).view({1, -1})); };
  std::map<int64_t, std::vector<int64_t>> got;
  SequenceToken a = dec.admit(embed(ids), o);
  got[a.row].push_back(a.token);
  for (int i = 0; i < 5; ++i)
    for (const auto& t : dec.step()) got[t.row].push_back(t.token);
  SequenceToken b = dec.admit(embed(ids), o);  // the same prompt 5 steps later, in the other row
  got[b.row].push_back(b.token);
  while (dec.active() > 0)
    for (const auto& t : dec.step()) got[t.row].push_back(t.token);
  EXPECT_EQ(got[a.row], want);
  EXPECT_EQ(got[b.row], want);
}
