// LLaVA-NeXT (LlavaNextForConditionalGeneration) vs transformers on three tiny fixtures (tools/make_fixtures.py
// --only llava_next): a Mistral decoder with a sliding window, a Vicuna-style Llama decoder, and a Llama decoder with
// a Llama-3 byte-level BPE tokenizer. Per image (10:1, 1:10, 9:4 PNGs; a 4:3 JPEG for the pixels): anyres tiles,
// the image-token count, the processor's prompt ids, packed features, logits and greedy tokens.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "data/anyres.h"
#include "data/config.h"
#include "data/error.h"
#include "llm/generate.h"
#include "llm/prompt.h"
#include "model_test_util.h"
#include "vision/llava.h"

using namespace eqat;
using namespace eqat_test;

struct LlavaNext : ::testing::TestWithParam<std::string> {
  std::string dir() const { return fixture("tiny_llava_next_" + GetParam()); }
  std::string file(const std::string& name) const { return dir() + "/" + name; }
  void SetUp() override {
    model = std::make_unique<Model>(load_model(dir()));
    golden = std::make_unique<Checkpoint>(Checkpoint::open(file("golden.safetensors")));
    meta = load_json(file("golden.json"));
  }
  std::vector<std::string> png_images() const {
    std::vector<std::string> out;
    for (const auto& [name, info] : meta["images"].items())
      if (info.contains("greedy_ids")) out.push_back(name);
    return out;
  }
  ImageInput image(const std::string& name) const {
    return load_pixels(*model, file(meta["images"][name]["file"].get<std::string>()));
  }
  std::unique_ptr<Model> model;
  std::unique_ptr<Checkpoint> golden;
  nlohmann::json meta;
};

TEST_P(LlavaNext, ConfigNamesTheFamilyAndItsGrid) {
  const ModelConfig& c = model->cfg;
  EXPECT_EQ(c.arch, Arch::kLlava);
  EXPECT_TRUE(c.anyres);
  EXPECT_STREQ(architecture_name(c), "LlavaNextForConditionalGeneration");
  ASSERT_EQ(c.image_grid_pinpoints.size(), meta["pinpoints"].size());
  for (size_t i = 0; i < c.image_grid_pinpoints.size(); ++i) {
    EXPECT_EQ(c.image_grid_pinpoints[i].height, meta["pinpoints"][i][0].get<int64_t>());
    EXPECT_EQ(c.image_grid_pinpoints[i].width, meta["pinpoints"][i][1].get<int64_t>());
  }
  EXPECT_EQ(c.text.model_type, GetParam() == "mistral" ? "mistral" : "llama");
  const ModelConfig back = parse_model_config(model_config_to_json(c), "round trip");
  EXPECT_TRUE(back.anyres);
  EXPECT_EQ(back.image_grid_pinpoints, c.image_grid_pinpoints);
  EXPECT_EQ(model_template(dir(), "none"), meta["template"].get<std::string>());
}

TEST(LlavaNextConfig, RefusesGridsItCannotUnpad) {
  const std::string base = R"({"architectures": ["LlavaNextForConditionalGeneration"], "vision_config": {"image_size": 336,
      "patch_size": 14}, "image_seq_length": 576)";
  EXPECT_EQ(parse_model_config(base + "}", "c").image_grid_pinpoints.size(), 5u);  // transformers' default grid
  auto expect_error = [&](const std::string& extra, const std::string& needle) {
    try {
      parse_model_config(base + ", " + extra + "}", "config.json");
      ADD_FAILURE() << "accepted " << extra;
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error(R"("image_grid_pinpoints": [[336, 500]])", "multiple");
  expect_error(R"("image_grid_pinpoints": [[336]])", "[height, width]");
  expect_error(R"("image_grid_pinpoints": [])", "non-empty");
  expect_error(R"("image_grid_pinpoints": [[0, 336]])", "positive");
  expect_error(R"("vision_feature_select_strategy": "full", "image_seq_length": 577)", "'full' is not supported");
}

// Tiles against HF's LlavaNextImageProcessor (PIL): bit-exact from PNG; from JPEG within one level, since the two
// libjpeg builds may round an IDCT differently (one level = 1/255 / std ≤ 0.0152 after normalisation).
TEST_P(LlavaNext, TilesMatchTheProcessor) {
  for (const auto& [name, info] : meta["images"].items()) {
    const ImageInput in = image(name);
    EXPECT_EQ(in.height, info["height"].get<int64_t>());
    EXPECT_EQ(in.width, info["width"].get<int64_t>());
    const at::Tensor want = golden->get(name + ".pixel_values");
    ASSERT_EQ(in.pixels.sizes(), want.sizes()) << name;
    EXPECT_EQ(to_ids(golden->get(name + ".image_sizes")), (std::vector<int64_t>{in.height, in.width}));
    if (info["file"].get<std::string>().find(".png") != std::string::npos) {
      EXPECT_TRUE(at::equal(in.pixels, want)) << name << ": max |d| " << max_abs_diff(in.pixels, want);
    } else {
      EXPECT_LE(max_abs_diff(in.pixels, want), 1.0 / 255.0 / 0.26130258 + 1e-6) << name;
    }
  }
}

// The token count comes from the image's size before any vision work (prompts are built first), and must equal
// what HF's processor expanded and what the packed features hold.
TEST_P(LlavaNext, ImageTokenCountsMatchTheProcessor) {
  for (const auto& [name, info] : meta["images"].items()) {
    const int64_t want = info["image_tokens"].get<int64_t>();
    EXPECT_EQ(model->image_tokens(info["height"].get<int64_t>(), info["width"].get<int64_t>()), want) << name;
    EXPECT_EQ(image(name).tokens, want) << name;
  }
  // The layout of the 10:1 image: a 1x3 grid (4x12 features) keeps 2 of its 4 rows.
  const AnyresLayout l = anyres_layout(model->cfg, 20, 200);
  EXPECT_EQ(l.grid_rows, 1);
  EXPECT_EQ(l.grid_cols, 3);
  EXPECT_EQ(l.row0, 1);
  EXPECT_EQ(l.rows, 2);
  EXPECT_EQ(l.cols, 12);
  EXPECT_EQ(l.tokens, 16 + 2 * 13);
}

TEST_P(LlavaNext, PromptIdsMatchTheProcessor) {
  const PromptTemplate t = parse_template(meta["template"].get<std::string>());
  const std::string text = render_prompt(t, meta["question"].get<std::string>(), true);
  EXPECT_EQ(text, meta["text"].get<std::string>());
  for (const std::string& name : png_images()) {
    const std::vector<int64_t> ids =
        tokenize_prompt(*model->tok, text, t, model->image_token_id(), image(name).tokens);
    EXPECT_EQ(ids, to_ids(golden->get(name + ".input_ids"))) << name;
  }
}

TEST_P(LlavaNext, PackedFeaturesAndLogitsMatchTransformers) {
  c10::NoGradGuard g;
  const ImageInput in = image("mid");
  at::Tensor feats = model->llava->pack_anyres(model->llava->image_features(in.pixels), in.height, in.width);
  EXPECT_LE(max_abs_diff(feats, golden->get("mid.image_features")), kLogitTol);
  for (const std::string& name : png_images()) {
    const std::vector<int64_t> ids = to_ids(golden->get(name + ".input_ids"));
    at::Tensor emb = embed_prompt(*model, ids, image(name));
    at::Tensor pos = at::arange(emb.size(1), at::kLong).view({1, -1});
    at::Tensor logits = model->lm->forward(emb, pos, {}, nullptr).squeeze(0);
    EXPECT_LE(max_abs_diff(logits[-1], golden->get(name + ".logits_last")), kLogitTol) << name;
    if (name == "mid") EXPECT_LE(max_abs_diff(logits, golden->get("mid.logits")), kLogitTol);
  }
}

TEST_P(LlavaNext, GreedyTokensMatchTransformers) {
  for (const std::string& name : png_images()) {
    const std::vector<int64_t> ids = to_ids(golden->get(name + ".input_ids"));
    at::Tensor emb = embed_prompt(*model, ids, image(name));
    GenerateOptions o;
    o.max_new_tokens = 10;
    o.keep_logits = true;
    GenerateResult r = generate(model->lm, emb, at::ones({1, emb.size(1)}, at::kBool), o);
    EXPECT_EQ(r.tokens[0], meta["images"][name]["greedy_ids"].get<std::vector<int64_t>>()) << name;
    if (name == "mid")
      EXPECT_LE(max_abs_diff(at::cat(r.step_logits, 0), golden->get("mid.greedy_logits")), kLogitTol);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, LlavaNext, ::testing::Values("mistral", "vicuna", "llama3"),
                         [](const auto& info) { return info.param; });
