// eqat eval: question loading per benchmark, prompt building (LLaVA's eval scripts), batched greedy generation,
// incremental answer file with resume, scoring; and the windowed text metrics (ppl, kl).
//
// Legend: B batch rows, T padded prompt length, C decoder width, L window length, V vocabulary.
#include "eval/runner.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <algorithm>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <sstream>

#include "data/cpu.h"
#include "data/error.h"
#include "data/json_util.h"
#include "data/fs.h"
#include "data/output.h"
#include "eval/text_util.h"
#include "llm/generate.h"
#include "llm/prompt.h"
#include "quant/cpu_qgemv.h"
#include "vision/llava.h"
#if __has_include("data/shapes.h")
#include "data/shapes.h"
#define EQAT_HAVE_SHAPES 1
#endif

namespace eqat {

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

namespace {

constexpr const char* kMcSuffix = "Answer with the option's letter from the given choices directly.";

// One question to answer. `bad` non-empty: the record cannot be run (message names it).
struct Item {
  std::string qid, qid_json;
  std::string prompt;  // the user text given to the template ("<image>" handled by with_image)
  std::string answer_prompt;  // the answer file's `prompt` field, as LLaVA writes it
  std::string image;          // resolved path; empty = text-only
  std::string category;
  std::string bad;
};

double now_s() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

std::string fmt_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = static_cast<int64_t>(s + 0.5);
  char buf[32];
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", static_cast<long>(t / 3600), static_cast<long>(t / 60 % 60));
  else
    std::snprintf(buf, sizeof buf, "%ldm%02lds", static_cast<long>(t / 60), static_cast<long>(t % 60));
  return buf;
}

// Progress bar on stderr: a redrawn line on a terminal, a plain line every ~5 s otherwise.
class Progress {
 public:
  Progress(int64_t total, bool enabled, std::string unit)
      : total_(total), enabled_(enabled), unit_(std::move(unit)), tty_(isatty(2)), t0_(now_s()) {}
  void update(int64_t done, int64_t tokens) {
    if (!enabled_) return;
    const double t = now_s(), el = t - t0_;
    if (!tty_ && done < total_ && t - last_ < 5.0) return;
    last_ = t;
    const double rate = el > 0 ? done / el : 0, tps = el > 0 ? tokens / el : 0;
    const double eta = rate > 0 ? (total_ - done) / rate : NAN;
    const int width = 30;
    const int fill = total_ > 0 ? static_cast<int>(width * done / total_) : width;
    std::string bar(fill, '=');
    if (fill < width) bar += '>' + std::string(width - fill - 1, ' ');
    char line[256];
    std::snprintf(line, sizeof line, "[%s] %ld/%ld  %.2f %s/s  %.1f tok/s  elapsed %s  ETA %s", bar.c_str(),
                  static_cast<long>(done), static_cast<long>(total_), rate, unit_.c_str(), tps,
                  fmt_duration(el).c_str(), fmt_duration(eta).c_str());
    std::cerr << (tty_ ? "\r" : "") << line << (tty_ ? "" : "\n") << std::flush;
  }
  void finish() {
    if (enabled_ && tty_) std::cerr << "\n";
  }

 private:
  int64_t total_;
  bool enabled_;
  std::string unit_;
  bool tty_;
  double t0_, last_ = 0;
};

std::string parent_dir(const std::string& path) {
  std::filesystem::path p(path);
  return p.has_parent_path() ? p.parent_path().string() : ".";
}

std::string resolve_image(const std::string& root, const std::string& rel) {
  if (rel.empty()) return "";
  if (std::filesystem::path(rel).is_absolute()) return rel;
  const std::string a = path_join(root, rel);
  if (file_exists(a)) return a;
  const std::string b = path_join(path_join(root, "images"), rel);
  if (file_exists(b)) return b;
  return a;  // reported as missing when loaded
}

std::string str_field(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return "";
  return it->is_string() ? it->get<std::string>() : it->dump();
}

// LLaVA eval JSONL ({question_id, image, text, category}); the text already carries the benchmark's suffix.
std::vector<Item> load_jsonl_items(const std::string& path, const std::string& image_root) {
  std::vector<Item> items;
  std::istringstream is(read_file(path));
  std::string line;
  int64_t ln = 0;
  while (std::getline(is, line)) {
    ++ln;
    if (trim(line).empty()) continue;
    Item it;
    const std::string where = str_cat(path, ":", ln);
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception&) {
      it.qid = it.qid_json = where;
      it.bad = where + ": malformed JSON";
      items.push_back(it);
      continue;
    }
    if (!j.is_object() || !j.contains("question_id") || !j.contains("text") || !j["text"].is_string()) {
      it.qid = it.qid_json = where;
      it.bad = where + ": question record needs question_id and text";
      items.push_back(it);
      continue;
    }
    it.qid_json = j["question_id"].dump();
    it.qid = j["question_id"].is_string() ? j["question_id"].get<std::string>() : it.qid_json;
    it.prompt = j["text"].get<std::string>();
    it.answer_prompt = it.prompt;
    it.category = str_field(j, "category");
    const std::string img = str_field(j, "image");
    it.image = resolve_image(image_root, img);
    items.push_back(it);
  }
  return items;
}

std::vector<Item> load_scienceqa_items(const std::string& path, const std::string& image_root) {
  json j;
  try {
    j = json::parse(read_file(path));
  } catch (const json::exception& e) {
    throw_input_error(str_cat(path, ": malformed JSON (", json_error_message(e), ")"));
  }
  EQAT_CHECK(j.is_array(), path, ": expected LLaVA's ScienceQA list (llava_test_CQM-A.json)");
  std::vector<Item> items;
  for (size_t i = 0; i < j.size(); ++i) {
    const json& e = j[i];
    Item it;
    if (!e.is_object() || !e.contains("id") || !e.contains("conversations") || !e["conversations"].is_array() ||
        e["conversations"].empty() || !e["conversations"][0].contains("value")) {
      it.qid = it.qid_json = str_cat(path, "[", i, "]");
      it.bad = str_cat(path, ": entry ", i, ": needs id and conversations[0].value");
      items.push_back(it);
      continue;
    }
    it.qid_json = e["id"].dump();
    it.qid = e["id"].is_string() ? e["id"].get<std::string>() : it.qid_json;
    const bool has_image = e.contains("image") && !e["image"].is_null();
    it.prompt = scienceqa_prompt(str_field(e["conversations"][0], "value"), has_image);
    it.answer_prompt = it.prompt;
    if (has_image) it.image = resolve_image(image_root, str_field(e, "image"));
    items.push_back(it);
  }
  return items;
}

// MMBench TSV (model_vqa_mmbench.py): prompt = [hint "\n"] question, then "\nA. opt" for options A–D up to the
// first missing one; the model also gets the MC suffix, the answer's `prompt` does not. The base64 image of each
// row is written to OUT/mmbench_images/<index> (decoded by content, like PIL).
std::vector<Item> load_mmbench_items(const std::string& path, const std::string& out_dir) {
  auto rows = read_tsv(path);
  EQAT_CHECK(rows.size() >= 2, path, ": empty TSV");
  std::map<std::string, size_t> col;
  for (size_t i = 0; i < rows[0].size(); ++i) col[rows[0][i]] = i;
  for (const char* c : {"index", "question", "image"}) EQAT_CHECK(col.count(c), path, ": no '", c, "' column");
  auto get = [&](const std::vector<std::string>& row, const std::string& c) -> std::string {
    auto it = col.find(c);
    return it == col.end() || it->second >= row.size() ? "" : row[it->second];
  };
  auto is_none = [](const std::string& v) {
    std::string l = trim(v);
    for (char& ch : l) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    return l.empty() || l == "nan" || l == "none";
  };
  const std::string img_dir = path_join(out_dir, "mmbench_images");
  std::filesystem::create_directories(img_dir);
  std::vector<Item> items;
  for (size_t r = 1; r < rows.size(); ++r) {
    const auto& row = rows[r];
    Item it;
    it.qid = trim(get(row, "index"));
    it.qid_json = it.qid;
    try {
      (void)std::stoll(it.qid);
    } catch (...) {
      it.qid_json = json(it.qid).dump();
      it.bad = str_cat(path, ": row ", r, ": bad index '", it.qid, "'");
      items.push_back(it);
      continue;
    }
    std::string q = get(row, "question");
    if (!is_none(get(row, "hint"))) q = get(row, "hint") + "\n" + q;
    for (const char* L : {"A", "B", "C", "D"}) {
      if (!col.count(L) || is_none(get(row, L))) break;
      q += std::string("\n") + L + ". " + get(row, L);
    }
    it.answer_prompt = q;
    it.prompt = q + "\n" + kMcSuffix;
    it.category = get(row, "category");
    it.image = path_join(img_dir, it.qid);
    if (!file_exists(it.image)) {
      try {
        const std::string bytes = base64_decode(get(row, "image"), str_cat(path, ": row ", r, " (index ", it.qid, ")"));
        EQAT_CHECK(!bytes.empty(), path, ": row ", r, " (index ", it.qid, "): empty image");
        write_file_atomic(it.image, bytes);
      } catch (const InputError& e) {
        it.bad = e.what();
      }
    }
    items.push_back(it);
  }
  return items;
}

// A stable answer_id (LLaVA uses a random shortuuid): FNV-1a of model + answer key, hex.
std::string answer_id(const std::string& model_id, const std::string& key) {
  uint64_t h = 1469598103934665603ull;
  for (char c : model_id + '\x1e' + key) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  char buf[24];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

// Cuts a torn last line (a run killed mid-write) so appends start on a fresh line.
void repair_tail(const std::string& path) {
  if (!file_exists(path)) return;
  std::string d = read_file(path);
  if (d.empty() || d.back() == '\n') return;
  const size_t nl = d.rfind('\n');
  std::filesystem::resize_file(path, nl == std::string::npos ? 0 : nl + 1);
  std::cerr << path << ": dropped a partial last line from an interrupted run\n";
}

void write_run_json(const EvalOptions& o, const std::string& path, const ordered_json& extra) {
  ordered_json j;
  j["bench"] = o.bench;
  j["model"] = o.model_dir;
  if (!o.reference_dir.empty()) j["reference"] = o.reference_dir;
  j["data"] = o.data;
  j["images"] = o.images;
  j["ground_truth"] = o.ground_truth;
  j["template"] = o.template_name;
  j["batch_size"] = o.batch_size;
  j["limit"] = o.limit;
  j["max_new_tokens"] = o.max_new_tokens;
  j["device"] = o.device;
  j["dtype"] = o.dtype;
  j["exact_activations"] = o.exact_activations;
  for (auto it = extra.begin(); it != extra.end(); ++it) j[it.key()] = it.value();
  write_file_atomic(path, j.dump(2) + "\n");
}

std::string model_id_of(const std::string& dir) {
  std::filesystem::path p(dir);
  std::string name = p.filename().string();
  if (name.empty()) name = p.parent_path().filename().string();
  return name;
}

// The template a model's config.json names ("conv_template"), else LLaVA-1.5's vicuna_v1.
void apply_threads(const EvalOptions& o, const Model& m) {
  set_compute_threads(o.threads, m.device.is_cpu() && m.cfg.text.hidden_size < 1024 ? 1 : 0);  // see cmd_generate.cpp
}

// ---- text metrics --------------------------------------------------------------------------------------------

// Logits [B,L,V] fp32 for token windows ids [B,L] (plain causal attention, positions 0..L-1).
at::Tensor window_logits(Model& m, const at::Tensor& ids) {
  c10::NoGradGuard ng;
  at::Tensor t = ids.to(m.device);
  at::Tensor emb = m.lm->embed(t);
  at::Tensor pos = at::arange(ids.size(1), at::TensorOptions().dtype(at::kLong).device(m.device))
                       .unsqueeze(0)
                       .expand({ids.size(0), ids.size(1)});
  return m.lm->forward(emb, pos, at::Tensor(), nullptr).to(at::kFloat);
}

EvalResult run_text_metric(const EvalOptions& o) {
  EvalResult res;
  const double t0 = now_s();
  EQAT_CHECK(!o.data.empty(), "--data is required for --bench ", o.bench, " (a UTF-8 text file)");
  LoadOptions lo;
  lo.device = o.device;
  lo.dtype = o.dtype;
  lo.fuse_projections = true;
  lo.weights_as_stored = true;
  Model m = load_model(o.model_dir, lo);
  apply_threads(o, m);
  Model ref;
  const bool kl = o.bench == "kl";
  if (kl) {
    EQAT_CHECK(!o.reference_dir.empty(), "--reference DIR is required for --bench kl");
    ref = load_model(o.reference_dir, lo);
    EQAT_CHECK(ref.cfg.text.vocab_size == m.cfg.text.vocab_size, o.reference_dir, ": vocabulary ",
               ref.cfg.text.vocab_size, " differs from the model's ", m.cfg.text.vocab_size,
               "; KL needs the same tokenizer");
  }
  const std::string text = read_file(o.data);
  std::vector<int64_t> ids = m.tok->encode(text, /*add_bos=*/true);
  int64_t ctx = model_context(m.cfg.text);
  if (kl) ctx = std::min(ctx, ref.cfg.text.max_position_embeddings);
  int64_t L = std::min(o.seq_len, ctx);
  EQAT_CHECK(L >= 2, "--seq-len must be >= 2, got ", o.seq_len);
  int64_t nwin = static_cast<int64_t>(ids.size()) / L;
  ScoreReport r;
  r.bench = o.bench;
  r.unit = "value";
  if (nwin == 0) {  // shorter than one window: score it whole (noted)
    EQAT_CHECK(ids.size() >= 2, o.data, ": text has fewer than 2 tokens");
    L = static_cast<int64_t>(ids.size());
    nwin = 1;
    r.notes.push_back(str_cat("text has ", ids.size(), " tokens, fewer than one window; scored as one window"));
  }
  if (o.limit > 0) nwin = std::min(nwin, o.limit);
  at::Tensor all = at::tensor(ids, at::kLong);
  Progress bar(nwin, o.progress, "win");
  double nll_sum = 0, kl_sum = 0, ref_nll_sum = 0;
  int64_t agree = 0, positions = 0;
  // Windows per forward: --batch-size, capped so one [B,L,V] fp32 logits tensor stays under ~1 GiB (a 7B model's
  // 2048 × 32000 logits are 262 MB per window, and log-softmax copies them).
  const int64_t V = m.cfg.text.vocab_size;
  const int64_t fit = (int64_t{1} << 28) / std::max<int64_t>(1, L * V);
  const int64_t B = std::max<int64_t>(1, std::min<int64_t>(o.batch_size, fit));
  for (int64_t w0 = 0; w0 < nwin; w0 += B) {
    const int64_t nb = std::min(B, nwin - w0);
    at::Tensor win = all.narrow(0, w0 * L, nb * L).view({nb, L});  // [B,L]
    at::Tensor logits = window_logits(m, win).cpu();                 // [B,L,V]
    at::Tensor logp = at::log_softmax(logits, -1);
    at::Tensor target = win.narrow(1, 1, L - 1).unsqueeze(-1);       // [B,L-1,1]
    // Per-window mean NLL over the L-1 shifted positions (EFFICIENTQAT.md §2.3).
    at::Tensor nll = -logp.narrow(1, 0, L - 1).gather(-1, target).squeeze(-1).mean(1);  // [B]
    nll_sum += nll.sum().item<double>();
    if (kl) {
      at::Tensor rlogp = at::log_softmax(window_logits(ref, win).cpu(), -1);
      // KL(reference || model) per position, averaged over all L positions of every window.
      at::Tensor k = (rlogp.exp() * (rlogp - logp)).sum(-1);  // [B,L]
      kl_sum += k.sum().item<double>();
      agree += (rlogp.argmax(-1) == logp.argmax(-1)).sum().item<int64_t>();
      positions += nb * L;
      ref_nll_sum += (-rlogp.narrow(1, 0, L - 1).gather(-1, target).squeeze(-1).mean(1)).sum().item<double>();
    }
    bar.update(w0 + nb, (w0 + nb) * L);
  }
  bar.finish();
  if (kl) {
    r.headline = "kl_mean";
    r.metrics.push_back({"kl_mean", kl_sum / positions});
    r.metrics.push_back({"top1_agreement", 100.0 * agree / positions});
    r.metrics.push_back({"ppl", std::exp(nll_sum / nwin)});
    r.metrics.push_back({"ppl_reference", std::exp(ref_nll_sum / nwin)});
  } else {
    r.headline = "ppl";
    r.metrics.push_back({"ppl", std::exp(nll_sum / nwin)});
  }
  r.metrics.push_back({"windows", static_cast<double>(nwin)});
  r.metrics.push_back({"seq_len", static_cast<double>(L)});
  r.metrics.push_back({"tokens", static_cast<double>(ids.size())});
  res.total = nwin;
  res.answered = nwin;
  res.scored = true;
  res.score = r;
  res.scores_path = path_join(o.out, "scores.json");
  write_file_atomic(res.scores_path, score_to_json(r) + "\n");
  res.seconds = now_s() - t0;
  write_run_json(o, path_join(o.out, "run.json"), {{"windows", nwin}, {"seconds", res.seconds}});
  return res;
}

#ifdef EQAT_HAVE_SHAPES
// The standard shapes test split (fixed seed, disjoint from training) as a dataset directory: test.jsonl,
// test_answers.jsonl, images/*.png.
void write_standard_shapes_test(const std::string& dir) {
  std::cerr << "generating the standard shapes test split (" << kShapesStandardTestSize << " questions, seed "
            << kShapesStandardTestSeed << ") in " << dir << "\n";
  const std::vector<ShapesEvalItem> items = shapes_standard_test_split();
  write_dir_atomic(dir, OutputKind::kDataset, [&](const std::string& tmp) {
    std::filesystem::create_directories(path_join(tmp, "images"));
    std::string q, a;
    for (const auto& it : items) {
      ordered_json jq;
      jq["question_id"] = it.question_id;
      jq["image"] = it.image;  // under images/, as write_shapes_dataset lays it out
      jq["text"] = it.text;
      jq["category"] = it.category;
      q += jq.dump() + "\n";
      ordered_json ja;
      ja["question_id"] = it.question_id;
      ja["text"] = it.answer;
      a += ja.dump() + "\n";
      write_file_atomic(path_join(path_join(tmp, "images"), it.image), shapes_png(it.pixels));
    }
    write_file_atomic(path_join(tmp, "test.jsonl"), q);
    write_file_atomic(path_join(tmp, "test_answers.jsonl"), a);
  });
}
#endif

// ---- scoring after a run ---------------------------------------------------------------------------------------

// Rewrites the answer file in question order when a resumed run appended answers out of order (e.g. records
// skipped earlier and answered now): POPE and MME match answers by their order in the file.
void reorder_answers(const std::string& path, const std::vector<Item>& items) {
  std::map<std::string, size_t> pos;
  for (size_t i = 0; i < items.size(); ++i) pos.emplace(answer_key(items[i].qid, items[i].answer_prompt), i);
  std::istringstream is(read_file(path));
  std::vector<std::pair<size_t, std::string>> lines;  // (order key, line)
  std::string line;
  size_t n = 0;
  bool sorted = true;
  size_t last = 0;
  while (std::getline(is, line)) {
    if (trim(line).empty()) continue;
    json j = json::parse(line, nullptr, false);
    size_t k = items.size() + n;  // unknown answers keep their relative order at the end
    if (!j.is_discarded() && j.is_object() && j.contains("question_id")) {
      const std::string qid =
          j["question_id"].is_string() ? j["question_id"].get<std::string>() : j["question_id"].dump();
      auto it = pos.find(answer_key(qid, str_field(j, "prompt")));
      if (it != pos.end()) k = it->second;
    }
    sorted = sorted && (n == 0 || k >= last);
    last = k;
    lines.push_back({k, line});
    ++n;
  }
  if (sorted) return;
  std::stable_sort(lines.begin(), lines.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::string out;
  for (const auto& l : lines) out += l.second + "\n";
  write_file_atomic(path, out);
}

// OUT/judged.jsonl: {question_id, prompt, correct} per scored answer, for the report's examples page.
void write_judgements(const std::string& path, const std::string& answers, const ScoreReport& r) {
  std::string out;
  std::set<std::string> written;  // a duplicate answer (same key) is judged once, as the scorer judged the first
  for (const auto& a : read_answers(answers)) {
    auto it = r.correct.find(answer_key(a));
    if (it == r.correct.end() || !written.insert(it->first).second) continue;
    ordered_json j;
    j["question_id"] = json::parse(a.qid_json);
    j["prompt"] = a.prompt;
    j["correct"] = it->second;
    out += j.dump() + "\n";
  }
  write_file_atomic(path, out);
}

// What produced an answer file: the model's weight files (name, size, modification time), the prompt template and
// the generation settings. Conservative: a copied model directory counts as another model.
std::string answers_source(const EvalOptions& o) {
  namespace fs = std::filesystem;
  std::vector<std::string> files;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(o.model_dir, ec)) {
    const std::string n = e.path().filename().string();
    if (n.size() > 12 && n.compare(n.size() - 12, 12, ".safetensors") == 0) {
      std::error_code e2;
      const auto size = fs::file_size(e.path(), e2);
      const auto t = fs::last_write_time(e.path(), e2).time_since_epoch().count();
      files.push_back(str_cat(n, " ", size, " ", t));
    }
  }
  std::sort(files.begin(), files.end());
  nlohmann::ordered_json j{{"model", fs::weakly_canonical(o.model_dir, ec).string()},
                           {"weights", files},
                           {"template", o.template_name},
                           {"max_new_tokens", o.max_new_tokens},
                           {"dtype", o.dtype}};
  return j.dump() + "\n";
}

std::string sibling_answers(const std::string& questions) {
  // DIR/test.jsonl -> DIR/test_answers.jsonl
  const std::string ext = ".jsonl";
  if (questions.size() > ext.size() && questions.compare(questions.size() - ext.size(), ext.size(), ext) == 0)
    return questions.substr(0, questions.size() - ext.size()) + "_answers" + ext;
  return questions + "_answers.jsonl";
}

// Answer-token KL(reference || model) on a shapes split (--reference with --bench shapes): each question's prompt
// followed by its ground-truth answer and </s> is run through both models (teacher forcing), and the per-position
// KL of the next-token distributions is averaged over that answer's tokens, then over the questions. A finer
// measure than exact match of how much of the reference's behaviour a quantized model keeps: a question can stay
// right while its answer distribution drifts. Also the share of answer positions whose argmax agrees.
// The mean is carried by a few questions where it is large (a near tie between two answers), so the report also
// gives the median and the standard error of the mean over questions, and writes each question's KL to
// `per_question_path` (JSON lines {question_id, kl, answer_tokens}): two models scored on the same split compare
// question by question (a paired difference) instead of by two means.
void add_answer_kl(const EvalOptions& o, Model& m, const std::vector<Item>& items, ScoreReport& r,
                   const std::string& per_question_path) {
  const std::map<std::string, std::string> truth = read_shapes_ground_truth(o.ground_truth);
  LoadOptions lo;
  lo.device = o.device;
  lo.dtype = o.dtype;
  lo.fuse_projections = true;
  lo.weights_as_stored = true;
  Model ref = load_model(o.reference_dir, lo);
  EQAT_CHECK(ref.multimodal() && m.multimodal(), o.reference_dir, ": --reference for --bench shapes must be a LLaVA model");
  EQAT_CHECK(ref.cfg.text.vocab_size == m.cfg.text.vocab_size, o.reference_dir, ": vocabulary ", ref.cfg.text.vocab_size,
             " differs from the model's ", m.cfg.text.vocab_size, "; KL needs the same tokenizer");
  const PromptTemplate tmpl = parse_template(o.template_name.empty() ? model_template(o.model_dir, "llava-1.5") : o.template_name);
  c10::NoGradGuard ng;
  auto answer_logp = [&](Model& mm, const std::vector<int64_t>& ids, const ImageInput& image, int64_t from, int64_t n) {
    at::Tensor e = embed_prompt(mm, ids, image);  // [1,T,C]
    at::Tensor pos = at::arange(e.size(1), at::TensorOptions().dtype(at::kLong).device(mm.device)).unsqueeze(0);
    at::Tensor logits = mm.lm->forward(e, pos, at::Tensor(), nullptr)[0].narrow(0, from, n);
    return at::log_softmax(logits.to(at::kFloat).cpu(), -1);  // [n,V]
  };
  Progress bar(static_cast<int64_t>(items.size()), o.progress, "q");
  double kl_sum = 0;
  int64_t questions = 0, agree = 0, positions = 0, visited = 0;
  std::vector<double> kls;
  std::string lines;
  for (const Item& it : items) {
    bar.update(++visited, positions);
    auto t = truth.find(it.qid);
    if (t == truth.end() || !it.bad.empty() || it.image.empty() || !file_exists(it.image)) continue;
    const ImageInput image = load_pixels(m, it.image, o.strict_images);
    const ImageInput ref_image = load_pixels(ref, it.image, o.strict_images);
    EQAT_CHECK(image.tokens == ref_image.tokens, o.reference_dir, ": its image layout differs from the model's (",
               ref_image.tokens, " image tokens against ", image.tokens, "); KL needs the same prompt");
    std::vector<int64_t> ids = tokenize_prompt(*m.tok, render_prompt(tmpl, it.prompt, true), tmpl, m.image_token_id(),
                                               image.tokens);
    const int64_t prompt_len = static_cast<int64_t>(ids.size());
    std::vector<int64_t> ans = m.tok->encode(t->second, false);
    ans.push_back(m.tok->eos_id());
    ids.insert(ids.end(), ans.begin(), ans.end());
    const int64_t n = static_cast<int64_t>(ans.size());
    // Position prompt_len - 1 + k predicts answer token k.
    at::Tensor lp = answer_logp(m, ids, image, prompt_len - 1, n);
    at::Tensor rp = answer_logp(ref, ids, ref_image, prompt_len - 1, n);
    const double kl = (rp.exp() * (rp - lp)).sum(-1).mean().item<double>();
    kl_sum += kl;
    kls.push_back(kl);
    lines += ordered_json({{"question_id", json::parse(it.qid_json)}, {"kl", kl}, {"answer_tokens", n}}).dump() + "\n";
    agree += (rp.argmax(-1) == lp.argmax(-1)).sum().item<int64_t>();
    positions += n;
    ++questions;
  }
  bar.finish();
  EQAT_CHECK(questions > 0, o.ground_truth, ": no question of ", o.data, " has a ground-truth answer and an image");
  const double nq = static_cast<double>(questions), mean = kl_sum / nq;
  double ss = 0;
  for (double k : kls) ss += (k - mean) * (k - mean);
  std::vector<double> sorted = kls;
  std::sort(sorted.begin(), sorted.end());
  const size_t h = sorted.size() / 2;
  const double median = sorted.size() % 2 ? sorted[h] : 0.5 * (sorted[h - 1] + sorted[h]);
  r.metrics.push_back({"answer_kl_mean", mean});
  r.metrics.push_back({"answer_top1_agreement", 100.0 * static_cast<double>(agree) / static_cast<double>(positions)});
  r.metrics.push_back({"answer_kl_n", nq});
  r.metrics.push_back({"answer_kl_median", median});
  r.metrics.push_back({"answer_kl_sem", questions > 1 ? std::sqrt(ss / (nq - 1) / nq) : 0.0});
  write_file_atomic(per_question_path, lines);
}

}  // namespace

std::string scienceqa_prompt(const std::string& human_value, bool has_image) {
  std::string qs = human_value;
  for (size_t p; (p = qs.find(kImageMarker)) != std::string::npos;) qs.erase(p, std::string(kImageMarker).size());
  qs = trim(qs);
  if (has_image) qs = std::string(kImageMarker) + "\n" + qs;
  return qs + "\n" + kMcSuffix;
}

EvalResult run_eval(const EvalOptions& o_in) {
  EvalOptions o = o_in;
  EQAT_CHECK(!o.out.empty(), "--out DIR is required");
  EQAT_CHECK(o.batch_size >= 1, "--batch-size must be >= 1, got ", o.batch_size);
  static const std::set<std::string> kBenches = {"shapes",  "pope", "mme",   "scienceqa", "mmbench", "textvqa",
                                                  "gqa",     "vqav2", "seed", "llava",     "ppl",     "kl"};
  EQAT_CHECK(kBenches.count(o.bench), "--bench: unknown benchmark '", o.bench,
             "' (shapes, pope, mme, scienceqa, mmbench, textvqa, gqa, vqav2, seed, llava, ppl, kl)");
  EQAT_CHECK(o.reference_dir.empty() || o.bench == "shapes" || o.bench == "kl",
             "--reference: only --bench kl and shapes use it, not ", o.bench);
  std::optional<ExactCpuActivations> exact;  // for the whole run, on this (the computing) thread
  if (o.exact_activations) exact.emplace();
  // The run directory is eqat's own: new, empty, or an earlier eval run (continued). One run at a time.
  o.out = check_in_place_dir({o.out, "--out", OutputKind::kEvalRun, o.overwrite,
                              {o.model_dir, o.reference_dir, o.data, o.images, o.ground_truth}},
                             /*may_continue=*/true);
  claim_dir(o.out, OutputKind::kEvalRun);
  FileLock lock(path_join(o.out, ".eqat-lock"), "--out " + o.out);
  if (o.overwrite) claim_dir(o.out, OutputKind::kEvalRun, /*start_over=*/true);  // under the lock
  if (o.bench == "ppl" || o.bench == "kl") return run_text_metric(o);
  EvalResult res;
  const double t0 = now_s();

  // Questions.
  std::string questions = o.data;
  if (o.bench == "shapes" && questions.empty()) {
#ifdef EQAT_HAVE_SHAPES
    const std::string dir = path_join(o.out, "shapes_test");
    if (!file_exists(path_join(dir, "test.jsonl"))) write_standard_shapes_test(dir);
    questions = dir;
#else
    throw_input_error("--bench shapes without --data needs the shapes generator (src/data/shapes.h), which this "
                      "build lacks; pass --data DIR (eqat data shapes --out DIR)");
#endif
  }
  EQAT_CHECK(!questions.empty(), "--data is required for --bench ", o.bench);
  if (is_directory(questions)) {
    EQAT_CHECK(o.bench == "shapes", "--data ", questions, ": a directory is only accepted for --bench shapes");
    questions = path_join(questions, "test.jsonl");
  }
  EQAT_CHECK(file_exists(questions), questions, ": no such file (--data)");
  o.data = questions;
  const std::string image_root = o.images.empty() ? parent_dir(questions) : o.images;
  if (o.images.empty()) o.images = image_root;
  if (o.bench == "shapes" && o.ground_truth.empty()) o.ground_truth = sibling_answers(questions);
  std::vector<Item> items = o.bench == "scienceqa" ? load_scienceqa_items(questions, image_root)
                            : o.bench == "mmbench" ? load_mmbench_items(questions, o.out)
                                                   : load_jsonl_items(questions, image_root);
  if (o.limit >= 0 && static_cast<int64_t>(items.size()) > o.limit) items.resize(o.limit);
  res.total = static_cast<int64_t>(items.size());
  if (o.max_new_tokens < 0) o.max_new_tokens = o.bench == "scienceqa" ? 1024 : 128;

  // Resume: answers already in the file are skipped — but only answers of the same model and generation settings
  // (answers.source names them): resuming into another model's answers would silently score a mix of two models.
  res.answers_path = path_join(o.out, "answers.jsonl");
  {
    const std::string source_path = path_join(o.out, "answers.source");
    const std::string source = answers_source(o);
    if (file_exists(res.answers_path) && file_exists(source_path))
      EQAT_CHECK(read_file(source_path) == source, res.answers_path,
                 ": holds answers of another model or generation settings (see ", source_path,
                 "); use a new --out, or delete the directory to start over");
    EQAT_CHECK(!file_exists(res.answers_path) || file_exists(source_path), res.answers_path,
               ": answers of an unknown model (no answers.source beside them); use a new --out or delete the file");
    write_file_atomic(source_path, source);
  }
  repair_tail(res.answers_path);
  std::set<std::string> done, queued;
  if (file_exists(res.answers_path))
    for (const auto& a : read_answers(res.answers_path, true)) done.insert(answer_key(a.qid, a.prompt));
  // Never two answers for one key: answered keys are skipped, and a question repeated in the question file (same
  // question_id and prompt) is answered once (the scorers would count the second answer as a duplicate).
  std::vector<Item> todo;
  int64_t repeated = 0;
  for (auto& it : items) {
    const std::string key = answer_key(it.qid, it.answer_prompt);
    if (done.count(key)) {
      ++res.resumed;
      continue;
    }
    if (!queued.insert(key).second) {
      ++repeated;
      continue;
    }
    todo.push_back(it);
  }
  if (repeated)
    std::cerr << "warning: " << repeated << " question(s) of " << questions
              << " repeat an earlier question's question_id and prompt; each is answered once\n";
  if (res.resumed) std::cerr << "resuming: " << res.resumed << " of " << res.total << " already answered\n";

  std::vector<std::string> bad_msgs;
  // The model is loaded on first use (generation, answer KL), once: a fully resumed run without --reference
  // never loads it.
  std::optional<Model> loaded;
  auto model = [&]() -> Model& {
    if (!loaded) {
      LoadOptions lo;
      lo.device = o.device;
      lo.dtype = o.dtype;
      lo.fuse_projections = true;
      lo.weights_as_stored = true;
      loaded.emplace(load_model(o.model_dir, lo));
      apply_threads(o, *loaded);
    }
    return *loaded;
  };
  if (!todo.empty()) {
    Model& m = model();
    if (o.template_name.empty()) o.template_name = model_template(o.model_dir, "llava-1.5");
    const PromptTemplate tmpl = parse_template(o.template_name);
    const std::string model_id = model_id_of(o.model_dir);
    GenerateOptions gopts;
    gopts.max_new_tokens = o.max_new_tokens;
    gopts.sampling.temperature = 0;  // LLaVA's evaluation is greedy
    gopts.stop_ids = {m.tok->eos_id()};
    if (m.cfg.text.eos_token_id >= 0 && m.cfg.text.eos_token_id != m.tok->eos_id())
      gopts.stop_ids.push_back(m.cfg.text.eos_token_id);
    const int64_t ctx = m.cfg.text.max_position_embeddings;
    if (gopts.max_new_tokens >= ctx)  // generate() caps each batch at the context left after its prompts
      std::cerr << "warning: --max-new-tokens " << gopts.max_new_tokens << " capped at the model's context of " << ctx
                << " positions less each prompt" << std::endl;

    std::ofstream out(res.answers_path, std::ios::app | std::ios::binary);
    EQAT_CHECK(out.good(), res.answers_path, ": cannot open for writing");
    Progress bar(static_cast<int64_t>(todo.size()), o.progress, "q");
    int64_t processed = 0, gen_tokens = 0;
    size_t next = 0;
    // Rows of the current batch: prepared (tokenized + embedded) or rejected as bad.
    while (next < todo.size()) {
      std::vector<const Item*> rows;
      std::vector<at::Tensor> embeds;
      while (next < todo.size() && static_cast<int64_t>(rows.size()) < o.batch_size) {
        const Item& it = todo[next++];
        std::string bad = it.bad;
        at::Tensor e;
        if (bad.empty()) {
          try {
            ImageInput image;
            if (!it.image.empty()) {
              EQAT_CHECK(m.multimodal(), "question ", it.qid_json, ": has an image but ", o.model_dir,
                         " is a text-only model");
              EQAT_CHECK(file_exists(it.image), "question ", it.qid_json, ": image not found: ", it.image);
              image = load_pixels(m, it.image, o.strict_images);
            }
            const std::string text = render_prompt(tmpl, it.prompt, !it.image.empty());
            std::vector<int64_t> ids = tokenize_prompt(*m.tok, text, tmpl, m.image_token_id(), prompt_image_tokens(m, image));
            EQAT_CHECK(static_cast<int64_t>(ids.size()) < ctx, "question ", it.qid_json, ": prompt of ",
                       ids.size(), " positions does not fit the model's context of ", ctx);
            e = embed_prompt(m, ids, image);  // [1,T_i,C]
          } catch (const InputError& err) {
            bad = err.what();
          }
        }
        if (!bad.empty()) {
          if (!o.skip_bad)
            throw_input_error(bad + " (--skip-bad skips such records and counts them)");
          bad_msgs.push_back(bad);
          ++res.skipped;
          ++processed;
          continue;
        }
        rows.push_back(&it);
        embeds.push_back(e);
      }
      if (rows.empty()) {
        bar.update(processed, gen_tokens);
        continue;
      }
      // Left-pad the embeddings: zeros at pads, valid mask false there.
      int64_t T = 0;
      for (const auto& e : embeds) T = std::max(T, e.size(1));
      const int64_t B = static_cast<int64_t>(rows.size()), C = embeds[0].size(2);
      at::Tensor batch = at::zeros({B, T, C}, embeds[0].options());
      at::Tensor valid = at::zeros({B, T}, at::kBool);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t Ti = embeds[b].size(1);
        batch.select(0, b).narrow(0, T - Ti, Ti).copy_(embeds[b][0]);
        valid.select(0, b).narrow(0, T - Ti, Ti).fill_(true);
      }
      GenerateResult g = generate(m.lm, batch, valid, gopts);
      std::string lines;
      for (int64_t b = 0; b < B; ++b) {
        const Item& it = *rows[b];
        gen_tokens += static_cast<int64_t>(g.tokens[b].size());
        ordered_json a;
        a["question_id"] = json::parse(it.qid_json);
        a["prompt"] = it.answer_prompt;
        a["text"] = trim(m.tok->decode(g.tokens[b], true));  // LLaVA: batch_decode(skip_special).strip()
        a["answer_id"] = answer_id(model_id, answer_key(it.qid, it.answer_prompt));
        a["model_id"] = model_id;
        ordered_json meta = ordered_json::object();
        if (!it.image.empty()) meta["image"] = std::filesystem::absolute(it.image).string();  // for reports
        if (!it.category.empty()) meta["category"] = it.category;
        a["metadata"] = meta;
        lines += a.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";  // random weights: bad UTF-8
      }
      out << lines << std::flush;  // one batch at a time; a kill loses at most this batch
      EQAT_CHECK(out.good(), res.answers_path, ": write failed");
      processed += B;
      res.answered += B;
      bar.update(processed, gen_tokens);
    }
    bar.finish();
  }
  if (res.answered > 0 && res.resumed > 0) reorder_answers(res.answers_path, items);
  for (const auto& msg : bad_msgs) std::cerr << "skipped: " << msg << "\n";
  if (res.skipped) std::cerr << "skipped " << res.skipped << " bad record(s)\n";

  // Score.
  ScoreOptions so;
  so.only_answered = o.limit >= 0 || res.skipped > 0;
  so.strict = o.strict_answers;
  const std::string& A = res.answers_path;
  if (!file_exists(A)) write_file_atomic(A, "");
  auto have = [](const std::string& p) { return !p.empty() && file_exists(p); };
  if (o.bench == "shapes" && have(o.ground_truth)) {
    res.score = score_shapes(questions, o.ground_truth, A, so), res.scored = true;
    if (!o.reference_dir.empty()) add_answer_kl(o, model(), items, res.score, path_join(o.out, "answer_kl.jsonl"));
  } else if (o.bench == "pope" && have(o.ground_truth)) {
    res.score = score_pope(o.ground_truth, questions, A, so), res.scored = true;
  } else if (o.bench == "mme" && have(o.ground_truth)) {
    res.score = score_mme(o.ground_truth, questions, A, so), res.scored = true;
  } else if (o.bench == "scienceqa") {
    res.score = score_scienceqa(questions, A, so), res.scored = true;
  } else if (o.bench == "mmbench") {
    res.score = score_mmbench(questions, A, so), res.scored = true;
  } else if (o.bench == "textvqa" && have(o.ground_truth)) {
    res.score = score_textvqa(o.ground_truth, A, so), res.scored = true;
  } else if (o.bench == "gqa") {
    const AnswerChecks checks = write_gqa_predictions(A, path_join(o.out, "gqa_predictions.json"), so);
    if (have(o.ground_truth))
      res.score = score_gqa(o.ground_truth, A, so), res.scored = true;  // its notes repeat the checks
    else
      for (const auto& n : checks.notes) std::cerr << "note: " << n << "\n";
  } else if (o.bench == "seed" && have(o.ground_truth)) {
    res.score = score_seed(o.ground_truth, A, so), res.scored = true;
  } else if (o.bench == "vqav2") {
    for (const auto& n : write_vqav2_upload(A, path_join(o.out, "vqav2_upload.json"), so).notes)
      std::cerr << "note: " << n << "\n";
    std::cerr << "VQAv2 is scored by the EvalAI server: upload " << path_join(o.out, "vqav2_upload.json") << "\n";
  }
  if (!res.scored && o.bench != "vqav2")
    std::cerr << "not scored: --bench " << o.bench << " needs --ground-truth (see eqat score " << o.bench
              << " --help)\n";
  if (res.scored) {
    if (res.skipped) res.score.notes.push_back(str_cat(res.skipped, " bad records skipped"));
    res.scores_path = path_join(o.out, "scores.json");
    write_file_atomic(res.scores_path, score_to_json(res.score) + "\n");
    write_judgements(path_join(o.out, "judged.jsonl"), A, res.score);
  }
  res.seconds = now_s() - t0;
  write_run_json(o, path_join(o.out, "run.json"),
                 {{"questions", res.total},
                  {"answered_this_run", res.answered},
                  {"resumed", res.resumed},
                  {"skipped_bad", res.skipped},
                  {"seconds", res.seconds}});
  return res;
}

}  // namespace eqat
