// QuantLinear: the one pluggable linear layer of eqat (HOUSE_STYLE.md rule 4). Every linear in the Llama decoder,
// the CLIP tower and the projector is a QuantLinear, so the same model code runs in every mode:
//   kFloat      — y = x·Wᵀ + b with a float weight (the reference; what checkpoints load into).
// The quantization issue adds kFakeQuant (learnable W, s, z; Block-AP) and kPacked (frozen integers, learnable
// scales; E2E-QP and serving) to this module — parameter names stay HF's (`weight`, `bias`), so
// named_parameters() equals the checkpoint key set in float mode.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>

namespace eqat {

enum class LinearMode { kFloat, kCount };

class QuantLinearImpl : public torch::nn::Module {
 public:
  // Parameters are allocated uninitialised (at::empty touches no pages): models are either loaded from a
  // checkpoint, which replaces them, or initialised explicitly by a trainer.
  QuantLinearImpl(int64_t in_features, int64_t out_features, bool bias);

  // x: [..., in] -> [..., out]
  at::Tensor forward(const at::Tensor& x);

  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }
  LinearMode mode() const { return mode_; }

  at::Tensor weight;  // [out, in]
  at::Tensor bias;    // [out] or undefined

 private:
  int64_t in_features_, out_features_;
  LinearMode mode_ = LinearMode::kFloat;
};
TORCH_MODULE(QuantLinear);

}  // namespace eqat
