// Benchmark scorers with the official rules (LLAVA.md §5) for LLaVA answer files, plus the shapes world's
// exact-match scorer. Every scorer reads files, never a model, so `eqat score` works on answers from any tool.
//
// Units: the LLaVA benchmarks report percent (0–100) as their official scripts print them (MME scores are sums
// of percents, max 200 per category); `shapes` reports fractions (0–1), as issue 3's acceptance bar is written.
// A ScoreReport states its unit.
//
// Answer files are LLaVA answer JSONL: {question_id, prompt, text, answer_id, model_id, metadata}. question_id
// may be a number or a string and is not unique in every benchmark (MME repeats it for both questions of an
// image), so an answer is identified by answer_key() = question_id + prompt.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace eqat {

struct Answer {
  std::string qid;       // question_id as text (a string's contents, or a number's JSON form)
  std::string qid_json;  // question_id exactly as JSON ("7" or "\"a/b.png\"")
  std::string prompt;
  std::string text;            // a string's contents; any other JSON value as read_answers found it (see below)
  bool text_is_string = true;  // false: "text" was a number/null/object/array, kept as its JSON form (null: "")
  std::string metadata_json = "{}";
  int64_t line = 0;  // 1-based line in the file, for messages
};
std::string answer_key(const std::string& qid, const std::string& prompt);
inline std::string answer_key(const Answer& a) { return answer_key(a.qid, a.prompt); }

// LLaVA eval question JSONL: {question_id, image, text, category}.
struct Question {
  std::string qid, qid_json;
  std::string image;     // relative path as written; empty when absent
  std::string text;      // the prompt text (suffix included where the file has it)
  std::string category;  // empty when absent
  int64_t line = 0;
};

// InputError naming file:line on malformed JSON or a record without question_id/text. An interrupted writer may
// leave a torn last line: read_answers ignores an unterminated, unparsable final line when tolerate_torn_tail.
std::vector<Answer> read_answers(const std::string& path, bool tolerate_torn_tail = false);
std::vector<Question> read_questions(const std::string& path);

struct ScoreOptions {
  // Score only the questions that have an answer (for --limit runs); the official scripts count missing answers
  // as wrong (ScienceQA, shapes) or fail.
  bool only_answered = false;
  // audit_answers' findings (duplicates, unknown ids, non-string text) are an InputError instead of counts + notes.
  bool strict = false;
};

struct ScoreReport {
  std::string bench;
  std::string unit = "percent";  // percent | fraction (0–1, shapes) | value (ppl, kl)
  // Flat metrics in display order; dots nest them in JSON ("splits.random.f1" -> {"splits":{"random":{"f1":…}}}).
  std::vector<std::pair<std::string, double>> metrics;
  std::string headline;                 // key of the metric a summary table shows first
  std::map<std::string, bool> correct;  // answer_key -> judged correct (for the report's examples page)
  std::vector<std::string> notes;       // e.g. "12 answers without a ground truth were ignored"
  double get(const std::string& key) const;  // NaN when absent
};

// ---- answer checks (every scorer and upload writer runs them once on the answer file) ----
// Duplicates are judged by the key a scorer looks answers up by: the question id alone, or id + prompt where one
// id carries several questions (MME: two per image; TextVQA: image id + question).
enum class AnswerKey { kQuestionId, kQuestionIdAndPrompt };
struct AnswerChecks {
  int64_t duplicates = 0;       // later answers for a key already answered: dropped, the first one is scored
  int64_t unknown_ids = 0;      // question ids the benchmark's files do not have: dropped, not scored
  int64_t non_string_text = 0;  // "text" not a JSON string: scored as its JSON form (5 -> "5", null -> "")
  std::vector<std::string> notes;  // one per nonzero kind, naming its first line
  // Appends "answer_checks.{duplicates,unknown_ids,non_string_text}" (always, zeros included) and the notes.
  void add_to(ScoreReport& r) const;
};
// Removes duplicates and unknown ids from `answers` (in place, order kept) and counts all three kinds; known(qid)
// says whether a question id is in the benchmark (nullptr: every id is). Under o.strict any finding throws one
// InputError naming `path`, the counts and each kind's first line.
AnswerChecks audit_answers(std::vector<Answer>& answers, AnswerKey key,
                           const std::function<bool(const std::string& qid)>& known, const std::string& path,
                           const ScoreOptions& o);

bool is_count_key(const std::string& key);  // "n", "*.n", "*_n", windows, tokens, …: printed as integers
std::string score_to_json(const ScoreReport& r);  // {"bench":…, "unit":…, metrics nested…}
std::string score_to_text(const ScoreReport& r);  // aligned "key  value" lines

// ---- answer parsing rules, exposed for tests ----
bool pope_is_yes(const std::string& text);              // eval_pope.py
std::string mme_parse(const std::string& text);         // "yes" | "no" | "other" (MME calculation.py)
std::string sqa_extract(const std::string& text);       // "A".."E" or "FAILED" (eval_science_qa.py)
// VLMEvalKit rule stage: option letter, "Z" for a refusal, "" when nothing could be inferred.
std::string mmbench_extract(const std::string& text, const std::vector<std::pair<std::string, std::string>>& options);
std::string vqa_normalize(const std::string& text);     // EvalAI answer processor (m4c_evaluator.py)
double vqa_soft_accuracy(const std::string& pred, const std::vector<std::string>& gt_answers);  // 0..1
std::string shapes_normalize(const std::string& text);  // trim, lowercase, drop one trailing '.'

// ---- scorers ----
// shapes ground truth (JSONL {question_id, text}): question_id as answers/questions key it -> answer text.
std::map<std::string, std::string> read_shapes_ground_truth(const std::string& path);
// shapes: answers vs ground truth {question_id, text}; family = the question's `category`.
ScoreReport score_shapes(const std::string& questions, const std::string& ground_truth, const std::string& answers,
                         const ScoreOptions& o = {});
// POPE: annotations dir with coco_pope_<split>.json label files; questions = llava_pope_test.jsonl.
ScoreReport score_pope(const std::string& annotation_dir, const std::string& questions, const std::string& answers,
                       const ScoreOptions& o = {});
// MME: ground-truth dir with <category>.txt (image<TAB>question<TAB>Yes|No); questions may be empty.
ScoreReport score_mme(const std::string& gt_dir, const std::string& questions, const std::string& answers,
                      const ScoreOptions& o = {});
// ScienceQA: problems = LLaVA's llava_test_CQM-A.json (list) or ScienceQA's problems.json (dict; split "test").
ScoreReport score_scienceqa(const std::string& problems, const std::string& answers, const ScoreOptions& o = {});
// MMBench: the dev TSV (index, question, hint, A..D, answer, category, …); circular over index mod 1e6.
ScoreReport score_mmbench(const std::string& tsv, const std::string& answers, const ScoreOptions& o = {});
// TextVQA: TextVQA_0.5.1_val.json ({"data": [{image_id, question, answers[10]}]}), matched as eval_textvqa.py.
ScoreReport score_textvqa(const std::string& gt_json, const std::string& answers, const ScoreOptions& o = {});
// GQA: testdev_balanced_questions.json ({qid: {answer, …}}); prediction rstrip('.').lower() == answer.
ScoreReport score_gqa(const std::string& gt_json, const std::string& answers, const ScoreOptions& o = {});
// SEED-Bench: SEED-Bench.json ({questions: [{question_id, answer, question_type_id, data_type}]}); text == answer.
ScoreReport score_seed(const std::string& gt_json, const std::string& answers, const ScoreOptions& o = {});

// Upload files for server-scored benchmarks: VQAv2 [{question_id, answer}] (EvalAI-normalised) and GQA
// [{questionId, prediction}]. Written atomically. Duplicate answers are dropped (the first kept) and counted; the
// returned checks' notes are for the caller to show (strict: an InputError before anything is written).
AnswerChecks write_vqav2_upload(const std::string& answers, const std::string& out_json, const ScoreOptions& o = {});
AnswerChecks write_gqa_predictions(const std::string& answers, const std::string& out_json,
                                   const ScoreOptions& o = {});

}  // namespace eqat
