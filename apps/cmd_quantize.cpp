// eqat quantize: EfficientQAT (Block-AP then E2E-QP), RTN and GPTQ baselines, GPTQ-v2 export.
#include <cstdint>
#include <iostream>

#include "args.h"
#include "commands.h"
#include "data/error.h"
#include "quant/qat/pipeline.h"

namespace eqat {

int cmd_quantize(const Argv& argv);
namespace {
const bool kRegistered =
    register_command("quantize", cmd_quantize, "quantize a model: EfficientQAT, RTN or GPTQ; GPTQ-v2 export");

}  // namespace

int cmd_quantize(const Argv& argv) {
  CommandSpec spec{
      "quantize", "eqat quantize [--model DIR] --out DIR --bits B --group-size G [--method M] [--calib FILE] [...]",
      "Quantizes the decoder blocks' linears (q,k,v,o,gate,up,down) and writes a GPTQ-v2 checkpoint.\n"
      "Methods: efficientqat (Block-AP, then E2E-QP), rtn, gptq. Data: LLaVA instruction JSON (*.json, with images)\n"
      "or text (*.txt, *.jsonl with \"text\").",
      {{"model", "DIR", "source model (default: the embedded default model)", ""},
       {"out", "DIR", "output directory (written atomically)", ""},
       {"bits", "B", "weight bits: 2, 3, 4 or 8", "4"},
       {"group-size", "G", "group size along in_features (-1 = per channel)", "128"},
       {"group-size-fallback", "MODE",
        "when G does not divide a layer: ragged (a shorter last group, GPTQ g_idx) or per-channel (the whole model)",
        "ragged"},
       {"method", "M", "efficientqat | rtn | gptq", "efficientqat"},
       {"phases", "P", "efficientqat phases: both | block-ap | e2e-qp (e2e-qp needs a quantized --model)", "both"},
       {"calib", "FILE", "Block-AP / GPTQ calibration data (instruction .json or text .txt/.jsonl; a LLaVA model defaults to its shapes world)", ""},
       {"calib-images", "DIR", "image folder for --calib (default: the JSON's folder)", ""},
       {"train-data", "FILE", "E2E-QP training data (default: --calib)", ""},
       {"train-images", "DIR", "image folder for --train-data", ""},
       {"samples", "N", "calibration samples", "4096"},
       {"val-samples", "N", "validation samples", "64"},
       {"seq-len", "L", "max tokens per sample (text windows are exactly L)", "2048"},
       {"batch-size", "N", "Block-AP batch size in samples, or auto: for efficientqat at 2 and 3 bits on short "
                           "samples, enough for about 256 tokens (at most 16), else 2 (faster on ~35-token samples, "
                           "but not always as close to the FP model: models/SOURCES.md) (default: 4, or 8 at 2 bits, "
                           "from the default gptq-unrounded start, whose learning rates scale with the batch up to "
                           "that, when the samples are short (under 128 tokens on average) and at least 4096 (1024 "
                           "at 3 bits); else 2, the paper's)",
        ""},
       {"epochs", "N", "Block-AP epochs per block", "2"},
       {"quant-lr", "LR", "Block-AP lr of step sizes and zero points (default 1e-4; 0 with --init gptq, whose weights "
                          "sit on their grid points where s and z get no gradient; with --init gptq-unrounded 1e-5 "
                          "per sample of --batch-size up to 4 (8 at 2 bits): 2e-5 at batch 2, 4e-5 at 4, 8e-5 at "
                          "8)", ""},
       {"weight-lr", "LR", "Block-AP lr of weights and norms (default 2e-5 at 2 bits, else 1e-5; with --init "
                           "gptq-unrounded 1e-5 (2 bits) or 2e-5 (3/4/8 bits) per sample of --batch-size up to 4 (8 "
                           "at 2 bits): 2e-5 / 4e-5 at batch 2, 4e-5 / 8e-5 at 4, 8e-5 at 8 (2 bits))", ""},
       {"min-lr-factor", "F", "cosine decays to lr/F per block", "20"},
       {"init", "I", "Block-AP's start: minmax (W as loaded, s and z from min-max: the paper's) | mse (W as loaded, "
                     "each group's clip range searched for the least weight error) | gptq (GPTQ's integers on the "
                     "block's inputs; s and z then train only in E2E-QP) | gptq-unrounded (GPTQ's integers, s and z, "
                     "with W where GPTQ's error compensation left it before rounding: s and z train; the "
                     "default)", ""},
       {"gptq-order", "O", "GPTQ's column order (--method gptq and the gptq starts): natural (left to right) | gar "
                           "(group-aware reordering, GPTQModel's default: the most sensitive inputs first, each "
                           "group's columns kept together so g_idx stays sequential)", "natural"},
       {"train-gemm", "G", "Block-AP's GEMMs in the CPU's hand-written step (small models): fp32 | bf16 (bf16 operands, "
                           "fp32 products and sums; needs AVX512-BF16 or AMX: on an AMX CPU 0.74-0.91x the Block-AP "
                           "time, near fp32's fidelity but not level: models/SOURCES.md)", "fp32"},
       {"seed", "S", "data sampling seed", "2"},
       {"e2e-loss", "L", "E2E-QP objective: ce (cross-entropy on the data's answer tokens: the paper's) | kd (KL "
                          "divergence from the FP model's next-token distributions at the same positions) (default: "
                          "kd when its targets take at most 2 GiB, else ce)", ""},
       {"e2e-lr", "LR", "E2E-QP lr of the step sizes (default 2e-5 at 2 bits, else 1e-5; 1e-4 when distilling at 2 "
                        "bits)", ""},
       {"e2e-epochs", "N", "E2E-QP epochs (default 1; 4 when distilling at 2 bits)", ""},
       {"e2e-batch", "N", "E2E-QP global batch (gradient accumulation over micro-batches)", "32"},
       {"e2e-micro-batch", "N", "E2E-QP micro-batch, a memory bound (small fp32 models on the CPU run a step's "
                                "samples in one pass where that takes at most 256 MiB)", "4"},
       {"e2e-samples", "N", "E2E-QP training samples (default: --samples)", ""},
       {"e2e-steps", "N", "cap on E2E-QP optimizer steps", ""},
       {"e2e-early-check", "F", "after this fraction of E2E-QP's steps, stop and keep Block-AP's step sizes if "
                                "validation is worse than Block-AP's: mean up and most samples worse (0: judge at the "
                                "end only)", "0.25"},
       {"warmup-ratio", "R", "E2E-QP linear warmup fraction", "0.03"},
       {"max-grad-norm", "X", "E2E-QP gradient clipping", "0.3"},
       {"e2e-save-every", "N", "E2E-QP checkpoint interval in steps", "10"},
       {"offload-dir", "DIR", "keep Block-AP activation caches on disk (bounded RAM)", ""},
       {"resume", "", "continue an interrupted run (state in OUT.eqat-state/; the settings must be the same)", ""},
       {"overwrite", "", kOverwriteHelp, ""},
       {"format", "F",
        "gptq-v2 (true zero points) | gptq-v1 (zero points limited to [1, 2^B-1], stored as zero - 1; GPTQModel "
        "refuses asymmetric v1 files it did not write itself, transformers loads them)",
        "gptq-v2"},
       {"layout", "L", "LLaVA checkpoint keys: llava-hf (language_model.model.*) | transformers (model.language_model.*, "
                       "what GPTQModel and current transformers read) (default: the source model's)", ""},
       {"device", "DEV", "cpu | cuda[:N]", "cpu"},
       {"dtype", "T", "auto | float32 | bfloat16 | float16", "auto"},
       {"threads", "N", "CPU threads (0 = LibTorch's default; at most the machine's cores)", "0"},
       {"no-progress", "", "no progress bars", ""}},
      0, 0};
  ParsedArgs a = parse_args(spec, argv);
  QuantizeOptions o;
  o.out = a.require("out");
  o.overwrite = a.flag("overwrite");
  o.resume = a.flag("resume");
  o.progress = !a.flag("no-progress");
  o.method = a.str("method");
  o.phases = a.str("phases");
  o.spec.bits = static_cast<int>(a.i64("bits", 2, 8));
  o.spec.group_size = a.i64("group-size", -1, 1 << 20);
  o.group_size_fallback = a.str("group-size-fallback");
  o.format = a.str("format");
  o.layout = a.str("layout");
  o.calib = a.str("calib");
  o.calib_images = a.str("calib-images");
  o.train_data = a.str("train-data");
  o.train_images = a.str("train-images");
  o.calib_opts.n_train = a.i64("samples", 1, kMaxSamples);
  o.calib_opts.n_val = a.i64("val-samples", 0, kMaxSamples);
  o.calib_opts.seq_len = a.i64("seq-len", 2, kMaxSeqLen);
  o.calib_opts.seed = static_cast<uint64_t>(a.i64("seed", 0, INT64_MAX));
  if (a.has("e2e-samples")) o.e2e_samples = a.i64("e2e-samples", 1, kMaxSamples);
  o.block.epochs = a.i64("epochs", 0, kMaxEpochs);
  if (a.has("batch-size"))  // 0: auto_block_batch; not given: default_block_batch (-1)
    o.block.batch_size = a.str("batch-size") == "auto" ? 0 : a.i64("batch-size", 1, kMaxBatch);
  if (a.has("quant-lr")) o.block.quant_lr = a.f64("quant-lr", 0, 1);
  if (a.has("weight-lr")) o.block.weight_lr = a.f64("weight-lr", 0, 1);
  o.block.min_lr_factor = a.f64("min-lr-factor", 1, 1e6);
  o.block.offload_dir = a.str("offload-dir");
  o.block.init = a.str("init");
  o.block.gptq_order = a.str("gptq-order");
  o.block.train_gemm = a.str("train-gemm");
  o.e2e_loss = a.str("e2e-loss");
  if (a.has("e2e-lr")) o.e2e.lr = a.f64("e2e-lr", 0, 1);
  if (a.has("e2e-epochs")) o.e2e.epochs = a.i64("e2e-epochs", 0, kMaxEpochs);
  o.e2e.global_batch = a.i64("e2e-batch", 1, kMaxBatch);
  o.e2e.micro_batch = a.i64("e2e-micro-batch", 1, kMaxBatch);
  if (a.has("e2e-steps")) o.e2e.max_steps = a.i64("e2e-steps", 1, INT64_MAX);
  o.e2e.early_check = a.f64("e2e-early-check", 0, 1);
  o.e2e.warmup_ratio = a.f64("warmup-ratio", 0, 1);
  o.e2e.max_grad_norm = a.f64("max-grad-norm", 1e-12, 1e12);
  o.e2e.save_every = a.i64("e2e-save-every", 0, INT64_MAX);
  o.device = a.str("device");
  o.dtype = a.str("dtype");
  o.threads = a.threads();
  validate_quantize_flags(o);  // before the default model is looked up: flag errors first
  o.model_dir = resolve_model_dir(a.str("model"), "quantize");
  const nlohmann::json summary = run_quantize(o);
  std::cerr << "wrote " << o.out << ": " << summary.dump() << std::endl;
  return 0;
}

}  // namespace eqat
