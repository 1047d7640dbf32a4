// Loading and generating with careless or hostile model files (issue 16): config sizes are checked against the
// checkpoint before anything is allocated, non-finite weights are refused naming tensor and file, a request for
// more tokens than the context is capped (never sizes the KV cache), and a cache that cannot fit is refused.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>

#include "data/error.h"
#include "data/safetensors.h"
#include "llm/generate.h"
#include "llm/sampler.h"
#include "model_test_util.h"
#include "vision/llava.h"

namespace eqat {
namespace load_checks_test {

using eqat_test::fixture;
using eqat_test::TempDir;

std::string copy_model(const TempDir& t, const std::string& name) {
  const std::string dst = t.str(name);
  std::filesystem::copy(fixture(name), dst, std::filesystem::copy_options::recursive);
  return dst;
}

void edit_config(const std::string& dir, const std::function<void(nlohmann::json&)>& edit) {
  nlohmann::json j = eqat_test::load_json(dir + "/config.json");
  edit(j);
  std::ofstream(dir + "/config.json") << j.dump(2);
}

// Loads `dir` expecting an InputError whose one-line message contains every needle.
void expect_load_error(const std::string& dir, const std::vector<std::string>& needles) {
  try {
    LoadOptions lo;
    lo.need_tokenizer = false;
    load_model(dir, lo);
    ADD_FAILURE() << "loaded " << dir;
  } catch (const InputError& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << msg << "\n lacks: " << n;
  }
}

// Each size would allocate far more than the machine has (2^31 x 64 fp32 = 512 GiB; 10^6 layers) if the modules
// were built first; the check compares with the checkpoint's header shapes before constructing anything.
TEST(LoadChecks, ConfigSizesAreCheckedAgainstTheCheckpointBeforeAllocating) {
  TempDir t;
  const std::string m = copy_model(t, "tiny_llama");
  edit_config(m, [](nlohmann::json& j) { j["vocab_size"] = int64_t{1} << 31; });
  expect_load_error(m, {"model.embed_tokens.weight", "[512, 64]", "vocab_size", "2147483648"});
  edit_config(m, [](nlohmann::json& j) { j["vocab_size"] = 512, j["num_hidden_layers"] = 1000000; });
  expect_load_error(m, {"num_hidden_layers = 1000000", "model.layers.999999."});
  edit_config(m, [](nlohmann::json& j) { j["num_hidden_layers"] = 3, j["intermediate_size"] = int64_t{1} << 30; });
  expect_load_error(m, {"mlp.gate_proj.weight", "intermediate_size"});
  edit_config(m, [](nlohmann::json& j) { j["intermediate_size"] = 160, j["num_key_value_heads"] = 8; });
  expect_load_error(m, {"k_proj.weight", "num_key_value_heads"});

  const std::string v = copy_model(t, "tiny_llava");
  edit_config(v, [](nlohmann::json& j) {
    j["vision_config"]["image_size"] = 16384;  // (16384/patch)^2 position embeddings
    j.erase("image_seq_length");
  });
  expect_load_error(v, {"position_embedding.weight", "image_size"});
  edit_config(v, [](nlohmann::json& j) {
    j = eqat_test::load_json(fixture("tiny_llava/config.json"));
    j["vision_config"]["num_hidden_layers"] = 100000;
    j["vision_feature_layer"] = -2;
  });
  expect_load_error(v, {"vision_config.num_hidden_layers = 100000"});
}

// A NaN weight: refused at load, naming the tensor and the file, instead of an empty answer (greedy) or LibTorch's
// "probability tensor contains inf/nan" (sampling). The scan costs one reduction per tensor; the measured cost on
// the fixtures is printed (RecordProperty) rather than asserted, timing being machine-dependent.
TEST(LoadChecks, NonFiniteWeightsAreRefusedNamingTensorAndFile) {
  TempDir t;
  const std::string m = copy_model(t, "tiny_llama");
  for (float bad : {NAN, INFINITY}) {
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    {
      Checkpoint ck = Checkpoint::open(fixture("tiny_llama"));
      for (const auto& n : ck.names()) tensors.emplace_back(n, ck.get(n).clone());
    }
    for (auto& [n, w] : tensors)
      if (n == "model.layers.1.mlp.up_proj.weight") w.view(-1)[17] = bad;
    write_safetensors(m + "/model.safetensors", tensors);
    expect_load_error(m, {"model.safetensors", "'model.layers.1.mlp.up_proj.weight'", "1 non-finite value",
                          std::isnan(bad) ? "NaN" : "inf"});
  }

  // Cost: the scan alone over every floating tensor of tiny_llava, against a whole load.
  using Clock = std::chrono::steady_clock;
  Checkpoint ck = Checkpoint::open(fixture("tiny_llava"));
  const auto t0 = Clock::now();
  for (const auto& n : ck.names()) {
    at::Tensor w = ck.get(n);
    if (w.is_floating_point()) (void)w.sum().item<double>();
  }
  const double scan_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  const auto t1 = Clock::now();
  (void)load_model(fixture("tiny_llava"));
  const double load_ms = std::chrono::duration<double, std::milli>(Clock::now() - t1).count();
  RecordProperty("finite_scan_ms", std::to_string(scan_ms));
  RecordProperty("load_ms", std::to_string(load_ms));
  std::printf("tiny_llava: finite-weight scan %.2f ms of a %.1f ms load\n", scan_ms, load_ms);
}

TEST(LoadChecks, SamplerRefusesNonFiniteLogits) {
  for (double temperature : {0.0, 0.8}) {
    SamplingOptions so;
    so.temperature = temperature;
    Sampler s(so);
    at::Tensor logits = at::zeros({1, 8});
    logits[0][3] = NAN;
    EXPECT_THROW(s.sample(logits), InputError);
  }
}

// More new tokens than the context holds: generation stops at the context (max_position_embeddings), and the cache
// is sized from that — 10^9 tokens would otherwise allocate 10^9 positions per layer.
TEST(Generate, NewTokensAreCappedAtTheContext) {
  LoadOptions lo;
  lo.need_tokenizer = false;
  Model m = load_model(fixture("tiny_llama"), lo);
  const int64_t ctx = m.cfg.text.max_position_embeddings;  // 256
  EXPECT_EQ(max_new_tokens_in_context(m.cfg.text, 6, 1000000000), ctx - 6);
  EXPECT_EQ(max_new_tokens_in_context(m.cfg.text, 6, 10), 10);
  EXPECT_EQ(max_new_tokens_in_context(m.cfg.text, ctx, 10), 0);
  c10::NoGradGuard g;
  at::Tensor ids = at::tensor(std::vector<int64_t>{1, 5, 9, 13, 17, 21}, at::kLong).view({1, -1});
  GenerateOptions o;
  o.max_new_tokens = 1000000000;  // no stop ids: runs to the end of the context
  GenerateResult r = generate(m.lm, m.lm->embed(ids), at::ones({1, 6}, at::kBool), o);
  EXPECT_EQ(static_cast<int64_t>(r.tokens[0].size()), ctx - 6);
}

// A context of 2^30 positions makes a request of 2^30 tokens legal, but its cache (3 layers x K,V x 2 heads x 2^30
// x 8 x 4 bytes = 384 GiB) does not fit: refused before allocating, in one line.
TEST(Generate, KvCacheThatCannotFitIsRefused) {
  TempDir t;
  const std::string d = copy_model(t, "tiny_llama");
  edit_config(d, [](nlohmann::json& j) { j["max_position_embeddings"] = int64_t{1} << 30; });
  LoadOptions lo;
  lo.need_tokenizer = false;
  Model m = load_model(d, lo);
  EXPECT_EQ(kv_cache_bytes(m.cfg.text, 1, int64_t{1} << 30, at::kFloat), int64_t{384} << 30);
  c10::NoGradGuard g;
  at::Tensor ids = at::tensor(std::vector<int64_t>{1, 5}, at::kLong).view({1, -1});
  GenerateOptions o;
  o.max_new_tokens = (int64_t{1} << 30) - 2;
  try {
    generate(m.lm, m.lm->embed(ids), at::ones({1, 2}, at::kBool), o);
    ADD_FAILURE() << "allocated a 384 GiB KV cache";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("the KV cache for 1 x 1073741824 positions needs about 384.0 GiB"),
              std::string::npos)
        << e.what();
  }
}

// LoadOptions::defer_decoder (the quantize pipeline's CPU load): decoder layers stay as stored until
// materialize_layer converts them, and then equal an ordinary load exactly; everything else loads as usual.
TEST(LoadChecks, DeferredDecoderLayersMaterializeToTheOrdinaryLoad) {
  LoadOptions plain, deferred;
  plain.dtype = deferred.dtype = "bfloat16";  // the fixture stores fp32: every float tensor converts
  deferred.defer_decoder = true;
  Model a = load_model(fixture("tiny_llama"), plain), b = load_model(fixture("tiny_llama"), deferred);
  auto layer_params = [](Model& m, int64_t l) { return m.lm->model->layers[l]->named_parameters(true); };
  EXPECT_EQ(layer_params(b, 0)["mlp.down_proj.weight"].scalar_type(), at::kFloat);  // still as stored
  EXPECT_EQ(b.lm->model->embed_tokens->weight.scalar_type(), at::kBFloat16);         // not a decoder layer
  for (int64_t l = 0; l < b.cfg.text.num_hidden_layers; ++l) {
    materialize_layer(b, l);
    materialize_layer(b, l);  // twice: a no-op
    auto pa = layer_params(a, l), pb = layer_params(b, l);
    for (const auto& kv : pa) {
      EXPECT_EQ(pb[kv.key()].scalar_type(), at::kBFloat16) << kv.key();
      EXPECT_TRUE(at::equal(kv.value(), pb[kv.key()])) << l << " " << kv.key();
    }
  }
}

// LoadOptions::weights_as_stored (what ask, generate, eval and serve load): an fp16 checkpoint served in fp32 keeps
// its float linears' weights (decoder, vision tower, projector, lm_head) and its token table as fp16 aliases of the
// file, norms and the rest converted as before. The numbers are the float32 load's: prompt rows multiply the
// exactly converted weights with the same GEMM; a decode row takes cpu_half_gemv, whose sums differ from MKL's by
// fp32 rounding only (kLogitTol, derived in model_test_util.h), so the greedy tokens are the same.
TEST(LoadChecks, WeightsKeptAsStoredGiveTheFloat32LoadsAnswers) {
  TempDir t;
  const std::string dir = copy_model(t, "tiny_llava");
  {
    std::vector<std::pair<std::string, at::Tensor>> half;
    const Checkpoint ck = Checkpoint::open(dir + "/model.safetensors");
    for (const auto& name : ck.names()) {
      const at::Tensor v = ck.get(name);
      half.emplace_back(name, v.is_floating_point() ? v.to(at::kHalf) : v.clone());
    }
    write_safetensors(dir + "/model.safetensors", half);
  }
  LoadOptions stored;
  stored.weights_as_stored = true;
  Model a = load_model(dir), b = load_model(dir, stored);
  ASSERT_EQ(a.dtype, at::kFloat);
  ASSERT_EQ(b.dtype, at::kFloat);
  std::set<std::string> kept;
  for (const auto& p : b.llava->named_parameters(true)) {
    if (p.value().scalar_type() == at::kHalf) kept.insert(p.key());
    else EXPECT_EQ(p.value().scalar_type(), at::kFloat) << p.key();
  }
  for (const auto& p : a.llava->named_parameters(true)) EXPECT_EQ(p.value().scalar_type(), at::kFloat) << p.key();
  for (const char* key : {"language_model.lm_head.weight", "language_model.model.embed_tokens.weight",
                          "language_model.model.layers.0.mlp.down_proj.weight",
                          "language_model.model.layers.1.self_attn.q_proj.weight",
                          "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
                          "multi_modal_projector.linear_2.weight"})
    EXPECT_EQ(kept.count(key), 1u) << key;
  for (const auto& key : kept) EXPECT_EQ(key.find("norm"), std::string::npos) << key;

  const auto golden = Checkpoint::open(fixture("tiny_llava/golden.safetensors"));
  const std::vector<int64_t> ids = eqat_test::to_ids(golden.get("p0.input_ids"));
  c10::NoGradGuard g;
  const at::Tensor pixels = golden.get("pixel_values");
  at::Tensor ea = embed_prompt(a, ids, pixels), eb = embed_prompt(b, ids, pixels);
  EXPECT_EQ(eb.scalar_type(), at::kFloat);
  EXPECT_LE(eqat_test::max_abs_diff(ea, eb), eqat_test::kLogitTol);
  GenerateOptions o;
  o.max_new_tokens = 12;
  o.keep_logits = true;
  const at::Tensor valid = at::ones({1, ea.size(1)}, at::kBool);
  GenerateResult ra = generate(a.lm, ea, valid, o), rb = generate(b.lm, eb, valid, o);
  EXPECT_EQ(ra.tokens, rb.tokens);
  EXPECT_LE(eqat_test::max_abs_diff(at::cat(ra.step_logits, 0), at::cat(rb.step_logits, 0)), eqat_test::kLogitTol);
}

}  // namespace load_checks_test
}  // namespace eqat

