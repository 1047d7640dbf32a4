// LLaVA pipeline vs transformers (fixtures/tiny_llava): preprocessing, CLIP hidden state, projector, merged
// decoder logits, greedy generation over three prompt styles (vicuna_v1, multi-turn with </s>, llava-hf chat).
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <gtest/gtest.h>

#include "data/image.h"
#include "llm/generate.h"
#include "llm/prompt.h"
#include "model_test_util.h"
#include "vision/llava.h"

using namespace eqat;
using namespace eqat_test;

// Not in an anonymous namespace: gtest derives the test classes from it (-Wsubobject-linkage).
struct TinyLlava : ::testing::Test {
  static void SetUpTestSuite() {
    model = new Model(load_model(fixture("tiny_llava")));
    golden = new Checkpoint(Checkpoint::open(fixture("tiny_llava/golden.safetensors")));
    meta = new nlohmann::json(load_json(fixture("tiny_llava/golden.json")));
  }
  static void TearDownTestSuite() {
    delete model;
    delete golden;
    delete meta;
  }
  static Model* model;
  static Checkpoint* golden;
  static nlohmann::json* meta;
};
Model* TinyLlava::model = nullptr;
Checkpoint* TinyLlava::golden = nullptr;
nlohmann::json* TinyLlava::meta = nullptr;

TEST_F(TinyLlava, PreprocessingIsBitExactWithPillow) {
  // Lossless PNG input: the pad path (expand2square + Pillow bicubic + rescale/normalise) must be bit-identical.
  at::Tensor px = load_pixels(*model, fixture("tiny_llava/image.png")).pixels;
  EXPECT_TRUE(at::equal(px, golden->get("pixel_values")));
  ImageProcessorConfig crop = model->image_cfg;
  crop.aspect_mode = "crop";
  at::Tensor pc = preprocess_image(load_image(fixture("tiny_llava/image.png")), crop).unsqueeze(0);
  EXPECT_TRUE(at::equal(pc, golden->get("pixel_values_crop")));
}

TEST_F(TinyLlava, VisionHiddenStateAndProjectorMatch) {
  c10::NoGradGuard g;
  at::Tensor px = golden->get("pixel_values");
  // Every entry of HF's hidden_states list (0 = after pre_layrnorm, k = after encoder layer k-1).
  at::Tensor all = golden->get("vision_hidden_states");
  for (int64_t k = 0; k < all.size(0); ++k) {
    at::Tensor h = model->llava->vision_model->hidden_state(px, k);
    EXPECT_LE(max_abs_diff(h[0], all[k]), kLogitTol) << "hidden state " << k;
  }
  at::Tensor f = model->llava->image_features(px);
  EXPECT_LE(max_abs_diff(f[0], golden->get("image_features")), kLogitTol);
}

TEST_F(TinyLlava, PromptTokenizationMatchesProcessor) {
  for (const char* p : {"p0", "p1", "p2"}) {
    std::string text = (*meta)["prompts"][p]["text"];
    std::vector<int64_t> ids = tokenize_prompt(*model->tok, text, model->image_token_id(), model->cfg.image_seq_length);
    EXPECT_EQ(ids, to_ids(golden->get(std::string(p) + ".input_ids"))) << p;
  }
  // The llava-1.5 template renders p0's text from the bare question.
  EXPECT_EQ(render_prompt(PromptTemplate::kLlava15, "What is in the picture?", true),
            (*meta)["prompts"]["p0"]["text"].get<std::string>());
  EXPECT_EQ(render_prompt(PromptTemplate::kHf, "What is shown in this image?", true),
            (*meta)["prompts"]["p2"]["text"].get<std::string>());
}

TEST_F(TinyLlava, PromptLogitsMatchTransformers) {
  c10::NoGradGuard g;
  std::vector<int64_t> ids = to_ids(golden->get("p0.input_ids"));
  at::Tensor emb = embed_prompt(*model, ids, golden->get("pixel_values"));
  at::Tensor pos = at::arange(emb.size(1), at::kLong).view({1, -1});
  EXPECT_LE(max_abs_diff(emb[0], golden->get("p0.inputs_embeds")), kLogitTol);  // image rows spliced in place
  at::Tensor logits = model->lm->forward(emb, pos, {}, nullptr).squeeze(0);
  EXPECT_LE(max_abs_diff(logits, golden->get("p0.logits")), kLogitTol);
}

TEST_F(TinyLlava, GreedyGenerationMatchesTransformers) {
  for (const char* p : {"p0", "p1", "p2"}) {
    std::vector<int64_t> ids = to_ids(golden->get(std::string(p) + ".input_ids"));
    at::Tensor emb = embed_prompt(*model, ids, golden->get("pixel_values"));
    GenerateOptions o;
    o.max_new_tokens = 12;
    o.keep_logits = true;
    GenerateResult r = generate(model->lm, emb, at::ones({1, emb.size(1)}, at::kBool), o);
    EXPECT_EQ(r.tokens[0], to_ids(golden->get(std::string(p) + ".greedy_ids"))) << p;
    EXPECT_LE(max_abs_diff(at::cat(r.step_logits, 0), golden->get(std::string(p) + ".greedy_logits")), kLogitTol)
        << p;
  }
}

TEST_F(TinyLlava, Bfloat16RunsAndStaysClose) {
  // bf16 has 8 mantissa bits (ε = 2^-8 ≈ 3.9e-3): activations of magnitude ~1–8 round by up to ~3e-2 per op, so
  // logits (std ≈ 1.9) may move by ~0.1–0.3 over 3 layers. A loose bound of 0.5 catches a broken cast path (which
  // gives O(logit) errors) while allowing bf16 rounding.
  LoadOptions lo;
  lo.dtype = "bfloat16";
  Model bf = load_model(fixture("tiny_llava"), lo);
  c10::NoGradGuard g;
  std::vector<int64_t> ids = to_ids(golden->get("p0.input_ids"));
  at::Tensor emb = embed_prompt(bf, ids, golden->get("pixel_values"));
  EXPECT_EQ(emb.scalar_type(), at::kBFloat16);
  at::Tensor pos = at::arange(emb.size(1), at::kLong).view({1, -1});
  at::Tensor logits = bf.lm->forward(emb, pos, {}, nullptr).squeeze(0);
  EXPECT_LE(max_abs_diff(logits[-1], golden->get("p0.logits")[-1]), 0.5);
}
