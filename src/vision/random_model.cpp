#include "vision/random_model.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>
#include <c10/util/accumulate.h>
#include <sys/statvfs.h>

#include <nlohmann/json.hpp>

#include <filesystem>

#include "data/config.h"
#include "data/error.h"
#include "data/fs.h"
#include "data/image.h"
#include "data/memory.h"
#include "data/output.h"
#include "data/safetensors.h"
#include "data/tokenizer.h"
#include "llm/llama.h"
#include "vision/llava.h"

namespace eqat {
namespace {

using json = nlohmann::json;

// One entry per config: the config.json of the upload, verbatim in its fields (LLAVA.md §1.2; meta-llama's
// Llama-2-7b-hf). Nothing else about a model is written down here.
struct Like {
  const char* name;
  const char* config;
};
constexpr Like kLikes[] = {
    {"llava-1.5-7b", R"({
  "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
  "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
  "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                  "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                  "torch_dtype": "float16", "vocab_size": 32064},
  "tie_word_embeddings": false, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
  "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
                    "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                    "vocab_size": 32000},
  "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064})"},
    {"llava-1.5-13b", R"({
  "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
  "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
  "text_config": {"_name_or_path": "lmsys/vicuna-13b-v1.5", "architectures": ["LlamaForCausalLM"],
                  "hidden_size": 5120, "intermediate_size": 13824, "max_position_embeddings": 4096,
                  "model_type": "llama", "num_attention_heads": 40, "num_hidden_layers": 40, "rms_norm_eps": 1e-05,
                  "torch_dtype": "float16", "vocab_size": 32064},
  "tie_word_embeddings": false, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
  "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
                    "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                    "vocab_size": 32000},
  "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064})"},
    {"llava-v1.6-mistral-7b", R"({
  "architectures": ["LlavaNextForConditionalGeneration"], "ignore_index": -100,
  "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
  "image_token_index": 32000, "model_type": "llava_next", "projector_hidden_act": "gelu",
  "text_config": {"_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2", "architectures": ["MistralForCausalLM"],
                  "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
                  "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": null,
                  "torch_dtype": "bfloat16", "vocab_size": 32064},
  "torch_dtype": "float16", "transformers_version": "4.39.0.dev0", "use_image_newline_parameter": true,
  "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
                    "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                    "vocab_size": 32000},
  "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064})"},
    {"llava-v1.6-vicuna-7b", R"({
  "architectures": ["LlavaNextForConditionalGeneration"], "ignore_index": -100,
  "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
  "image_token_index": 32000, "model_type": "llava_next", "pad_token_id": 32001, "projector_hidden_act": "gelu",
  "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                  "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                  "torch_dtype": "bfloat16", "vocab_size": 32064},
  "torch_dtype": "float16", "transformers_version": "4.39.0.dev0", "use_image_newline_parameter": true,
  "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
                    "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                    "vocab_size": 32000},
  "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064})"},
    {"llama-2-7b", R"({
  "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
  "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
  "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
  "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null, "tie_word_embeddings": false,
  "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": true, "vocab_size": 32000})"},
};

// HF's initialisation at initializer_range 0.02: norms 1, biases 0, every other weight N(0, 0.02²). Each tensor has
// its own generator, seeded from --seed and its position, so the bytes do not depend on how the stream is cut.
at::Tensor init_tensor(const std::string& name, const std::vector<int64_t>& shape, c10::ScalarType dtype,
                       uint64_t seed) {
  c10::NoGradGuard ng;
  const bool bias = name.size() >= 4 && name.compare(name.size() - 4, 4, "bias") == 0;
  const bool norm = name.find("norm") != std::string::npos || name.find("layrnorm") != std::string::npos;
  if (bias) return at::zeros(shape, at::TensorOptions().dtype(dtype));
  if (norm) return at::ones(shape, at::TensorOptions().dtype(dtype));
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::normal(0.0, 0.02, shape, gen, at::TensorOptions().dtype(at::kFloat)).to(dtype);
}

std::string shrunk_config(const std::string& text, int64_t layers, const std::string& patch) {
  json j = json::parse(text);
  if (layers > 0 && j.contains("text_config")) {
    j["text_config"]["num_hidden_layers"] = layers;
    j["vision_config"]["num_hidden_layers"] = layers;
  } else if (layers > 0) {
    j["num_hidden_layers"] = layers;
  }
  if (!patch.empty()) {
    const json p = json::parse(patch, nullptr, /*allow_exceptions=*/false);
    EQAT_CHECK(p.is_object(), "random model: the config patch is not a JSON object");
    j.merge_patch(p);
  }
  return j.dump(2) + "\n";
}

}  // namespace

std::vector<std::string> random_model_likes() {
  std::vector<std::string> out;
  for (const Like& l : kLikes) out.push_back(l.name);
  return out;
}

std::string random_model_config(const std::string& like) {
  std::string names;
  for (const Like& l : kLikes) {
    if (like == l.name) return l.config;
    names += names.empty() ? l.name : std::string(", ") + l.name;
  }
  throw_input_error(str_cat("--like: unknown model '", like, "' (", names, ")"));
}

int64_t write_random_model(const RandomModelOptions& o) {
  const std::string config = shrunk_config(random_model_config(o.like), o.layers, o.config_patch);
  const ModelConfig cfg = parse_model_config(config, "--like " + o.like);
  EQAT_CHECK(std::filesystem::is_regular_file(o.tokenizer), "--tokenizer ", o.tokenizer, ": not a file");
  const bool llava = cfg.arch == Arch::kLlava;
  // The module gives every tensor's name and shape. Its parameters are allocated uninitialised (at::empty touches
  // no pages), so even the 13B skeleton costs address space, not memory.
  std::shared_ptr<torch::nn::Module> skeleton;
  if (llava) skeleton = LlavaForConditionalGeneration(cfg).ptr();
  else skeleton = LlamaForCausalLM(cfg.text).ptr();
  std::vector<TensorSource> sources;
  int64_t params = 0;
  uint64_t index = 0;
  for (const auto& p : skeleton->named_parameters(/*recurse=*/true)) {
    if (p.value().numel() == 0) continue;  // unused fake-quant slots
    const std::string name = p.key();
    const std::vector<int64_t> shape = p.value().sizes().vec();
    const uint64_t seed = o.seed * 1000003ull + index++;
    params += p.value().numel();
    sources.push_back({name, o.dtype, shape, [name, shape, dtype = o.dtype, seed] {
                         return init_tensor(name, shape, dtype, seed);
                       }});
  }
  skeleton.reset();
  // Refuse up front what the disk cannot hold (a 13B fp16 checkpoint is 27 GB).
  uint64_t bytes = 0;
  for (const auto& s : sources) bytes += static_cast<uint64_t>(c10::multiply_integers(s.shape)) * c10::elementSize(s.dtype);
  std::filesystem::path parent = std::filesystem::absolute(o.out).parent_path();
  struct statvfs vfs;
  if (::statvfs(parent.c_str(), &vfs) == 0) {
    const uint64_t free_bytes = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
    EQAT_CHECK(bytes <= free_bytes, "--out ", o.out, ": the checkpoint needs ", format_bytes(static_cast<double>(bytes)),
               " but only ", format_bytes(static_cast<double>(free_bytes)), " is free on that disk");
  }
  write_dir_atomic(o.out, OutputKind::kModel, [&](const std::string& tmp) {
    write_file_atomic(path_join(tmp, "config.json"), config);
    write_file_atomic(path_join(tmp, "generation_config.json"),
                      json{{"bos_token_id", 1}, {"eos_token_id", 2}, {"pad_token_id", llava ? 32001 : 0}}.dump(2) + "\n");
    std::error_code ec;
    std::filesystem::copy_file(o.tokenizer, path_join(tmp, "tokenizer.model"), ec);
    EQAT_CHECK(!ec, "--tokenizer ", o.tokenizer, ": cannot copy (", ec.message(), ")");
    // The Llama-2 tokenizer; LLaVA adds <image> (32000) and <pad> (32001) as special tokens.
    write_llama_tokenizer_files(tmp, llava ? 32000 : -1, 32001, 4096);
    if (llava)
      write_file_atomic(path_join(tmp, "preprocessor_config.json"),
                        cfg.anyres ? llava_next_preprocessor_json(cfg.vision.image_size, cfg.image_grid_pinpoints)
                                   : clip_preprocessor_json(cfg.vision.image_size));
    write_checkpoint_streamed(tmp, sources, o.shard_bytes, {{"format", "pt"}});
  });
  return params;
}

}  // namespace eqat
