// CLIP vision tower (HF CLIPVisionModel, LLAVA.md §2.1) and the LLaVA projector (§2.3). Names mirror HF:
// vision_model.embeddings.{class_embedding, patch_embedding.weight, position_embedding.weight},
// vision_model.pre_layrnorm (sic), vision_model.encoder.layers.{j}.{self_attn.{q,k,v,out}_proj, layer_norm1,
// mlp.fc1, mlp.fc2, layer_norm2}, vision_model.post_layernorm (loaded, unused by LLaVA).
//
// Legend: N images, P patches (+1 with CLS), E vision width, Hv heads, Dv head dim, C decoder width.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include "data/config.h"
#include "quant/linear.h"

namespace eqat {

class LayerNormImpl : public torch::nn::Module {
 public:
  LayerNormImpl(int64_t dim, double eps);
  at::Tensor forward(const at::Tensor& x);
  at::Tensor weight, bias;  // [E]
  double eps;
};
TORCH_MODULE(LayerNorm);

class CLIPVisionEmbeddingsImpl : public torch::nn::Module {
 public:
  explicit CLIPVisionEmbeddingsImpl(const VisionConfig& cfg);
  at::Tensor forward(const at::Tensor& pixels);  // [N,3,S,S] -> [N,P+1,E]
  at::Tensor class_embedding;                     // [E]
  at::Tensor patch_weight;     // patch_embedding.weight [E,3,p,p] (conv, no bias)
  at::Tensor position_weight;  // position_embedding.weight [P+1,E]

 private:
  int64_t patch_size_;
};
TORCH_MODULE(CLIPVisionEmbeddings);

class CLIPEncoderLayerImpl : public torch::nn::Module {
 public:
  explicit CLIPEncoderLayerImpl(const VisionConfig& cfg);
  at::Tensor forward(const at::Tensor& x);  // [N,P,E] -> [N,P,E]
  QuantLinear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, out_proj{nullptr};  // under self_attn
  QuantLinear fc1{nullptr}, fc2{nullptr};                                            // under mlp
  LayerNorm layer_norm1{nullptr}, layer_norm2{nullptr};

 private:
  int64_t n_head_, head_dim_;
  bool quick_gelu_;
};
TORCH_MODULE(CLIPEncoderLayer);

class CLIPVisionTransformerImpl : public torch::nn::Module {
 public:
  explicit CLIPVisionTransformerImpl(const VisionConfig& cfg);
  // hidden_states[index] of HF's list: 0 = after pre_layrnorm, k = after encoder layer k-1. Runs only the layers
  // needed. pixels [N,3,S,S] -> [N,P+1,E]
  at::Tensor hidden_state(const at::Tensor& pixels, int64_t index);
  std::shared_ptr<CLIPVisionEmbeddingsImpl> embeddings;
  LayerNorm pre_layrnorm{nullptr}, post_layernorm{nullptr};
  torch::nn::ModuleList layers{nullptr};  // registered under encoder.layers
  int64_t num_layers() const { return static_cast<int64_t>(layers->size()); }
};
TORCH_MODULE(CLIPVisionTransformer);

// LLaVA multi_modal_projector (mlp2x_gelu): linear_2(gelu_erf(linear_1(x))).
class LlavaProjectorImpl : public torch::nn::Module {
 public:
  LlavaProjectorImpl(int64_t vision_dim, int64_t text_dim, bool bias, const std::string& act);
  at::Tensor forward(const at::Tensor& x);  // [N,P,E] -> [N,P,C]
  QuantLinear linear_1{nullptr}, linear_2{nullptr};

 private:
  bool tanh_gelu_ = false;
};
TORCH_MODULE(LlavaProjector);

}  // namespace eqat
