// LLaVA composition (HF LlavaForConditionalGeneration, LLAVA.md §2; LlavaNextForConditionalGeneration with
// ModelConfig::anyres) and model loading for LLaVA, LLaVA-NeXT and plain Llama/Mistral directories. Module names mirror the llava-hf ("old") checkpoint layout:
//   vision_tower.vision_model.…, multi_modal_projector.linear_{1,2}.…, language_model.model.…, language_model.lm_head
// The loader also reads the newer transformers layout (model.language_model.…, model.vision_tower.…, lm_head) via
// one prefix-rewrite table.
//
// Legend: N images, F feature rows per image (image_seq_length), E vision width, C decoder width, B, T as in llama.h.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <string>
#include <vector>

#include "data/config.h"
#include "data/image.h"
#include "data/tokenizer.h"
#include "llm/llama.h"
#include "vision/clip.h"

namespace eqat {

class LlavaForConditionalGenerationImpl : public torch::nn::Module {
 public:
  explicit LlavaForConditionalGenerationImpl(const ModelConfig& cfg);
  // pixels [N,3,S,S] -> projected features [N,F,C]: CLIP hidden_states[vision_feature_layer], CLS dropped for
  // strategy "default", then the projector.
  at::Tensor image_features(const at::Tensor& pixels);
  // Embeds ids [B,T] and overwrites, in order, the rows whose id is the image token with `features` [N,F,C]
  // (N·F must equal the number of image-token positions).
  at::Tensor embed_with_images(const at::Tensor& ids, const at::Tensor& features);
  // LLaVA-NeXT (HF pack_image_features): the projected features of one image's tiles [1 + rows·cols, F, C] (the
  // base image first) -> its prompt features [anyres_layout(...).tokens, C]: the base image's F rows, then the grid
  // as one feature map unpadded to the image's height x width, each of its rows followed by image_newline.
  at::Tensor pack_anyres(const at::Tensor& tile_features, int64_t height, int64_t width);

  at::Tensor image_newline;  // [C], LLaVA-NeXT only (registered as "image_newline")

  CLIPVisionTransformer vision_model{nullptr};  // registered as vision_tower.vision_model
  LlavaProjector multi_modal_projector{nullptr};
  LlamaForCausalLM language_model{nullptr};

 private:
  ModelConfig cfg_;
};
TORCH_MODULE(LlavaForConditionalGeneration);

struct LoadOptions {
  std::string device = "cpu";  // cpu | cuda[:i]
  std::string dtype = "auto";  // auto (stored dtype; fp16 on CPU runs as fp32) | float32 | bfloat16 | float16
  bool need_tokenizer = true;
  // Serving a packed model: merge each layer's q/k/v and gate/up (LlamaForCausalLM::fuse_projections). Leave it
  // off where step sizes are trained afterwards.
  bool fuse_projections = false;
  // Quantize pipeline on the CPU: the decoder layers' float weights stay aliases of the checkpoint in their stored
  // dtype (nothing read, nothing resident) until materialize_layer converts one, so a model larger than RAM can be
  // quantized layer by layer. Unquantized models only.
  bool defer_decoder = false;
  // Serving on the CPU in fp32 (--dtype auto on an fp16 checkpoint): float linears' weights, the token table and
  // packed linears' step sizes stored as fp16/bf16 stay so, aliases of the checkpoint (no fp32 copy; pages resident
  // only once read). Every product converts them exactly (float_linear, LlamaForCausalLM::embed, the packed CPU
  // kernels), so the numbers are a float32 load's, up to fp32 summation order where a few rows take
  // cpu_half_gemv. Leave it off where weights or step sizes are trained afterwards.
  bool weights_as_stored = false;
};

// Everything needed to run a model directory.
struct Model {
  std::string dir;
  ModelConfig cfg;
  std::shared_ptr<Tokenizer> tok;  // null when !need_tokenizer
  ImageProcessorConfig image_cfg;
  LlamaForCausalLM lm{nullptr};                    // the decoder (inside `llava` for LLaVA)
  LlavaForConditionalGeneration llava{nullptr};    // LLaVA only
  c10::ScalarType dtype = c10::ScalarType::Float;
  c10::Device device = c10::Device(c10::DeviceType::CPU);
  bool multimodal() const { return static_cast<bool>(llava); }
  int64_t image_token_id() const;  // -1 for text-only models
  // The image-token positions a prompt holds for an image of height x width: image_seq_length for LLaVA-1.5, the
  // anyres layout's count for LLaVA-NeXT (data/anyres.h). 0 for text-only models.
  int64_t image_tokens(int64_t height, int64_t width) const;
};

// One preprocessed image, ready for embed_prompt: its pixels (LLaVA-1.5 [1,3,S,S]; LLaVA-NeXT [1 + rows·cols, 3,
// S, S], the base image then the tiles row by row), the size it was loaded at (NeXT unpads its grid to that aspect)
// and the number of image-token positions its features fill in a prompt.
struct ImageInput {
  at::Tensor pixels;
  int64_t height = 0, width = 0;
  int64_t tokens = 0;
  bool defined() const { return pixels.defined(); }
};

// Loads config, tokenizer, image processor config and weights (zero-copy from the mmap when the stored dtype
// is the compute dtype on CPU). InputError naming the directory/tensor on a missing tensor or a shape that
// disagrees with the config.
Model load_model(const std::string& dir, const LoadOptions& opts = {});

// The checkpoint key of a module tensor name (llava-hf old layout names) in `ckpt`'s layout.
class Checkpoint;
std::string checkpoint_key(const Checkpoint& ckpt, const std::string& module_key, bool multimodal);
// The two LLaVA checkpoint layouts: llava-hf's (`language_model.model.*`, `vision_tower.*`, ...) and current
// transformers' (`model.language_model.*`, `lm_head.*`, `model.vision_tower.*` with the CLIP tower flat, without
// llava-hf's inner `vision_model.`, ...). checkpoint_layout names the
// one `ckpt` uses; relayout_key moves any key of either layout to `layout` (keys outside both stay as they are).
enum class CheckpointLayout { kLlavaHf, kTransformers };
CheckpointLayout checkpoint_layout(const Checkpoint& ckpt);
std::string relayout_key(const std::string& key, CheckpointLayout layout);
// Switches the decoder's block linears to packed mode (empty tensors shaped by cfg.quant), ready to load.
void pack_decoder(LlamaForCausalLM& lm, const ModelConfig& cfg, c10::ScalarType dtype);

c10::ScalarType parse_dtype(const std::string& name);  // InputError naming --dtype
const char* dtype_name(c10::ScalarType t);

// Converts decoder layer `layer`'s deferred weights (LoadOptions::defer_decoder) to the model dtype, checks them
// for NaN/inf, and drops the checkpoint's pages they were read from. A no-op for layers already in the model dtype.
void materialize_layer(Model& m, int64_t layer);

// Preprocesses one decoded image for `model` (CLIP resize/pad/crop for LLaVA-1.5, anyres tiling for LLaVA-NeXT).
// InputError for a text-only model.
ImageInput prepare_image(const Model& model, const Image& img);
// Same, from a file. `strict`: see load_image.
ImageInput load_pixels(const Model& model, const std::string& image_path, bool strict = false);
// The image-token positions a prompt needs for `image`, or for a prompt without an image (undefined `image`) the
// count a stray "<image>" marker expands to (LLaVA-1.5's fixed count; it then fails in embed_prompt, naming it).
int64_t prompt_image_tokens(const Model& model, const ImageInput& image);

// Prompt ids (with image positions expanded) -> embeddings [1,T,C] in the model's dtype/device; `image` may be
// undefined for text-only prompts.
at::Tensor embed_prompt(Model& model, const std::vector<int64_t>& ids, const ImageInput& image);
// LLaVA-1.5 only: with pixels [N,3,S,S] as HF's processor gives them (undefined for text-only prompts).
at::Tensor embed_prompt(Model& model, const std::vector<int64_t>& ids, const at::Tensor& pixels);

}  // namespace eqat
