// Block-wise quantization of the Llama decoder (the LLaVA decoder's blocks or a plain Llama's), three methods on one
// block loop (EFFICIENTQAT.md §3.3):
//   rtn          min–max scales, round to nearest (Block-AP with 0 epochs).
//   gptq         GPTQ per linear (Hessian from the block's inputs on the quantized stream, dampening 0.01, no
//                act-order, lazy batch updates of 128 columns, group parameters from the updated weights).
//   efficientqat Block-AP: W, s, z and the block's RMSNorm weights trained with AdamW (two groups, per-block
//                cosine to lr/min_lr_factor) to minimise the MSE between the block's output on the quantized stream
//                and the FP block's output on the FP stream.
// Two streams (P1): block b trains on outputs of the already-quantized blocks 0…b−1 against the FP chain's outputs;
// after a block is finalised (weights replaced by their packed values) the quantized stream is advanced.
// On CUDA the block forward runs under fp16 autocast with dynamic loss scaling (fp32 masters; overflowing steps are
// skipped); on the CPU in fp32.
// Run state is checkpointed after every block (atomically) so a killed run resumes; on the CPU with a fixed seed
// and thread count the resumed result is bit-identical to an uninterrupted run.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "quant/qat/calib.h"
#include "quant/quantizer.h"
#include "vision/llava.h"

namespace eqat {

struct BlockApOptions {
  std::string method = "efficientqat";  // efficientqat | rtn | gptq
  QuantSpec spec;
  int64_t epochs = 2;
  int64_t batch_size = 2;  // the paper's; eqat quantize's default: default_block_batch (pipeline.h)
  // <0: 1e-4 (the paper's), or 0 with init "gptq": GPTQ's error compensation leaves every weight exactly on its
  // grid point, where the STE gradient of s and z is exactly zero; Adam normalises that zero (float noise) into
  // full-size steps in random directions (measured on the default model: block MSE up 6x). The step sizes are then
  // left to E2E-QP. With init "gptq-unrounded": 2e-5 per 2 samples of batch (unrounded_lr_scale; measured at batch
  // 2 on both models at W2, models/SOURCES.md: 1e-4 is better on stories260K, 1.62 against 2.14 held-out KL at
  // W2g64, but leaves the default VLM behind GPTQ, 0.00069 against 0.00040 answer KL; 2e-5 meets the issue-18 bars
  // on both).
  double quant_lr = -1;
  // <0: 2e-5 for 2-bit; 3/4/8-bit 1e-5 (the paper's); from gptq-unrounded 2e-5 (2-bit) or 4e-5 (3/4/8-bit) per 2
  // samples of batch (unrounded_lr_scale).
  double weight_lr = -1;
  double min_lr_factor = 20;
  double gptq_damp = 0.01;
  // GPTQ's column order (gptq.h): "natural" or "gar" (group-aware reordering); for --method gptq and the gptq starts.
  std::string gptq_order = "natural";
  // efficientqat: where W, s and z start. "minmax": W as loaded, s and z from each group's min–max (the paper's; the
  // CLI's default). "mse": W as loaded, s and z from each group's clip range with the least weight error
  // (mse_clip_init).
  // "gptq": GPTQ's result on the block's quantized-stream inputs: W = (q − z)·s, so Block-AP starts from GPTQ's
  // integers and trains away from them only where the block's output error falls.
  // "gptq-unrounded": GPTQ's integers, s and z too, but W where GPTQ's error compensation had moved it just before
  // rounding (gptq_unrounded_start): off the grid points, so s and z get a real gradient (quant_lr above).
  std::string init = "minmax";
  // The GEMMs of the hand-written CPU step (block_grad.h), where it runs: "fp32" (the default) or "bf16" (bf16
  // operands, fp32 products and sums: cpu_bf16_gemm.h; needs cpu_bf16_gemm_available()). Measured on the default
  // model at 4096 samples on an AMX CPU (models/SOURCES.md, issue 18): bf16 took 0.74-0.91x fp32's Block-AP time, level
  // on the answer KL within the seeds' noise but the lower on only 49 % of the questions over 11 seed-settings, so
  // fp32 stays the default. Elsewhere (autograd, CUDA) the GEMMs are those of the device and dtype.
  std::string train_gemm = "fp32";
  // E2E-QP's distillation targets (--e2e-loss kd): these samples also ride the FP stream through every block;
  // BlockApResult::teacher_hidden returns the FP model's last hidden states at their loss positions.
  const std::vector<CalibSample>* teacher_samples = nullptr;
  // Return each calibration sample's decoder input (BlockApResult::sample_embeds), as embedded for the streams, so
  // that E2E-QP on the same samples does not run the vision tower again.
  bool keep_sample_embeds = false;
  std::string offload_dir;  // activation caches on disk (bounded RAM) instead of in memory
  std::string state_dir;    // where per-block state goes (resume); empty: no checkpointing
  bool resume = false;
  bool progress = true;
  std::string log_jsonl;    // per-block records appended here
  // Test hook: called after block b is finalised and its state saved (the kill -9 resume test uses it).
  std::function<void(int64_t block)> after_block;
};

// Throws (one line naming --train-gemm) unless `train_gemm` is fp32, or bf16 where cpu_bf16_gemm_available().
void check_train_gemm(const std::string& train_gemm);

struct BlockRecord {
  int64_t block = 0;
  std::vector<double> train_loss;  // per epoch (mean)
  std::vector<double> val_loss;    // per epoch (and [0] for rtn/gptq: the val MSE after quantization)
  double seconds = 0;
  int64_t skipped_steps = 0;  // fp16 steps skipped for non-finite gradients (CUDA)
  double loss_scale = 1;      // the dynamic loss scale at the end of the block (1: no scaling, CPU)
};

// From GPTQ's unrounded start on many short samples, eqat quantize trains Block-AP in batches of 4 (8 at 2 bits) at
// twice (four times) the batch-2 learning rates (the linear scaling rule; default_block_batch in pipeline.h says when
// and why). The default rates scale with the batch up to that size and stop there: larger batches keep its rates,
// because they were not measured with scaled rates (and batches of 8 at four times the rates were measured worse at
// W4).
constexpr int64_t kUnroundedBatch = 4, kUnroundedBatch2Bit = 8;
int64_t unrounded_batch(int bits);  // kUnroundedBatch2Bit at 2 bits, else kUnroundedBatch
// The factor on the gptq-unrounded start's default rates (given per 2 samples): min(batch, unrounded_batch(bits)) / 2.
double unrounded_lr_scale(int64_t batch_size, int bits);

struct BlockApResult {
  std::vector<BlockRecord> blocks;
  double quant_lr = 0, weight_lr = 0;  // the rates that trained (the options' or the defaults)
  std::string train_gemm = "fp32";      // "bf16" when the hand-written step ran on bf16 GEMMs
  double seconds = 0;
  double ms_per_iteration = 0;
  double peak_rss_mib = 0;
  // Per teacher sample: [n_i, C] fp16, the FP model's output of the last decoder block (before the final norm) at
  // the sample's loss positions (loss_positions), in order.
  std::vector<at::Tensor> teacher_hidden;
  // keep_sample_embeds: per sample of calib.train, then of calib.val, its decoder input [T, C] in the model's dtype
  // (embed_samples of that sample alone gives the same values).
  std::vector<at::Tensor> sample_embeds;
};

// Quantizes every decoder block of `m` in place (its linears end in packed mode).
BlockApResult run_block_quantization(Model& m, const CalibSet& calib, const BlockApOptions& opts);

// The decoder's quantizable linears of block `layer` (q, k, v, o, gate, up, down) with their names.
std::vector<std::pair<std::string, QuantLinear>> block_linears(Model& m, int64_t layer);

}  // namespace eqat
