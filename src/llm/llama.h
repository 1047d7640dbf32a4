// Llama decoder (HF LlamaForCausalLM semantics, LLAVA.md §2.5). Module names mirror HF, so named_parameters()
// are the checkpoint keys: model.embed_tokens.weight, model.layers.{i}.self_attn.q_proj.weight, …, lm_head.weight.
//
// Dimension legend: B batch, T new positions this call, S cached + new positions (keys), C n_embd,
// H n_head, Hkv n_kv_head, D head_dim, F ff hidden, V vocab.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include <vector>

#include "data/config.h"
#include "quant/linear.h"

namespace eqat {

// Per-layer key/value cache, preallocated to `capacity` positions. Keys are stored after RoPE.
struct KVCache {
  std::vector<at::Tensor> k, v;  // per layer: [B, Hkv, capacity, D]
  int64_t length = 0;            // positions filled
  int64_t capacity = 0;
  // Static-shape decode (CUDA graphs): when defined, a one-position step writes its keys/values at this [1] int64
  // index on the cache's device and attends over the whole capacity under the caller's mask (which must exclude
  // the slots not yet written); `length` is then left alone. The index lives on the device, so one captured step
  // replays for every position. A [B] slot gives each row its own index (continuous batching: rows at different
  // lengths, llm/batch_decoder.h).
  at::Tensor slot;
  int64_t window = 0;  // with `slot`: attend over keys [0, window) only; 0 = the whole capacity
  static KVCache create(const LlamaConfig& cfg, int64_t batch, int64_t capacity, c10::ScalarType dtype,
                        c10::Device device);
};

// Rotary embedding tables (HF rotate-half convention), with rope_scaling linear / dynamic / llama3.
class RotaryEmbedding {
 public:
  explicit RotaryEmbedding(const LlamaConfig& cfg);
  // position_ids [B, T] int64 -> (cos, sin) each [B, T, D] in `dtype`. `seq_len` (the longest position + 1) only
  // matters for dynamic NTK scaling.
  std::pair<at::Tensor, at::Tensor> cos_sin(const at::Tensor& position_ids, c10::ScalarType dtype,
                                            int64_t seq_len) const;

 private:
  LlamaConfig cfg_;
  at::Tensor inv_freq_;                  // [D/2] fp32, CPU
  mutable at::Tensor inv_freq_device_;  // its copy on the positions' device, made once (no copy inside a graph)
};

// Token embedding table; weight allocated uninitialised (see QuantLinear).
class EmbeddingImpl : public torch::nn::Module {
 public:
  EmbeddingImpl(int64_t num, int64_t dim);
  at::Tensor forward(const at::Tensor& ids);  // [B,T] -> [B,T,C]
  at::Tensor weight;                          // [V, C]
};
TORCH_MODULE(Embedding);

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps);
  // Stats in fp32, cast back to the input dtype, then times weight (HF LlamaRMSNorm order).
  at::Tensor forward(const at::Tensor& x);
  at::Tensor weight;  // [C]
  double eps;
};
TORCH_MODULE(RMSNorm);

class LlamaAttentionImpl : public torch::nn::Module {
 public:
  explicit LlamaAttentionImpl(const LlamaConfig& cfg);
  // x [B,T,C]; cos/sin [B,T,D]; mask [B,1,T,S] bool (true = attend) — or undefined for plain causal without
  // cache; cache may be null. Returns [B,T,C].
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& mask,
                     KVCache* cache, int64_t layer_idx);
  QuantLinear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  // Serving: q/k/v merged into one packed linear when they can be (MergedPackedLinear). Returns whether they were.
  bool fuse_projections();

 private:
  int64_t n_head_, n_kv_head_, head_dim_;
  MergedPackedLinear qkv_;
};
TORCH_MODULE(LlamaAttention);

class LlamaMLPImpl : public torch::nn::Module {
 public:
  explicit LlamaMLPImpl(const LlamaConfig& cfg);
  at::Tensor forward(const at::Tensor& x);  // down(silu(gate(x)) * up(x))
  QuantLinear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
  bool fuse_projections();  // serving: gate/up merged into one packed linear when they can be

 private:
  MergedPackedLinear gate_up_;
};
TORCH_MODULE(LlamaMLP);

class LlamaDecoderLayerImpl : public torch::nn::Module {
 public:
  explicit LlamaDecoderLayerImpl(const LlamaConfig& cfg);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& mask,
                     KVCache* cache, int64_t layer_idx);
  LlamaAttention self_attn{nullptr};
  LlamaMLP mlp{nullptr};
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
};
TORCH_MODULE(LlamaDecoderLayer);

// HF LlamaModel: embed_tokens, layers, norm.
class LlamaModelImpl : public torch::nn::Module {
 public:
  explicit LlamaModelImpl(const LlamaConfig& cfg);
  // embeds [B,T,C], position_ids [B,T], mask as in LlamaAttention. Returns the final-normed hidden [B,T,C].
  at::Tensor forward(const at::Tensor& embeds, const at::Tensor& position_ids, const at::Tensor& mask,
                     KVCache* cache);
  Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};
  const RotaryEmbedding& rotary() const { return rotary_; }
  // `mask` narrowed by Mistral's sliding window (cfg.sliding_window > 0) when some query would see more keys
  // (undefined `mask`: causal); `mask` itself otherwise. forward() applies it; code that runs decoder layers on
  // its own (Block-AP) calls it with the same arguments.
  at::Tensor sliding_window_mask(const at::Tensor& mask, int64_t T, const KVCache* cache, c10::Device device) const;

 private:
  LlamaConfig cfg_;
  RotaryEmbedding rotary_;
};
TORCH_MODULE(LlamaModel);

// HF LlamaForCausalLM: model + lm_head (absent when tie_word_embeddings: the embedding matrix is reused).
class LlamaForCausalLMImpl : public torch::nn::Module {
 public:
  explicit LlamaForCausalLMImpl(const LlamaConfig& cfg);
  at::Tensor embed(const at::Tensor& ids);  // [B,T] -> [B,T,C]
  // Returns logits [B,T,V] (or only for the last position when last_only: [B,1,V]).
  at::Tensor forward(const at::Tensor& embeds, const at::Tensor& position_ids, const at::Tensor& mask,
                     KVCache* cache, bool last_only = false);
  at::Tensor lm_head_weight() const;  // [V, C]
  // Serving a packed model: merges every layer's q/k/v and gate/up (MergedPackedLinear) so a decode step runs 2
  // fused GEMVs per layer for them instead of 5. Returns the number of merges (0 for float models). Never call it
  // before training step sizes (E2E-QP): the parts become views of the merged tensors.
  int64_t fuse_projections();
  LlamaModel model{nullptr};
  QuantLinear lm_head{nullptr};
  const LlamaConfig& config() const { return cfg_; }

 private:
  LlamaConfig cfg_;
};
TORCH_MODULE(LlamaForCausalLM);

// Attention mask for a step: query positions [past, past+T) over keys [0, past+T), causal, and keys whose
// `key_valid` [B, past+T] is false (left padding) are masked — except a query's own position, so fully padded
// rows stay finite. Returns [B,1,T,past+T] bool.
at::Tensor make_attention_mask(const at::Tensor& key_valid, int64_t past, int64_t T);
// Position ids for left-padded rows: count of valid positions before each position (HF's cumsum - 1, pads 1).
at::Tensor positions_from_valid(const at::Tensor& key_valid);

}  // namespace eqat
