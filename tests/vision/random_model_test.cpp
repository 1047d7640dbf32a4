// Random-weight checkpoints in the real shapes (vision/random_model.h), through the code path the 7B/13B use, at
// test size: the real config with smaller widths (a JSON merge patch), many shards, one tensor in memory at a time.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <set>

#include "data/error.h"
#include "data/safetensors.h"
#include "data/tokenizer.h"
#include "llm/prompt.h"
#include "model_test_util.h"
#include "vision/llava.h"
#include "vision/random_model.h"

using namespace eqat;
using namespace eqat_test;
namespace fs = std::filesystem;

namespace {
// llava-1.5-7b with every width shrunk (the vocabulary stays: the Llama-2 tokenizer and <image> = 32000 need it).
RandomModelOptions small_llava(const std::string& out, uint64_t seed) {
  RandomModelOptions o;
  o.like = "llava-1.5-7b";
  o.out = out;
  o.tokenizer = data_path("tokenizers/llama2/tokenizer.model");
  o.seed = seed;
  o.layers = 2;
  o.shard_bytes = 1'000'000;  // ~1 MB shards: many of them
  o.config_patch = R"({"text_config": {"hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4},
                       "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}})";
  return o;
}

}  // namespace

TEST(RandomModel, WritesAnHfShardedLlavaThatLoadsAndRunsFinite) {
  TempDir t;
  const std::string dir = t.str("m");
  const int64_t params = write_random_model(small_llava(dir, 1));
  const nlohmann::json index = load_json(dir + "/model.safetensors.index.json");
  std::set<std::string> shards;
  for (const auto& [name, file] : index["weight_map"].items()) shards.insert(file.get<std::string>());
  ASSERT_GT(shards.size(), 3u);
  for (size_t i = 0; i < shards.size(); ++i) EXPECT_TRUE(shards.count(shard_name(i, shards.size()))) << i;
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors"));
  int64_t total = 0;
  for (const auto& s : shards) total += static_cast<int64_t>(fs::file_size(dir + "/" + s));
  EXPECT_GT(total, 2 * params);                                        // fp16 data + headers
  EXPECT_EQ(index["metadata"]["total_size"].get<int64_t>(), 2 * params);  // data bytes only, as HF counts

  // The config is the upload's (fields eqat does not read kept), the tokenizer has <image> at 32000.
  const nlohmann::json cfg = load_json(dir + "/config.json");
  EXPECT_EQ(cfg["image_token_index"], 32000);
  EXPECT_EQ(cfg["text_config"]["_name_or_path"], "lmsys/vicuna-7b-v1.5");
  EXPECT_EQ(cfg["vision_config"]["image_size"], 336);
  Model m = load_model(dir);
  EXPECT_EQ(m.tok->added_token_id("<image>"), 32000);
  EXPECT_EQ(m.image_cfg.crop_height, 336);
  EXPECT_EQ(m.image_cfg.shortest_edge, 336);

  // Real init scale: embeddings and linears N(0, 0.02²), norms 1, biases 0; activations finite.
  Checkpoint ck = Checkpoint::open(dir);
  at::Tensor e = ck.get("language_model.model.embed_tokens.weight").to(at::kFloat);
  EXPECT_NEAR(e.std().item<double>(), 0.02, 0.001);
  EXPECT_TRUE(at::equal(ck.get("language_model.model.norm.weight"), at::ones({64}, at::kHalf)));
  EXPECT_TRUE(at::equal(ck.get("multi_modal_projector.linear_1.bias"), at::zeros({64}, at::kHalf)));
  c10::NoGradGuard ng;
  at::Tensor logits = m.lm->forward(m.lm->embed(at::tensor({1, 450, 32000, 338}).view({1, -1})),
                                    at::arange(4).view({1, -1}), {}, nullptr);
  EXPECT_TRUE(logits.isfinite().all().item<bool>());
  at::Tensor feats = m.llava->image_features(at::randn({1, 3, 336, 336}));
  EXPECT_EQ(feats.sizes(), at::IntArrayRef({1, 576, 64}));
  EXPECT_TRUE(feats.isfinite().all().item<bool>());
}

TEST(RandomModel, BytesDependOnTheSeedOnlyNotOnTheSharding) {
  TempDir t;
  RandomModelOptions a = small_llava(t.str("a"), 7), b = small_llava(t.str("b"), 7), c = small_llava(t.str("c"), 8);
  b.shard_bytes = 5'000'000'000;  // one file
  write_random_model(a);
  write_random_model(b);
  write_random_model(c);
  Checkpoint ca = Checkpoint::open(t.str("a")), cb = Checkpoint::open(t.str("b")), cc = Checkpoint::open(t.str("c"));
  EXPECT_TRUE(fs::exists(t.str("b/model.safetensors")));
  ASSERT_EQ(ca.names(), cb.names());
  for (const auto& n : ca.names()) EXPECT_TRUE(at::equal(ca.get(n), cb.get(n))) << n;
  EXPECT_FALSE(at::equal(ca.get("language_model.lm_head.weight"), cc.get("language_model.lm_head.weight")));
}

TEST(RandomModel, UnknownModelsAndBadOutputsAreInputErrors) {
  TempDir t;
  RandomModelOptions o = small_llava(t.str("m"), 0);
  o.like = "llava-1.5-70b";
  EXPECT_THROW(write_random_model(o), InputError);
  o = small_llava(t.str("m"), 0);
  o.tokenizer = t.str("missing.model");
  EXPECT_THROW(write_random_model(o), InputError);
  EXPECT_FALSE(fs::exists(t.str("m")));
  EXPECT_EQ(random_model_likes(), (std::vector<std::string>{"llava-1.5-7b", "llava-1.5-13b", "llava-v1.6-mistral-7b",
                                                             "llava-v1.6-vicuna-7b", "llama-2-7b"}));
}

// llava-v1.6-mistral-7b's config (shrunk): a LLaVA-NeXT with a Mistral decoder, its anyres preprocessor and
// image_newline; a 640x480 photo takes HF's 2340 image tokens: the 672x672 grid (2x2 tiles of 24x24 features) is
// 48x48, the 4:3 image fills 36 of its rows (6 + 6 of padding cut), so 576 (base) + 36·(48 + 1).
TEST(RandomModel, WritesALlavaNextWithAMistralDecoder) {
  TempDir t;
  RandomModelOptions o = small_llava(t.str("m"), 3);
  o.like = "llava-v1.6-mistral-7b";
  o.config_patch = R"({"text_config": {"hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4,
                                        "num_key_value_heads": 2},
                       "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}})";
  write_random_model(o);
  Model m = load_model(t.str("m"));
  EXPECT_TRUE(m.cfg.anyres);
  EXPECT_EQ(m.cfg.text.model_type, "mistral");
  EXPECT_EQ(m.cfg.text.sliding_window, 0);
  EXPECT_EQ(m.image_cfg.image_grid_pinpoints, m.cfg.image_grid_pinpoints);
  EXPECT_TRUE(Checkpoint::open(t.str("m")).has("image_newline"));
  EXPECT_EQ(m.image_tokens(480, 640), 2340);
  EXPECT_EQ(model_template(t.str("m"), "llava-1.5"), "mistral");
}

// The quantize pipeline's CPU load of a model in the real widths: deferred decoder layers are not resident until
// read, and materialize_layer leaves only the converted copy (the checkpoint's pages of the layer leave RSS).
TEST(RandomModel, MaterializedLayersLeaveOnlyTheirConvertedCopy) {
  TempDir t;
  RandomModelOptions o;
  o.like = "llama-2-7b";
  o.out = t.str("m");
  o.tokenizer = data_path("tokenizers/llama2/tokenizer.model");
  o.layers = 2;  // 2 × 25.7 MB of fp16 layers (hidden 1024, FFN 2816), 2 × 65.5 MB of embeddings
  o.config_patch = R"({"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 8,
                       "num_key_value_heads": 8})";
  write_random_model(o);
  LoadOptions lo;
  lo.dtype = "float32";
  lo.defer_decoder = true;
  Model m = load_model(o.out, lo);
  const int64_t loaded = rss_file_kib();
  if (loaded < 0) GTEST_SKIP() << "no RssFile in /proc/self/status";
  double sum = 0;  // read every deferred byte, as the conversion will
  for (int64_t l = 0; l < 2; ++l)
    for (const auto& p : m.lm->model->layers[l]->named_parameters(true)) sum += p.value().to(at::kFloat).sum().item<double>();
  const int64_t touched = rss_file_kib();
  EXPECT_GT(touched - loaded, 40 * 1024) << sum;  // 51 MB of layers mapped in
  // Layer 1 still aliases the shard, so the mapping stays: only the release can take layer 0's 25.7 MB out.
  materialize_layer(m, 0);
  EXPECT_LT(rss_file_kib(), touched - 20 * 1024) << "layer 0's checkpoint pages should have left RSS";
  materialize_layer(m, 1);
  EXPECT_LT(rss_file_kib() - loaded, 8 * 1024) << "the layers' checkpoint pages should have left RSS";
  EXPECT_EQ(m.lm->model->layers[1]->named_parameters(true)["mlp.up_proj.weight"].scalar_type(), at::kFloat);
}

// The streamed writer holds one made tensor at a time: each make() finds the previous tensor already released.
TEST(RandomModel, StreamedWriterHoldsOneTensorAtATime) {
  TempDir t;
  static std::atomic<int> live{0};
  int most = 0;
  std::vector<TensorSource> sources;
  for (int i = 0; i < 12; ++i)
    sources.push_back({"t" + std::to_string(i), at::kFloat, {1000, 100}, [&most, i] {
                         auto* buf = new float[100000];
                         for (int k = 0; k < 100000; ++k) buf[k] = static_cast<float>(i);
                         most = std::max(most, ++live);
                         return at::from_blob(buf, {1000, 100}, [](void* p) {
                           delete[] static_cast<float*>(p);
                           --live;
                         });
                       }});
  write_checkpoint_streamed(t.path.string(), sources, 1'000'000);  // 400 KB tensors, ~1 MB shards: 6 files
  EXPECT_EQ(most, 1);
  EXPECT_EQ(live, 0);
  Checkpoint ck = Checkpoint::open(t.path.string());
  EXPECT_EQ(ck.files().size(), 6u);
  EXPECT_EQ(ck.get("t11").select(0, 999)[99].item<float>(), 11.f);
}
