// CLIP ViT forward as HF modeling_clip.py (LLAVA.md §2.1), and the LLaVA projector (§2.3).
// Legend: N images, P patches, E width, Hv heads, Dv head dim.
#include "vision/clip.h"

#include <ATen/ATen.h>

#include <cmath>

#include "data/error.h"

namespace eqat {

namespace {
// A parameter-only submodule so checkpoint names nest like HF's (e.g. embeddings.patch_embedding.weight).
struct ParamHolderImpl : torch::nn::Module {};
TORCH_MODULE(ParamHolder);

std::shared_ptr<torch::nn::Module> holder(torch::nn::Module& parent, const std::string& name) {
  return parent.register_module(name, ParamHolder())->shared_from_this();
}
}  // namespace

LayerNormImpl::LayerNormImpl(int64_t dim, double eps_) : eps(eps_) {
  weight = register_parameter("weight", at::empty({dim}));
  bias = register_parameter("bias", at::empty({dim}));
}

at::Tensor LayerNormImpl::forward(const at::Tensor& x) {
  return at::layer_norm(x, {x.size(-1)}, weight, bias, eps);
}

// ---------------------------------------------------------------------------------------------------------------
CLIPVisionEmbeddingsImpl::CLIPVisionEmbeddingsImpl(const VisionConfig& cfg) : patch_size_(cfg.patch_size) {
  const int64_t E = cfg.hidden_size, p = cfg.patch_size;
  class_embedding = register_parameter("class_embedding", at::empty({E}));
  patch_weight = holder(*this, "patch_embedding")->register_parameter("weight", at::empty({E, cfg.num_channels, p, p}));
  position_weight =
      holder(*this, "position_embedding")->register_parameter("weight", at::empty({cfg.num_patches() + 1, E}));
}

at::Tensor CLIPVisionEmbeddingsImpl::forward(const at::Tensor& pixels) {
  const int64_t N = pixels.size(0);
  // patch_embedding: conv p×p stride p, no bias -> [N,E,g,g] -> row-major patches [N,g·g,E]
  at::Tensor patches = at::conv2d(pixels.to(patch_weight.scalar_type()), patch_weight, {}, {patch_size_, patch_size_});
  patches = patches.flatten(2).transpose(1, 2);
  // prepend class_embedding -> [N,P+1,E]; add position_embedding rows 0..P
  at::Tensor cls = class_embedding.view({1, 1, -1}).expand({N, 1, class_embedding.size(0)});
  at::Tensor x = at::cat({cls, patches}, 1);
  EQAT_CHECK(x.size(1) == position_weight.size(0), "image gives ", x.size(1) - 1, " patches, the vision tower has ",
             position_weight.size(0) - 1, " position embeddings (wrong image size for this model?)");
  return x + position_weight.unsqueeze(0);
}

// ---------------------------------------------------------------------------------------------------------------
CLIPEncoderLayerImpl::CLIPEncoderLayerImpl(const VisionConfig& cfg)
    : n_head_(cfg.num_attention_heads),
      head_dim_(cfg.hidden_size / cfg.num_attention_heads),
      quick_gelu_(cfg.hidden_act == "quick_gelu") {
  const int64_t E = cfg.hidden_size, F = cfg.intermediate_size;
  auto attn = holder(*this, "self_attn");
  q_proj = attn->register_module("q_proj", QuantLinear(E, E, true));
  k_proj = attn->register_module("k_proj", QuantLinear(E, E, true));
  v_proj = attn->register_module("v_proj", QuantLinear(E, E, true));
  out_proj = attn->register_module("out_proj", QuantLinear(E, E, true));
  layer_norm1 = register_module("layer_norm1", LayerNorm(E, cfg.layer_norm_eps));
  auto mlp = holder(*this, "mlp");
  fc1 = mlp->register_module("fc1", QuantLinear(E, F, true));
  fc2 = mlp->register_module("fc2", QuantLinear(F, E, true));
  layer_norm2 = register_module("layer_norm2", LayerNorm(E, cfg.layer_norm_eps));
}

at::Tensor CLIPEncoderLayerImpl::forward(const at::Tensor& x) {
  const int64_t N = x.size(0), P = x.size(1), E = x.size(2);
  // x = x + out_proj(MHA(layer_norm1(x))): bidirectional, scale Dv^-0.5
  at::Tensor h = layer_norm1->forward(x);
  auto heads = [&](const at::Tensor& t) { return t.view({N, P, n_head_, head_dim_}).transpose(1, 2); };
  at::Tensor q = heads(q_proj->forward(h)), k = heads(k_proj->forward(h)), v = heads(v_proj->forward(h));
  at::Tensor a = at::scaled_dot_product_attention(q, k, v, {}, 0.0, false, 1.0 / std::sqrt(double(head_dim_)));
  at::Tensor r = x + out_proj->forward(a.transpose(1, 2).reshape({N, P, E}));
  // r = r + fc2(act(fc1(layer_norm2(r)))), act = quick_gelu x·σ(1.702x) (or exact gelu)
  at::Tensor m = fc1->forward(layer_norm2->forward(r));
  m = quick_gelu_ ? m * at::sigmoid(1.702 * m) : at::gelu(m);
  return r + fc2->forward(m);
}

// ---------------------------------------------------------------------------------------------------------------
CLIPVisionTransformerImpl::CLIPVisionTransformerImpl(const VisionConfig& cfg) {
  embeddings = register_module("embeddings", std::make_shared<CLIPVisionEmbeddingsImpl>(cfg));
  pre_layrnorm = register_module("pre_layrnorm", LayerNorm(cfg.hidden_size, cfg.layer_norm_eps));
  auto encoder = holder(*this, "encoder");
  layers = encoder->register_module("layers", torch::nn::ModuleList());
  for (int64_t j = 0; j < cfg.num_hidden_layers; ++j) layers->push_back(CLIPEncoderLayer(cfg));
  post_layernorm = register_module("post_layernorm", LayerNorm(cfg.hidden_size, cfg.layer_norm_eps));
}

at::Tensor CLIPVisionTransformerImpl::hidden_state(const at::Tensor& pixels, int64_t index) {
  EQAT_ASSERT(index >= 0 && index <= num_layers(), "hidden state index ", index);
  // embeddings -> pre_layrnorm = hidden_states[0]; then `index` encoder layers. post_layernorm is not applied
  // (HF applies it only to the pooled CLS output).
  at::Tensor x = pre_layrnorm->forward(embeddings->forward(pixels));
  for (int64_t j = 0; j < index; ++j) x = layers[j]->as<CLIPEncoderLayerImpl>()->forward(x);
  return x;
}

// ---------------------------------------------------------------------------------------------------------------
LlavaProjectorImpl::LlavaProjectorImpl(int64_t vision_dim, int64_t text_dim, bool bias, const std::string& act)
    : tanh_gelu_(act == "gelu_pytorch_tanh" || act == "gelu_new") {
  linear_1 = register_module("linear_1", QuantLinear(vision_dim, text_dim, bias));
  linear_2 = register_module("linear_2", QuantLinear(text_dim, text_dim, bias));
}

at::Tensor LlavaProjectorImpl::forward(const at::Tensor& x) {
  return linear_2->forward(at::gelu(linear_1->forward(x), tanh_gelu_ ? "tanh" : "none"));
}

}  // namespace eqat
