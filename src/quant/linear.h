// QuantLinear: the one pluggable linear layer of eqat (HOUSE_STYLE.md rule 4). Every linear in the Llama decoder,
// the CLIP tower and the projector is a QuantLinear, so the same model code runs in every mode:
//   kFloat      y = x·Wᵀ + b. Parameters: weight [N, K], bias [N]. What checkpoints load into.
//   kFakeQuant  y = x·Ŵᵀ + b, Ŵ = fake_quantize(W, s, z) (Block-AP: W, s, z all trainable).
//               Extra parameters: weight_scale, weight_zero [N, G].
//   kPacked     frozen integers in the GPTQ layout (pack.h): buffers qweight, qzeros, g_idx; parameter scales [G, N]
//               (trainable in E2E-QP; ∂Ŵ/∂s = q − z). `weight` is emptied. Names match GPTQ checkpoints.
// Legend: N out_features, K in_features, G groups per row.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <tuple>
#include <vector>

#include "quant/pack.h"
#include "quant/quantizer.h"

namespace eqat {

struct TrainWeightCache;  // quant/qmatmul.h

enum class LinearMode { kFloat, kFakeQuant, kPacked, kCount };

class QuantLinearImpl : public torch::nn::Module {
 public:
  // Parameters are allocated uninitialised (at::empty touches no pages): models are either loaded from a
  // checkpoint, which replaces them, or initialised explicitly by a trainer.
  QuantLinearImpl(int64_t in_features, int64_t out_features, bool bias);

  // x: [..., K] -> [..., N]
  at::Tensor forward(const at::Tensor& x);

  // float -> fake-quant: s, z from min–max over the current weight (computed in the weight's dtype).
  void to_fake_quant(const QuantSpec& spec);
  // fake-quant (or float: round-to-nearest with min–max) -> packed. Scales are kept in `scale_dtype`.
  void to_packed(c10::ScalarType scale_dtype);
  // Packed mode from given integers (GPTQ baseline, checkpoint load). Shapes are checked against the module.
  void set_packed(const GptqTensors& t, const QuantSpec& spec);
  // Packed mode with empty tensors of the right shapes, to be filled by the checkpoint loader.
  void init_packed(const QuantSpec& spec, c10::ScalarType scale_dtype);
  // Back to float mode with a given weight (e.g. GPTQ's updated weights during calibration).
  void set_float_weight(const at::Tensor& W);

  // Serving only (MergedPackedLinear): qweight, scales and bias become views of columns [n0, n0 + N) of a merged
  // tensor set; qzeros and g_idx stay this module's own. The module computes what it did.
  void view_packed_columns(const GptqTensors& merged, const at::Tensor& merged_bias, int64_t n0);

  // The weight this module effectively multiplies by, [N, K] (dequantized in packed mode, Ŵ in fake-quant).
  at::Tensor effective_weight();
  GptqTensors packed() const { return {qweight, qzeros, scales, g_idx}; }

  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }
  LinearMode mode() const { return mode_; }
  const QuantSpec& spec() const { return spec_; }

  // E2E-QP on the CPU, for models small enough (the trainer decides): while on, the packed training forward and
  // backward read (q − z) and Ŵᵀ from a TrainWeightCache (qmatmul.h) built at the first call, and Ŵᵀ is recomputed
  // at the first call after the step sizes changed (their version counter: once per optimizer step) instead of
  // at every call. Off drops it. The results are the same either way.
  void set_train_cache(bool on);
  bool train_cache_on() const { return train_cache_on_; }
  // The cache for the current step sizes, built or refreshed here (only while on); null where it does not apply.
  std::shared_ptr<const TrainWeightCache> train_cache();

  // Optional tap on the input of every forward (GPTQ collects its Hessian from it).
  std::function<void(const at::Tensor& x)> input_observer;
  // Block-AP's data-parallel step: Ŵ, computed once per step by the trainer for all its threads (a leaf that
  // requires grad, so each thread's backward stops at dL/dŴ). While defined, a fake-quant forward multiplies by it
  // instead of quantizing `weight` itself.
  at::Tensor fake_quant_weight_override;

  at::Tensor weight;  // [N, K] (empty in packed mode)
  at::Tensor bias;    // [N] or undefined
  at::Tensor weight_scale, weight_zero;          // fake-quant: [N, G]
  at::Tensor qweight, qzeros, g_idx, scales;     // packed: GPTQ layout, scales [G, N]

 private:
  at::Tensor set_tensor(const std::string& name, const at::Tensor& value, bool is_buffer);
  at::Tensor packed_weight(c10::ScalarType dtype);

  int64_t in_features_, out_features_;
  LinearMode mode_ = LinearMode::kFloat;
  QuantSpec spec_;
  at::Tensor q_minus_z_;  // packed on CUDA: (q − z) [N, K] float, cached for training scales
  at::Tensor dequant_;    // packed: cached dequantized weight for inference (CPU reference path)
  bool train_cache_on_ = false;
  std::shared_ptr<const TrainWeightCache> train_cache_;  // for the step sizes of train_cache_key_
  std::tuple<const void*, const void*, int64_t> train_cache_key_{nullptr, nullptr, -1};  // impl, data, version
};
TORCH_MODULE(QuantLinear);

// Packed linears that read the same input (a decoder layer's q/k/v, or gate/up) merged along N into one GPTQ tensor
// set, so a decode step runs one fused dequant-GEMV over all their columns instead of one per projection: fewer
// launches and weight streams, and GQA's narrow k/v projections no longer run as kernels too small to fill the GPU
// (vLLM's merged column-parallel linears). Serving only: the parts' qweight, scales and bias become column views
// of the merged tensors (the weights are held once: where the parts' own tensors aliased a checkpoint's mapping and
// nothing else holds them, their pages are dropped after the copy), so their step sizes must not be trained
// afterwards.
class MergedPackedLinear {
 public:
  // Merges when every part is packed with the same bits, group size, in_features, scale dtype and device, g_idx is
  // sequential (no act-order) and all or none have a bias; otherwise returns an undefined merge and leaves the
  // parts untouched.
  static MergedPackedLinear merge(const std::vector<QuantLinear>& parts);
  bool defined() const { return !widths_.empty(); }
  // Whether forward(x) stands in for the parts: merged, and no gradient is wanted through x (the merged path has
  // no autograd; the parts' own forward does).
  bool serves(const at::Tensor& x) const;
  // x [..., K] -> the parts' outputs [..., N_i], in order (views of one [..., ΣN_i] result).
  std::vector<at::Tensor> forward(const at::Tensor& x) const;

 private:
  GptqTensors w_;
  at::Tensor bias_;
  int bits_ = 0;
  int64_t group_size_ = 0;
  std::vector<int64_t> widths_;
};

}  // namespace eqat
