#include "quant/qat/pipeline.h"

#include <ATen/Parallel.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "data/config.h"
#include "data/cpu.h"
#include "data/error.h"
#include "data/fs.h"
#include "data/memory.h"
#include "data/output.h"
#include "data/plot.h"
#include "data/shapes.h"
#include "quant/cpu_qgemv.h"
#include "quant/pack.h"
#include "quant/qat/export.h"
#include "quant/qat/progress.h"

namespace eqat {
namespace {

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

CalibSet load_data(const Model& m, const std::string& file, const std::string& images, const CalibOptions& co) {
  if (ends_with(file, ".json")) return load_instruction_data(m, file, images, co);
  return load_text_data(m, file, co);
}

// E2E-QP's samples that are Block-AP's calibration samples (same tokens, answer mask and image, at the same index:
// the default, both drawn from one file) take the embeddings Block-AP computed for its streams.
void hand_over_embeds(const CalibSet& calib, std::vector<at::Tensor>& embeds, CalibSet& e2e) {
  if (embeds.size() != calib.train.size() + calib.val.size()) return;
  auto take = [&](const std::vector<CalibSample>& from, size_t offset, std::vector<CalibSample>& to) {
    for (size_t i = 0; i < std::min(from.size(), to.size()); ++i)
      if (same_sample(from[i], to[i])) to[i].embeds = std::move(embeds[offset + i]);
  };
  take(calib.train, 0, e2e.train);
  take(calib.val, calib.train.size(), e2e.val);
  embeds.clear();
}

int64_t dir_bytes(const std::string& dir) {
  int64_t n = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.is_regular_file()) n += static_cast<int64_t>(e.file_size());
  return n;
}

// A data file: a readable regular file with a known extension.
void check_data_file(const std::string& path, const std::string& flag) {
  if (path.empty()) return;
  try {
    check_regular_file(path);
  } catch (const InputError& e) {
    throw_input_error(str_cat(flag, ": ", e.what()));
  }
  EQAT_CHECK(ends_with(path, ".json") || ends_with(path, ".jsonl") || ends_with(path, ".txt"), flag, ": ", path,
             ": expected LLaVA instruction .json, or text .txt / .jsonl");
  EQAT_CHECK(::access(path.c_str(), R_OK) == 0, flag, ": ", path, ": cannot open for reading");
}

void check_dir(const std::string& path, const std::string& flag) {
  if (path.empty()) return;
  EQAT_CHECK(is_directory(path), flag, ": ", path, ": not a directory");
}

// Size, mtime and canonical path of a file: what identifies an input in the saved settings (hashing a 1-GB
// instruction JSON on every resume would cost more than it protects).
nlohmann::json file_identity(const std::string& path) {
  if (path.empty()) return nullptr;
  std::error_code ec;
  const std::string canon = std::filesystem::weakly_canonical(path, ec).string();
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return canon;
  return {{"path", canon}, {"bytes", static_cast<int64_t>(st.st_size)},
          {"mtime_ns", static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec}};
}

// A group size that does not divide a quantized layer's in_features (q,k,v,gate,up: hidden; o: heads × head_dim;
// down: intermediate) gives that layer a ragged last group, or switches the model to per-channel. Checked on the
// config, before the weights load.
void check_group_size(QuantizeOptions& o, const ModelConfig& cfg) {
  const LlamaConfig& t = cfg.text;
  const std::pair<const char*, int64_t> layers[] = {{"q/k/v/gate/up_proj", t.hidden_size},
                                                    {"o_proj", t.num_attention_heads * t.head_dim},
                                                    {"down_proj", t.intermediate_size}};
  for (const auto& [name, k] : layers) {
    if (o.spec.group_size <= 0 || k % o.spec.group_size == 0) continue;
    if (o.group_size_fallback == "ragged") {
      if (o.progress)
        std::fprintf(stderr, "note: group size %lld does not divide %s.in_features = %lld; its last group has %lld columns\n",
                     static_cast<long long>(o.spec.group_size), name, static_cast<long long>(k),
                     static_cast<long long>(k % o.spec.group_size));
      continue;
    }
    std::fprintf(stderr, "warning: group size %lld does not divide %s (%lld); using per-channel\n",
                 static_cast<long long>(o.spec.group_size), name, static_cast<long long>(k));
    o.spec.group_size = -1;
  }
}

// Block-AP caches every sample's block input twice (the FP and the quantized stream), fp16, each batch padded to
// its longest sample, and the distillation samples (--e2e-loss kd) once more on the FP stream: refuse up front what
// neither memory nor the offload directory's disk can hold.
void check_activation_caches_fit(const QuantizeOptions& o, const CalibSet& calib, int64_t hidden,
                                 const std::vector<CalibSample>& teacher) {
  int64_t positions = 0;
  for (const auto* set : {&calib.train, &calib.val, &teacher})
    for (size_t i = 0; i < set->size(); i += static_cast<size_t>(o.block.batch_size)) {
      const size_t end = std::min(set->size(), i + static_cast<size_t>(o.block.batch_size));
      size_t longest = 0;
      for (size_t k = i; k < end; ++k) longest = std::max(longest, (*set)[k].ids.size());
      const int64_t streams = set == &teacher ? 1 : 2;
      positions = add_sat(positions, mul_sat(static_cast<int64_t>(longest), static_cast<int64_t>(end - i) * streams));
    }
  const int64_t bytes = mul_sat(mul_sat(positions, hidden), 2 /*fp16*/);
  const std::string what =
      str_cat("Block-AP's activation caches (", calib.train.size() + calib.val.size(), " samples x 2 streams",
              teacher.empty() ? "" : str_cat(" + ", teacher.size(), " distillation samples"), " x hidden ", hidden,
              ", fp16)");
  if (o.block.offload_dir.empty()) {
    check_memory_fits(bytes, what, "pass --offload-dir DIR to keep them on disk, or fewer --samples / --seq-len");
    return;
  }
  struct statvfs vfs;
  if (::statvfs(o.block.offload_dir.c_str(), &vfs) != 0) return;
  const int64_t free_bytes = mul_sat(static_cast<int64_t>(vfs.f_bavail), static_cast<int64_t>(vfs.f_frsize));
  EQAT_CHECK(bytes <= free_bytes, "--offload-dir ", o.block.offload_dir, ": ", what, " need about ",
             format_bytes(static_cast<double>(bytes)), " of disk, only ", format_bytes(static_cast<double>(free_bytes)),
             " is free; use fewer --samples / --seq-len or another disk");
}

bool is_finite_nonneg(double x) { return std::isfinite(x) && x >= 0; }

}  // namespace

void validate_quantize_flags(const QuantizeOptions& o) {
  EQAT_CHECK(o.method == "efficientqat" || o.method == "rtn" || o.method == "gptq", "--method: unknown '", o.method,
             "' (efficientqat, rtn or gptq)");
  EQAT_CHECK(o.phases == "both" || o.phases == "block-ap" || o.phases == "e2e-qp", "--phases: unknown '", o.phases,
             "' (both, block-ap or e2e-qp)");
  EQAT_CHECK(o.phases == "both" || o.method == "efficientqat", "--phases ", o.phases,
             ": only --method efficientqat has phases");
  EQAT_CHECK(packable_bits(o.spec.bits), "--bits must be 2, 3, 4 or 8, got ", o.spec.bits);
  EQAT_CHECK(o.spec.group_size == -1 || (o.spec.group_size > 0 && o.spec.group_size <= (1 << 20)),
             "--group-size must be in [1, 1048576] or -1, got ", o.spec.group_size);
  EQAT_CHECK(o.format == "gptq-v2" || o.format == "gptq-v1", "--format: expected gptq-v2 or gptq-v1, got '", o.format,
             "'");
  EQAT_CHECK(o.group_size_fallback == "ragged" || o.group_size_fallback == "per-channel",
             "--group-size-fallback: expected ragged or per-channel, got '", o.group_size_fallback, "'");
  EQAT_CHECK(o.layout.empty() || o.layout == "llava-hf" || o.layout == "transformers",
             "--layout: expected llava-hf or transformers, got '", o.layout, "'");
  const CalibOptions& c = o.calib_opts;
  EQAT_CHECK(c.n_train >= 1 && c.n_train <= kMaxSamples, "--samples must be in [1, ", kMaxSamples, "], got ",
             c.n_train);
  EQAT_CHECK(c.n_val >= 0 && c.n_val <= kMaxSamples, "--val-samples must be in [0, ", kMaxSamples, "], got ", c.n_val);
  EQAT_CHECK(c.seq_len >= 2 && c.seq_len <= kMaxSeqLen, "--seq-len must be in [2, ", kMaxSeqLen, "], got ", c.seq_len);
  EQAT_CHECK(o.e2e_samples < 0 || (o.e2e_samples >= 1 && o.e2e_samples <= kMaxSamples), "--e2e-samples must be in [1, ",
             kMaxSamples, "], got ", o.e2e_samples);
  const BlockApOptions& b = o.block;
  EQAT_CHECK(b.init.empty() || b.init == "minmax" || b.init == "mse" || b.init == "gptq" || b.init == "gptq-unrounded",
             "--init: expected minmax, mse, gptq or gptq-unrounded, got '", b.init, "'");
  EQAT_CHECK(b.init.empty() || b.init == "minmax" || o.method == "efficientqat", "--init ", b.init,
             ": only --method efficientqat trains from a starting point");
  EQAT_CHECK(b.gptq_order == "natural" || b.gptq_order == "gar", "--gptq-order: expected natural or gar, got '",
             b.gptq_order, "'");
  check_train_gemm(b.train_gemm);
  EQAT_CHECK(b.epochs >= 0 && b.epochs <= kMaxEpochs, "--epochs must be in [0, ", kMaxEpochs, "], got ", b.epochs);
  EQAT_CHECK(b.batch_size >= -1 && b.batch_size <= kMaxBatch, "--batch-size must be in [1, ", kMaxBatch,
             "] or auto (0), got ", b.batch_size);
  EQAT_CHECK(b.quant_lr == -1 || is_finite_nonneg(b.quant_lr), "--quant-lr must be a finite number >= 0, got ",
             b.quant_lr);
  EQAT_CHECK(b.weight_lr < 0 || std::isfinite(b.weight_lr), "--weight-lr must be finite, got ", b.weight_lr);
  EQAT_CHECK(std::isfinite(b.min_lr_factor) && b.min_lr_factor >= 1, "--min-lr-factor must be >= 1, got ",
             b.min_lr_factor);
  const E2eOptions& e = o.e2e;
  EQAT_CHECK(e.lr < 0 || std::isfinite(e.lr), "--e2e-lr must be finite, got ", e.lr);
  EQAT_CHECK(o.e2e_loss.empty() || o.e2e_loss == "ce" || o.e2e_loss == "kd", "--e2e-loss: expected ce or kd, got '",
             o.e2e_loss, "'");
  EQAT_CHECK(o.e2e_loss != "kd" || o.phases == "both", "--e2e-loss kd with --phases ", o.phases,
             ": the FP model's outputs come from Block-AP's FP stream, so kd needs --phases both");
  EQAT_CHECK(e.epochs == -1 || (e.epochs >= 0 && e.epochs <= kMaxEpochs), "--e2e-epochs must be in [0, ", kMaxEpochs,
             "], got ", e.epochs);
  EQAT_CHECK(e.micro_batch >= 1 && e.micro_batch <= kMaxBatch, "--e2e-micro-batch must be in [1, ", kMaxBatch,
             "], got ", e.micro_batch);
  EQAT_CHECK(e.global_batch >= e.micro_batch && e.global_batch <= kMaxBatch && e.global_batch % e.micro_batch == 0,
             "--e2e-batch must be a multiple of --e2e-micro-batch (", e.micro_batch, ") up to ", kMaxBatch, ", got ",
             e.global_batch);
  EQAT_CHECK(e.max_steps == -1 || e.max_steps >= 1, "--e2e-steps must be >= 1, got ", e.max_steps);
  EQAT_CHECK(std::isfinite(e.warmup_ratio) && e.warmup_ratio >= 0 && e.warmup_ratio <= 1,
             "--warmup-ratio must be in [0, 1], got ", e.warmup_ratio);
  EQAT_CHECK(std::isfinite(e.max_grad_norm) && e.max_grad_norm > 0, "--max-grad-norm must be > 0, got ",
             e.max_grad_norm);
  EQAT_CHECK(e.save_every >= 0, "--e2e-save-every must be >= 0, got ", e.save_every);
  EQAT_CHECK(o.threads >= 0, "--threads must be >= 0, got ", o.threads);
}

namespace {
constexpr int64_t kPaperBatch = 2;  // Block-AP's batch in the paper

double mean_sample_tokens(const std::vector<CalibSample>& train) {
  int64_t tokens = 0;
  for (const auto& smp : train) tokens = add_sat(tokens, static_cast<int64_t>(smp.ids.size()));
  return train.empty() ? 0.0 : static_cast<double>(tokens) / static_cast<double>(train.size());
}
}  // namespace

int64_t default_block_batch(const std::string& method, const std::string& init, int bits,
                            const std::vector<CalibSample>& train) {
  if (method != "efficientqat" || init != "gptq-unrounded") return kPaperBatch;
  const bool short_samples = kPaperBatch * mean_sample_tokens(train) < static_cast<double>(kAutoBatchTokens);
  const bool many = static_cast<int64_t>(train.size()) >= unrounded_min_samples(bits);
  return short_samples && many ? unrounded_batch(bits) : kPaperBatch;
}

int64_t auto_block_batch(const std::string& method, int bits, const std::vector<CalibSample>& train) {
  if (method != "efficientqat" || bits >= 4 || train.empty()) return kPaperBatch;
  const double mean = mean_sample_tokens(train);
  const auto want = static_cast<int64_t>(std::ceil(static_cast<double>(kAutoBatchTokens) / std::max(1.0, mean)));
  return std::clamp<int64_t>(want, kPaperBatch, kAutoBatchMax);
}

nlohmann::json quantize_settings(const QuantizeOptions& o) {
  const bool e2e = o.method == "efficientqat" && o.phases != "block-ap";
  nlohmann::json s = {
      {"--model", file_identity(path_join(o.model_dir, "config.json"))},
      {"--method", o.method},
      {"--phases", o.phases},
      {"--bits", o.spec.bits},
      {"--group-size", o.spec.group_size},
      {"--group-size-fallback", o.group_size_fallback},
      {"--format", o.format},
      {"--calib", file_identity(o.calib)},
      {"--calib-images", o.calib_images},
      {"--samples", o.calib_opts.n_train},
      {"--val-samples", o.calib_opts.n_val},
      {"--seq-len", o.calib_opts.seq_len},
      {"--seed", o.calib_opts.seed},
      {"--epochs", o.block.epochs},
      {"--batch-size", o.block.batch_size},
      {"--quant-lr", o.block.quant_lr},
      {"--weight-lr", o.block.weight_lr},
      {"--min-lr-factor", o.block.min_lr_factor},
      {"--init", o.block.init},
      {"--gptq-order", o.block.gptq_order},
      {"--train-gemm", o.block.train_gemm},
      {"--device", o.device},
      {"--dtype", o.dtype},
  };
  if (e2e) {
    s["--train-data"] = file_identity(o.train_data);
    s["--train-images"] = o.train_images;
    s["--e2e-samples"] = o.e2e_samples;
    s["--e2e-lr"] = o.e2e.lr;
    s["--e2e-loss"] = o.e2e_loss;
    s["--e2e-epochs"] = o.e2e.epochs;
    s["--e2e-batch"] = o.e2e.global_batch;
    s["--e2e-micro-batch"] = o.e2e.micro_batch;
    s["--e2e-steps"] = o.e2e.max_steps;
    s["--e2e-early-check"] = o.e2e.early_check;
    s["--warmup-ratio"] = o.e2e.warmup_ratio;
    s["--max-grad-norm"] = o.e2e.max_grad_norm;
  }
  return s;
}

std::string settings_differences(const nlohmann::json& saved, const nlohmann::json& now) {
  auto show = [](const nlohmann::json& v) -> std::string {
    if (v.is_null()) return "(none)";
    if (v.is_string()) return v.get<std::string>().empty() ? "(none)" : v.get<std::string>();
    if (v.is_object() && v.contains("path")) return v["path"].get<std::string>() + " as of its size and time then";
    return v.dump();
  };
  std::string out;
  auto add = [&](const std::string& key, const nlohmann::json& a, const nlohmann::json& b) {
    if (a == b) return;
    if (!out.empty()) out += ", ";
    if (a.is_object() && b.is_object() && a.value("path", "") == b.value("path", ""))
      out += key + " " + b.value("path", "") + " changed since the saved run";
    else
      out += key + " " + show(a) + " -> " + show(b);
  };
  for (auto it = now.begin(); it != now.end(); ++it)
    add(it.key(), saved.contains(it.key()) ? saved[it.key()] : nlohmann::json(), it.value());
  for (auto it = saved.begin(); it != saved.end(); ++it)
    if (!now.contains(it.key())) add(it.key(), it.value(), nlohmann::json());
  return out;
}

nlohmann::json run_quantize(QuantizeOptions o) {
  const ExactCpuActivations exact;  // every phase computes with fp32 activations (cpu_qgemv.h)
  // ---- validation: nothing is created before all of it passes.
  validate_quantize_flags(o);
  o.out = check_replaced_dir({o.out, "--out", OutputKind::kModel, o.overwrite,
                              {o.model_dir, o.calib, o.calib_images, o.train_data, o.train_images,
                               o.block.offload_dir}});
  const std::string state_dir = o.out + ".eqat-state";
  check_data_file(o.calib, "--calib");
  check_data_file(o.train_data, "--train-data");
  check_dir(o.calib_images, "--calib-images");
  check_dir(o.train_images, "--train-images");
  if (!o.block.offload_dir.empty()) {
    const std::string parent = std::filesystem::absolute(o.block.offload_dir).parent_path().string();
    EQAT_CHECK(is_directory(o.block.offload_dir) || is_directory(parent), "--offload-dir: ", o.block.offload_dir,
               ": neither it nor its parent directory exists");
    EQAT_CHECK(!file_exists(o.block.offload_dir) || is_directory(o.block.offload_dir), "--offload-dir: ",
               o.block.offload_dir, ": not a directory");
    EQAT_CHECK(::access((is_directory(o.block.offload_dir) ? o.block.offload_dir : parent).c_str(), W_OK) == 0,
               "--offload-dir: ", o.block.offload_dir, ": not writable");
  }
  const ModelConfig cfg = load_model_config(o.model_dir);
  const bool e2e_only = o.phases == "e2e-qp";
  if (e2e_only) {
    EQAT_CHECK(cfg.quant.present, "--phases e2e-qp: ", o.model_dir, " is not quantized; run Block-AP first");
    o.spec.bits = static_cast<int>(cfg.quant.bits);
    o.spec.group_size = cfg.quant.group_size;
  } else {
    EQAT_CHECK(!cfg.quant.present, o.model_dir, ": is already quantized; quantize a full-precision model");
    check_group_size(o, cfg);
  }
  EQAT_CHECK(!o.calib.empty() || !o.train_data.empty() || cfg.arch == Arch::kLlava,
             "--calib FILE is required for a text-only model (text .txt/.jsonl, or instruction .json with images)");
  if (o.format == "gptq-v1" && !e2e_only) {
    // GPTQ v1 stores zero − 1 in `bits` bits: zero points are trained and rounded within [1, qmax] from the start,
    // so the export can never meet one it cannot write.
    o.spec.zero_min = 1;
    std::fprintf(stderr, "note: --format gptq-v1 stores zero - 1, so zero points are limited to [1, %lld] at %d bits\n",
                 static_cast<long long>(o.spec.qmax()), o.spec.bits);
    // GPTQModel 7.7 (gptqmodel/models/loader.py) refuses any sym=False checkpoint of format "gptq" unless
    // quantization_config.meta.quantizer names "gptqmodel:<version >= 0.9.0>"; eqat names itself, truthfully.
    std::fprintf(stderr, "note: GPTQModel loads asymmetric gptq-v1 files only from gptqmodel >= 0.9.0 itself (its rule "
                         "reads meta.quantizer); transformers loads this one; for GPTQModel use --format gptq-v2\n");
  }
  EQAT_CHECK(!(o.format == "gptq-v1" && e2e_only && cfg.quant.checkpoint_format != "gptq"),
             "--format gptq-v1 with --phases e2e-qp: the zero points were fixed by Block-AP and may be 0, which v1 ",
             "cannot store; run Block-AP with --format gptq-v1, or export gptq-v2");

  // ---- the run's state directory: eqat's own, locked, fresh unless resuming a run with the same settings.
  const bool had_state = is_directory(state_dir);
  EQAT_CHECK(!had_state || replaceable_dir(state_dir, OutputKind::kQuantizeState), state_dir,
             ": exists and is not an eqat quantize state; move it away (eqat does not delete it)");
  EQAT_CHECK(!file_exists(state_dir) || had_state, state_dir, ": exists and is not a directory");
  claim_dir(state_dir, OutputKind::kQuantizeState);
  FileLock lock(path_join(state_dir, ".eqat-lock"), "--out " + o.out);
  remove_stale_temps(state_dir);
  const nlohmann::json settings = quantize_settings(o);
  const std::string settings_file = path_join(state_dir, "settings.json");
  bool resume = o.resume;
  if (resume) {
    if (!file_exists(settings_file)) {
      std::fprintf(stderr, "--resume: %s holds no earlier run; starting from the beginning\n", state_dir.c_str());
      resume = false;
    } else {
      const nlohmann::json saved = nlohmann::json::parse(read_file(settings_file), nullptr, false);
      EQAT_CHECK(saved.is_object(), settings_file, ": corrupt state file (not a JSON object); rerun without --resume");
      const std::string diff = settings_differences(saved, settings);
      EQAT_CHECK(diff.empty(), "--resume: ", state_dir, " was made with other settings: ", diff,
                 "; rerun with the saved settings, or without --resume to start over");
    }
  }
  if (!resume && (file_exists(path_join(state_dir, "state.json")) ||
                  file_exists(path_join(state_dir, "e2e_state.safetensors"))))
    std::fprintf(stderr, "note: starting over; %s held an interrupted run (--resume continues one)\n",
                 state_dir.c_str());
  if (!resume) claim_dir(state_dir, OutputKind::kQuantizeState, /*start_over=*/true);  // keeps marker and lock
  write_file_atomic(settings_file, settings.dump(2));
  // A run that fails before it saved any progress (bad data, too little memory) leaves no state behind. Only once
  // the lock is held and the resume check passed: another run's state, or one to resume later, is never touched.
  struct DropEmptyState {
    std::string dir;
    ~DropEmptyState() {
      std::error_code ec;
      if (std::filesystem::exists(dir) && !file_exists(path_join(dir, "state.json")) &&
          !file_exists(path_join(dir, "e2e_state.safetensors")))
        std::filesystem::remove_all(dir, ec);
    }
  } drop_empty_state{state_dir};
  // Offloaded activations go to a directory of this run's own inside --offload-dir (never over files there), named
  // like a temp so that a killed run's is removed by the next run; removed when the run ends, however it ends.
  std::string offload;
  if (!o.block.offload_dir.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(o.block.offload_dir, ec);
    EQAT_CHECK(!ec, "--offload-dir: ", o.block.offload_dir, ": cannot create it (", ec.message(), ")");
    const std::string base = std::filesystem::path(o.out).filename().string() + "-activations";
    remove_stale_temps(o.block.offload_dir, base);
    offload = path_join(o.block.offload_dir, str_cat(base, ".tmp.", ::getpid(), ".0"));
    std::filesystem::create_directory(offload, ec);
    EQAT_CHECK(!ec, "--offload-dir: cannot create ", offload, " (", ec.message(), ")");
  }
  struct RemoveOnExit {
    std::string dir;
    ~RemoveOnExit() {
      std::error_code ec;
      if (!dir.empty()) std::filesystem::remove_all(dir, ec);
    }
  } offload_guard{offload};

  // ---- the model and the data.
  LoadOptions lo;
  lo.device = o.device;
  lo.dtype = o.dtype;
  lo.defer_decoder = true;  // layers are converted one at a time as the block loop reaches them (CPU)
  Model m = load_model(o.model_dir, lo);
  set_compute_threads(o.threads, m.device.is_cpu() && m.cfg.text.hidden_size < 1024 ? 2 : 0);
  // Without --calib, a LLaVA model calibrates (and E2E-QP trains) on the default model's world: shapes
  // instruction conversations from the --seed stream (never the test stream), written once into the state dir.
  std::string calib_file = !o.calib.empty() ? o.calib : o.train_data;
  std::string calib_images = o.calib_images;
  if (calib_file.empty()) {
    const std::string world = path_join(state_dir, "shapes-calib");
    if (!file_exists(path_join(world, "train.json"))) {
      const int64_t n = std::max(o.calib_opts.n_train, o.e2e_samples) + o.calib_opts.n_val;
      std::fprintf(stderr, "calibration: no --calib given; generating %lld shapes conversations (seed %lld)\n",
                   static_cast<long long>(n), static_cast<long long>(o.calib_opts.seed));
      write_shapes_dataset(world, n, 0, o.calib_opts.seed);
    }
    calib_file = path_join(world, "train.json");
    calib_images = path_join(world, "images");
  }
  const std::string log = path_join(state_dir, "log.jsonl");
  if (!resume) std::filesystem::remove(log);
  nlohmann::json summary = {{"method", o.method}, {"bits", o.spec.bits}, {"group_size", o.spec.group_size},
                            {"source", o.model_dir}};
  // Loss curves, one PNG each: per-block MSE, and the E2E-QP step loss.
  std::vector<std::pair<std::string, std::string>> plots;  // (file name, PNG bytes)
  auto curve = [](const std::string& label, const std::vector<double>& y) {
    PlotSeries s{label, {}};
    for (size_t i = 0; i < y.size(); ++i)
      if (std::isfinite(y[i])) s.xy.emplace_back(static_cast<double>(i), y[i]);
    return s;
  };

  // E2E-QP's data, loaded before Block-AP when it distils: its samples then ride Block-AP's FP stream.
  const bool e2e = o.method == "efficientqat" && o.phases != "block-ap";
  CalibSet e2e_data;
  std::vector<CalibSample> teacher_samples;
  std::vector<at::Tensor> teacher_hidden;
  std::string e2e_loss = o.e2e_loss;
  if (e2e) {
    CalibOptions eo = o.calib_opts;
    if (o.e2e_samples > 0) eo.n_train = o.e2e_samples;
    e2e_data = load_data(m, !o.train_data.empty() ? o.train_data : calib_file,
                         !o.train_images.empty() ? o.train_images : calib_images, eo);
    // kd's targets: the FP model's last hidden state at every loss position of every E2E sample, fp16.
    int64_t rows = 0;
    for (const auto* set : {&e2e_data.train, &e2e_data.val})
      for (const auto& smp : *set) rows = add_sat(rows, loss_position_count(smp));
    const int64_t bytes = mul_sat(mul_sat(rows, m.cfg.text.hidden_size), 2);
    if (e2e_loss.empty()) {
      // The default: distil when the targets are small (instruction data: a few answer tokens per sample), the
      // paper's cross-entropy otherwise (text trains on every token). A fixed bound, so a resumed run decides alike.
      e2e_loss = e2e_only ? "ce" : bytes <= kDistillAutoBytes ? "kd" : "ce";
      if (e2e_loss == "ce" && o.progress)
        std::fprintf(stderr, "note: E2E-QP trains with cross-entropy (%s)\n",
                     e2e_only ? "distillation needs Block-AP's FP stream: --phases both"
                              : str_cat("distillation targets would take ", format_bytes(static_cast<double>(bytes)),
                                        "; --e2e-loss kd asks for them anyway").c_str());
    }
    if (e2e_loss == "kd")
      check_memory_fits(bytes, str_cat("E2E-QP's distillation targets (", rows, " positions x hidden ",
                                       m.cfg.text.hidden_size, ", fp16)"),
                        "use --e2e-loss ce, or fewer --e2e-samples / --seq-len");
  }
  const bool kd = e2e_loss == "kd";
  if (kd) {
    teacher_samples = e2e_data.train;
    teacher_samples.insert(teacher_samples.end(), e2e_data.val.begin(), e2e_data.val.end());
  }

  if (!e2e_only) {
    CalibSet calib = load_data(m, calib_file, calib_images, o.calib_opts);
    const int64_t tokens = token_count(calib.train);
    if (o.block.init.empty()) o.block.init = o.method == "efficientqat" ? kDefaultInit : "minmax";
    if (o.block.batch_size < 0)
      o.block.batch_size = default_block_batch(o.method, o.block.init, o.spec.bits, calib.train);
    if (o.block.batch_size == 0) o.block.batch_size = auto_block_batch(o.method, o.spec.bits, calib.train);
    check_activation_caches_fit(o, calib, m.cfg.text.hidden_size, teacher_samples);
    std::fprintf(stderr, "calibration: %zu train + %zu val samples (%lld training tokens) from %s\n",
                 calib.train.size(), calib.val.size(), static_cast<long long>(tokens), calib.source.c_str());
    summary["calibration_tokens"] = tokens;
    // The paper trains each block on 4096 × 2048 tokens for 2 epochs (16.8 M token passes). Far fewer leaves
    // Block-AP under-trained: on the shapes model (~36-token samples) 4× the samples or epochs cut the answer-token
    // KL vs FP by half (models/SOURCES.md).
    constexpr double kPaperTokenPasses = 4096.0 * 2048.0 * 2.0;
    if (o.method == "efficientqat" &&
        static_cast<double>(tokens) * static_cast<double>(o.block.epochs) < kPaperTokenPasses / 16)
      std::fprintf(stderr, "note: Block-AP sees %lld tokens x %lld epochs per block, under 1/16 of the paper's "
                   "4096 x 2048 x 2; more --samples or --epochs usually brings it closer to the FP model\n",
                   static_cast<long long>(tokens), static_cast<long long>(o.block.epochs));
    BlockApOptions bo = o.block;
    if (!offload.empty()) bo.offload_dir = offload;
    bo.method = o.method;
    bo.spec = o.spec;
    bo.state_dir = state_dir;
    bo.resume = resume;
    bo.progress = o.progress;
    bo.log_jsonl = log;
    if (kd) bo.teacher_samples = &teacher_samples;
    bo.keep_sample_embeds = e2e && e2e_embeds_cached(m, e2e_data);
    BlockApResult r = run_block_quantization(m, calib, bo);
    hand_over_embeds(calib, r.sample_embeds, e2e_data);
    teacher_hidden = std::move(r.teacher_hidden);
    std::vector<double> tr, va;
    for (const auto& b : r.blocks) {
      tr.push_back(b.train_loss.empty() ? NAN : b.train_loss.back());
      va.push_back(b.val_loss.back());
    }
    std::vector<PlotSeries> series;
    if (o.method == "efficientqat") series.push_back(curve("train", tr));
    series.push_back(curve("val", va));
    plots.emplace_back("eqat_quantize_blocks.png",
                       plot_png(series, o.method + ": per-block MSE (last epoch)", "block", true));
    summary["block_phase"] = {{"init", bo.init},         {"gptq_order", bo.gptq_order}, {"batch_size", bo.batch_size},
                              {"quant_lr", r.quant_lr},  {"weight_lr", r.weight_lr},    {"epochs", bo.epochs},
                              {"train_gemm", r.train_gemm},
                              {"seconds", r.seconds},    {"ms_per_iteration", r.ms_per_iteration},
                              {"peak_rss_mib", r.peak_rss_mib}};
  }
  if (e2e) {
    const CalibSet& data = e2e_data;
    E2eOptions e = o.e2e;
    e.loss = e2e_loss;
    const bool distil2 = kd && o.spec.bits == 2;
    if (e.epochs < 0) e.epochs = distil2 ? kDistill2BitEpochs : 1;
    if (e.lr < 0 && distil2) e.lr = kDistill2BitLr;
    if (kd) e.teacher_hidden = &teacher_hidden;
    e.state_dir = state_dir;
    e.resume = resume;
    e.progress = o.progress;
    e.log_jsonl = log;
    E2eResult r = run_e2e_qp(m, data, e);
    std::fprintf(stderr, "E2E-QP: %lld steps, val %s %.4g -> %.4g (%.1fs)\n", static_cast<long long>(r.steps),
                 kd ? "KL to the FP model" : "loss", r.val_loss_before, r.val_loss_after, r.seconds);
    plots.emplace_back("eqat_quantize_e2e.png",
                       plot_png({curve("loss", r.step_loss)}, "E2E-QP: training loss per step", "step", true));
    summary["e2e_phase"] = {{"loss", e2e_loss}, {"seconds", r.seconds}, {"ms_per_step", r.ms_per_step}, {"steps", r.steps},
                            {"val_loss_before", r.val_loss_before}, {"val_loss_after", r.val_loss_after},
                            {"reverted", r.reverted},   {"stopped_early", r.stopped_early}, {"weight_cache", r.weight_cache},
                            {"by_hand", r.by_hand},
                            {"pass_samples", r.pass_samples},
                            {"check_step", r.check_step}, {"val_loss_check", r.val_loss_check},
                            {"val_samples_worse", r.val_worse}, {"val_samples_better", r.val_better},
                            {"peak_rss_mib", r.peak_rss_mib}};
  }

  // ---- export: the checkpoint and the run's artefacts (log, plots, summary) land in one atomic rename.
  ExportOptions eo;
  eo.format = o.format;
  eo.layout = o.layout;
  eo.spec = o.spec;
  eo.method = o.method;
  const double g = static_cast<double>(o.spec.group_size > 0 ? o.spec.group_size : m.cfg.text.hidden_size);
  summary["bits_per_param_decoder_linears"] = o.spec.bits + (16.0 + o.spec.bits) / g;
  summary["source_size_on_disk_bytes"] = dir_bytes(o.model_dir);
  eo.extra_files = [&](const std::string& tmp) {
    if (file_exists(log)) write_file_atomic(path_join(tmp, "eqat_quantize_log.jsonl"), read_file(log));
    for (const auto& [name, png] : plots) write_file_atomic(path_join(tmp, name), png);
    summary["size_on_disk_bytes"] = dir_bytes(tmp);
    summary["peak_rss_mib"] = peak_rss_mib();
    write_file_atomic(path_join(tmp, "eqat_quantize_summary.json"), summary.dump(2));
  };
  export_gptq(m, o.out, eo);
  std::error_code ec;
  std::filesystem::remove_all(state_dir, ec);
  return summary;
}

}  // namespace eqat
