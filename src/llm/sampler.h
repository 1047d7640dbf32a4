// Next-token selection: greedy (temperature 0) or temperature / top-k / top-p sampling with a seeded generator
// (HF LogitsProcessor order: temperature, top-k, top-p; top-p keeps the smallest set whose mass reaches p, and at
// least one token).
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace eqat {

struct SamplingOptions {
  double temperature = 0.0;  // 0: greedy
  int64_t top_k = 0;         // 0: off
  double top_p = 1.0;        // 1: off
  uint64_t seed = 0;
};

// InputError when float32 `logits` hold NaN or +inf (finite weights can still overflow in fp16 activations): the
// message names `computed_in`, the dtype the model ran in. argmax would pick a NaN and multinomial would fail.
void check_logits_finite(const at::Tensor& logits, c10::ScalarType computed_in);

class Sampler {
 public:
  explicit Sampler(const SamplingOptions& opts);
  // logits [B, V] (any float dtype) -> token ids [B] int64 (CPU).
  at::Tensor sample(const at::Tensor& logits);
  const SamplingOptions& options() const { return opts_; }

 private:
  SamplingOptions opts_;
  at::Generator gen_;
};

}  // namespace eqat
