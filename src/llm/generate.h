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
};

struct GenerateResult {
  std::vector<std::vector<int64_t>> tokens;  // per row, generated ids without the stop id
  std::vector<at::Tensor> step_logits;       // when keep_logits: per step [B, V] fp32 CPU (step 0 = prompt's last)
  int64_t prompt_len = 0;                    // padded prompt length
  double prefill_seconds = 0, decode_seconds = 0;
  int64_t decode_steps = 0;
};

// Called after each step with the token chosen for every row (-1 for rows already finished).
using TokenCallback = std::function<void(const std::vector<int64_t>& step_tokens)>;

// prompt_embeds [B,T,C] (left-padded), prompt_valid [B,T] bool (false at pads).
GenerateResult generate(LlamaForCausalLM& lm, const at::Tensor& prompt_embeds, const at::Tensor& prompt_valid,
                        const GenerateOptions& opts, const TokenCallback& on_step = nullptr);

// Left-pads token rows to one length. Returns (ids [B,T] int64, valid [B,T] bool).
std::pair<at::Tensor, at::Tensor> left_pad(const std::vector<std::vector<int64_t>>& rows, int64_t pad_id);

}  // namespace eqat
