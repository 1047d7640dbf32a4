// Autoregressive generation over a LlamaForCausalLM with a KV cache. Prompts arrive as embeddings (so LLaVA can
// splice image features in) with a validity mask for left padding; batched rows run together.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <vector>

#include "llm/llama.h"
#include "llm/sampler.h"

namespace eqat {

struct GenerateOptions {
  int64_t max_new_tokens = 128;
  SamplingOptions sampling;
  std::vector<int64_t> stop_ids;  // EOS ids; a row stops after emitting one (not included in its tokens)
  bool keep_logits = false;       // collect the logits that chose each token
  // Decode steps. Eager: each step attends over the positions filled so far (shapes grow by one per step).
  // Static: every step has the same shapes (attention over the whole KV cache under a key-validity mask; the write
  // slot and the positions advance on the device). Graph: static steps captured once as a CUDA graph and replayed,
  // one launch per token instead of one per kernel (CUDA only). Auto: Graph on CUDA when at least kMinGraphSteps
  // decode steps may run, Eager otherwise. Static and Graph refuse dynamic-NTK RoPE (its table depends on the
  // host-side length).
  enum class Decode { Auto, Eager, Static, Graph };
  Decode decode = Decode::Auto;
  static constexpr int64_t kMinGraphSteps = 8;  // below this, capturing (2 steps + instantiation) costs more than it saves
};

struct GenerateResult {
  std::vector<std::vector<int64_t>> tokens;  // per row, generated ids without the stop id
  std::vector<at::Tensor> step_logits;       // when keep_logits: per step [B, V] fp32 CPU (step 0 = prompt's last)
  int64_t prompt_len = 0;                    // padded prompt length
  double prefill_seconds = 0, decode_seconds = 0;  // decode_seconds includes a CUDA graph's capture
  int64_t decode_steps = 0;
  bool cuda_graph = false;  // the decode steps replayed a captured CUDA graph
};

// Called after each step with the token chosen for every row (-1 for rows already finished).
using TokenCallback = std::function<void(const std::vector<int64_t>& step_tokens)>;

// The positions a sequence may use: max_position_embeddings, or factor x that with dynamic-NTK RoPE, whose base
// keeps growing with the length past the trained context (transformers sets no limit there; the factor is the
// length the scaling was configured for).
int64_t model_context(const LlamaConfig& cfg);
// New tokens that fit the context after a prompt of `prompt_len` positions: min(requested, context - prompt_len).
// generate() never runs past the context (max_position_embeddings) and sizes its KV cache from this, not from
// the request; callers that take the count from a user compare with it to warn that the request was capped.
int64_t max_new_tokens_in_context(const LlamaConfig& cfg, int64_t prompt_len, int64_t requested);
// Bytes of a KV cache of `capacity` positions for `batch` rows (keys + values, every layer).
int64_t kv_cache_bytes(const LlamaConfig& cfg, int64_t batch, int64_t capacity, c10::ScalarType dtype);

// prompt_embeds [B,T,C] (left-padded), prompt_valid [B,T] bool (false at pads).
GenerateResult generate(LlamaForCausalLM& lm, const at::Tensor& prompt_embeds, const at::Tensor& prompt_valid,
                        const GenerateOptions& opts, const TokenCallback& on_step = nullptr);

// Left-pads token rows to one length. Returns (ids [B,T] int64, valid [B,T] bool).
std::pair<at::Tensor, at::Tensor> left_pad(const std::vector<std::vector<int64_t>>& rows, int64_t pad_id);

}  // namespace eqat
