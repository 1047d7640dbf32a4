// Continuous batching (llm/batch_decoder.h) against transformers' greedy tokens and against generate() alone:
// sequences admitted at different steps, rows freed and refilled, each row at its own length.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <gtest/gtest.h>

#include <map>

#include "data/error.h"
#include "llm/batch_decoder.h"
#include "llm/generate.h"
#include "model_test_util.h"
#include "vision/llava.h"

using namespace eqat;
using namespace eqat_test;

namespace {

at::Tensor embeds_of(Model& m, const std::vector<int64_t>& ids) {
  c10::NoGradGuard g;
  return m.lm->embed(at::tensor(ids, at::kLong).view({1, -1}));
}

// Runs `prompts` through a decoder of `max_batch` rows, admitting prompt i once `admit_at[i]` steps have run and a
// row is free (later prompts wait in order, as in the server's queue). Returns every prompt's tokens.
std::vector<std::vector<int64_t>> run_staggered(Model& m, const std::vector<std::vector<int64_t>>& prompts,
                                                const std::vector<int>& admit_at, const SequenceOptions& opts,
                                                int64_t max_batch, int64_t* max_active = nullptr) {
  BatchDecoder dec(m.lm, max_batch, 64, at::kFloat, at::kCPU);
  std::vector<std::vector<int64_t>> out(prompts.size());
  std::map<int64_t, size_t> owner;  // row -> prompt
  size_t next = 0, finished = 0;
  for (int step = 0; finished < prompts.size(); ++step) {
    EXPECT_LT(step, 1000) << "the decoder never finished";
    if (step >= 1000) break;
    auto consume = [&](const SequenceToken& t, size_t p) {
      if (t.token >= 0) out[p].push_back(t.token);
      if (t.finish != FinishReason::kNone) owner.erase(t.row), ++finished;
    };
    while (next < prompts.size() && admit_at[next] <= step && dec.has_free_row()) {
      SequenceToken t = dec.admit(embeds_of(m, prompts[next]), opts);
      owner[t.row] = next;
      consume(t, next++);
    }
    if (max_active) *max_active = std::max(*max_active, dec.active());
    for (const SequenceToken& t : dec.step()) consume(t, owner.at(t.row));
  }
  EXPECT_EQ(dec.active(), 0);
  return out;
}

}  // namespace

TEST(BatchDecoder, StaggeredSequencesGiveTransformersGreedyTokens) {
  Model m = load_model(fixture("tiny_llama"));
  auto g = Checkpoint::open(fixture("tiny_llama/golden.safetensors"));
  std::vector<std::vector<int64_t>> prompts, want;
  for (int i = 0; i < 3; ++i) {
    const std::string p = "batch" + std::to_string(i);
    prompts.push_back(to_ids(g.get(p + ".input_ids")));
    want.push_back(to_ids(g.get(p + ".greedy_ids")));  // 8 tokens each
  }
  prompts.push_back(to_ids(g.get("prompt.input_ids")));
  want.push_back(to_ids(g.get("prompt.greedy_ids")));  // 16 tokens
  SequenceOptions o;
  o.max_new_tokens = 8;
  want[3].resize(8);
  // Two rows for four prompts: the third and fourth wait for a row; rows differ in length at every step.
  int64_t peak = 0;
  auto got = run_staggered(m, prompts, {0, 3, 3, 4}, o, 2, &peak);
  EXPECT_EQ(peak, 2);
  for (size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(got[i], want[i]) << "prompt " << i;
  // The budget ends a sequence with kLength; a larger one reaches transformers' 16 tokens for the long prompt.
  o.max_new_tokens = 16;
  auto solo = run_staggered(m, {prompts[3]}, {0}, o, 1);
  EXPECT_EQ(solo[0], to_ids(g.get("prompt.greedy_ids")));
}

// Seeded sampling: each row owns its generator, so a row's tokens are those generate() gives the same prompt and
// seed alone, whatever shares its steps.
TEST(BatchDecoder, SeededSamplingPerRowEqualsGenerateAlone) {
  Model m = load_model(fixture("tiny_llama"));
  auto g = Checkpoint::open(fixture("tiny_llama/golden.safetensors"));
  std::vector<std::vector<int64_t>> prompts;
  for (int i = 0; i < 3; ++i) prompts.push_back(to_ids(g.get("batch" + std::to_string(i) + ".input_ids")));
  SequenceOptions o;
  o.max_new_tokens = 12;
  o.sampling.temperature = 0.8;
  o.sampling.top_p = 0.9;
  o.sampling.seed = 7;
  auto got = run_staggered(m, prompts, {0, 1, 5}, o, 3);
  for (size_t i = 0; i < prompts.size(); ++i) {
    GenerateOptions go;
    go.max_new_tokens = o.max_new_tokens;
    go.sampling = o.sampling;
    c10::NoGradGuard ng;
    GenerateResult r = generate(m.lm, embeds_of(m, prompts[i]), at::ones({1, (int64_t)prompts[i].size()}, at::kBool), go);
    EXPECT_EQ(got[i], r.tokens[0]) << "prompt " << i;
  }
}

TEST(BatchDecoder, StopIdsCapacityAndReleaseFreeRows) {
  Model m = load_model(fixture("tiny_llama"));
  auto g = Checkpoint::open(fixture("tiny_llama/golden.safetensors"));
  const std::vector<int64_t> ids = to_ids(g.get("prompt.input_ids"));
  const std::vector<int64_t> greedy = to_ids(g.get("prompt.greedy_ids"));
  BatchDecoder dec(m.lm, 2, static_cast<int64_t>(ids.size()) + 3, at::kFloat, at::kCPU);
  // The row holds the prompt + 3 positions: tokens 1-3 are fed, the 4th is emitted and ends the row (kLength).
  SequenceOptions o;
  o.max_new_tokens = 100;
  SequenceToken t = dec.admit(embeds_of(m, ids), o);
  EXPECT_EQ(t.token, greedy[0]);
  std::vector<int64_t> got{t.token};
  FinishReason fin = FinishReason::kNone;
  while (fin == FinishReason::kNone) {
    auto s = dec.step();
    ASSERT_EQ(s.size(), 1u);
    got.push_back(s[0].token);
    fin = s[0].finish;
  }
  EXPECT_EQ(fin, FinishReason::kLength);
  EXPECT_EQ(got, std::vector<int64_t>(greedy.begin(), greedy.begin() + 4));
  EXPECT_EQ(dec.active(), 0);
  // A stop id ends the sequence without emitting it.
  o.stop_ids = {greedy[2]};
  t = dec.admit(embeds_of(m, ids), o);
  dec.step();
  auto s = dec.step();
  ASSERT_EQ(s.size(), 1u);
  EXPECT_EQ(s[0].token, -1);
  EXPECT_EQ(s[0].finish, FinishReason::kStop);
  // release() frees a busy row (a cancelled request); a prompt without room for an answer is refused.
  t = dec.admit(embeds_of(m, ids), o);
  EXPECT_EQ(dec.active(), 1);
  dec.release(t.row);
  EXPECT_EQ(dec.active(), 0);
  EXPECT_TRUE(dec.step().empty());
  std::vector<int64_t> too_long(ids.size() + 3, ids[0]);
  EXPECT_THROW(dec.admit(embeds_of(m, too_long), o), InputError);
  EXPECT_THROW(BatchDecoder(m.lm, 0, 16, at::kFloat, at::kCPU), InputError);
}
