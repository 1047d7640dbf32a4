#include "llm/generate.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <chrono>
#include <cmath>

#include "data/error.h"
#include "data/memory.h"
#include "quant/qmatmul.h"  // cuda_graph_capture

namespace eqat {

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

std::pair<at::Tensor, at::Tensor> left_pad(const std::vector<std::vector<int64_t>>& rows, int64_t pad_id) {
  EQAT_ASSERT(!rows.empty(), "no prompt rows");
  size_t T = 0;
  for (const auto& r : rows) T = std::max(T, r.size());
  const int64_t B = static_cast<int64_t>(rows.size());
  at::Tensor ids = at::full({B, static_cast<int64_t>(T)}, pad_id < 0 ? 0 : pad_id, at::kLong);
  at::Tensor valid = at::zeros({B, static_cast<int64_t>(T)}, at::kBool);
  auto ida = ids.accessor<int64_t, 2>();
  auto va = valid.accessor<bool, 2>();
  for (int64_t b = 0; b < B; ++b) {
    const auto& r = rows[b];
    const size_t off = T - r.size();
    for (size_t t = 0; t < r.size(); ++t) {
      ida[b][off + t] = r[t];
      va[b][off + t] = true;
    }
  }
  return {ids, valid};
}

int64_t model_context(const LlamaConfig& cfg) {
  if (cfg.rope_scaling.type == "dynamic" && cfg.rope_scaling.factor > 1)
    return static_cast<int64_t>(std::floor(cfg.rope_scaling.factor * static_cast<double>(cfg.max_position_embeddings)));
  return cfg.max_position_embeddings;
}

int64_t max_new_tokens_in_context(const LlamaConfig& cfg, int64_t prompt_len, int64_t requested) {
  return std::max<int64_t>(0, std::min(requested, model_context(cfg) - prompt_len));
}

int64_t kv_cache_bytes(const LlamaConfig& cfg, int64_t batch, int64_t capacity, c10::ScalarType dtype) {
  int64_t per_layer = mul_sat(mul_sat(mul_sat(batch, cfg.num_key_value_heads), capacity), cfg.head_dim);
  return mul_sat(mul_sat(per_layer, 2 * static_cast<int64_t>(c10::elementSize(dtype))), cfg.num_hidden_layers);
}

GenerateResult generate(LlamaForCausalLM& lm, const at::Tensor& prompt_embeds, const at::Tensor& prompt_valid,
                        const GenerateOptions& opts, const TokenCallback& on_step) {
  c10::NoGradGuard no_grad;
  const LlamaConfig& cfg = lm->config();
  const int64_t B = prompt_embeds.size(0), T = prompt_embeds.size(1);
  EQAT_CHECK(opts.max_new_tokens >= 0, "--max-new-tokens must be >= 0, got ", opts.max_new_tokens);
  EQAT_CHECK(T <= model_context(cfg), "prompt of ", T, " positions is longer than the model's context (",
             model_context(cfg), " positions)");
  // The cache is sized from the capped count, never from the request: a huge --max-new-tokens must not allocate.
  const int64_t max_new = max_new_tokens_in_context(cfg, T, opts.max_new_tokens);
  const int64_t capacity = T + std::max<int64_t>(max_new, 1);
  const auto device = prompt_embeds.device();
  if (device.is_cpu())
    check_memory_fits(kv_cache_bytes(cfg, B, capacity, prompt_embeds.scalar_type()),
                      str_cat("the KV cache for ", B, " x ", capacity, " positions"),
                      "lower --max-new-tokens or the batch size");

  GenerateResult res;
  res.tokens.resize(B);
  res.prompt_len = T;
  Sampler sampler(opts.sampling);
  KVCache cache = KVCache::create(cfg, B, capacity, prompt_embeds.scalar_type(), device);

  at::Tensor valid = prompt_valid.to(device, at::kBool);
  std::vector<bool> done(B, false);
  auto is_stop = [&](int64_t id) {
    return std::find(opts.stop_ids.begin(), opts.stop_ids.end(), id) != opts.stop_ids.end();
  };

  // Prefill: the whole prompt in one forward; only the last position's logits are needed.
  auto t0 = std::chrono::steady_clock::now();
  at::Tensor pos = positions_from_valid(valid);
  bool any_pad = !valid.all().item<bool>();
  at::Tensor mask = any_pad ? make_attention_mask(valid, 0, T) : at::Tensor();
  at::Tensor logits = lm->forward(prompt_embeds, pos, mask, &cache, /*last_only=*/true).select(1, 0);
  res.prefill_seconds = seconds_since(t0);

  at::Tensor next_pos = pos.select(1, T - 1).unsqueeze(1) + 1;  // [B,1]
  t0 = std::chrono::steady_clock::now();

  // Static-shape decode steps (GenerateOptions::Decode): the step reads its token ids from step_ids and writes its
  // logits into step_logits; positions, the cache slot and the key-validity mask advance on the device.
  using Decode = GenerateOptions::Decode;
  const bool dynamic_rope = cfg.rope_scaling.type == "dynamic";
  Decode mode = opts.decode;
  if (mode == Decode::Auto)
    mode = device.is_cuda() && !dynamic_rope && max_new - 1 >= GenerateOptions::kMinGraphSteps ? Decode::Graph
                                                                                               : Decode::Eager;
  EQAT_CHECK(mode != Decode::Graph || device.is_cuda(),
             "--decode graph: CUDA-graph decoding needs the model on a CUDA device (--device cuda)");
  EQAT_CHECK(mode == Decode::Eager || !dynamic_rope,
             "--decode static/graph: static-shape decoding cannot use the model's dynamic-NTK RoPE (use eager)");
  const bool static_steps = mode != Decode::Eager && max_new > 1;
  std::function<void()> static_step;
  at::Tensor step_ids, step_logits;
  if (static_steps) {
    // Unwritten slots are masked out, but a masked weight of 0 times uninitialised NaN bits would still be NaN.
    for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
      cache.k[l].narrow(2, T, capacity - T).zero_();
      cache.v[l].narrow(2, T, capacity - T).zero_();
    }
    at::Tensor key_valid = at::zeros({B, capacity}, valid.options());  // [B, capacity] bool
    key_valid.narrow(1, 0, T).copy_(valid);
    cache.slot = at::full({1}, T, next_pos.options());
    at::Tensor step_pos = next_pos.clone();  // [B,1]
    step_ids = at::zeros({B, 1}, next_pos.options());
    step_logits = at::empty_like(logits);
    static_step = [&lm, &cache, key_valid, step_pos, step_ids, step_logits, B, capacity] {
      key_valid.index_fill_(1, cache.slot, true);  // the new position attends to itself and is attended later
      at::Tensor mask = key_valid.view({B, 1, 1, capacity});
      step_logits.copy_(lm->forward(lm->embed(step_ids), step_pos, mask, &cache, /*last_only=*/true).select(1, 0));
      step_pos.add_(1);
      cache.slot.add_(1);
    };
    if (mode == Decode::Graph) {
      // Capturing runs the step twice (warm-up, capture); put back the state those runs advanced.
      at::Tensor valid0 = key_valid.clone(), pos0 = step_pos.clone(), slot0 = cache.slot.clone();
      static_step = cuda_graph_capture(static_step);
      key_valid.copy_(valid0);
      step_pos.copy_(pos0);
      cache.slot.copy_(slot0);
      res.cuda_graph = true;
    }
  }
  for (int64_t step = 0; step < max_new; ++step) {
    if (opts.keep_logits)  // a copy: static steps reuse their logits buffer
      res.step_logits.push_back(logits.to(at::kCPU, at::kFloat, /*non_blocking=*/false, /*copy=*/true));
    at::Tensor chosen = sampler.sample(logits);
    auto ca = chosen.accessor<int64_t, 1>();
    std::vector<int64_t> step_tokens(B, -1);
    bool all_done = true;
    for (int64_t b = 0; b < B; ++b) {
      if (done[b]) continue;
      const int64_t id = ca[b];
      if (is_stop(id)) {
        done[b] = true;
      } else {
        res.tokens[b].push_back(id);
        step_tokens[b] = id;
      }
      all_done = all_done && done[b];
    }
    if (on_step) on_step(step_tokens);
    if (all_done || step + 1 == max_new) break;
    // Decode step: one new position per row. Finished rows keep running (cheap, batch shape stays fixed).
    at::Tensor ids = chosen.to(device).view({B, 1});
    if (static_steps) {
      step_ids.copy_(ids);
      static_step();
      logits = step_logits;  // overwritten by the next step; whatever keeps it copies it first
    } else {
      valid = at::cat({valid, at::ones({B, 1}, valid.options())}, 1);
      at::Tensor step_mask = any_pad ? make_attention_mask(valid, cache.length, 1) : at::Tensor();
      logits = lm->forward(lm->embed(ids), next_pos, step_mask, &cache, true).select(1, 0);
      next_pos = next_pos + 1;
    }
    res.decode_steps++;
  }
  res.decode_seconds = seconds_since(t0);
  return res;
}

}  // namespace eqat
