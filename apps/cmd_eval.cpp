// eqat eval / eqat score / eqat report: the benchmark runner, the scorers for answer files from any tool, and the
// side-by-side HTML/Markdown report (eval/).
#include <iostream>

#include "args.h"
#include "commands.h"
#include "data/error.h"
#include "data/fs.h"
#include "data/output.h"
#include "eval/report.h"
#include "eval/runner.h"
#include "eval/score.h"

namespace eqat {

int cmd_eval(const Argv& argv);
int cmd_score(const Argv& argv);
int cmd_report(const Argv& argv);
namespace {
const bool kRegistered =
    register_command("eval", cmd_eval, "run a benchmark (batched, resumable) and score it") &&
    register_command("score", cmd_score, "score a LLaVA answer file with a benchmark's official rules") &&
    register_command("report", cmd_report, "side-by-side HTML/Markdown report of eval runs");

void print_score(const ScoreReport& r, bool as_json) {
  if (as_json)
    std::cout << score_to_json(r) << std::endl;
  else
    std::cout << score_to_text(r) << std::flush;
}
}  // namespace

int cmd_eval(const Argv& argv) {
  CommandSpec spec{
      "eval",
      "eqat eval --bench BENCH [--model DIR] [--data FILE_OR_DIR] [--images DIR] --out DIR [options]",
      "Answers a benchmark's questions with LLaVA's evaluation prompts (vicuna_v1 template, greedy), appending to\n"
      "OUT/answers.jsonl as it goes (rerun the same command to resume), then scores into OUT/scores.json.\n"
      "Benches: shapes (no --data: the standard 1000-question test split), pope, mme, scienceqa, mmbench (dev\n"
      "TSV), textvqa, gqa, vqav2 (writes the upload file), seed (LLaVA's llava-seed-bench.jsonl + --ground-truth\n"
      "SEED-Bench.json), llava (any LLaVA question JSONL, answers only), ppl (--data TEXT),\n"
      "kl (--data TEXT --reference DIR). Scores: percent for LLaVA benchmarks, fractions (0-1) for shapes.",
      {{"bench", "NAME", "benchmark (see above)", ""},
       {"model", "DIR", "model directory (default: the embedded default model)", ""},
       {"reference", "DIR",
        "kl: the reference model (e.g. the unquantized one); shapes: also report answer-token KL against it (mean, "
        "median, standard error; each question's in OUT/answer_kl.jsonl)",
        ""},
       {"data", "PATH", "question file (LLaVA JSONL; ScienceQA: llava_test_CQM-A.json; MMBench: the TSV), shapes "
                        "dataset dir, or text", ""},
       {"images", "DIR", "image root (default: the question file's directory; DIR/images/ is also tried)", ""},
       {"ground-truth", "PATH", "pope: label dir; mme: ground-truth dir; textvqa/gqa/seed: GT json; shapes: "
                                "answers JSONL (default: beside the questions)", ""},
       {"out", "DIR", "output directory (answers.jsonl, scores.json, run.json); an earlier eval run there is "
                      "continued", ""},
       {"overwrite", "", "start an earlier eval run in --out over instead of continuing it", ""},
       {"json", "", "print the scores as JSON", ""},
       {"batch-size", "N", "questions per generation batch (left padding + KV cache)", "8"},
       {"limit", "N", "only the first N questions (ppl/kl: windows); scores count only answered ones", "-1"},
       {"skip-bad", "", "skip missing images / malformed records (counted) instead of stopping", ""},
       {"max-new-tokens", "N", "answer length cap (-1: LLaVA's default, 128; ScienceQA 1024)", "-1"},
       {"seq-len", "N", "ppl/kl window length, capped at the model context", "2048"},
       {"template", "NAME", "prompt template: llava-1.5 (vicuna_v1) | hf | none (default: the model's "
                            "conv_template, else llava-1.5)", ""},
       {"no-progress", "", "no progress bar on stderr", ""},
       {"strict", "", "refuse corrupt JPEGs that libjpeg would decode with a warning (a bad question), and make "
                      "the answer checks (duplicate or unknown question ids, non-string text) errors", ""},
       {"device", "DEV", "cpu | cuda[:N]", "cpu"},
       {"dtype", "T",
        "auto (the stored dtype; fp16 computes in float32 on the CPU, its weights kept fp16) | float32 | bfloat16 | "
        "float16",
        "auto"},
       {"threads", "N", "CPU threads (0 = auto)", "0"},
       {"exact-activations", "", "packed models compute with fp32 activations instead of the int8-activation AVX-512 "
                                 "VNNI kernel and the bf16 prefill GEMM (the CPU defaults where they exist): scores "
                                 "then measure the weights' quantization alone, as for a fake-quantized FP checkpoint", ""}},
      0,
      0};
  ParsedArgs a = parse_args(spec, argv);
  EvalOptions o;
  o.bench = a.require("bench");
  o.out = a.require("out");
  o.model_dir = resolve_model_dir(a.str("model"), "eval");
  o.reference_dir = a.str("reference");
  o.data = a.str("data");
  o.images = a.str("images");
  o.ground_truth = a.str("ground-truth");
  o.batch_size = a.i64("batch-size", 1, 4096);
  o.limit = a.i64("limit", -1, INT64_MAX);
  o.skip_bad = a.flag("skip-bad");
  o.max_new_tokens = a.i64("max-new-tokens", -1, int64_t{1} << 24);
  o.seq_len = a.i64("seq-len", 2, int64_t{1} << 24);
  o.template_name = a.str("template");
  o.progress = !a.flag("no-progress");
  o.overwrite = a.flag("overwrite");
  o.strict_images = a.flag("strict");
  o.strict_answers = a.flag("strict");
  o.device = a.str("device");
  o.dtype = a.str("dtype");
  o.threads = a.threads();
  o.exact_activations = a.flag("exact-activations");
  EvalResult r = run_eval(o);
  std::cerr << "eval: " << r.total << " items, " << r.answered << " answered now, " << r.resumed
            << " resumed, " << r.skipped << " skipped; " << static_cast<int>(r.seconds * 10) / 10.0 << " s; "
            << r.answers_path << std::endl;
  if (r.scored) print_score(r.score, a.flag("json"));
  return 0;
}

int cmd_score(const Argv& argv) {
  CommandSpec spec{
      "score",
      "eqat score BENCH --answers FILE [benchmark files] [--json]",
      "Scores a LLaVA answer JSONL with the benchmark's official rules (LLAVA.md §5):\n"
      "  shapes    --questions FILE --ground-truth FILE   exact match per family, yes/no F1 (fractions 0-1)\n"
      "  pope      --annotations DIR --questions FILE     per split acc/precision/recall/F1/yes-ratio, f1_mean (%)\n"
      "  mme       --ground-truth DIR [--questions FILE]  per category acc, acc+, score; perception/cognition\n"
      "  scienceqa --problems FILE                        accuracy, img_accuracy (%)\n"
      "  mmbench   --questions FILE.tsv                   circular accuracy (%)\n"
      "  textvqa   --ground-truth FILE                    VQA soft accuracy (%)\n"
      "  gqa       --ground-truth FILE                    exact match (%)\n"
      "  seed      --ground-truth FILE                    exact letter (%)\n"
      "  vqav2     --out FILE                             writes the EvalAI upload [{question_id, answer}]",
      {{"answers", "FILE", "answer JSONL (question_id, prompt, text, ...)", ""},
       {"questions", "FILE", "question file", ""},
       {"annotations", "DIR", "pope: directory with coco_pope_<split>.json", ""},
       {"ground-truth", "PATH", "ground-truth file or directory", ""},
       {"problems", "FILE", "scienceqa: llava_test_CQM-A.json or problems.json", ""},
       {"out", "FILE", "vqav2/gqa: upload file to write", ""},
       {"overwrite", "", kOverwriteHelp, ""},
       {"only-answered", "", "score only questions that have an answer (default: missing answers are wrong)", ""},
       {"strict", "", "duplicate or unknown question ids and non-string text are an error (default: counted in "
                      "answer_checks.*, noted, the first answer of a duplicate scored)", ""},
       {"json", "", "print JSON", ""}},
      1,
      1};
  ParsedArgs a = parse_args(spec, argv);
  const std::string bench = a.positional()[0];
  const std::string answers = a.require("answers");
  ScoreOptions so;
  so.only_answered = a.flag("only-answered");
  so.strict = a.flag("strict");
  std::string upload;
  if (a.has("out"))
    upload = check_output_file({a.str("out"), "--out", OutputKind::kUpload, a.flag("overwrite"),
                                {answers, a.str("questions"), a.str("annotations"), a.str("ground-truth"),
                                 a.str("problems")}});
  ScoreReport r;
  if (bench == "shapes") {
    r = score_shapes(a.require("questions"), a.require("ground-truth"), answers, so);
  } else if (bench == "pope") {
    r = score_pope(a.require("annotations"), a.require("questions"), answers, so);
  } else if (bench == "mme") {
    r = score_mme(a.require("ground-truth"), a.str("questions"), answers, so);
  } else if (bench == "scienceqa") {
    r = score_scienceqa(a.require("problems"), answers, so);
  } else if (bench == "mmbench") {
    r = score_mmbench(a.require("questions"), answers, so);
  } else if (bench == "textvqa") {
    r = score_textvqa(a.require("ground-truth"), answers, so);
  } else if (bench == "gqa") {
    AnswerChecks checks;
    if (!upload.empty()) checks = write_gqa_predictions(answers, upload, so);
    if (!a.has("ground-truth")) {
      for (const auto& n : checks.notes) std::cerr << "note: " << n << "\n";
      return 0;
    }
    r = score_gqa(a.str("ground-truth"), answers, so);
  } else if (bench == "seed") {
    r = score_seed(a.require("ground-truth"), answers, so);
  } else if (bench == "vqav2") {
    a.require("out");
    for (const auto& n : write_vqav2_upload(answers, upload, so).notes) std::cerr << "note: " << n << "\n";
    std::cerr << "wrote " << upload << " (upload to the EvalAI VQAv2 server)" << std::endl;
    return 0;
  } else {
    throw_input_error("score: unknown benchmark '" + bench +
                      "' (shapes, pope, mme, scienceqa, mmbench, textvqa, gqa, seed, vqav2)");
  }
  print_score(r, a.flag("json"));
  return 0;
}

int cmd_report(const Argv& argv) {
  CommandSpec spec{"report", "eqat report --out FILE.html [--markdown FILE.md] RUN_DIR...",
                   "Puts eval runs (eqat eval --out directories) side by side: the score table, per-category deltas\n"
                   "against the first run, and an examples page (image thumbnail, question, each run's answer,\n"
                   "disagreements highlighted). The HTML is self-contained (images embedded as base64 PNG).",
                   {{"out", "FILE", "HTML report to write", ""},
                    {"markdown", "FILE", "also write the score table as Markdown", ""},
                    {"examples", "N", "examples on the page (disagreements first)", "40"},
                    {"thumb", "PX", "thumbnail size", "128"},
                    {"overwrite", "", kOverwriteHelp, ""}},
                   1,
                   1000};
  ParsedArgs a = parse_args(spec, argv);
  ReportOptions o;
  o.runs = a.positional();
  o.html = a.require("out");
  o.markdown = a.str("markdown");
  o.examples = a.i64("examples", 0, 100000);
  o.thumb = a.i64("thumb", 8, 1024);
  o.html = check_output_file({o.html, "--out", OutputKind::kReport, a.flag("overwrite"), o.runs});
  if (!o.markdown.empty())
    o.markdown = check_output_file({o.markdown, "--markdown", OutputKind::kMarkdown, a.flag("overwrite"), o.runs});
  EQAT_CHECK(o.markdown.empty() || o.markdown != o.html, "--markdown: same file as --out");
  write_report(o);
  std::cerr << "wrote " << o.html << (o.markdown.empty() ? "" : " and " + o.markdown) << std::endl;
  return 0;
}

}  // namespace eqat
