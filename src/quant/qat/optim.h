// AdamW (decoupled weight decay, torch.optim.AdamW semantics) over explicit parameter groups, with state that can
// be saved and restored bit-exactly (resume), and the learning-rate schedules EfficientQAT uses.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <vector>

namespace eqat {

struct ParamGroup {
  std::string name;
  std::vector<at::Tensor> params;
  double lr = 1e-3;
  double weight_decay = 0.0;
};

class AdamW {
 public:
  AdamW(std::vector<ParamGroup> groups, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8);
  void zero_grad();
  void step();  // parameters without a gradient are skipped
  std::vector<ParamGroup>& groups() { return groups_; }
  int64_t steps() const { return step_; }
  // State as named tensors ("<group>.<i>.exp_avg", …, "step") for safetensors, and back.
  std::vector<std::pair<std::string, at::Tensor>> state() const;
  void load_state(const std::map<std::string, at::Tensor>& state);

 private:
  std::vector<ParamGroup> groups_;
  std::vector<std::vector<at::Tensor>> exp_avg_, exp_avg_sq_;
  double beta1_, beta2_, eps_;
  int64_t step_ = 0;
};

// Cosine from lr to lr/min_factor over `total` steps (Block-AP, per block, no warmup).
double cosine_lr(double lr, double min_factor, int64_t step, int64_t total);
// Linear warmup over ceil(warmup_ratio·total) steps, then cosine to 0 (HF get_cosine_schedule_with_warmup; E2E-QP).
double warmup_cosine_lr(double lr, double warmup_ratio, int64_t step, int64_t total);

// Global L2 norm of the gradients; scales them down to max_norm when above (torch clip_grad_norm_). Returns the
// norm before clipping.
double clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm);

}  // namespace eqat
