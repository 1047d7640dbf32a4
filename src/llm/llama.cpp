// Llama decoder forward, step by step as HF modeling_llama.py (LLAVA.md §2.5).
// Legend: B batch, T new positions, S keys (cache + new), C n_embd, H n_head, Hkv n_kv_head, D head_dim.
#include "llm/llama.h"

#include <ATen/ATen.h>

#include <cmath>

#include "data/error.h"
#include "llm/decode_attention.h"
#include "quant/qmatmul.h"

namespace eqat {

// ---------------------------------------------------------------------------------------------------------------
KVCache KVCache::create(const LlamaConfig& cfg, int64_t batch, int64_t capacity, c10::ScalarType dtype,
                        c10::Device device) {
  KVCache c;
  c.capacity = capacity;
  auto opts = at::TensorOptions().dtype(dtype).device(device);
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) {
    c.k.push_back(at::empty({batch, cfg.num_key_value_heads, capacity, cfg.head_dim}, opts));
    c.v.push_back(at::empty({batch, cfg.num_key_value_heads, capacity, cfg.head_dim}, opts));
  }
  return c;
}

// ---------------------------------------------------------------------------------------------------------------
RotaryEmbedding::RotaryEmbedding(const LlamaConfig& cfg) : cfg_(cfg) {
  const int64_t D = cfg.head_dim;
  // HF: inv_freq = 1 / base^(arange(0, D, 2).float() / D), in fp32.
  at::Tensor exponent = at::arange(0, D, 2, at::kLong).to(at::kFloat) / static_cast<float>(D);
  inv_freq_ = 1.0 / at::pow(static_cast<double>(cfg.rope_theta), exponent);
  const RopeScaling& rs = cfg.rope_scaling;
  if (rs.type == "linear") {
    inv_freq_ = inv_freq_ / rs.factor;
  } else if (rs.type == "llama3") {
    // HF _compute_llama3_parameters: long wavelengths divided by factor, short kept, smooth blend in between.
    const double low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor;
    const double high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor;
    at::Tensor wavelen = 2 * M_PI / inv_freq_;
    at::Tensor scaled = at::where(wavelen > low_wavelen, inv_freq_ / rs.factor, inv_freq_);
    at::Tensor smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) /
                        (rs.high_freq_factor - rs.low_freq_factor);
    at::Tensor smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled;
    at::Tensor is_medium = (wavelen >= high_wavelen).logical_and(wavelen <= low_wavelen);
    inv_freq_ = at::where(is_medium, smoothed, scaled);
  }
}

std::pair<at::Tensor, at::Tensor> RotaryEmbedding::cos_sin(const at::Tensor& position_ids, c10::ScalarType dtype,
                                                           int64_t seq_len) const {
  if (!inv_freq_device_.defined() || inv_freq_device_.device() != position_ids.device())
    inv_freq_device_ = inv_freq_.to(position_ids.device());
  at::Tensor inv_freq = inv_freq_device_;
  if (cfg_.rope_scaling.type == "dynamic" && seq_len > cfg_.max_position_embeddings) {
    // HF dynamic NTK: base grows with the sequence length beyond the trained context.
    const double f = cfg_.rope_scaling.factor, D = static_cast<double>(cfg_.head_dim);
    const double base = cfg_.rope_theta * std::pow((f * seq_len / cfg_.max_position_embeddings) - (f - 1), D / (D - 2));
    at::Tensor exponent = at::arange(0, cfg_.head_dim, 2, at::kLong).to(at::kFloat) / static_cast<float>(D);
    inv_freq = (1.0 / at::pow(base, exponent)).to(position_ids.device());
  }
  // freqs [B,T,D/2] = pos ⊗ inv_freq in fp32; emb = cat(freqs, freqs) -> [B,T,D].
  at::Tensor freqs = position_ids.to(at::kFloat).unsqueeze(-1) * inv_freq.view({1, 1, -1});
  at::Tensor emb = at::cat({freqs, freqs}, -1);
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

namespace {
// rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])
at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}
}  // namespace

// ---------------------------------------------------------------------------------------------------------------
EmbeddingImpl::EmbeddingImpl(int64_t num, int64_t dim) {
  weight = register_parameter("weight", at::empty({num, dim}));
}

at::Tensor EmbeddingImpl::forward(const at::Tensor& ids) { return at::embedding(weight, ids); }

RMSNormImpl::RMSNormImpl(int64_t dim, double eps_) : eps(eps_) {
  weight = register_parameter("weight", at::empty({dim}));
}

at::Tensor RMSNormImpl::forward(const at::Tensor& x) {
  at::Tensor xf = x.to(at::kFloat);
  at::Tensor var = xf.pow(2).mean(-1, /*keepdim=*/true);
  return weight * (xf * at::rsqrt(var + eps)).to(x.scalar_type());
}

// ---------------------------------------------------------------------------------------------------------------
LlamaAttentionImpl::LlamaAttentionImpl(const LlamaConfig& cfg)
    : n_head_(cfg.num_attention_heads), n_kv_head_(cfg.num_key_value_heads), head_dim_(cfg.head_dim) {
  const int64_t C = cfg.hidden_size;
  q_proj = register_module("q_proj", QuantLinear(C, n_head_ * head_dim_, cfg.attention_bias));
  k_proj = register_module("k_proj", QuantLinear(C, n_kv_head_ * head_dim_, cfg.attention_bias));
  v_proj = register_module("v_proj", QuantLinear(C, n_kv_head_ * head_dim_, cfg.attention_bias));
  o_proj = register_module("o_proj", QuantLinear(n_head_ * head_dim_, C, cfg.attention_bias));
}

at::Tensor LlamaAttentionImpl::forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                       const at::Tensor& mask, KVCache* cache, int64_t layer_idx) {
  const int64_t B = x.size(0), T = x.size(1);
  // q/k/v projections -> [B,H(kv),T,D]
  at::Tensor q, k, v;
  if (qkv_.serves(x)) {
    auto y = qkv_.forward(x);
    q = y[0], k = y[1], v = y[2];
  } else {
    q = q_proj->forward(x), k = k_proj->forward(x), v = v_proj->forward(x);
  }
  q = q.view({B, T, n_head_, head_dim_}).transpose(1, 2);
  k = k.view({B, T, n_kv_head_, head_dim_}).transpose(1, 2);
  v = v.view({B, T, n_kv_head_, head_dim_}).transpose(1, 2);
  // RoPE (rotate-half): q' = q·cos + rotate_half(q)·sin; cos/sin broadcast over heads.
  at::Tensor c = cos.unsqueeze(1), s = sin.unsqueeze(1);
  q = q * c + rotate_half(q) * s;
  k = k * c + rotate_half(k) * s;
  if (cache && cache->slot.defined()) {
    EQAT_ASSERT(T == 1 && mask.defined(), "a static-shape decode step takes one position and a mask");
    if (cache->slot.numel() == 1) {
      cache->k[layer_idx].index_copy_(2, cache->slot, k);
      cache->v[layer_idx].index_copy_(2, cache->slot, v);
    } else {  // row b writes at slot[b]
      EQAT_ASSERT(cache->slot.numel() == B, "a per-row slot needs one index per row");
      at::Tensor idx = cache->slot.view({B, 1, 1, 1}).expand({B, n_kv_head_, 1, head_dim_});
      cache->k[layer_idx].scatter_(2, idx, k);
      cache->v[layer_idx].scatter_(2, idx, v);
    }
    const int64_t S = cache->window > 0 ? cache->window : cache->capacity;
    k = cache->k[layer_idx].narrow(2, 0, S);
    v = cache->v[layer_idx].narrow(2, 0, S);
  } else if (cache) {
    const int64_t past = cache->length;
    EQAT_CHECK(past + T <= cache->capacity, "sequence of ", past + T, " positions exceeds the KV cache (",
               cache->capacity, ")");
    cache->k[layer_idx].narrow(2, past, T).copy_(k);
    cache->v[layer_idx].narrow(2, past, T).copy_(v);
    k = cache->k[layer_idx].narrow(2, 0, past + T);
    v = cache->v[layer_idx].narrow(2, 0, past + T);
  }
  // softmax(q·kᵀ/√D + mask)·v; GQA maps query head h to kv head h / (H/Hkv) (HF repeat_kv order).
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim_));
  // A decode step on the CPU in fp32 takes decode_attention_cpu, everything else LibTorch's SDPA (causal without a
  // mask when T > 1).
  const at::Tensor out = attention(q, k, v, mask, scale, /*is_causal=*/T > 1);
  // [B,H,T,D] -> [B,T,H·D] -> o_proj
  return o_proj->forward(out.transpose(1, 2).reshape({B, T, n_head_ * head_dim_}));
}

bool LlamaAttentionImpl::fuse_projections() {
  if (!qkv_.defined()) qkv_ = MergedPackedLinear::merge({q_proj, k_proj, v_proj});
  return qkv_.defined();
}

// ---------------------------------------------------------------------------------------------------------------
LlamaMLPImpl::LlamaMLPImpl(const LlamaConfig& cfg) {
  const int64_t C = cfg.hidden_size, F = cfg.intermediate_size;
  gate_proj = register_module("gate_proj", QuantLinear(C, F, cfg.mlp_bias));
  up_proj = register_module("up_proj", QuantLinear(C, F, cfg.mlp_bias));
  down_proj = register_module("down_proj", QuantLinear(F, C, cfg.mlp_bias));
}

at::Tensor LlamaMLPImpl::forward(const at::Tensor& x) {
  if (gate_up_.serves(x)) {
    auto y = gate_up_.forward(x);
    return down_proj->forward(at::silu(y[0]) * y[1]);
  }
  return down_proj->forward(at::silu(gate_proj->forward(x)) * up_proj->forward(x));
}

bool LlamaMLPImpl::fuse_projections() {
  if (!gate_up_.defined()) gate_up_ = MergedPackedLinear::merge({gate_proj, up_proj});
  return gate_up_.defined();
}

// ---------------------------------------------------------------------------------------------------------------
LlamaDecoderLayerImpl::LlamaDecoderLayerImpl(const LlamaConfig& cfg) {
  self_attn = register_module("self_attn", LlamaAttention(cfg));
  mlp = register_module("mlp", LlamaMLP(cfg));
  input_layernorm = register_module("input_layernorm", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps));
  post_attention_layernorm =
      register_module("post_attention_layernorm", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps));
}

at::Tensor LlamaDecoderLayerImpl::forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                          const at::Tensor& mask, KVCache* cache, int64_t layer_idx) {
  // h = x + o_proj(attn(input_layernorm(x)))
  at::Tensor h = x + self_attn->forward(input_layernorm->forward(x), cos, sin, mask, cache, layer_idx);
  // out = h + mlp(post_attention_layernorm(h))
  return h + mlp->forward(post_attention_layernorm->forward(h));
}

// ---------------------------------------------------------------------------------------------------------------
LlamaModelImpl::LlamaModelImpl(const LlamaConfig& cfg) : cfg_(cfg), rotary_(cfg) {
  embed_tokens = register_module("embed_tokens", Embedding(cfg.vocab_size, cfg.hidden_size));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) layers->push_back(LlamaDecoderLayer(cfg));
  norm = register_module("norm", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps));
}

// Mistral's sliding window (HF's sliding_window_overlay): query at cache index q sees key index k only when
// k > q - W, on top of the caller's mask (causal when none). Indices are cache slots, as in HF, so left padding
// counts toward the window there too. A no-op while every query sees at most W keys.
at::Tensor LlamaModelImpl::sliding_window_mask(const at::Tensor& mask, int64_t T, const KVCache* cache,
                                               c10::Device device) const {
  const int64_t W = cfg_.sliding_window;
  if (W <= 0) return mask;
  at::Tensor q;  // [B or 1, T] query cache indices
  int64_t S = 0;  // keys attended
  auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  if (cache && cache->slot.defined()) {  // static / batched steps: each row's query sits at its slot
    S = cache->window > 0 ? cache->window : cache->capacity;
    q = cache->slot.view({-1, 1});
  } else {
    const int64_t past = cache ? cache->length : 0;
    S = past + T;
    if (S <= W) return mask;
    q = at::arange(past, past + T, opts).view({1, T});
  }
  at::Tensor k = at::arange(S, opts).view({1, 1, S});
  at::Tensor qi = q.unsqueeze(-1);                                // [B|1, T, 1]
  at::Tensor keep = (k > qi - W).unsqueeze(1);                    // [B|1, 1, T, S]
  if (mask.defined()) return mask & keep;
  return keep & (k <= qi).unsqueeze(1);  // causal, as the unmasked path is
}

at::Tensor LlamaModelImpl::forward(const at::Tensor& embeds, const at::Tensor& position_ids, const at::Tensor& mask,
                                   KVCache* cache) {
  const int64_t T = embeds.size(1);
  const int64_t seq_len = (cache ? cache->length : 0) + T;
  auto [cos, sin] = rotary_.cos_sin(position_ids, embeds.scalar_type(), seq_len);
  const at::Tensor attn_mask = sliding_window_mask(mask, T, cache, embeds.device());
  at::Tensor h = embeds;
  for (size_t i = 0; i < layers->size(); ++i)
    h = layers[i]->as<LlamaDecoderLayerImpl>()->forward(h, cos, sin, attn_mask, cache, static_cast<int64_t>(i));
  if (cache && !cache->slot.defined()) cache->length += T;
  return norm->forward(h);
}

// ---------------------------------------------------------------------------------------------------------------
LlamaForCausalLMImpl::LlamaForCausalLMImpl(const LlamaConfig& cfg) : cfg_(cfg) {
  model = register_module("model", LlamaModel(cfg));
  if (!cfg.tie_word_embeddings) lm_head = register_module("lm_head", QuantLinear(cfg.hidden_size, cfg.vocab_size, false));
}

at::Tensor LlamaForCausalLMImpl::embed(const at::Tensor& ids) {
  // A table kept in its stored fp16/bf16 (LoadOptions::weights_as_stored) gives rows in the decoder's dtype, exactly.
  at::Tensor e = model->embed_tokens->forward(ids);
  const c10::ScalarType dtype = model->norm->weight.scalar_type();
  return e.scalar_type() == dtype ? e : e.to(dtype);
}

int64_t LlamaForCausalLMImpl::fuse_projections() {
  int64_t n = 0;
  for (size_t i = 0; i < model->layers->size(); ++i) {
    auto* layer = model->layers[i]->as<LlamaDecoderLayerImpl>();
    n += layer->self_attn->fuse_projections();
    n += layer->mlp->fuse_projections();
  }
  return n;
}

at::Tensor LlamaForCausalLMImpl::lm_head_weight() const {
  return lm_head ? lm_head->weight : model->embed_tokens->weight;
}

at::Tensor LlamaForCausalLMImpl::forward(const at::Tensor& embeds, const at::Tensor& position_ids,
                                         const at::Tensor& mask, KVCache* cache, bool last_only) {
  at::Tensor h = model->forward(embeds, position_ids, mask, cache);
  if (last_only) h = h.narrow(1, h.size(1) - 1, 1);
  return lm_head ? lm_head->forward(h) : float_linear(h, model->embed_tokens->weight);
}

// ---------------------------------------------------------------------------------------------------------------
at::Tensor make_attention_mask(const at::Tensor& key_valid, int64_t past, int64_t T) {
  const int64_t S = past + T;
  EQAT_ASSERT(key_valid.size(1) == S, "key_valid has ", key_valid.size(1), " positions, expected ", S);
  auto dev = key_valid.device();
  at::Tensor qpos = at::arange(past, S, at::TensorOptions().dtype(at::kLong).device(dev)).view({T, 1});
  at::Tensor kpos = at::arange(0, S, at::TensorOptions().dtype(at::kLong).device(dev)).view({1, S});
  at::Tensor causal = kpos <= qpos;                           // [T,S]
  at::Tensor self = kpos == qpos;                             // [T,S]
  at::Tensor valid = key_valid.to(at::kBool).view({-1, 1, 1, S});  // [B,1,1,S]
  return causal.view({1, 1, T, S}).logical_and(valid.logical_or(self.view({1, 1, T, S})));
}

at::Tensor positions_from_valid(const at::Tensor& key_valid) {
  at::Tensor v = key_valid.to(at::kLong);
  at::Tensor pos = v.cumsum(-1) - 1;
  return pos.masked_fill(v == 0, 1);
}

}  // namespace eqat
