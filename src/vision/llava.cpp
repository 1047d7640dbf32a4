#include "vision/llava.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <map>

#include "data/error.h"
#include "data/fs.h"
#include "data/safetensors.h"

namespace eqat {

namespace {
struct ContainerImpl : torch::nn::Module {};
TORCH_MODULE(Container);
}  // namespace

LlavaForConditionalGenerationImpl::LlavaForConditionalGenerationImpl(const ModelConfig& cfg) : cfg_(cfg) {
  auto tower = register_module("vision_tower", Container());
  vision_model = tower->register_module("vision_model", CLIPVisionTransformer(cfg.vision));
  multi_modal_projector = register_module(
      "multi_modal_projector", LlavaProjector(cfg.vision.hidden_size, cfg.text.hidden_size,
                                              cfg.multimodal_projector_bias, cfg.projector_hidden_act));
  language_model = register_module("language_model", LlamaForCausalLM(cfg.text));
}

at::Tensor LlavaForConditionalGenerationImpl::image_features(const at::Tensor& pixels) {
  const int64_t L = vision_model->num_layers();
  const int64_t layer = cfg_.vision_feature_layer;
  const int64_t index = layer >= 0 ? layer : L + 1 + layer;  // index into the L+1 hidden states
  at::Tensor h = vision_model->hidden_state(pixels, index);  // [N,P+1,E]
  if (cfg_.vision_feature_select_strategy == "default") h = h.narrow(1, 1, h.size(1) - 1);  // drop CLS
  return multi_modal_projector->forward(h);                  // [N,F,C]
}

at::Tensor LlavaForConditionalGenerationImpl::embed_with_images(const at::Tensor& ids, const at::Tensor& features) {
  at::Tensor is_image = ids == cfg_.image_token_index;
  // The image token's own embedding row is never used: zero the ids there before the lookup (the row may be
  // random padding in llava-hf checkpoints).
  at::Tensor embeds = language_model->embed(ids.masked_fill(is_image, 0));
  const int64_t n_pos = is_image.sum().item<int64_t>();
  if (n_pos == 0) return embeds;
  EQAT_CHECK(features.defined(), "the prompt has ", n_pos, " image positions but no image was given");
  at::Tensor flat = features.reshape({-1, features.size(-1)}).to(embeds.scalar_type());
  EQAT_CHECK(flat.size(0) == n_pos, "the prompt has ", n_pos, " image positions but the image gives ",
             flat.size(0), " feature rows");
  return embeds.masked_scatter(is_image.unsqueeze(-1), flat);
}

// ---------------------------------------------------------------------------------------------------------------
c10::ScalarType parse_dtype(const std::string& name) {
  if (name == "float32" || name == "fp32") return at::kFloat;
  if (name == "bfloat16" || name == "bf16") return at::kBFloat16;
  if (name == "float16" || name == "fp16") return at::kHalf;
  throw_input_error(str_cat("--dtype: unknown dtype '", name, "' (choose float32, bfloat16, float16 or auto)"));
}

const char* dtype_name(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    default: return c10::toString(t);
  }
}

int64_t Model::image_token_id() const { return multimodal() ? cfg.image_token_index : -1; }

namespace {

// Checkpoint key for a module parameter name, per layout. Our names are the llava-hf "old" layout.
std::string rewrite_key(const std::string& name, const std::string& layout) {
  auto starts = [&](const char* p) { return name.rfind(p, 0) == 0; };
  auto repl = [&](const std::string& from, const std::string& to) { return to + name.substr(from.size()); };
  if (layout == "hf-new") {
    if (starts("language_model.model.")) return repl("language_model.model.", "model.language_model.");
    if (starts("language_model.lm_head.")) return repl("language_model.lm_head.", "lm_head.");
    if (starts("vision_tower.")) return repl("vision_tower.", "model.vision_tower.");
    if (starts("multi_modal_projector.")) return repl("multi_modal_projector.", "model.multi_modal_projector.");
  }
  return name;
}

std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

void load_weights(torch::nn::Module& module, const Checkpoint& ckpt, const std::string& layout,
                  c10::ScalarType dtype, c10::Device device, const std::string& dir) {
  c10::NoGradGuard no_grad;
  for (auto& item : module.named_parameters(/*recurse=*/true)) {
    std::string key = rewrite_key(item.key(), layout);
    // transformers 5 saves the CLIP tower without the inner "vision_model." level.
    if (!ckpt.has(key) && key.find("vision_tower.vision_model.") != std::string::npos) {
      std::string alt = key;
      alt.erase(alt.find("vision_model."), std::string("vision_model.").size());
      if (ckpt.has(alt)) key = alt;
    }
    EQAT_CHECK(ckpt.has(key), dir, ": missing tensor '", key, "'");
    at::Tensor t = ckpt.get(key);
    at::Tensor& p = item.value();
    EQAT_CHECK(t.sizes() == p.sizes(), dir, ": tensor '", key, "' has shape ", shape_str(t.sizes()),
               ", the config expects ", shape_str(p.sizes()));
    EQAT_CHECK(at::isFloatingType(t.scalar_type()), dir, ": tensor '", key, "' has dtype ",
               c10::toString(t.scalar_type()), ", expected a floating-point dtype");
    // Same dtype on CPU: alias the mmap'd bytes (no copy; peak RSS stays near the file size).
    if (t.scalar_type() != dtype || device != t.device()) t = t.to(device, dtype);
    p.set_data(t);
    p.set_requires_grad(false);
  }
}

c10::ScalarType stored_dtype(const Checkpoint& ckpt) {
  // The dtype of the first floating tensor that is not a norm (norms are sometimes kept in fp32).
  for (const auto& name : ckpt.names()) {
    const auto& info = ckpt.info(name);
    if (name.find("norm") != std::string::npos) continue;
    if (info.dtype == "F32") return at::kFloat;
    if (info.dtype == "BF16") return at::kBFloat16;
    if (info.dtype == "F16") return at::kHalf;
  }
  return at::kFloat;
}
}  // namespace

Model load_model(const std::string& dir, const LoadOptions& opts) {
  EQAT_CHECK(is_directory(dir), dir, ": not a model directory");
  Model m;
  m.dir = dir;
  m.cfg = load_model_config(dir);
  try {
    m.device = c10::Device(opts.device);
  } catch (const std::exception&) {
    throw_input_error(str_cat("--device: unknown device '", opts.device, "' (cpu or cuda[:N])"));
  }
  Checkpoint ckpt = Checkpoint::open(dir);
  if (opts.dtype == "auto") {
    m.dtype = stored_dtype(ckpt);
    if (m.dtype == at::kHalf && m.device.is_cpu()) m.dtype = at::kFloat;
  } else {
    m.dtype = parse_dtype(opts.dtype);
  }
  if (opts.need_tokenizer) m.tok = std::make_shared<Tokenizer>(Tokenizer::load(dir));

  if (m.cfg.arch == Arch::kLlava) {
    m.llava = LlavaForConditionalGeneration(m.cfg);
    const std::string layout = ckpt.has("model.language_model.embed_tokens.weight") ? "hf-new" : "hf-old";
    load_weights(*m.llava, ckpt, layout, m.dtype, m.device, dir);
    m.lm = m.llava->language_model;
    m.image_cfg = load_image_processor_config(dir, m.cfg.vision.image_size);
  } else {
    m.lm = LlamaForCausalLM(m.cfg.text);
    load_weights(*m.lm, ckpt, "hf-old", m.dtype, m.device, dir);
  }
  if (m.tok) {
    EQAT_CHECK(m.tok->vocab_size() <= m.cfg.text.vocab_size, dir, ": the tokenizer has ", m.tok->vocab_size(),
               " tokens but the model's vocabulary is ", m.cfg.text.vocab_size);
  }
  return m;
}

at::Tensor load_pixels(const Model& model, const std::string& image_path) {
  EQAT_CHECK(model.multimodal(), model.dir, ": is a text-only model (", arch_name(model.cfg.arch),
             "); it cannot take an image");
  return preprocess_image(load_image(image_path), model.image_cfg).unsqueeze(0);
}

at::Tensor embed_prompt(Model& model, const std::vector<int64_t>& ids, const at::Tensor& pixels) {
  c10::NoGradGuard no_grad;
  at::Tensor t = at::tensor(ids, at::kLong).view({1, -1}).to(model.device);
  if (!model.multimodal()) return model.lm->embed(t);
  at::Tensor feats;
  if (pixels.defined()) feats = model.llava->image_features(pixels.to(model.device, model.dtype));
  return model.llava->embed_with_images(t, feats);
}

}  // namespace eqat
