#include "quant/qat/export.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <dirent.h>
#include <nlohmann/json.hpp>

#include <set>

#include "data/error.h"
#include "data/fs.h"
#include "data/safetensors.h"
#include "quant/linear.h"

namespace eqat {

void export_gptq(Model& m, const std::string& out_dir, const ExportOptions& opts) {
  c10::NoGradGuard g;
  EQAT_CHECK(opts.format == "gptq-v2" || opts.format == "gptq-v1", "--format: expected gptq-v2 or gptq-v1, got '",
             opts.format, "'");
  EQAT_CHECK(opts.layout.empty() || opts.layout == "llava-hf" || opts.layout == "transformers",
             "--layout: expected llava-hf or transformers, got '", opts.layout, "'");
  Checkpoint src = Checkpoint::open(m.dir);
  const bool mm = m.multimodal();
  torch::nn::Module& root = mm ? static_cast<torch::nn::Module&>(*m.llava) : static_cast<torch::nn::Module&>(*m.lm);
  // The source's storage dtype for float tensors (fp16 for llava-hf).
  std::map<std::string, c10::ScalarType> src_dtype;
  for (const auto& n : src.names()) src_dtype[n] = dtype_from_safetensors(src.info(n).dtype);

  // Written as a stream: each tensor is made (converted, copied to the CPU) when the writer reaches it, so the
  // export holds one tensor besides the model. The packed integers of Block-AP's finished blocks alias their state
  // files; they are copied and their pages dropped as they are written (they are never modified in place), so
  // exporting a 13B does not bring its 4–7 GB of integers back into RSS at once.
  std::vector<TensorSource> out;
  std::set<std::string> written;
  auto emit = [&](const std::string& key, const at::Tensor& t, c10::ScalarType dtype, bool integers = false) {
    const at::Tensor h = t.detach();
    out.push_back({key, dtype, h.sizes().vec(), [h, dtype, integers] {
                     if (!integers) return h.to(at::kCPU, dtype);
                     at::Tensor c = h.cpu().clone();
                     release_mapped_bytes(h.const_data_ptr(), h.nbytes());
                     return c;
                   }});
    written.insert(key);
  };
  int64_t quantized = 0;
  for (auto& item : root.named_modules("", true)) {
    const std::string prefix = item.key().empty() ? "" : item.key() + ".";
    torch::nn::Module& mod = *item.value();
    auto* lin = dynamic_cast<QuantLinearImpl*>(&mod);
    if (lin && lin->mode() == LinearMode::kPacked) {
      GptqTensors p = lin->packed();
      at::Tensor qz = p.qzeros;
      if (opts.format == "gptq-v1") qz = qzeros_v2_to_v1(qz, lin->spec().bits, lin->out_features(), checkpoint_key(src, prefix + "qzeros", mm));
      emit(checkpoint_key(src, prefix + "qweight", mm), p.qweight, p.qweight.scalar_type(), true);
      emit(checkpoint_key(src, prefix + "qzeros", mm), qz, qz.scalar_type(), true);
      emit(checkpoint_key(src, prefix + "scales", mm), p.scales, at::kHalf);
      emit(checkpoint_key(src, prefix + "g_idx", mm), p.g_idx, p.g_idx.scalar_type(), true);
      if (lin->bias.defined()) emit(checkpoint_key(src, prefix + "bias", mm), lin->bias, at::kHalf);
      written.insert(checkpoint_key(src, prefix + "weight", mm));  // replaced, not copied below
      ++quantized;
      continue;
    }
    for (auto& p : mod.named_parameters(false)) {
      if (p.value().numel() == 0) continue;
      const std::string key = checkpoint_key(src, prefix + p.key(), mm);
      auto it = src_dtype.find(key);
      emit(key, p.value(), it != src_dtype.end() ? it->second : at::kHalf);
    }
  }
  EQAT_CHECK(quantized > 0, m.dir, ": the model has no quantized linears to export");
  for (const auto& n : src.names())  // anything the modules do not own (e.g. position_ids buffers)
    if (!written.count(n)) out.push_back({n, src_dtype[n], src.info(n).shape, [src, n] { return src.get(n).clone(); }});
  if (mm && !opts.layout.empty()) {  // keys so far are in the source's layout
    const CheckpointLayout target =
        opts.layout == "transformers" ? CheckpointLayout::kTransformers : CheckpointLayout::kLlavaHf;
    for (auto& t : out) t.name = relayout_key(t.name, target);
  }

  nlohmann::json cfg = nlohmann::json::parse(read_file(path_join(m.dir, "config.json")));
  cfg["quantization_config"] = {{"quant_method", "gptq"},
                                {"bits", opts.spec.bits},
                                {"group_size", opts.spec.group_size},
                                {"sym", false},
                                {"desc_act", false},
                                {"checkpoint_format", opts.format == "gptq-v2" ? "gptq_v2" : "gptq"},
                                {"pack_dtype", "int32"},
                                {"lm_head", false},
                                {"meta", {{"quantizer", "eqat"}, {"method", opts.method}}}};
  write_dir_atomic(out_dir, OutputKind::kModel, [&](const std::string& tmp) {
    write_checkpoint_streamed(tmp, out);
    write_file_atomic(path_join(tmp, "config.json"), cfg.dump(2));
    // Tokenizer, processor and generation files travel unchanged.
    if (DIR* d = ::opendir(m.dir.c_str())) {
      while (dirent* e = ::readdir(d)) {
        const std::string name = e->d_name;
        if (name == "." || name == ".." || name == "config.json" || name.find(".safetensors") != std::string::npos ||
            name.rfind(".eqat-", 0) == 0 ||  // the source's output marker and lock are its own
            is_directory(path_join(m.dir, name)))
          continue;
        write_file_atomic(path_join(tmp, name), read_file(path_join(m.dir, name)));
      }
      ::closedir(d);
    }
    if (opts.extra_files) opts.extra_files(tmp);
  });
}

}  // namespace eqat
