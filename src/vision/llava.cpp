#include "vision/llava.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cmath>
#include <map>
#include <set>

#include "data/anyres.h"
#include "data/error.h"
#include "data/fs.h"
#include "data/memory.h"
#include "data/safetensors.h"
#include "quant/pack.h"

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
  if (cfg.anyres) image_newline = register_parameter("image_newline", at::zeros({cfg.text.hidden_size}));
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

at::Tensor LlavaForConditionalGenerationImpl::pack_anyres(const at::Tensor& tile_features, int64_t height,
                                                         int64_t width) {
  const AnyresLayout l = anyres_layout(cfg_, height, width);
  const int64_t C = tile_features.size(-1), n_grid = l.grid_rows * l.grid_cols;
  EQAT_CHECK(tile_features.dim() == 3 && tile_features.size(0) == 1 + n_grid && tile_features.size(1) == l.side * l.side,
             "pack_anyres: an image of ", width, "x", height, " needs 1 + ", n_grid, " tiles of ", l.side * l.side,
             " features, got ", tile_features.sizes());
  // [rows·cols, side·side, C] -> [rows, cols, side, side, C] -> [C, rows, side, cols, side] -> [C, rows·side, cols·side]
  at::Tensor grid = tile_features.narrow(0, 1, n_grid)
                        .reshape({l.grid_rows, l.grid_cols, l.side, l.side, C})
                        .permute({4, 0, 2, 1, 3})
                        .reshape({C, l.grid_rows * l.side, l.grid_cols * l.side})
                        .narrow(1, l.row0, l.rows)
                        .narrow(2, l.col0, l.cols);
  at::Tensor newline = image_newline.to(grid.scalar_type()).view({C, 1, 1}).expand({C, l.rows, 1});
  at::Tensor seq = at::cat({grid, newline}, 2).reshape({C, l.rows * (l.cols + 1)}).t();  // [rows·(cols+1), C]
  return at::cat({tile_features[0], seq}, 0);
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

int64_t Model::image_tokens(int64_t height, int64_t width) const {
  if (!multimodal()) return 0;
  return cfg.anyres ? anyres_layout(cfg, height, width).tokens : cfg.image_seq_length;
}

namespace {

std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

}  // namespace

CheckpointLayout checkpoint_layout(const Checkpoint& ckpt) {
  return ckpt.has("model.language_model.embed_tokens.weight") ? CheckpointLayout::kTransformers
                                                               : CheckpointLayout::kLlavaHf;
}

std::string relayout_key(const std::string& key, CheckpointLayout layout) {
  // The CLIP tower: transformers 5 holds it flat (model.vision_tower.X), llava-hf nests it under vision_model.
  // Either nesting is accepted on the way in (llava-hf files saved by transformers 5 are flat, eqat's older
  // transformers-layout files nested); the way out is the target layout's own.
  static const std::string kHf = "vision_tower.", kTf = "model.vision_tower.", kNest = "vision_model.";
  auto tower_rest = [&](const std::string& prefix, std::string* rest) {
    if (key.rfind(prefix, 0) != 0) return false;
    *rest = key.substr(prefix.size());
    if (rest->rfind(kNest, 0) == 0) *rest = rest->substr(kNest.size());
    return true;
  };
  std::string rest;
  if (layout == CheckpointLayout::kTransformers && tower_rest(kHf, &rest)) return kTf + rest;
  if (layout == CheckpointLayout::kLlavaHf && tower_rest(kTf, &rest)) return kHf + kNest + rest;
  if (key == "image_newline" || key == "model.image_newline")  // LLaVA-NeXT's one top-level parameter
    return layout == CheckpointLayout::kTransformers ? "model.image_newline" : "image_newline";
  static const std::pair<const char*, const char*> kPrefixes[] = {  // (llava-hf, transformers)
      {"language_model.model.", "model.language_model."},
      {"language_model.lm_head.", "lm_head."},
      {"multi_modal_projector.", "model.multi_modal_projector."}};
  for (const auto& [old_prefix, new_prefix] : kPrefixes) {
    const std::string from = layout == CheckpointLayout::kTransformers ? old_prefix : new_prefix;
    const std::string to = layout == CheckpointLayout::kTransformers ? new_prefix : old_prefix;
    if (key.rfind(from, 0) == 0) return to + key.substr(from.size());
  }
  return key;
}

std::string checkpoint_key(const Checkpoint& ckpt, const std::string& module_key, bool multimodal) {
  if (!multimodal) return module_key;
  // Module names are the llava-hf layout's.
  std::string key = relayout_key(module_key, checkpoint_layout(ckpt));
  // The CLIP tower with or without the inner "vision_model." level: transformers 5 saves it flat, llava-hf and
  // older transformers-layout files (eqat's before 2026-12) nest it.
  if (!ckpt.has(key) && key.find("vision_tower.vision_model.") != std::string::npos) {
    std::string alt = key;
    alt.erase(alt.find("vision_model."), std::string("vision_model.").size());
    if (ckpt.has(alt)) key = alt;
  } else if (!ckpt.has(key) && key.rfind("model.vision_tower.", 0) == 0) {
    std::string alt = key;
    alt.insert(std::string("model.vision_tower.").size(), "vision_model.");
    if (ckpt.has(alt)) key = alt;
  }
  return key;
}

namespace {

// A NaN or inf weight makes every answer NaN (greedy decoding then emits token 0 forever, sampling fails inside
// LibTorch). One reduction per tensor finds it: the sum of a tensor is finite iff every element is, except when
// finite values overflow the accumulator (|w| near 1e38 in fp32; bf16/fp16 accumulate in fp32 and cannot), so a
// non-finite sum is confirmed element-wise before refusing. Cost: one read of the weights, which the first forward
// pays anyway on an mmapped checkpoint (tests/llm/llama_test.cpp measures it on the fixtures).
void check_finite(const at::Tensor& t, const std::string& key, const std::string& file) {
  if (t.numel() == 0) return;
  const double s = t.sum().item<double>();
  if (std::isfinite(s)) return;
  at::Tensor bad = at::isfinite(t).logical_not_();
  const int64_t n_bad = bad.sum().item<int64_t>();
  if (n_bad == 0) return;  // an fp32 sum that overflowed; every element is finite
  const bool nan = at::isnan(t).any().item<bool>();
  throw_input_error(str_cat(file, ": tensor '", key, "' has ", n_bad, " non-finite value", n_bad == 1 ? "" : "s",
                            " (", nan ? "NaN" : "inf", "); the checkpoint is corrupt"));
}

// A key (module or checkpoint, either layout) of a decoder layer: "model.layers.N." under the language model.
bool is_decoder_layer_key(const std::string& key) {
  return key.rfind("model.layers.", 0) == 0 || key.rfind("language_model.model.layers.", 0) == 0 ||
         key.rfind("model.language_model.layers.", 0) == 0;
}

void load_tensor(at::Tensor& p, const Checkpoint& ckpt, const std::string& key, c10::ScalarType dtype,
                 c10::Device device, const std::string& dir, bool deferred = false, bool as_stored = false) {
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
  // Deferred (a decoder layer the quantize pipeline converts when it gets there, materialize_layer): the alias as
  // stored, nothing read yet. Same dtype on CPU: alias the mmap'd bytes (no copy; peak RSS stays near the file
  // size). Otherwise convert, and drop the source's pages at once: loading fp16 as bf16 then peaks near the bf16
  // bytes, not both.
  // Kept as stored (LoadOptions::weights_as_stored): the alias too, checked, and its pages dropped again, so only
  // what a forward reads becomes resident (a token table is read a few rows at a time).
  if ((deferred && device.is_cpu() && t.is_floating_point()) || as_stored) {
    if (as_stored) {
      check_finite(t, key, ckpt.info(key).file);
      ckpt.release(key);
    }
    p.set_data(t);
    p.set_requires_grad(false);
    return;
  }
  if (t.scalar_type() != dtype || device != t.device()) {
    t = t.to(device, dtype);
    ckpt.release(key);
  }
  if (t.is_floating_point()) check_finite(t, key, ckpt.info(key).file);
  const bool grad = p.requires_grad();
  p.set_data(t);
  p.set_requires_grad(grad && p.is_floating_point());
}

// Walks the module tree: packed QuantLinears load qweight/qzeros/scales/g_idx (+bias), everything else its own
// parameters and buffers (non-recursively, per module).
void load_weights(torch::nn::Module& module, const Checkpoint& ckpt, bool multimodal, c10::ScalarType dtype,
                  c10::Device device, const std::string& dir, int gptq_v1_bits, bool defer_decoder,
                  const std::set<std::string>& as_stored) {
  c10::NoGradGuard no_grad;
  for (auto& item : module.named_modules("", /*include_self=*/true)) {
    const std::string prefix = item.key().empty() ? "" : item.key() + ".";
    const bool deferred = defer_decoder && is_decoder_layer_key(prefix);
    torch::nn::Module& mod = *item.value();
    auto* lin = dynamic_cast<QuantLinearImpl*>(&mod);
    if (lin && lin->mode() == LinearMode::kPacked) {
      auto bufs = mod.named_buffers(false);  // shallow handles to the registered buffers
      for (const char* n : {"qweight", "qzeros", "g_idx"}) {
        at::Tensor& b = *bufs.find(n);
        load_tensor(b, ckpt, checkpoint_key(ckpt, prefix + n, multimodal), dtype, device, dir);
      }
      if (gptq_v1_bits > 0) lin->qzeros.set_data(qzeros_v1_to_v2(lin->qzeros, gptq_v1_bits, lin->out_features()));
      const std::string scales_key = checkpoint_key(ckpt, prefix + "scales", multimodal);
      load_tensor(lin->scales, ckpt, scales_key, dtype, device, dir, false, as_stored.count(scales_key) > 0);
      lin->scales.set_requires_grad(false);
      if (lin->bias.defined())
        load_tensor(lin->bias, ckpt, checkpoint_key(ckpt, prefix + "bias", multimodal), dtype, device, dir);
      continue;
    }
    for (auto& p : mod.named_parameters(/*recurse=*/false)) {
      if (p.value().numel() == 0 && p.key() != "weight") continue;  // unused fake-quant slots
      const std::string key = checkpoint_key(ckpt, prefix + p.key(), multimodal);
      load_tensor(p.value(), ckpt, key, dtype, device, dir, deferred, as_stored.count(key) > 0);
      p.value().set_requires_grad(false);
    }
  }
}

// The checkpoint keys LoadOptions::weights_as_stored keeps in their stored dtype: float linears' weights, the token
// table and packed linears' step sizes, where they are stored as fp16/bf16 and the model computes in fp32 on the
// CPU. Each feeds only products that convert it exactly (float_linear, LlamaForCausalLM::embed, the packed kernels,
// which read fp16/bf16 step sizes).
std::set<std::string> as_stored_keys(torch::nn::Module& module, const Checkpoint& ckpt, bool multimodal) {
  std::set<std::string> keys;
  auto add = [&](const std::string& module_key) {
    const std::string key = checkpoint_key(ckpt, module_key, multimodal);
    if (!ckpt.has(key)) return;  // load_tensor names what is missing
    const std::string& d = ckpt.info(key).dtype;
    if (d == "F16" || d == "BF16") keys.insert(key);
  };
  for (auto& item : module.named_modules("", /*include_self=*/true)) {
    const std::string prefix = item.key().empty() ? "" : item.key() + ".";
    if (dynamic_cast<QuantLinearImpl*>(item.value().get())) {
      add(prefix + "weight");  // a float linear; a packed one has scales instead (pack_decoder may not have run yet)
      add(prefix + "scales");
    } else if (dynamic_cast<EmbeddingImpl*>(item.value().get())) {
      add(prefix + "weight");
    }
  }
  return keys;
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

namespace {

// Every size the modules allocate comes from config.json. Before anything is constructed, each config size is
// checked against the shape of one checkpoint tensor that carries it (read from the safetensors headers; nothing
// is allocated), so a config that disagrees with its weights — a vocab of 10^12, 10^6 layers — is refused in one
// line instead of aborting in LibTorch's allocator or running out of memory. load_weights later checks every
// tensor; what is checked here bounds what the constructors allocate by what the checkpoint holds.
class SizeCheck {
 public:
  SizeCheck(const Checkpoint& ckpt, const ModelConfig& cfg, bool multimodal, const std::string& dir)
      : ckpt_(ckpt), cfg_(cfg), mm_(multimodal), dir_(dir) {}

  // `module_key` (our llava-hf names) must exist with `shape`; `what` names the config keys behind the shape.
  void expect(const std::string& module_key, const std::vector<int64_t>& shape, const std::string& what) const {
    const std::string key = checkpoint_key(ckpt_, module_key, mm_);
    EQAT_CHECK(ckpt_.has(key), dir_, ": missing tensor '", key, "' (", cfg_.source_path, " says ", what, ")");
    const std::vector<int64_t>& got = ckpt_.info(key).shape;
    EQAT_CHECK(got == shape, dir_, ": tensor '", key, "' has shape ", shape_str(got), " but ", cfg_.source_path,
               " says ", what, " = ", shape_str(shape));
  }
  // A linear `out` x `in`: the float weight, or the packed GPTQ tensors of a quantized checkpoint.
  void linear(const std::string& base, int64_t out, int64_t in, const std::string& what, bool packed) const {
    if (!packed) return expect(base + ".weight", {out, in}, what);
    const int bits = static_cast<int>(cfg_.quant.bits);
    expect(base + ".qweight", {packed_words(in, bits), out},
           str_cat(what, " packed to ", bits, " bits ([in·bits/32, out])"));
  }
  // Layer `n - 1` exists and layer `n` does not: the checkpoint has exactly the configured number of layers.
  void layer_count(const std::string& prefix, const std::string& probe, int64_t n, const std::string& what) const {
    const std::string last = checkpoint_key(ckpt_, str_cat(prefix, n - 1, ".", probe), mm_);
    EQAT_CHECK(ckpt_.has(last), dir_, ": ", cfg_.source_path, " says ", what, " = ", n, " but the checkpoint has no '",
               last, "'");
  }

 private:
  const Checkpoint& ckpt_;
  const ModelConfig& cfg_;
  bool mm_;
  const std::string& dir_;
};

void check_sizes_against_checkpoint(const ModelConfig& cfg, const Checkpoint& ckpt, bool multimodal,
                                    const std::string& dir) {
  const SizeCheck c(ckpt, cfg, multimodal, dir);
  const LlamaConfig& t = cfg.text;
  const std::string tp = multimodal ? "text_config." : "";
  const std::string lm = multimodal ? "language_model." : "";
  const bool packed = cfg.quant.present;
  c.expect(lm + "model.embed_tokens.weight", {t.vocab_size, t.hidden_size},
           str_cat("[", tp, "vocab_size, ", tp, "hidden_size]"));
  c.layer_count(lm + "model.layers.", "input_layernorm.weight", t.num_hidden_layers, tp + "num_hidden_layers");
  const std::string last = str_cat(lm, "model.layers.", t.num_hidden_layers - 1, ".");
  c.linear(last + "self_attn.q_proj", t.num_attention_heads * t.head_dim, t.hidden_size,
           str_cat("[", tp, "num_attention_heads·head_dim, ", tp, "hidden_size]"), packed);
  c.linear(last + "self_attn.k_proj", t.num_key_value_heads * t.head_dim, t.hidden_size,
           str_cat("[", tp, "num_key_value_heads·head_dim, ", tp, "hidden_size]"), packed);
  c.linear(last + "mlp.gate_proj", t.intermediate_size, t.hidden_size,
           str_cat("[", tp, "intermediate_size, ", tp, "hidden_size]"), packed);
  if (!multimodal) return;
  const VisionConfig& v = cfg.vision;
  const std::string vp = "vision_tower.vision_model.";
  c.expect(vp + "embeddings.patch_embedding.weight", {v.hidden_size, v.num_channels, v.patch_size, v.patch_size},
           "[vision_config.hidden_size, num_channels, patch_size, patch_size]");
  c.expect(vp + "embeddings.position_embedding.weight", {v.num_patches() + 1, v.hidden_size},
           "[(vision_config.image_size / patch_size)^2 + 1, hidden_size]");
  c.layer_count(vp + "encoder.layers.", "layer_norm1.weight", v.num_hidden_layers, "vision_config.num_hidden_layers");
  c.expect(str_cat(vp, "encoder.layers.", v.num_hidden_layers - 1, ".mlp.fc1.weight"),
           {v.intermediate_size, v.hidden_size}, "[vision_config.intermediate_size, hidden_size]");
  c.expect("multi_modal_projector.linear_1.weight", {t.hidden_size, v.hidden_size},
           "[text_config.hidden_size, vision_config.hidden_size]");
}

// Bytes a load allocates in host memory: tensors converted to the compute dtype (a same-dtype CPU tensor aliases
// the mmapped file: page cache, evictable, not counted; so do pack_decoder's placeholders, never touched). Weights
// sent to a CUDA device are not host memory (the device allocator reports its own out-of-memory).
// With `defer_decoder`, the decoder layers' floats are converted one layer at a time later (materialize_layer), so
// they count once, as the largest layer. Tensors kept as stored (`as_stored`) alias the file and count nothing.
int64_t host_bytes_to_load(const Checkpoint& ckpt, c10::ScalarType dtype, const c10::Device& device,
                           bool defer_decoder, const std::set<std::string>& as_stored) {
  int64_t bytes = 0;
  std::map<std::string, int64_t> layer_bytes;  // "....layers.N." -> converted bytes
  const int64_t elem = static_cast<int64_t>(c10::elementSize(dtype));
  for (const auto& name : ckpt.names()) {
    const TensorInfo& info = ckpt.info(name);
    int64_t numel = 1;
    for (int64_t d : info.shape) numel = mul_sat(numel, d);
    const bool is_float = info.dtype == "F32" || info.dtype == "F16" || info.dtype == "BF16" || info.dtype == "F64";
    if (!device.is_cpu()) continue;
    if (!is_float || dtype_from_safetensors(info.dtype) == dtype || as_stored.count(name)) continue;
    if (defer_decoder && is_decoder_layer_key(name)) {
      const size_t at = name.find("layers.") + 7, dot = name.find('.', at);
      int64_t& lb = layer_bytes[name.substr(0, dot)];
      lb = add_sat(lb, mul_sat(numel, elem));
      continue;
    }
    bytes = add_sat(bytes, mul_sat(numel, elem));
  }
  int64_t largest = 0;
  for (const auto& [layer, b] : layer_bytes) largest = std::max(largest, b);
  return add_sat(bytes, largest);
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
  check_sizes_against_checkpoint(m.cfg, ckpt, m.cfg.arch == Arch::kLlava, dir);
  const bool defer = opts.defer_decoder && m.device.is_cpu() && !m.cfg.quant.present;
  int v1_bits = 0;
  if (m.cfg.quant.present) {
    EQAT_CHECK(m.cfg.quant.quant_method == "gptq" && !m.cfg.quant.desc_act, dir,
               ": only GPTQ checkpoints without act-order are supported (quant_method gptq, desc_act false)");
    if (m.cfg.quant.checkpoint_format != "gptq_v2") v1_bits = static_cast<int>(m.cfg.quant.bits);
  }
  // The modules first (uninitialised: nothing allocated is touched), so the memory check knows what stays stored.
  const bool multimodal = m.cfg.arch == Arch::kLlava;
  if (multimodal) {
    m.llava = LlavaForConditionalGeneration(m.cfg);
    m.lm = m.llava->language_model;
  } else {
    m.lm = LlamaForCausalLM(m.cfg.text);
  }
  torch::nn::Module& root = multimodal ? static_cast<torch::nn::Module&>(*m.llava) : *m.lm;
  const std::set<std::string> as_stored = opts.weights_as_stored && m.device.is_cpu() && m.dtype == at::kFloat
                                              ? as_stored_keys(root, ckpt, multimodal)
                                              : std::set<std::string>{};
  check_memory_fits(host_bytes_to_load(ckpt, m.dtype, m.device, defer, as_stored),
                    str_cat(dir, ": loading the weights as ", dtype_name(m.dtype)),
                    m.dtype == at::kFloat ? "a smaller --dtype (bfloat16) halves it" : "");
  if (opts.need_tokenizer) m.tok = std::make_shared<Tokenizer>(Tokenizer::load(dir));
  if (m.cfg.quant.present) pack_decoder(m.lm, m.cfg, m.dtype);
  load_weights(root, ckpt, multimodal, m.dtype, m.device, dir, v1_bits, defer, as_stored);
  if (multimodal) {
    m.image_cfg = load_image_processor_config(dir, m.cfg.vision.image_size);
    // The processor's pinpoints decide the tiles, the model's the unpadding: they must agree (they do in every
    // published checkpoint).
    EQAT_CHECK(!m.cfg.anyres || m.image_cfg.image_grid_pinpoints.empty() ||
                   m.image_cfg.image_grid_pinpoints == m.cfg.image_grid_pinpoints,
               dir, ": image_grid_pinpoints differ between preprocessor_config.json and config.json");
  }
  if (opts.fuse_projections && m.cfg.quant.present) m.lm->fuse_projections();
  if (m.tok) {
    EQAT_CHECK(m.tok->vocab_size() <= m.cfg.text.vocab_size, dir, ": the tokenizer has ", m.tok->vocab_size(),
               " tokens but the model's vocabulary is ", m.cfg.text.vocab_size);
  }
  return m;
}

void materialize_layer(Model& m, int64_t layer) {
  c10::NoGradGuard no_grad;
  auto& l = *m.lm->model->layers[layer];
  for (auto& p : l.named_parameters(/*recurse=*/true)) {
    at::Tensor& t = p.value();
    if (!t.is_floating_point() || t.numel() == 0 || !t.device().is_cpu()) continue;
    if (t.scalar_type() != m.dtype) {
      // The stored bytes' address, taken before set_data swaps the storage under every handle of this tensor.
      const void* stored = t.data_ptr();
      const size_t stored_bytes = t.nbytes();
      t.set_data(t.to(m.dtype));
      release_mapped_bytes(stored, stored_bytes);  // the checkpoint's pages of it leave RSS
    }
    check_finite(t, str_cat("model.layers.", layer, ".", p.key()), m.dir);  // deferred tensors skipped it at load
  }
}

ImageInput prepare_image(const Model& model, const Image& img) {
  EQAT_CHECK(model.multimodal(), model.dir, ": is a text-only model (", architecture_name(model.cfg),
             "); it cannot take an image");
  ImageInput in;
  in.height = img.height;
  in.width = img.width;
  in.tokens = model.image_tokens(img.height, img.width);
  in.pixels = model.cfg.anyres ? preprocess_anyres(img, model.image_cfg, model.cfg.image_grid_pinpoints)
                               : preprocess_image(img, model.image_cfg).unsqueeze(0);
  return in;
}

ImageInput load_pixels(const Model& model, const std::string& image_path, bool strict) {
  EQAT_CHECK(model.multimodal(), model.dir, ": is a text-only model (", architecture_name(model.cfg),
             "); it cannot take an image");
  return prepare_image(model, load_image(image_path, strict));
}

int64_t prompt_image_tokens(const Model& model, const ImageInput& image) {
  if (image.defined()) return image.tokens;
  return model.multimodal() ? model.cfg.image_seq_length : 0;
}

at::Tensor embed_prompt(Model& model, const std::vector<int64_t>& ids, const ImageInput& image) {
  c10::NoGradGuard no_grad;
  at::Tensor t = at::tensor(ids, at::kLong).view({1, -1}).to(model.device);
  if (!model.multimodal()) return model.lm->embed(t);
  at::Tensor feats;
  if (image.defined()) {
    feats = model.llava->image_features(image.pixels.to(model.device, model.dtype));
    if (model.cfg.anyres) feats = model.llava->pack_anyres(feats, image.height, image.width);
  }
  return model.llava->embed_with_images(t, feats);
}

at::Tensor embed_prompt(Model& model, const std::vector<int64_t>& ids, const at::Tensor& pixels) {
  EQAT_CHECK(!model.cfg.anyres || !pixels.defined(), model.dir,
             ": a LLaVA-NeXT model needs the image's size with its tiles (embed_prompt with an ImageInput)");
  ImageInput in;
  in.pixels = pixels;
  return embed_prompt(model, ids, in);
}

}  // namespace eqat
