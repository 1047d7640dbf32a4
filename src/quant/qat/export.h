// Export of a quantized model as an HF-style GPTQ directory (KERNELS.md §3): config.json gains
// quantization_config {quant_method "gptq", bits, group_size, sym false, desc_act false, checkpoint_format
// "gptq_v2" | "gptq"}; each quantized linear is stored as qweight/qzeros/scales(fp16)/g_idx under its checkpoint
// name; every other tensor comes from the model (trained RMSNorm gains included) in the source's layout and dtype;
// tokenizer and processor files are copied. The directory is written atomically.
#pragma once

#include <functional>
#include <string>

#include "quant/quantizer.h"
#include "vision/llava.h"

namespace eqat {

struct ExportOptions {
  std::string format = "gptq-v2";  // gptq-v2 (true zero points) | gptq-v1 (legacy; every zero point must be >= 1)
  QuantSpec spec;
  std::string method;  // recorded in quantization_config.meta
  // LLaVA key layout of the export: "" (the source's), "llava-hf" (language_model.model.*) or "transformers"
  // (model.language_model.*, what GPTQModel and current transformers expect). Plain Llama keys are the same in both.
  std::string layout;
  // Called with the temp directory after the checkpoint is written, before it is renamed into place: files that
  // must appear together with the checkpoint (the run's log, plots, summary).
  std::function<void(const std::string& tmp_dir)> extra_files;
};

void export_gptq(Model& m, const std::string& out_dir, const ExportOptions& opts);

}  // namespace eqat
