#include "llm/sampler.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "data/error.h"

namespace eqat {

Sampler::Sampler(const SamplingOptions& opts) : opts_(opts) {
  EQAT_CHECK(opts.temperature >= 0, "--temperature must be >= 0, got ", opts.temperature);
  EQAT_CHECK(opts.top_k >= 0, "--top-k must be >= 0, got ", opts.top_k);
  EQAT_CHECK(opts.top_p > 0 && opts.top_p <= 1, "--top-p must be in (0, 1], got ", opts.top_p);
  gen_ = at::make_generator<at::CPUGeneratorImpl>(opts.seed);
}

void check_logits_finite(const at::Tensor& logits, c10::ScalarType computed_in) {
  EQAT_CHECK(!logits.isnan().any().item<bool>() && !logits.isposinf().any().item<bool>(),
             "the model produced NaN or infinite logits; its weights overflow in ", c10::toString(computed_in),
             " (try --dtype float32)");
}

at::Tensor Sampler::sample(const at::Tensor& logits_in) {
  at::Tensor logits = logits_in.to(at::kCPU, at::kFloat);
  // load_model refuses non-finite weights; finite ones can still overflow (fp16 activations past 65504).
  check_logits_finite(logits, logits_in.scalar_type());
  if (opts_.temperature == 0.0) return logits.argmax(-1);
  logits = logits / opts_.temperature;
  const int64_t V = logits.size(-1);
  if (opts_.top_k > 0 && opts_.top_k < V) {
    at::Tensor kth = std::get<0>(logits.topk(opts_.top_k, -1)).narrow(-1, opts_.top_k - 1, 1);
    logits = logits.masked_fill(logits < kth, -INFINITY);
  }
  if (opts_.top_p < 1.0) {
    auto [sorted, idx] = logits.sort(-1, /*descending=*/false);
    at::Tensor cum = sorted.softmax(-1).cumsum(-1);
    at::Tensor remove_sorted = cum <= (1.0 - opts_.top_p);
    remove_sorted.narrow(-1, V - 1, 1).fill_(false);  // always keep the most likely token
    at::Tensor remove = at::zeros_like(remove_sorted).scatter(-1, idx, remove_sorted);
    logits = logits.masked_fill(remove, -INFINITY);
  }
  at::Tensor probs = logits.softmax(-1);
  return at::multinomial(probs, 1, /*replacement=*/false, gen_).squeeze(-1);
}

}  // namespace eqat
