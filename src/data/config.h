// Model configuration: config.json (HF layout) -> validated plain structs (HOUSE_STYLE.md rule 7).
// JSON is touched only in config.cpp. Every optional key takes transformers' default (LLAVA.md §1.2);
// note LlamaConfig's defaults rms_norm_eps 1e-6 and max_position_embeddings 2048 differ from Vicuna's.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace eqat {

// rope_scaling as HF writes it; type "none" when absent.
struct RopeScaling {
  std::string type = "none";  // none | linear | dynamic | llama3
  double factor = 1.0;
  double low_freq_factor = 1.0;                    // llama3 only
  double high_freq_factor = 4.0;                   // llama3 only
  int64_t original_max_position_embeddings = 8192;  // llama3 only
};

struct LlamaConfig {
  std::string model_type = "llama";  // llama | mistral (Llama's layout; Mistral may add a sliding window)
  int64_t sliding_window = 0;        // mistral: a query attends to the last sliding_window positions, itself
                                     // included (HF: key index > query index - window); 0 = the whole context
  int64_t vocab_size = 32000;
  int64_t hidden_size = 4096;         // n_embd
  int64_t intermediate_size = 11008;  // ff hidden
  int64_t num_hidden_layers = 32;     // n_layer
  int64_t num_attention_heads = 32;   // n_head
  int64_t num_key_value_heads = 32;   // n_kv_head (defaults to n_head)
  int64_t head_dim = 128;             // defaults to hidden_size / n_head
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  bool mlp_bias = false;
  std::string hidden_act = "silu";
  int64_t bos_token_id = 1;
  int64_t eos_token_id = 2;
  int64_t pad_token_id = -1;  // -1: none
  std::string torch_dtype = "float32";
};

struct VisionConfig {
  int64_t hidden_size = 768;
  int64_t intermediate_size = 3072;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 12;
  int64_t image_size = 224;
  int64_t patch_size = 32;
  int64_t num_channels = 3;
  double layer_norm_eps = 1e-5;
  std::string hidden_act = "quick_gelu";  // quick_gelu | gelu
  int64_t num_patches() const { return (image_size / patch_size) * (image_size / patch_size); }
};

// GPTQ-style quantization_config (present on quantized checkpoints). The defaults below describe "absent";
// keys missing from a present quantization_config take transformers' GPTQConfig defaults (group_size 128,
// sym true, desc_act false, checkpoint_format "gptq"; "format" is accepted as GPTQModel's alias).
struct QuantizationConfig {
  bool present = false;
  std::string quant_method;  // "gptq"
  int64_t bits = 0;
  int64_t group_size = -1;  // -1: per channel
  bool sym = false;
  bool desc_act = false;
  std::string checkpoint_format = "gptq";  // gptq (v1) | gptq_v2
};

// Arch::kLlava covers both LLaVA compositions: LLaVA-1.5 (LlavaForConditionalGeneration, one fixed-size image) and
// LLaVA-NeXT (LlavaNextForConditionalGeneration, ModelConfig::anyres: tiled images, a variable image-token count).
enum class Arch { kLlama, kLlava, kCount };

// One anyres grid resolution, in pixels.
struct GridPoint {
  int64_t height = 0, width = 0;
  bool operator==(const GridPoint& o) const { return height == o.height && width == o.width; }
};

struct ModelConfig {
  Arch arch = Arch::kLlama;
  LlamaConfig text;  // the decoder (text_config for LLaVA)
  // LLaVA only:
  VisionConfig vision;
  int64_t image_token_index = 32000;
  std::string projector_hidden_act = "gelu";
  int64_t vision_feature_layer = -2;
  std::string vision_feature_select_strategy = "default";  // default (drop CLS) | full
  int64_t image_seq_length = 576;  // absent: derived from the vision geometry (576 for ViT-L/14-336, default)
  bool multimodal_projector_bias = true;
  // LLaVA-NeXT only: images are tiled over the best of image_grid_pinpoints ((height, width) pairs, multiples of
  // vision.image_size); the grid features are unpadded to the image's aspect and end each row with the learned
  // image_newline vector. image_seq_length then counts the base image's tokens only.
  bool anyres = false;
  std::vector<GridPoint> image_grid_pinpoints;
  QuantizationConfig quant;
  std::string source_path;  // the config.json this came from, for messages
};

// Parses and validates `dir`/config.json (or a config.json path). InputError naming the file on any problem:
// missing, malformed JSON, unknown architecture, inconsistent dims (e.g. n_head % n_kv_head != 0).
ModelConfig load_model_config(const std::string& dir_or_file);
// Same, from JSON text; `source` names the origin in messages. Entry point of the config fuzzer.
ModelConfig parse_model_config(const std::string& json_text, const std::string& source);
// Serialises back to HF-style JSON (used by converters and exporters).
std::string model_config_to_json(const ModelConfig& cfg);

const char* arch_name(Arch a);
// The checkpoint's architectures[0]: LlamaForCausalLM, MistralForCausalLM, LlavaForConditionalGeneration or
// LlavaNextForConditionalGeneration.
const char* architecture_name(const ModelConfig& cfg);

}  // namespace eqat
