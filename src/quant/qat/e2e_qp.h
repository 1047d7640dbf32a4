// E2E-QP (EFFICIENTQAT.md §4): integers and zero points frozen, only the step sizes (fp32 masters) train, end to
// end through the whole model with the causal-LM loss — on answer tokens only for instruction data (is_answer), on
// every token for text, or (--e2e-loss kd) the KL divergence from the FP model's next-token distributions at the same
// positions. AdamW (wd 0), HF cosine schedule with linear warmup, global-norm clipping, gradient accumulation to a
// global batch. If validation ends worse than where it started (worse_on_validation: the mean up and most samples
// worse), the step sizes go back to Block-AP's. The run state (scales + optimizer moments + step) is checkpointed
// every `save_every` steps so a killed run resumes.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "quant/qat/calib.h"
#include "vision/llava.h"

namespace eqat {

struct E2eOptions {
  // "ce": the paper's cross-entropy with the data's tokens. "kd": distillation, KL(FP ‖ quantized) of the next-token
  // distributions at the same positions, the FP model's taken from `teacher_hidden`.
  std::string loss = "ce";
  // kd: per sample of data.train, then of data.val, the FP model's last hidden states at the sample's loss positions
  // (BlockApResult::teacher_hidden for those samples).
  const std::vector<at::Tensor>* teacher_hidden = nullptr;
  double lr = -1;  // <0: 2e-5 for 2-bit, 1e-5 for 3/4/8-bit (LLaVA recipe: 3e-5 for 2/3-bit, 2e-5 for 4-bit)
  int64_t epochs = 1;
  int64_t micro_batch = 4;
  int64_t global_batch = 32;
  double warmup_ratio = 0.03;
  double max_grad_norm = 0.3;
  int64_t max_steps = -1;  // cap on optimizer steps (<0: epochs decide)
  // Fraction of the steps after which validation is checked once; if it is worse than Block-AP's
  // (worse_on_validation), training stops and Block-AP's step sizes are restored (0: only the end's check). Needs
  // validation samples.
  double early_check = 0.25;
  uint64_t seed = 42;
  std::string state_dir;
  int64_t save_every = 0;  // steps between checkpoints (0: only at the end)
  bool resume = false;
  bool progress = true;
  std::string log_jsonl;
  // Test hook: called with the number of steps done after each step (and its state save, when one is due).
  std::function<void(int64_t steps_done)> on_step;
  // The CPU step by hand (block_grad.h) where it applies: data-parallel training (optim.h), the weight cache, an
  // fp32 model of Llama blocks without biases. false: autograd always (tests compare the two).
  bool by_hand = true;
  // By hand: the most bytes of layer tapes one pass of a step's samples may hold (kE2eHandPassBytes; tests set 0
  // to run the micro-batches one by one).
  int64_t hand_pass_bytes = -1;  // <0: kE2eHandPassBytes
  // Test hook: each step's dL/ds of every packed linear (block_linears' order, layer by layer), before clipping.
  std::function<void(const std::vector<at::Tensor>& grads)> on_gradients;
};

struct E2eResult {
  std::vector<double> step_loss;
  double val_loss_before = 0, val_loss_after = 0;
  double seconds = 0, ms_per_step = 0, peak_rss_mib = 0;
  int64_t steps = 0;
  // Training made validation worse (worse_on_validation), so Block-AP's step sizes were restored.
  bool reverted = false;
  // The early check (E2eOptions::early_check): the step it ran at (-1: it did not run in this call: off, too few
  // steps, or a resumed run already past it) and its validation loss; it stopped training when validation was worse
  // than Block-AP's (then steps == check_step, and reverted).
  int64_t check_step = -1;
  double val_loss_check = 0;
  // The validation samples whose own loss the deciding comparison (the check's when it stopped, else the end's)
  // found higher / lower than Block-AP's (worse_on_validation).
  int64_t val_worse = 0, val_better = 0;
  bool stopped_early = false;
  bool weight_cache = false;  // whether the linears kept a training cache (kE2eWeightCacheBytes)
  bool by_hand = false;       // whether the steps ran by hand (E2eOptions::by_hand)
  int64_t pass_samples = 0;   // by hand: the most samples one pass held (kE2eHandPassBytes)
};

// A validation loss: the mean over all loss positions, and each validation sample's own mean over its positions.
struct ValLoss {
  double mean = 0;
  std::vector<double> per_sample;
};
// Whether step sizes that give `now` did worse on validation than those that gave `before` (Block-AP's), so that
// E2E-QP restores Block-AP's: the mean rose AND more samples got worse than better (worse / better: those counts).
// The mean alone is carried by one or two samples of a small validation set: at W2g64 on the default model it rose
// on 4 of seeds 2-10, and on each the trained step sizes were the lower on 551-566 of the 1000 test questions
// (models/SOURCES.md, issue 18).
bool worse_on_validation(const ValLoss& before, const ValLoss& now, int64_t* worse = nullptr,
                         int64_t* better = nullptr);

// At most this many bytes of decoder inputs (the train and val samples' embeddings) are kept across E2E-QP's steps.
constexpr int64_t kE2eEmbedCacheBytes = int64_t{512} << 20;
// Whether E2E-QP keeps `data`'s embeddings across steps (they fit kE2eEmbedCacheBytes in the model's dtype).
bool e2e_embeds_cached(const Model& m, const CalibSet& data);
// On the CPU, the packed linears keep a training cache (QuantLinearImpl::set_train_cache: (q − z) and Ŵᵀ in fp32,
// 8 bytes per weight) while E2E-QP runs when all of them together take at most this much: a model of up to 32 M
// decoder-linear weights. On the default model (2.6 M) the per-call unpacking, scaling and page dropping it saves
// were about 15 % of a step's profile; a 7B (52 GB) keeps the per-chunk path.
constexpr int64_t kE2eWeightCacheBytes = int64_t{256} << 20;

// E2eOptions::hand_pass_bytes' default. By hand (E2eOptions::by_hand), a step's micro-batches only bound its
// memory: its samples run as one pass of packed rows where all the layers' tapes for them (block_tape_bytes) fit
// this, else in the largest halvings of the batch that fit, down to the micro-batch. On the default model one pass
// instead of eight took 0.78-0.91x the time per step (fewer, larger GEMMs, one barrier per stage instead of eight);
// the sums differ in fp32 order only.
constexpr int64_t kE2eHandPassBytes = int64_t{256} << 20;

// How one step's samples run. The samples (their token counts in `lengths`), longest first, are cut into
// micro-batches of `micro_batch` consecutive ones (the last may hold fewer), so that each micro-batch pads to about
// its own samples' length instead of the longest of a random draw (on the default model's calibration set, such
// padding was 10.5 % of E2E-QP's token slots). The micro-batches are then dealt, longest first, each to the thread
// with the fewest padded tokens so far (lowest index on a tie), so the threads finish together. Any plan sums the
// same samples' losses and gradients; only the fp32 summation order differs.
struct MicroBatchPlan {
  std::vector<std::vector<size_t>> micro;  // per micro-batch: positions into `lengths`
  std::vector<std::vector<size_t>> runs;   // per thread: the micro-batches it runs, in order
};
MicroBatchPlan plan_micro_batches(const std::vector<int64_t>& lengths, int64_t micro_batch, int64_t parts);

E2eResult run_e2e_qp(Model& m, const CalibSet& data, const E2eOptions& opts);

}  // namespace eqat
