// eqat train-tiny on a very small config: the loss goes down, the output loads with load_model, and a run
// interrupted by --max-steps then resumed ends in bit-identical weights.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <ATen/ATen.h>

#include <sstream>

#include "data/fs.h"
#include "data/safetensors.h"
#include "test_util.h"
#include "vision/llava.h"
#include "vision/train_tiny.h"

namespace eqat {
namespace {

TinyTrainOptions tiny(const std::string& out) {
  TinyTrainOptions o;
  o.out = out;
  o.seed = 3;
  o.threads = 1;
  o.progress = false;
  o.patch_size = 32;  // 3×3 = 9 image tokens
  o.vit_dim = 32, o.vit_layers = 2, o.vit_heads = 2, o.vit_ff = 64;
  o.dim = 64, o.layers = 2, o.heads = 2, o.kv_heads = 1, o.ff = 128;
  o.sp_vocab = 400;
  o.stage0_steps = 10, o.stage0_batch = 8, o.stage0_lr = 3e-3;
  o.stage1_steps = 30, o.stage1_batch = 4, o.stage1_lr = 3e-3;
  o.warmup = 3;
  o.eval_every = 0;
  o.checkpoint_every = 1000;
  return o;
}

std::vector<std::pair<int64_t, double>> stage1_losses(const std::string& dir) {
  std::vector<std::pair<int64_t, double>> out;
  std::istringstream in(read_file(dir + "/train_log.jsonl"));
  for (std::string l; std::getline(in, l);) {
    auto j = nlohmann::json::parse(l);
    if (j.contains("loss") && j["stage"] == 1) out.emplace_back(j["step"].get<int64_t>(), j["loss"].get<double>());
  }
  return out;
}

TEST(TrainTiny, LossGoesDownAndTheModelLoads) {
  eqat_test::TempDir tmp;
  TinyTrainOptions o = tiny(tmp.str("m"));
  train_tiny(o);
  auto l = stage1_losses(o.out);
  ASSERT_GE(l.size(), 3u);
  // The first logged loss is near ln(V) ≈ 5.7 for a uniform guess; 30 steps learn at least the answer vocabulary.
  EXPECT_LT(l.back().second, 0.75 * l.front().second);
  Model m = load_model(o.out);
  ASSERT_TRUE(m.multimodal());
  EXPECT_EQ(m.cfg.image_seq_length, 9);
  EXPECT_EQ(m.tok->added_token_id("<image>"), m.cfg.image_token_index);
  auto items = shapes_test_split(1, 7);
  auto preds = answer_shapes(m.llava, m.cfg, *m.tok, m.image_cfg, items, 7);
  EXPECT_EQ(preds.size(), 7u);
  EXPECT_TRUE(file_exists(o.out + "/loss.png"));
}

TEST(TrainTiny, ResumeIsBitIdentical) {
  eqat_test::TempDir tmp;
  TinyTrainOptions a = tiny(tmp.str("a"));
  a.stage1_steps = 8;
  train_tiny(a);
  TinyTrainOptions b = a;
  b.out = tmp.str("b");
  b.max_steps = 13;  // inside stage 1: weights and AdamW state both come back from the checkpoint
  train_tiny(b);
  EXPECT_FALSE(file_exists(b.out + "/model.safetensors"));
  b.max_steps = -1;
  b.resume = true;
  train_tiny(b);
  auto fa = SafetensorsFile::open(a.out + "/checkpoint/weights.safetensors");
  auto fb = SafetensorsFile::open(b.out + "/checkpoint/weights.safetensors");
  ASSERT_EQ(fa->tensors().size(), fb->tensors().size());
  for (auto& [name, info] : fa->tensors()) EXPECT_TRUE(at::equal(fa->get(name), fb->get(name))) << name;
}

}  // namespace
}  // namespace eqat
