// Llama decoder vs transformers (fixtures/tiny_llama*: GQA, tied embeddings, rope_theta 5e5, RoPE scaling).
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <gtest/gtest.h>

#include <filesystem>

#include "data/error.h"
#include "llm/generate.h"
#include "llm/llama.h"
#include "llm/prompt.h"
#include "model_test_util.h"
#include "vision/llava.h"

using namespace eqat;
using namespace eqat_test;

namespace {

at::Tensor full_logits(Model& m, const std::vector<int64_t>& ids) {
  c10::NoGradGuard g;
  at::Tensor t = at::tensor(ids, at::kLong).view({1, -1});
  at::Tensor pos = at::arange(t.size(1), at::kLong).view({1, -1});
  return m.lm->forward(m.lm->embed(t), pos, {}, nullptr).squeeze(0);  // [T,V]
}

GenerateResult greedy(Model& m, const std::vector<std::vector<int64_t>>& rows, int64_t n,
                      GenerateOptions::Decode decode = GenerateOptions::Decode::Auto) {
  auto [ids, valid] = left_pad(rows, 0);
  GenerateOptions o;
  o.max_new_tokens = n;
  o.decode = decode;
  o.keep_logits = true;  // no stop ids: the fixtures generate exactly n tokens
  c10::NoGradGuard g;
  return generate(m.lm, m.lm->embed(ids), valid, o);
}

}  // namespace

TEST(Llama, PromptLogitsMatchTransformers) {
  Model m = load_model(fixture("tiny_llama"));
  auto g = Checkpoint::open(fixture("tiny_llama/golden.safetensors"));
  at::Tensor logits = full_logits(m, to_ids(g.get("prompt.input_ids")));
  EXPECT_LE(max_abs_diff(logits, g.get("prompt.logits")), kLogitTol);
}

TEST(Llama, GreedyTokensAndStepLogitsMatchTransformers) {
  Model m = load_model(fixture("tiny_llama"));
  auto g = Checkpoint::open(fixture("tiny_llama/golden.safetensors"));
  GenerateResult r = greedy(m, {to_ids(g.get("prompt.input_ids"))}, 16);
  EXPECT_EQ(r.tokens[0], to_ids(g.get("prompt.greedy_ids")));
  ASSERT_EQ(r.step_logits.size(), 16u);
  EXPECT_LE(max_abs_diff(at::cat(r.step_logits, 0), g.get("prompt.greedy_logits")), kLogitTol);
}

TEST(Llama, KVCacheDecodingEqualsFullRecomputation) {
  Model m = load_model(fixture("tiny_llama"));
  auto g = Checkpoint::open(fixture("tiny_llama/golden.safetensors"));
  std::vector<int64_t> ids = to_ids(g.get("prompt.input_ids"));
  GenerateResult r = greedy(m, {ids}, 10);
  // Recompute each step from scratch (no cache) over prompt + tokens so far. Same fp32 math, different
  // shapes/blocking: differences are rounding only (≤ ~1e-5, see kLogitTol).
  std::vector<int64_t> seq = ids;
  for (size_t s = 0; s < r.tokens[0].size(); ++s) {
    at::Tensor full = full_logits(m, seq);
    EXPECT_LE(max_abs_diff(full[-1], r.step_logits[s][0]), kLogitTol) << "step " << s;
    seq.push_back(r.tokens[0][s]);
  }
}

TEST(Llama, LeftPaddedBatchEqualsOneByOne) {
  Model m = load_model(fixture("tiny_llama"));
  auto g = Checkpoint::open(fixture("tiny_llama/golden.safetensors"));
  std::vector<std::vector<int64_t>> rows;
  for (int i = 0; i < 3; ++i) rows.push_back(to_ids(g.get("batch" + std::to_string(i) + ".input_ids")));
  GenerateResult r = greedy(m, rows, 8);
  for (int i = 0; i < 3; ++i) {
    const std::string p = "batch" + std::to_string(i);
    EXPECT_LE(max_abs_diff(r.step_logits[0][i], g.get(p + ".last_logits")), kLogitTol) << p;
    EXPECT_EQ(r.tokens[i], to_ids(g.get(p + ".greedy_ids"))) << p;
    std::vector<at::Tensor> steps;
    for (const auto& s : r.step_logits) steps.push_back(s[i]);
    EXPECT_LE(max_abs_diff(at::stack(steps), g.get(p + ".greedy_logits")), kLogitTol) << p;
  }
}

// Static-shape steps (the CUDA-graph path, run eagerly here) attend over the whole cache under a key-validity mask:
// same math as the growing-shape steps, only the summation blocking differs, so kLogitTol (rounding) applies.
TEST(Llama, StaticShapeDecodeStepsMatchTransformers) {
  Model m = load_model(fixture("tiny_llama"));
  auto g = Checkpoint::open(fixture("tiny_llama/golden.safetensors"));
  GenerateResult one = greedy(m, {to_ids(g.get("prompt.input_ids"))}, 16, GenerateOptions::Decode::Static);
  EXPECT_FALSE(one.cuda_graph);
  EXPECT_EQ(one.tokens[0], to_ids(g.get("prompt.greedy_ids")));
  EXPECT_LE(max_abs_diff(at::cat(one.step_logits, 0), g.get("prompt.greedy_logits")), kLogitTol);
  // Left-padded rows: pads stay masked in every step and each row's positions advance on the device.
  std::vector<std::vector<int64_t>> rows;
  for (int i = 0; i < 3; ++i) rows.push_back(to_ids(g.get("batch" + std::to_string(i) + ".input_ids")));
  GenerateResult r = greedy(m, rows, 8, GenerateOptions::Decode::Static);
  for (int i = 0; i < 3; ++i) {
    const std::string p = "batch" + std::to_string(i);
    EXPECT_EQ(r.tokens[i], to_ids(g.get(p + ".greedy_ids"))) << p;
    std::vector<at::Tensor> steps;
    for (const auto& s : r.step_logits) steps.push_back(s[i]);
    EXPECT_LE(max_abs_diff(at::stack(steps), g.get(p + ".greedy_logits")), kLogitTol) << p;
  }
  // Graph mode is CUDA-only; Auto on the CPU stays eager.
  EXPECT_THROW(greedy(m, rows, 8, GenerateOptions::Decode::Graph), InputError);
}

TEST(Llama, RopeScalingLinearAndLlama3MatchTransformers) {
  for (const char* variant : {"tiny_llama_rope_scaled", "tiny_llama_rope_llama3"}) {
    TempDir dir;
    namespace fs = std::filesystem;
    fs::copy_file(fixture(std::string(variant) + "/config.json"), dir.str("config.json"));
    fs::copy_file(fixture("tiny_llama/model.safetensors"), dir.str("model.safetensors"));
    LoadOptions lo;
    lo.need_tokenizer = false;
    Model m = load_model(dir.str(), lo);
    auto g = Checkpoint::open(fixture(std::string(variant) + "/golden.safetensors"));
    EXPECT_LE(max_abs_diff(full_logits(m, to_ids(g.get("prompt.input_ids"))), g.get("prompt.logits")), kLogitTol)
        << variant;
  }
}

// Dynamic-NTK RoPE past max_position_embeddings (32 here): transformers goes on with a growing base, and so does
// eqat, up to factor x max_position_embeddings (64): a 40-token prompt and 16 greedy tokens, eager steps.
TEST(Llama, RopeDynamicRunsPastTheTrainedContextLikeTransformers) {
  TempDir dir;
  namespace fs = std::filesystem;
  fs::copy_file(fixture("tiny_llama_rope_dynamic/config.json"), dir.str("config.json"));
  fs::copy_file(fixture("tiny_llama/model.safetensors"), dir.str("model.safetensors"));
  LoadOptions lo;
  lo.need_tokenizer = false;
  Model m = load_model(dir.str(), lo);
  EXPECT_EQ(m.cfg.text.max_position_embeddings, 32);
  EXPECT_EQ(model_context(m.cfg.text), 64);
  auto g = Checkpoint::open(fixture("tiny_llama_rope_dynamic/golden.safetensors"));
  const std::vector<int64_t> ids = to_ids(g.get("prompt.input_ids"));
  EXPECT_LE(max_abs_diff(full_logits(m, ids), g.get("prompt.logits")), kLogitTol);
  GenerateResult r = greedy(m, {ids}, 16, GenerateOptions::Decode::Eager);
  EXPECT_EQ(r.tokens[0], to_ids(g.get("prompt.greedy_ids")));
  EXPECT_LE(max_abs_diff(at::cat(r.step_logits, 0), g.get("prompt.greedy_logits")), kLogitTol);
  // The extended context is the cap: 64 - 40 = 24 new tokens at most.
  EXPECT_EQ(max_new_tokens_in_context(m.cfg.text, 40, 1000), 24);
}

TEST(Llama, TokenizedPromptMatchesFixtureIds) {
  Model m = load_model(fixture("tiny_llama"));
  auto g = Checkpoint::open(fixture("tiny_llama/golden.safetensors"));
  auto j = load_json(fixture("tiny_llama/golden.json"));
  std::string text = j["prompt"]["text"];
  EXPECT_EQ(tokenize_prompt(*m.tok, text, -1, 0), to_ids(g.get("prompt.input_ids")));
}

TEST(Llama, PromptLongerThanContextIsAnInputError) {
  Model m = load_model(fixture("tiny_llama"));
  std::vector<int64_t> ids(m.cfg.text.max_position_embeddings + 1, 5);
  auto [t, valid] = left_pad({ids}, 0);
  GenerateOptions o;
  o.max_new_tokens = 1;
  EXPECT_THROW(generate(m.lm, m.lm->embed(t), valid, o), InputError);
}

TEST(Llama, SamplingIsReproducibleWithASeed) {
  Model m = load_model(fixture("tiny_llama"));
  std::vector<int64_t> ids{1, 40, 50};
  auto run = [&](uint64_t seed) {
    auto [t, valid] = left_pad({ids}, 0);
    GenerateOptions o;
    o.max_new_tokens = 12;
    o.sampling.temperature = 1.0;
    o.sampling.top_k = 50;
    o.sampling.top_p = 0.9;
    o.sampling.seed = seed;
    c10::NoGradGuard g;
    return generate(m.lm, m.lm->embed(t), valid, o).tokens[0];
  };
  EXPECT_EQ(run(7), run(7));
  EXPECT_NE(run(7), run(8));  // 12 draws from a non-flat distribution: equal sequences would be a ~0-probability event
}
