// The evaluation runner behind `eqat eval`: builds LLaVA evaluation prompts (LLAVA.md §4.5), generates answers
// with batched greedy decoding (left padding + KV cache), appends them to OUT/answers.jsonl as it goes (so an
// interrupted run resumes: answers already in the file are skipped), then scores with eval/score.h.
// Also the text metrics: windowed perplexity and KL divergence against a reference model (EFFICIENTQAT.md §2.3).
//
// OUT layout: answers.jsonl (LLaVA answer JSONL; metadata carries image, category), run.json (what ran),
// scores.json (score_to_json), and for server-scored benchmarks the upload file.
#pragma once

#include <cstdint>
#include <string>

#include "eval/score.h"

namespace eqat {

struct EvalOptions {
  std::string bench;         // shapes | pope | mme | scienceqa | textvqa | gqa | vqav2 | seed | llava | ppl | kl
  std::string model_dir;     // resolved model directory
  std::string reference_dir; // kl: the reference model
  std::string data;          // question file or directory (shapes: DIR with test.jsonl); ppl/kl: text file
  std::string images;        // image root; empty: the data file's directory
  std::string ground_truth;  // pope: annotation dir; mme: GT dir; textvqa/gqa/shapes: file; empty: bench default
  std::string out;           // output directory (created)
  std::string template_name;  // empty: config.json's conv_template, else llava-1.5 (vicuna_v1)
  int64_t batch_size = 8;
  int64_t limit = -1;           // first N questions (ppl/kl: windows); -1 all
  int64_t max_new_tokens = -1;  // -1: LLaVA's per-benchmark default (128; ScienceQA 1024)
  bool strict_images = false;   // --strict: a corrupt JPEG (libjpeg warning) is a bad question, not a warning
  bool strict_answers = false;  // --strict: the scorers' answer checks (ScoreOptions::strict) are errors
  int64_t seq_len = 2048;       // ppl/kl window, capped at the model context
  bool skip_bad = false;
  bool overwrite = false;       // --overwrite: start an earlier eval run of `out` over (default: continue it)
  bool progress = true;
  std::string device = "cpu", dtype = "auto";
  int64_t threads = 0;
  // --exact-activations: packed linears compute with fp32 activations, never the int8-activation AVX-512 VNNI
  // kernel that serving uses by default where the CPU has it, so the scores measure the weights' quantization alone
  // (as when comparing quantizers, whose fake-quantized FP checkpoints always run in fp32).
  bool exact_activations = false;
};

struct EvalResult {
  int64_t total = 0;      // questions in scope (after --limit)
  int64_t resumed = 0;    // already answered in OUT/answers.jsonl
  int64_t answered = 0;   // answered by this run
  int64_t skipped = 0;    // bad records skipped (--skip-bad)
  bool scored = false;
  ScoreReport score;
  std::string answers_path, scores_path;
  double seconds = 0;
};

EvalResult run_eval(const EvalOptions& o);

// Prompt text (before the conversation template) for one ScienceQA record as LLaVA's model_vqa_science builds it:
// "<image>\n" if the record has an image, the human turn without "<image>", stripped, + the MC suffix.
std::string scienceqa_prompt(const std::string& human_value, bool has_image);

}  // namespace eqat
