// AdamW (decoupled weight decay, torch.optim.AdamW semantics) over explicit parameter groups, with state that can
// be saved and restored bit-exactly (resume), and the learning-rate schedules EfficientQAT uses.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace eqat {

struct Model;  // vision/llava.h

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

// Data-parallel training on the CPU (Block-AP's batches, E2E-QP's micro-batches), for models whose decoder blocks
// hold at most 64 MiB of fp32 parameters, when LibTorch has more than one thread. Such blocks' ops are too small to
// share: a default-model batch's GEMMs take 0.68–1.04× their one-thread time at two threads (0.49–0.50× for
// [1100, 256] × [256, 512]; bench/train_gemm_shapes.py), LibTorch runs elementwise ops of [70, 256] on one thread,
// and the default quantize took 0.97× its one-thread time at two. Each extra thread's gradients cost one more copy
// of the trained parameters, which stays small below the bound. A 7B block (0.8 GB) keeps the threaded ops. Where
// the hand-written step applies (block_grad.h: Block-AP's whole step, E2E-QP's layers), each stage is shared by the
// threads instead of each sample, and no per-thread gradient copies are made.
bool data_parallel_training(const Model& m);
// Runs fn(i) for i in [0, n) on LibTorch's intra-op threads, each thread a contiguous range in order; with one
// thread, inline. The workers take the caller's grad mode, exact-activation scope and dispatch keys (all thread-local;
// the hand-written training steps dispatch below autograd, block_grad.cpp); the LibTorch ops inside them run on their
// own thread (OpenMP does not nest).
void parallel_items(int64_t n, const std::function<void(int64_t)>& fn);

// While alive (and `on`), glibc keeps freed memory in the heap: trim threshold 1 GiB, mmap threshold at its largest
// (32 MiB); then the trim threshold returns to 64 MiB (twice that, where glibc's dynamic rule ends) and the heap is
// trimmed. For the small models' training on the CPU, whose every step allocates and frees the same tapes and
// temporaries: with the dynamic thresholds the freed top of the heap went back to the kernel at a step's end, and
// the next step faulted its pages in again, zeroed. Measured on the default model (models/SOURCES.md): an E2E-QP
// epoch by hand spent 1.4 s in the kernel against 2.3 s and took 0.93x the wall time; Block-AP alone at 512
// samples, 0.94x (0.76-1.02).
// Nested scopes: the outermost one sets and restores. The main thread's; a no-op without glibc.
class KeepFreedMemory {
 public:
  explicit KeepFreedMemory(bool on);
  ~KeepFreedMemory();
  KeepFreedMemory(const KeepFreedMemory&) = delete;
  KeepFreedMemory& operator=(const KeepFreedMemory&) = delete;

 private:
  bool on_;
};

// Cosine from lr to lr/min_factor over `total` steps (Block-AP, per block, no warmup).
double cosine_lr(double lr, double min_factor, int64_t step, int64_t total);
// Linear warmup over ceil(warmup_ratio·total) steps, then cosine to 0 (HF get_cosine_schedule_with_warmup; E2E-QP).
double warmup_cosine_lr(double lr, double warmup_ratio, int64_t step, int64_t total);

// Global L2 norm of the gradients; scales them down to max_norm when above (torch clip_grad_norm_). Returns the
// norm before clipping.
double clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm);

// Dynamic loss scaling for fp16 autocast training (torch.cuda.amp.GradScaler semantics, EFFICIENTQAT.md P8): the
// loss is multiplied by the scale before backward; unscale_and_check() divides the gradients back and reports
// whether they are all finite. A non-finite step is skipped by the caller and halves the scale; every
// `growth_interval` finite steps in a row double it. Disabled: scale 1, gradients untouched, always true.
class LossScaler {
 public:
  explicit LossScaler(bool enabled, double init_scale = 65536.0, double growth = 2.0, double backoff = 0.5,
                      int64_t growth_interval = 2000);
  at::Tensor scale(const at::Tensor& loss) const;
  bool unscale_and_check(const std::vector<at::Tensor>& params);
  double value() const { return scale_; }
  int64_t skipped() const { return skipped_; }
  bool enabled() const { return enabled_; }

 private:
  bool enabled_;
  double scale_, growth_, backoff_;
  int64_t growth_interval_, good_ = 0, skipped_ = 0;
};

// RAII autocast region on CUDA (matmuls in `dtype`, reductions in fp32); a no-op when !enabled or on the CPU.
// Leaving the outermost region clears the autocast weight-cast cache, as torch's context manager does.
class AutocastGuard {
 public:
  AutocastGuard(c10::Device device, c10::ScalarType dtype, bool enabled);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool active_ = false, was_enabled_ = false;
  c10::ScalarType prev_dtype_ = c10::ScalarType::Half;
};

}  // namespace eqat
