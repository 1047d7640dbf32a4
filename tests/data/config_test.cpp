// Tests for src/data/config.cpp: transformers' defaults, the llava-hf 7B config (LLAVA.md §1.2), old/new key
// spellings, and clear InputErrors for every kind of bad config.
#include "data/config.h"

#include <gtest/gtest.h>

#include <fstream>
#include <string>

#include "data/error.h"
#include "data/fs.h"
#include "test_util.h"

namespace config_test {

using eqat::Arch;
using eqat::InputError;
using eqat::ModelConfig;
using eqat::parse_model_config;

// llava-hf/llava-1.5-7b-hf config.json as uploaded (LLAVA.md §1.2 table).
const char* kLlava7b = R"({
  "architectures": ["LlavaForConditionalGeneration"],
  "ignore_index": -100,
  "image_token_index": 32000,
  "model_type": "llava",
  "pad_token_id": 32001,
  "projector_hidden_act": "gelu",
  "text_config": {
    "_name_or_path": "lmsys/vicuna-7b-v1.5",
    "architectures": ["LlamaForCausalLM"],
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "rms_norm_eps": 1e-05,
    "torch_dtype": "float16",
    "vocab_size": 32064
  },
  "tie_word_embeddings": false,
  "torch_dtype": "float16",
  "transformers_version": "4.36.0.dev0",
  "vision_config": {
    "hidden_size": 1024,
    "image_size": 336,
    "intermediate_size": 4096,
    "model_type": "clip_vision_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
    "vocab_size": 32000
  },
  "vision_feature_layer": -2,
  "vision_feature_select_strategy": "default",
  "vocab_size": 32064
})";

// Expects parse_model_config(json) to throw InputError whose single-line message contains every needle.
void expect_error(const std::string& json, const std::vector<std::string>& needles,
                  const std::string& source = "config.json") {
  try {
    parse_model_config(json, source);
    ADD_FAILURE() << "expected InputError for: " << json;
  } catch (const InputError& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind(source + ": ", 0), 0u) << "message must start with the file: " << msg;
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "missing '" << n << "' in: " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos);
  }
}

// A llama config with one field replaced / added (`extra` is a JSON fragment like "\"hidden_size\": 7").
std::string llama_with(const std::string& extra) {
  return R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama")" + (extra.empty() ? "" : ", " + extra) +
         "}";
}
// The 7B llava config with top-level keys added or overriding (later duplicate keys win in nlohmann).
std::string llava_with(const std::string& extra) {
  std::string s = kLlava7b;
  return s.substr(0, s.rfind('}')) + ", " + extra + "}";
}

void expect_same(const ModelConfig& a, const ModelConfig& b) {
  EXPECT_EQ(a.arch, b.arch);
  const auto &t = a.text, &u = b.text;
  EXPECT_EQ(t.vocab_size, u.vocab_size);
  EXPECT_EQ(t.hidden_size, u.hidden_size);
  EXPECT_EQ(t.intermediate_size, u.intermediate_size);
  EXPECT_EQ(t.num_hidden_layers, u.num_hidden_layers);
  EXPECT_EQ(t.num_attention_heads, u.num_attention_heads);
  EXPECT_EQ(t.num_key_value_heads, u.num_key_value_heads);
  EXPECT_EQ(t.head_dim, u.head_dim);
  EXPECT_EQ(t.max_position_embeddings, u.max_position_embeddings);
  EXPECT_EQ(t.rms_norm_eps, u.rms_norm_eps);  // exact: the JSON writer emits round-trip-exact doubles
  EXPECT_EQ(t.rope_theta, u.rope_theta);
  EXPECT_EQ(t.rope_scaling.type, u.rope_scaling.type);
  EXPECT_EQ(t.rope_scaling.factor, u.rope_scaling.factor);
  EXPECT_EQ(t.rope_scaling.low_freq_factor, u.rope_scaling.low_freq_factor);
  EXPECT_EQ(t.rope_scaling.high_freq_factor, u.rope_scaling.high_freq_factor);
  EXPECT_EQ(t.rope_scaling.original_max_position_embeddings, u.rope_scaling.original_max_position_embeddings);
  EXPECT_EQ(t.tie_word_embeddings, u.tie_word_embeddings);
  EXPECT_EQ(t.attention_bias, u.attention_bias);
  EXPECT_EQ(t.mlp_bias, u.mlp_bias);
  EXPECT_EQ(t.hidden_act, u.hidden_act);
  EXPECT_EQ(t.bos_token_id, u.bos_token_id);
  EXPECT_EQ(t.eos_token_id, u.eos_token_id);
  EXPECT_EQ(t.pad_token_id, u.pad_token_id);
  EXPECT_EQ(t.torch_dtype, u.torch_dtype);
  EXPECT_EQ(a.vision.hidden_size, b.vision.hidden_size);
  EXPECT_EQ(a.vision.intermediate_size, b.vision.intermediate_size);
  EXPECT_EQ(a.vision.num_hidden_layers, b.vision.num_hidden_layers);
  EXPECT_EQ(a.vision.num_attention_heads, b.vision.num_attention_heads);
  EXPECT_EQ(a.vision.image_size, b.vision.image_size);
  EXPECT_EQ(a.vision.patch_size, b.vision.patch_size);
  EXPECT_EQ(a.vision.num_channels, b.vision.num_channels);
  EXPECT_EQ(a.vision.layer_norm_eps, b.vision.layer_norm_eps);
  EXPECT_EQ(a.vision.hidden_act, b.vision.hidden_act);
  EXPECT_EQ(a.image_token_index, b.image_token_index);
  EXPECT_EQ(a.projector_hidden_act, b.projector_hidden_act);
  EXPECT_EQ(a.vision_feature_layer, b.vision_feature_layer);
  EXPECT_EQ(a.vision_feature_select_strategy, b.vision_feature_select_strategy);
  EXPECT_EQ(a.image_seq_length, b.image_seq_length);
  EXPECT_EQ(a.multimodal_projector_bias, b.multimodal_projector_bias);
  EXPECT_EQ(a.quant.present, b.quant.present);
  EXPECT_EQ(a.quant.quant_method, b.quant.quant_method);
  EXPECT_EQ(a.quant.bits, b.quant.bits);
  EXPECT_EQ(a.quant.group_size, b.quant.group_size);
  EXPECT_EQ(a.quant.sym, b.quant.sym);
  EXPECT_EQ(a.quant.desc_act, b.quant.desc_act);
  EXPECT_EQ(a.quant.checkpoint_format, b.quant.checkpoint_format);
}

void expect_round_trip(const ModelConfig& c) {
  const std::string text = eqat::model_config_to_json(c);
  SCOPED_TRACE(text);
  expect_same(parse_model_config(text, "roundtrip.json"), c);
}

TEST(ConfigTest, LlamaDefaultsMatchTransformers) {
  ModelConfig c = parse_model_config(R"({"architectures": ["LlamaForCausalLM"]})", "config.json");
  EXPECT_EQ(c.arch, Arch::kLlama);
  EXPECT_EQ(c.text.vocab_size, 32000);
  EXPECT_EQ(c.text.hidden_size, 4096);
  EXPECT_EQ(c.text.intermediate_size, 11008);
  EXPECT_EQ(c.text.num_hidden_layers, 32);
  EXPECT_EQ(c.text.num_attention_heads, 32);
  EXPECT_EQ(c.text.num_key_value_heads, 32);
  EXPECT_EQ(c.text.head_dim, 128);
  EXPECT_EQ(c.text.max_position_embeddings, 2048);  // LlamaConfig's, not Vicuna's 4096
  EXPECT_EQ(c.text.rms_norm_eps, 1e-6);             // LlamaConfig's, not Vicuna's 1e-5
  EXPECT_EQ(c.text.rope_theta, 10000.0);
  EXPECT_EQ(c.text.rope_scaling.type, "none");
  EXPECT_FALSE(c.text.tie_word_embeddings);
  EXPECT_FALSE(c.text.attention_bias);
  EXPECT_EQ(c.text.bos_token_id, 1);
  EXPECT_EQ(c.text.eos_token_id, 2);
  EXPECT_EQ(c.text.pad_token_id, -1);
  EXPECT_FALSE(c.quant.present);
  EXPECT_EQ(c.source_path, "config.json");
  EXPECT_STREQ(eqat::arch_name(c.arch), "LlamaForCausalLM");
}

TEST(ConfigTest, KvHeadsAndHeadDimFollowHeads) {
  ModelConfig c = parse_model_config(R"({"model_type": "llama", "hidden_size": 512, "num_attention_heads": 8,
                                         "num_key_value_heads": null})",
                                     "config.json");
  EXPECT_EQ(c.text.num_key_value_heads, 8);
  EXPECT_EQ(c.text.head_dim, 64);
  // An explicit head_dim wins and lifts the divisibility requirement (e.g. Gemma-style 3072 / 24 heads of 256).
  c = parse_model_config(llama_with(R"("hidden_size": 100, "num_attention_heads": 3, "head_dim": 32)"), "c.json");
  EXPECT_EQ(c.text.head_dim, 32);
}

TEST(ConfigTest, Llava7bFromHub) {
  ModelConfig c = parse_model_config(kLlava7b, "llava/config.json");
  EXPECT_EQ(c.arch, Arch::kLlava);
  EXPECT_STREQ(eqat::arch_name(c.arch), "LlavaForConditionalGeneration");
  // text_config: stated fields plus LlamaConfig defaults.
  EXPECT_EQ(c.text.vocab_size, 32064);
  EXPECT_EQ(c.text.hidden_size, 4096);
  EXPECT_EQ(c.text.intermediate_size, 11008);
  EXPECT_EQ(c.text.num_hidden_layers, 32);
  EXPECT_EQ(c.text.num_attention_heads, 32);
  EXPECT_EQ(c.text.num_key_value_heads, 32);
  EXPECT_EQ(c.text.head_dim, 128);
  EXPECT_EQ(c.text.max_position_embeddings, 4096);
  EXPECT_EQ(c.text.rms_norm_eps, 1e-5);
  EXPECT_EQ(c.text.rope_theta, 10000.0);
  EXPECT_FALSE(c.text.tie_word_embeddings);
  EXPECT_EQ(c.text.pad_token_id, 32001);  // from the top level
  EXPECT_EQ(c.text.torch_dtype, "float16");
  // vision_config: CLIP ViT-L/14-336 with CLIPVisionConfig defaults for the rest.
  EXPECT_EQ(c.vision.hidden_size, 1024);
  EXPECT_EQ(c.vision.intermediate_size, 4096);
  EXPECT_EQ(c.vision.num_hidden_layers, 24);
  EXPECT_EQ(c.vision.num_attention_heads, 16);
  EXPECT_EQ(c.vision.image_size, 336);
  EXPECT_EQ(c.vision.patch_size, 14);
  EXPECT_EQ(c.vision.num_channels, 3);
  EXPECT_EQ(c.vision.layer_norm_eps, 1e-5);
  EXPECT_EQ(c.vision.hidden_act, "quick_gelu");
  EXPECT_EQ(c.vision.num_patches(), 576);
  // LLaVA fields.
  EXPECT_EQ(c.image_token_index, 32000);
  EXPECT_EQ(c.projector_hidden_act, "gelu");
  EXPECT_EQ(c.vision_feature_layer, -2);
  EXPECT_EQ(c.vision_feature_select_strategy, "default");
  EXPECT_EQ(c.image_seq_length, 576);
  EXPECT_TRUE(c.multimodal_projector_bias);
  EXPECT_EQ(c.source_path, "llava/config.json");
  expect_round_trip(c);
}

TEST(ConfigTest, LlavaDefaults) {
  // No sub-configs at all: transformers builds LlamaConfig() and CLIP ViT-L/14-336.
  ModelConfig c = parse_model_config(R"({"model_type": "llava"})", "config.json");
  EXPECT_EQ(c.arch, Arch::kLlava);
  EXPECT_EQ(c.text.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.text.vocab_size, 32000);
  EXPECT_EQ(c.vision.hidden_size, 1024);
  EXPECT_EQ(c.vision.image_size, 336);
  EXPECT_EQ(c.vision.patch_size, 14);
  EXPECT_EQ(c.vision.num_hidden_layers, 24);
  EXPECT_EQ(c.image_token_index, 32000);
  EXPECT_EQ(c.image_seq_length, 576);
  EXPECT_EQ(c.vision_feature_layer, -2);
  EXPECT_EQ(c.projector_hidden_act, "gelu");
  EXPECT_TRUE(c.multimodal_projector_bias);
  // A present but empty vision_config takes CLIPVisionConfig's own defaults (ViT-B/32 at 224 px), and the
  // absent image_seq_length follows the geometry instead of HF's fixed 576.
  c = parse_model_config(R"({"model_type": "llava", "vision_config": {}})", "config.json");
  EXPECT_EQ(c.vision.hidden_size, 768);
  EXPECT_EQ(c.vision.intermediate_size, 3072);
  EXPECT_EQ(c.vision.num_hidden_layers, 12);
  EXPECT_EQ(c.vision.num_attention_heads, 12);
  EXPECT_EQ(c.vision.image_size, 224);
  EXPECT_EQ(c.vision.patch_size, 32);
  EXPECT_EQ(c.vision.layer_norm_eps, 1e-5);
  EXPECT_EQ(c.vision.hidden_act, "quick_gelu");
  EXPECT_EQ(c.image_seq_length, 49);
  expect_round_trip(c);
}

TEST(ConfigTest, ImageSeqLengthFollowsStrategy) {
  ModelConfig c = parse_model_config(llava_with(R"("vision_feature_select_strategy": "full")"), "config.json");
  EXPECT_EQ(c.image_seq_length, 577);  // CLS kept
  c = parse_model_config(llava_with(R"("image_seq_length": 576)"), "config.json");
  EXPECT_EQ(c.image_seq_length, 576);
  expect_error(llava_with(R"("image_seq_length": 500)"), {"'image_seq_length' = 500", "576"});
  expect_error(llava_with(R"("vision_feature_select_strategy": "full", "image_seq_length": 576)"),
               {"image_seq_length", "577"});
}

TEST(ConfigTest, NewAndOldKeySpellings) {
  // image_token_id (newer transformers) for image_token_index; "dtype" for "torch_dtype"; rope_parameters.
  ModelConfig c = parse_model_config(R"({"model_type": "llava", "image_token_id": 32007, "dtype": "bfloat16",
      "text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}})",
                                     "config.json");
  EXPECT_EQ(c.image_token_index, 32007);
  EXPECT_EQ(c.text.torch_dtype, "bfloat16");
  EXPECT_EQ(c.text.rope_theta, 500000.0);
  EXPECT_EQ(c.text.rope_scaling.type, "none");
  c = parse_model_config(llava_with(R"("image_token_id": 32000)"), "config.json");  // both, agreeing
  EXPECT_EQ(c.image_token_index, 32000);
  expect_error(llava_with(R"("image_token_id": 32005)"), {"'image_token_index' and 'image_token_id' disagree"});
  // GPTQModel's "format" alias for checkpoint_format.
  c = parse_model_config(llama_with(R"("quantization_config": {"quant_method": "gptq", "bits": 4, "format": "gptq_v2"})"),
                         "config.json");
  EXPECT_EQ(c.quant.checkpoint_format, "gptq_v2");
}

TEST(ConfigTest, TieWordEmbeddingsTopLevelFallback) {
  ModelConfig c = parse_model_config(R"({"model_type": "llava", "tie_word_embeddings": true})", "config.json");
  EXPECT_TRUE(c.text.tie_word_embeddings);
  c = parse_model_config(R"({"model_type": "llava", "tie_word_embeddings": true,
                             "text_config": {"tie_word_embeddings": false}})",
                         "config.json");
  EXPECT_FALSE(c.text.tie_word_embeddings);  // text_config's own value wins
  c = parse_model_config(R"({"model_type": "llava", "text_config": {"tie_word_embeddings": true}})", "config.json");
  EXPECT_TRUE(c.text.tie_word_embeddings);
}

TEST(ConfigTest, EosTokenList) {
  ModelConfig c = parse_model_config(llama_with(R"("eos_token_id": [128001, 128008, 128009], "bos_token_id": 128000)"),
                                     "config.json");
  EXPECT_EQ(c.text.eos_token_id, 128001);
  EXPECT_EQ(c.text.bos_token_id, 128000);
  c = parse_model_config(llama_with(R"("eos_token_id": null, "pad_token_id": null)"), "config.json");
  EXPECT_EQ(c.text.eos_token_id, 2);
  EXPECT_EQ(c.text.pad_token_id, -1);
  expect_error(llama_with(R"("eos_token_id": [])"), {"'eos_token_id' is an empty list"});
  expect_error(llama_with(R"("eos_token_id": ["</s>"])"), {"'eos_token_id' must be an integer, got string"});
}

TEST(ConfigTest, RopeScaling) {
  ModelConfig c = parse_model_config(llama_with(R"("rope_scaling": {"type": "linear", "factor": 2.0})"), "c.json");
  EXPECT_EQ(c.text.rope_scaling.type, "linear");
  EXPECT_EQ(c.text.rope_scaling.factor, 2.0);
  expect_round_trip(c);
  c = parse_model_config(llama_with(R"("rope_scaling": {"rope_type": "dynamic", "factor": 4})"), "c.json");
  EXPECT_EQ(c.text.rope_scaling.type, "dynamic");
  EXPECT_EQ(c.text.rope_scaling.factor, 4.0);
  c = parse_model_config(llama_with(R"("rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
      "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})"),
                         "c.json");
  EXPECT_EQ(c.text.rope_scaling.type, "llama3");
  EXPECT_EQ(c.text.rope_scaling.factor, 8.0);
  EXPECT_EQ(c.text.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c.text.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_EQ(c.text.rope_theta, 500000.0);
  expect_round_trip(c);
  c = parse_model_config(llama_with(R"("rope_scaling": {"rope_type": "default"})"), "c.json");
  EXPECT_EQ(c.text.rope_scaling.type, "none");

  expect_error(llama_with(R"("rope_scaling": {"type": "yarn", "factor": 4.0})"), {"'yarn' is not supported"});
  expect_error(llama_with(R"("rope_scaling": {"factor": 4.0})"), {"'rope_scaling.rope_type'", "missing"});
  expect_error(llama_with(R"("rope_scaling": {"type": "linear"})"), {"'rope_scaling.factor' is required"});
  expect_error(llama_with(R"("rope_scaling": {"type": "linear", "factor": 0.5})"), {"must be >= 1"});
  expect_error(llama_with(R"("rope_scaling": {"rope_type": "llama3", "factor": 8.0})"),
               {"'rope_scaling.low_freq_factor' is required"});
  expect_error(llama_with(R"("rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})"),
               {"low_freq_factor < high_freq_factor"});
  expect_error(llama_with(R"("rope_scaling": "linear")"), {"'rope_scaling' must be an object, got string"});
}

TEST(ConfigTest, QuantizationConfig) {
  ModelConfig c = parse_model_config(llava_with(R"("quantization_config": {"quant_method": "gptq", "bits": 2,
      "group_size": 64, "sym": false, "desc_act": false, "checkpoint_format": "gptq_v2", "damp_percent": 0.01})"),
                                     "config.json");
  EXPECT_TRUE(c.quant.present);
  EXPECT_EQ(c.quant.quant_method, "gptq");
  EXPECT_EQ(c.quant.bits, 2);
  EXPECT_EQ(c.quant.group_size, 64);
  EXPECT_FALSE(c.quant.sym);
  EXPECT_FALSE(c.quant.desc_act);
  EXPECT_EQ(c.quant.checkpoint_format, "gptq_v2");
  expect_round_trip(c);
  // Absent keys: GPTQConfig's defaults.
  c = parse_model_config(llama_with(R"("quantization_config": {"quant_method": "gptq", "bits": 4})"), "c.json");
  EXPECT_EQ(c.quant.group_size, 128);
  EXPECT_TRUE(c.quant.sym);
  EXPECT_EQ(c.quant.checkpoint_format, "gptq");

  expect_error(llama_with(R"("quantization_config": {"quant_method": "awq", "bits": 4})"), {"'awq' is not supported"});
  expect_error(llama_with(R"("quantization_config": {"quant_method": "gptq", "bits": 5})"), {"'quantization_config.bits' = 5"});
  expect_error(llama_with(R"("quantization_config": {"quant_method": "gptq"})"), {"'quantization_config.bits' is required"});
  expect_error(llama_with(R"("quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 0})"),
               {"group_size"});
  expect_error(llama_with(R"("quantization_config": {"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"})"),
               {"'marlin' is not supported"});
}

TEST(ConfigTest, RoundTripLlama) {
  ModelConfig c = parse_model_config(llama_with(R"("hidden_size": 2048, "num_attention_heads": 16,
      "num_key_value_heads": 4, "intermediate_size": 5632, "num_hidden_layers": 22, "vocab_size": 32000,
      "rms_norm_eps": 1e-05, "tie_word_embeddings": true, "pad_token_id": 0, "torch_dtype": "bfloat16",
      "attention_bias": true, "quantization_config": {"quant_method": "gptq", "bits": 3, "group_size": -1,
      "desc_act": true})"),
                                     "config.json");
  EXPECT_EQ(c.text.num_key_value_heads, 4);
  EXPECT_EQ(c.quant.group_size, -1);
  EXPECT_TRUE(c.quant.desc_act);
  expect_round_trip(c);
}

TEST(ConfigTest, MalformedJson) {
  expect_error("{\"model_type\": \"llama\",", {"not valid JSON"});
  expect_error("", {"not valid JSON"});
  // Fuzzer finding: nlohmann reports "1e309" as out_of_range, not parse_error; it must still be an InputError.
  expect_error(llama_with(R"("rope_theta": 1e309)"), {"not valid JSON (number out of range)"});
  expect_error("[\"LlamaForCausalLM\"]", {"must be a JSON object, got array"});
  expect_error(std::string(200, '[') + std::string(200, ']'), {"nested deeper"});
  expect_error(std::string("{\"model_type\": \"ll\xff\"}"), {"not valid JSON"});
}

TEST(ConfigTest, MissingFile) {
  eqat_test::TempDir dir;
  try {
    eqat::load_model_config(dir.str());
    ADD_FAILURE();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("no config.json"), std::string::npos) << e.what();
  }
  EXPECT_THROW(eqat::load_model_config(dir.str("missing/config.json")), InputError);
  // From a directory and from the file path; messages name the file.
  eqat::write_file_atomic(dir.str("config.json"), kLlava7b);
  EXPECT_EQ(eqat::load_model_config(dir.str()).source_path, dir.str("config.json"));
  EXPECT_EQ(eqat::load_model_config(dir.str("config.json")).text.vocab_size, 32064);
  eqat::write_file_atomic(dir.str("config.json"), "{oops");
  try {
    eqat::load_model_config(dir.str());
    ADD_FAILURE();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(dir.str("config.json") + ": not valid JSON"), std::string::npos)
        << e.what();
  }
}

TEST(ConfigTest, UnknownArchitecture) {
  expect_error(R"({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"})",
               {"config.json: unsupported architecture 'Qwen2ForCausalLM' (supported: LlamaForCausalLM, "
                "MistralForCausalLM, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)"});
  // The original LLaVA layout says model_type "llava" but is not llava-hf's; architectures[0] decides.
  expect_error(R"({"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava"})",
               {"unsupported architecture 'LlavaLlamaForCausalLM'"});
  expect_error(R"({"model_type": "gpt2"})", {"unsupported architecture 'gpt2'"});
  expect_error(R"({"hidden_size": 4096})", {"neither 'architectures' nor 'model_type'"});
  expect_error(R"({"model_type": "llava", "text_config": {"model_type": "qwen2"}})",
               {"'text_config.model_type' = 'qwen2'"});
  expect_error(R"({"model_type": "llava", "vision_config": {"model_type": "siglip_vision_model"}})",
               {"'vision_config.model_type' = 'siglip_vision_model'"});
}

TEST(ConfigTest, WrongTypes) {
  expect_error(llama_with(R"("hidden_size": "4096")"), {"'hidden_size' must be an integer, got string"});
  expect_error(llama_with(R"("hidden_size": 4096.0)"), {"'hidden_size' must be an integer, got number"});
  expect_error(llama_with(R"("rms_norm_eps": "1e-5")"), {"'rms_norm_eps' must be a number, got string"});
  expect_error(llama_with(R"("tie_word_embeddings": "false")"), {"'tie_word_embeddings' must be true or false"});
  expect_error(llama_with(R"("hidden_act": 1)"), {"'hidden_act' must be a string"});
  expect_error(llama_with(R"("vocab_size": 18446744073709551615)"), {"'vocab_size'", "too large"});
  expect_error(R"({"architectures": "LlamaForCausalLM"})", {"'architectures' must be a list"});
  expect_error(R"({"architectures": [7]})", {"'architectures' must hold strings"});
  expect_error(R"({"model_type": "llava", "text_config": []})", {"'text_config' must be an object, got array"});
  expect_error(R"({"model_type": "llava", "vision_config": {"image_size": "336"}})",
               {"'vision_config.image_size' must be an integer"});
  expect_error(llava_with(R"("vision_feature_layer": [-2, -5])"), {"list of layers is not supported"});
  expect_error(llava_with(R"("multimodal_projector_bias": 1)"), {"'multimodal_projector_bias' must be true or false"});
}

TEST(ConfigTest, InconsistentDims) {
  expect_error(llama_with(R"("num_attention_heads": 33)"), {"'hidden_size' = 4096 is not divisible by",
                                                              "'num_attention_heads' = 33"});
  expect_error(llama_with(R"("num_key_value_heads": 5)"), {"'num_attention_heads' = 32 is not a multiple of",
                                                             "'num_key_value_heads' = 5"});
  expect_error(llama_with(R"("num_hidden_layers": 0)"), {"'num_hidden_layers' = 0 must be in [1, "});
  expect_error(llama_with(R"("hidden_size": -4096)"), {"'hidden_size' = -4096"});
  expect_error(llama_with(R"("head_dim": 0)"), {"'head_dim' = 0"});
  expect_error(llama_with(R"("rms_norm_eps": 0)"), {"'rms_norm_eps' must be positive"});
  expect_error(llama_with(R"("hidden_act": "gelu")"), {"'hidden_act' = 'gelu' is not supported"});
  expect_error(R"({"model_type": "llava", "text_config": {"num_key_value_heads": 3}})",
               {"'text_config.num_attention_heads' = 32", "'text_config.num_key_value_heads' = 3"});
  expect_error(R"({"model_type": "llava", "vision_config": {"hidden_size": 1000, "num_attention_heads": 16}})",
               {"'vision_config.hidden_size' = 1000 is not divisible"});
  expect_error(R"({"model_type": "llava", "vision_config": {"image_size": 336, "patch_size": 32}})",
               {"'vision_config.image_size' = 336 is not a multiple of 'vision_config.patch_size' = 32"});
  expect_error(R"({"model_type": "llava", "vision_config": {"hidden_act": "relu"}})", {"'relu' is not supported"});
  expect_error(llava_with(R"("vision_feature_select_strategy": "cls_patch")"), {"must be 'default' or 'full'"});
  expect_error(llava_with(R"("projector_hidden_act": "relu")"), {"'projector_hidden_act' = 'relu'"});
  expect_error(llava_with(R"("image_token_index": -1)"), {"'image_token_index' must be non-negative"});
  // vision_feature_layer indexes 25 hidden states of a 24-layer tower: [-25, 24].
  EXPECT_EQ(parse_model_config(llava_with(R"("vision_feature_layer": -25)"), "c.json").vision_feature_layer, -25);
  EXPECT_EQ(parse_model_config(llava_with(R"("vision_feature_layer": 24)"), "c.json").vision_feature_layer, 24);
  expect_error(llava_with(R"("vision_feature_layer": -26)"), {"'vision_feature_layer' = -26 is outside [-25, 24]"});
  expect_error(llava_with(R"("vision_feature_layer": 25)"), {"outside [-25, 24]"});
}

// Configs written by transformers 5 (tools/make_fixtures.py), when present.
TEST(ConfigTest, ReadsFixtureConfigs) {
  const std::string llava = eqat_test::data_path("fixtures/tiny_llava");
  if (!eqat::file_exists(llava + "/config.json")) GTEST_SKIP() << "fixtures not generated";
  ModelConfig c = eqat::load_model_config(llava);
  EXPECT_EQ(c.arch, Arch::kLlava);
  EXPECT_EQ(c.text.hidden_size, 64);
  EXPECT_EQ(c.text.head_dim, 16);
  EXPECT_EQ(c.text.num_key_value_heads, 2);
  EXPECT_EQ(c.text.pad_token_id, 513);  // text_config says null; the top-level value fills it
  EXPECT_EQ(c.image_token_index, 512);
  EXPECT_EQ(c.image_seq_length, 16);
  EXPECT_EQ(c.vision.num_patches(), 16);
  expect_round_trip(c);
  for (const char* name : {"tiny_llama", "tiny_llama_rope_llama3", "tiny_llama_rope_scaled"}) {
    const std::string dir = eqat_test::data_path(std::string("fixtures/") + name);
    if (!eqat::file_exists(dir + "/config.json")) continue;
    ModelConfig l = eqat::load_model_config(dir);
    EXPECT_EQ(l.arch, Arch::kLlama) << name;
    EXPECT_EQ(l.text.vocab_size, 512) << name;
    expect_round_trip(l);
  }
}

}  // namespace config_test
