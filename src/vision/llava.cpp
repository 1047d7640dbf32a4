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

}  // namespace

std::string checkpoint_key(const Checkpoint& ckpt, const std::string& module_key, bool multimodal) {
  if (!multimodal) return module_key;
  const std::string layout = ckpt.has("model.language_model.embed_tokens.weight") ? "hf-new" : "hf-old";
  std::string key = rewrite_key(module_key, layout);
  // transformers 5 saves the CLIP tower without the inner "vision_model." level.
  if (!ckpt.has(key) && key.find("vision_tower.vision_model.") != std::string::npos) {
    std::string alt = key;
    alt.erase(alt.find("vision_model."), std::string("vision_model.").size());
    if (ckpt.has(alt)) key = alt;
  }
  return key;
}

namespace {

void load_tensor(at::Tensor& p, const Checkpoint& ckpt, const std::string& key, c10::ScalarType dtype,
                 c10::Device device, const std::string& dir) {
  EQAT_CHECK(ckpt.has(key), dir, ": missing tensor '", key, "'");
  at::Tensor t = ckpt.get(key);
  EQAT_CHECK(t.sizes() == p.sizes(), dir, ": tensor '", key, "' has shape ", shape_str(t.sizes()),
             ", the config expects ", shape_str(p.sizes()));
  if (p.is_floating_point()) {
    EQAT_CHECK(at::isFloatingType(t.scalar_type()), dir, ": tensor '", key, "' has dtype ",
               c10::toString(t.scalar_type()), ", expected a floating-point dtype");
  } else {
    EQAT_CHECK(t.scalar_type() == p.scalar_type(), dir, ": tensor '", key, "' has dtype ",
               c10::toString(t.scalar_type()), ", expected ", c10::toString(p.scalar_type()));
    dtype = p.scalar_type();
  }
  // Same dtype on CPU: alias the mmap'd bytes (no copy; peak RSS stays near the file size).
  if (t.scalar_type() != dtype || device != t.device()) t = t.to(device, dtype);
  const bool grad = p.requires_grad();
  p.set_data(t);
  p.set_requires_grad(grad && p.is_floating_point());
}

// Walks the module tree: packed QuantLinears load qweight/qzeros/scales/g_idx (+bias), everything else its own
// parameters and buffers (non-recursively, per module).
void load_weights(torch::nn::Module& module, const Checkpoint& ckpt, bool multimodal, c10::ScalarType dtype,
                  c10::Device device, const std::string& dir, int gptq_v1_bits) {
  c10::NoGradGuard no_grad;
  for (auto& item : module.named_modules("", /*include_self=*/true)) {
    const std::string prefix = item.key().empty() ? "" : item.key() + ".";
    torch::nn::Module& mod = *item.value();
    auto* lin = dynamic_cast<QuantLinearImpl*>(&mod);
    if (lin && lin->mode() == LinearMode::kPacked) {
      auto bufs = mod.named_buffers(false);  // shallow handles to the registered buffers
      for (const char* n : {"qweight", "qzeros", "g_idx"}) {
        at::Tensor& b = *bufs.find(n);
        load_tensor(b, ckpt, checkpoint_key(ckpt, prefix + n, multimodal), dtype, device, dir);
      }
      if (gptq_v1_bits > 0) lin->qzeros.set_data(qzeros_v1_to_v2(lin->qzeros, gptq_v1_bits, lin->out_features()));
      load_tensor(lin->scales, ckpt, checkpoint_key(ckpt, prefix + "scales", multimodal), dtype, device, dir);
      lin->scales.set_requires_grad(false);
      if (lin->bias.defined())
        load_tensor(lin->bias, ckpt, checkpoint_key(ckpt, prefix + "bias", multimodal), dtype, device, dir);
      continue;
    }
    for (auto& p : mod.named_parameters(/*recurse=*/false)) {
      if (p.value().numel() == 0 && p.key() != "weight") continue;  // unused fake-quant slots
      load_tensor(p.value(), ckpt, checkpoint_key(ckpt, prefix + p.key(), multimodal), dtype, device, dir);
      p.value().set_requires_grad(false);
    }
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

void pack_decoder(LlamaForCausalLM& lm, const ModelConfig& cfg, c10::ScalarType dtype) {
  QuantSpec spec;
  spec.bits = static_cast<int>(cfg.quant.bits);
  spec.group_size = cfg.quant.group_size;
  for (size_t i = 0; i < lm->model->layers->size(); ++i) {
    auto* l = lm->model->layers[i]->as<LlamaDecoderLayerImpl>();
    for (QuantLinear* q : {&l->self_attn->q_proj, &l->self_attn->k_proj, &l->self_attn->v_proj, &l->self_attn->o_proj,
                           &l->mlp->gate_proj, &l->mlp->up_proj, &l->mlp->down_proj})
      (*q)->init_packed(spec, dtype);
  }
}

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
  int v1_bits = 0;
  if (m.cfg.quant.present) {
    EQAT_CHECK(m.cfg.quant.quant_method == "gptq" && !m.cfg.quant.desc_act, dir,
               ": only GPTQ checkpoints without act-order are supported (quant_method gptq, desc_act false)");
    if (m.cfg.quant.checkpoint_format != "gptq_v2") v1_bits = static_cast<int>(m.cfg.quant.bits);
  }

  if (m.cfg.arch == Arch::kLlava) {
    m.llava = LlavaForConditionalGeneration(m.cfg);
    if (m.cfg.quant.present) pack_decoder(m.llava->language_model, m.cfg, m.dtype);
    load_weights(*m.llava, ckpt, true, m.dtype, m.device, dir, v1_bits);
    m.lm = m.llava->language_model;
    m.image_cfg = load_image_processor_config(dir, m.cfg.vision.image_size);
  } else {
    m.lm = LlamaForCausalLM(m.cfg.text);
    if (m.cfg.quant.present) pack_decoder(m.lm, m.cfg, m.dtype);
    load_weights(*m.lm, ckpt, false, m.dtype, m.device, dir, v1_bits);
  }
  if (opts.fuse_projections && m.cfg.quant.present) m.lm->fuse_projections();
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
