// Scorers: each follows the official script named in its comment (LLAVA.md §5), including its quirks; where we
// deviate (robustness for partial runs) the comment says so.
#include "eval/score.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <fstream>
#include <iomanip>
#include <limits>
#include <regex>
#include <set>
#include <sstream>

#include "data/error.h"
#include "data/json_util.h"
#include "data/fs.h"
#include "eval/text_util.h"
#if __has_include("data/shapes.h")
#include "data/shapes.h"
#define EQAT_HAVE_SHAPES 1
#endif

namespace eqat {

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

// ---------------------------------------------------------------------------------------------------------------
// Files

std::string answer_key(const std::string& qid, const std::string& prompt) { return qid + '\x1f' + prompt; }

namespace {

std::string qid_text(const json& v) { return v.is_string() ? v.get<std::string>() : v.dump(); }

std::string str_field(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return "";
  return it->is_string() ? it->get<std::string>() : it->dump();
}

// Calls fn(json, line_no) for each non-empty line of a JSONL file.
template <typename Fn>
void for_each_jsonl(const std::string& path, bool tolerate_torn_tail, Fn fn) {
  const std::string data = read_file(path);
  size_t pos = 0;
  int64_t line_no = 0;
  while (pos < data.size()) {
    size_t nl = data.find('\n', pos);
    const bool terminated = nl != std::string::npos;
    if (!terminated) nl = data.size();
    std::string line = data.substr(pos, nl - pos);
    pos = nl + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {
      if (!terminated && tolerate_torn_tail) return;  // a writer killed mid-line
      throw_input_error(str_cat(path, ":", line_no, ": malformed JSON (", json_error_message(e), ")"));
    }
    EQAT_CHECK(j.is_object(), path, ":", line_no, ": expected a JSON object");
    fn(j, line_no);
  }
}

json parse_json_file(const std::string& path) {
  try {
    return json::parse(read_file(path));
  } catch (const json::exception& e) {
    throw_input_error(str_cat(path, ": malformed JSON (", json_error_message(e), ")"));
  }
}

double pct(double num, double den) { return den > 0 ? 100.0 * num / den : 0.0; }
double frac(double num, double den) { return den > 0 ? num / den : 0.0; }

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

}  // namespace

std::vector<Answer> read_answers(const std::string& path, bool tolerate_torn_tail) {
  std::vector<Answer> out;
  for_each_jsonl(path, tolerate_torn_tail, [&](const json& j, int64_t line) {
    EQAT_CHECK(j.contains("question_id"), path, ":", line, ": answer record without question_id");
    EQAT_CHECK(j.contains("text"), path, ":", line, ": answer record without text");
    Answer a;
    a.qid = qid_text(j["question_id"]);
    a.qid_json = j["question_id"].dump();
    a.prompt = str_field(j, "prompt");
    a.text = str_field(j, "text");
    a.text_is_string = j["text"].is_string();
    if (j.contains("metadata")) a.metadata_json = j["metadata"].dump();
    a.line = line;
    out.push_back(std::move(a));
  });
  return out;
}

std::vector<Question> read_questions(const std::string& path) {
  std::vector<Question> out;
  for_each_jsonl(path, false, [&](const json& j, int64_t line) {
    EQAT_CHECK(j.contains("question_id"), path, ":", line, ": question record without question_id");
    EQAT_CHECK(j.contains("text") && j["text"].is_string(), path, ":", line, ": question record without text");
    Question q;
    q.qid = qid_text(j["question_id"]);
    q.qid_json = j["question_id"].dump();
    q.image = str_field(j, "image");
    q.text = j["text"].get<std::string>();
    q.category = str_field(j, "category");
    q.line = line;
    out.push_back(std::move(q));
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Answer checks: one pass over an answer file's records for every scorer, so a duplicate is never silently merged
// (a map by question id would keep the last; a list would score both), an answer for a question the benchmark
// does not have is never silently dropped, and a non-string "text" (which the official Python scripts mostly
// crash on: .find / .rstrip / re on an int) is never silently stringified. Counted and noted by default; --strict
// makes any of them an error.

namespace {
struct FirstFinding {
  int64_t line = 0;
  std::string id;
  void note(const Answer& a, int64_t count) {
    if (count == 1) line = a.line, id = a.qid_json;
  }
  // "(line 9: id 999)" for one, "(first at line 7: id 12)" for several.
  std::string where(int64_t n) const { return str_cat("(", n > 1 ? "first at " : "", "line ", line, ": id ", id, ")"); }
};
}  // namespace

AnswerChecks audit_answers(std::vector<Answer>& answers, AnswerKey key,
                           const std::function<bool(const std::string& qid)>& known, const std::string& path,
                           const ScoreOptions& o) {
  AnswerChecks c;
  FirstFinding dup, unk, nstr;
  std::set<std::string> seen;
  std::vector<Answer> kept;
  kept.reserve(answers.size());
  for (Answer& a : answers) {
    if (!a.text_is_string) nstr.note(a, ++c.non_string_text);
    if (known && !known(a.qid)) {  // before the duplicate test: an unknown id is never scored, however often
      unk.note(a, ++c.unknown_ids);
      continue;
    }
    if (!seen.insert(key == AnswerKey::kQuestionId ? a.qid : answer_key(a)).second) {
      dup.note(a, ++c.duplicates);
      continue;
    }
    kept.push_back(std::move(a));
  }
  answers = std::move(kept);
  const std::string dup_what = key == AnswerKey::kQuestionId
                                   ? (c.duplicates == 1 ? "duplicate question id" : "duplicate question ids")
                                   : (c.duplicates == 1 ? "duplicate question id + prompt"
                                                        : "duplicate question id + prompt pairs");
  const std::string unk_what = c.unknown_ids == 1 ? "unknown id" : "unknown ids";
  const std::string nstr_what = c.non_string_text == 1 ? "non-string text" : "non-string texts";
  if (o.strict && (c.duplicates || c.unknown_ids || c.non_string_text)) {
    std::vector<std::string> parts;
    if (c.duplicates) parts.push_back(str_cat(c.duplicates, " ", dup_what, " ", dup.where(c.duplicates)));
    if (c.unknown_ids) parts.push_back(str_cat(c.unknown_ids, " ", unk_what, " ", unk.where(c.unknown_ids)));
    if (c.non_string_text)
      parts.push_back(str_cat(c.non_string_text, " ", nstr_what, " ", nstr.where(c.non_string_text)));
    std::string msg = path + ": ";
    for (size_t i = 0; i < parts.size(); ++i) msg += (i ? ", " : "") + parts[i];
    throw_input_error(msg + "; rerun without --strict to score anyway");
  }
  if (c.duplicates)
    c.notes.push_back(str_cat(c.duplicates, " ", dup_what, " in ", path, ": later answers ignored, the first scored ",
                              dup.where(c.duplicates)));
  if (c.unknown_ids)
    c.notes.push_back(str_cat(c.unknown_ids, " ", unk_what, " in ", path, ": not in the benchmark, not scored ",
                              unk.where(c.unknown_ids)));
  if (c.non_string_text)
    c.notes.push_back(str_cat(c.non_string_text, " ", nstr_what, " in ", path, ": scored as the JSON text read ",
                              nstr.where(c.non_string_text)));
  return c;
}

void AnswerChecks::add_to(ScoreReport& r) const {
  r.metrics.push_back({"answer_checks.duplicates", static_cast<double>(duplicates)});
  r.metrics.push_back({"answer_checks.unknown_ids", static_cast<double>(unknown_ids)});
  r.metrics.push_back({"answer_checks.non_string_text", static_cast<double>(non_string_text)});
  r.notes.insert(r.notes.end(), notes.begin(), notes.end());
}

bool is_count_key(const std::string& key) {
  if (key.rfind("answer_checks.", 0) == 0) return true;
  const std::string last = key.substr(key.rfind('.') == std::string::npos ? 0 : key.rfind('.') + 1);
  return last == "n" || (last.size() > 2 && last.compare(last.size() - 2, 2, "_n") == 0) || last == "windows" ||
         last == "tokens" || last == "seq_len" || last == "failed_extractions";
}

double ScoreReport::get(const std::string& key) const {
  for (const auto& m : metrics)
    if (m.first == key) return m.second;
  return std::numeric_limits<double>::quiet_NaN();
}

std::string score_to_json(const ScoreReport& r) {
  ordered_json j;
  j["bench"] = r.bench;
  j["unit"] = r.unit;
  for (const auto& [key, value] : r.metrics) {
    ordered_json v;  // null for NaN/inf
    if (std::isfinite(value)) v = is_count_key(key) ? ordered_json(std::llround(value)) : ordered_json(value);
    // Names taken from the data (MMBench categories, SEED types, POPE splits, shapes families) may contain dots, so
    // a path can run into a value already placed ("categories.a" then "categories.a.b") or end on an object. Such
    // a metric keeps its whole dotted key at the top level instead of failing (found by fuzz/eval_fuzz).
    const std::vector<std::string> parts = split(key, '.');
    ordered_json* node = &j;
    size_t i = 0;
    for (; i + 1 < parts.size(); ++i) {
      auto it = node->find(parts[i]);
      if (it != node->end() && !it->is_object()) break;
      node = &(*node)[parts[i]];
    }
    if (i + 1 == parts.size() && !(node->contains(parts[i]) && (*node)[parts[i]].is_object()))
      (*node)[parts[i]] = std::move(v);
    else
      j[key] = std::move(v);
  }
  if (!r.notes.empty()) j["notes"] = r.notes;
  // Names from the data (a TSV category, a POPE file name) need not be UTF-8; JSON must be, so bad bytes become
  // U+FFFD instead of a type_error 316 (found by fuzz/eval_fuzz).
  return j.dump(2, ' ', false, ordered_json::error_handler_t::replace);
}

std::string score_to_text(const ScoreReport& r) {
  size_t w = 0;
  for (const auto& m : r.metrics) w = std::max(w, m.first.size());
  std::ostringstream os;
  os << r.bench << " (" << (r.unit == "fraction" ? "fraction 0-1" : r.unit) << ")\n";
  for (const auto& [key, value] : r.metrics) {
    os << "  " << std::left << std::setw(static_cast<int>(w) + 2) << key;
    if (is_count_key(key))
      os << static_cast<int64_t>(value);
    else
      os << std::fixed << std::setprecision(r.unit == "percent" ? 2 : 4) << value;
    os << "\n";
  }
  for (const auto& n : r.notes) os << "  note: " << n << "\n";
  return os.str();
}

// ---------------------------------------------------------------------------------------------------------------
// Parsing rules

// eval_pope.py: text before the first "." (if any), commas deleted, split on single spaces; any token exactly
// "No", "not" or "no" -> no, else yes.
bool pope_is_yes(const std::string& text) {
  std::string t = text.substr(0, text.find('.'));
  t.erase(std::remove(t.begin(), t.end(), ','), t.end());
  size_t start = 0;
  while (true) {
    size_t sp = t.find(' ', start);
    std::string w = t.substr(start, sp == std::string::npos ? std::string::npos : sp - start);
    if (w == "No" || w == "not" || w == "no") return false;
    if (sp == std::string::npos) break;
    start = sp + 1;
  }
  return true;
}

// MME calculation.py: lowercase; exact yes/no, else the first 4 characters containing "yes", then "no".
// (The official script reads the prediction with its trailing newline; that never changes the outcome.)
std::string mme_parse(const std::string& text) {
  const std::string t = lower(text);
  if (t == "yes" || t == "no") return t;
  const std::string prefix = t.substr(0, 4);
  if (prefix.find("yes") != std::string::npos) return "yes";
  if (prefix.find("no") != std::string::npos) return "no";
  return "other";
}

// eval_science_qa.py with options A–E: exact letter; "X. …"; exactly one match of r"The answer is ([A-Z])."
// (the final "." is any character but a newline, as in Python's re); else FAILED.
std::string sqa_extract(const std::string& text) {
  static const std::string kOptions = "ABCDE";
  if (text.size() == 1 && kOptions.find(text[0]) != std::string::npos) return text;
  if (text.size() >= 3 && kOptions.find(text[0]) != std::string::npos && text.compare(1, 2, ". ") == 0)
    return text.substr(0, 1);
  static const std::regex re("The answer is ([A-Z]).");
  std::vector<std::string> found;
  for (auto it = std::sregex_iterator(text.begin(), text.end(), re); it != std::sregex_iterator(); ++it)
    found.push_back((*it)[1].str());
  if (found.size() == 1) return found[0];
  return "FAILED";
}

// VLMEvalKit can_infer (rule stage, LLAVA.md §5.3): refusals -> "Z"; replace .()[],:;!*#{} by spaces and split;
// exactly one option letter as a standalone token among the last 5 tokens -> it; else exactly one option text
// (lowercased) contained in the lowercased answer, the answer being at most twice the total option text -> it.
std::string mmbench_extract(const std::string& text,
                            const std::vector<std::pair<std::string, std::string>>& options) {
  static const char* kRefusals[] = {"Sorry, I can't help with images of people yet.", "I can't process this file.",
                                    "I'm sorry, but without the image provided", "Cannot determine the answer"};
  for (const char* r : kRefusals)
    if (text.find(r) != std::string::npos) return "Z";
  std::string mod = text;
  for (char& c : mod)
    if (std::string(".()[],:;!*#{}").find(c) != std::string::npos) c = ' ';
  std::vector<std::string> toks;
  {
    std::istringstream is(mod);
    std::string w;
    while (is >> w) toks.push_back(w);
  }
  int count = 0;
  std::string hit;
  for (const auto& [letter, _] : options)
    if (std::find(toks.begin(), toks.end(), letter) != toks.end()) {
      ++count;
      hit = letter;
    }
  if (count == 1) {
    const auto pos = std::find(toks.begin(), toks.end(), hit) - toks.begin();
    if (pos > static_cast<long>(toks.size()) - 5) return hit;
  } else if (count == 0 && std::find(toks.begin(), toks.end(), "Z") != toks.end()) {
    return "Z";
  }
  const std::string low = lower(text);
  size_t total = 0;
  for (const auto& o : options) total += o.second.size();
  std::string cand;
  int ncand = 0;
  for (const auto& [letter, opt] : options) {
    if (!opt.empty() && low.find(lower(opt)) != std::string::npos) {
      ++ncand;
      cand = letter;
    }
  }
  if (ncand == 1 && text.size() <= 2 * total) return cand;
  return "";
}

// The shapes world's own answer normalisation when it is built in (one definition for training and scoring).
std::string shapes_normalize(const std::string& text) {
#ifdef EQAT_HAVE_SHAPES
  return shapes_normalize_answer(text);
#endif
  std::string t = lower(trim(text));
  if (!t.empty() && t.back() == '.') t.pop_back();
  return trim(t);
}

// ---------------------------------------------------------------------------------------------------------------
// VQA accuracy (m4c_evaluator.py EvalAIAnswerProcessor + TextVQAAccuracyEvaluator)

namespace {

const std::map<std::string, std::string>& contractions() {
  static const std::map<std::string, std::string> m = {
      {"aint", "ain't"}, {"arent", "aren't"}, {"cant", "can't"}, {"couldve", "could've"}, {"couldnt", "couldn't"},
      {"couldn'tve", "couldn't've"}, {"couldnt've", "couldn't've"}, {"didnt", "didn't"}, {"doesnt", "doesn't"},
      {"dont", "don't"}, {"hadnt", "hadn't"}, {"hadnt've", "hadn't've"}, {"hadn'tve", "hadn't've"},
      {"hasnt", "hasn't"}, {"havent", "haven't"}, {"hed", "he'd"}, {"hed've", "he'd've"}, {"he'dve", "he'd've"},
      {"hes", "he's"}, {"howd", "how'd"}, {"howll", "how'll"}, {"hows", "how's"}, {"Id've", "I'd've"},
      {"I'dve", "I'd've"}, {"Im", "I'm"}, {"Ive", "I've"}, {"isnt", "isn't"}, {"itd", "it'd"},
      {"itd've", "it'd've"}, {"it'dve", "it'd've"}, {"itll", "it'll"}, {"let's", "let's"}, {"maam", "ma'am"},
      {"mightnt", "mightn't"}, {"mightnt've", "mightn't've"}, {"mightn'tve", "mightn't've"},
      {"mightve", "might've"}, {"mustnt", "mustn't"}, {"mustve", "must've"}, {"neednt", "needn't"},
      {"notve", "not've"}, {"oclock", "o'clock"}, {"oughtnt", "oughtn't"}, {"ow's'at", "'ow's'at"},
      {"'ows'at", "'ow's'at"}, {"'ow'sat", "'ow's'at"}, {"shant", "shan't"}, {"shed've", "she'd've"},
      {"she'dve", "she'd've"}, {"she's", "she's"}, {"shouldve", "should've"}, {"shouldnt", "shouldn't"},
      {"shouldnt've", "shouldn't've"}, {"shouldn'tve", "shouldn't've"}, {"somebody'd", "somebodyd"},
      {"somebodyd've", "somebody'd've"}, {"somebody'dve", "somebody'd've"}, {"somebodyll", "somebody'll"},
      {"somebodys", "somebody's"}, {"someoned", "someone'd"}, {"someoned've", "someone'd've"},
      {"someone'dve", "someone'd've"}, {"someonell", "someone'll"}, {"someones", "someone's"},
      {"somethingd", "something'd"}, {"somethingd've", "something'd've"}, {"something'dve", "something'd've"},
      {"somethingll", "something'll"}, {"thats", "that's"}, {"thered", "there'd"}, {"thered've", "there'd've"},
      {"there'dve", "there'd've"}, {"therere", "there're"}, {"theres", "there's"}, {"theyd", "they'd"},
      {"theyd've", "they'd've"}, {"they'dve", "they'd've"}, {"theyll", "they'll"}, {"theyre", "they're"},
      {"theyve", "they've"}, {"twas", "'twas"}, {"wasnt", "wasn't"}, {"wed've", "we'd've"},
      {"we'dve", "we'd've"}, {"weve", "we've"}, {"werent", "weren't"}, {"whatll", "what'll"},
      {"whatre", "what're"}, {"whats", "what's"}, {"whatve", "what've"}, {"whens", "when's"},
      {"whered", "where'd"}, {"wheres", "where's"}, {"whereve", "where've"}, {"whod", "who'd"},
      {"whod've", "who'd've"}, {"who'dve", "who'd've"}, {"wholl", "who'll"}, {"whos", "who's"},
      {"whove", "who've"}, {"whyll", "why'll"}, {"whyre", "why're"}, {"whys", "why's"}, {"wont", "won't"},
      {"wouldve", "would've"}, {"wouldnt", "wouldn't"}, {"wouldnt've", "wouldn't've"},
      {"wouldn'tve", "wouldn't've"}, {"yall", "y'all"}, {"yall'll", "y'all'll"}, {"y'allll", "y'all'll"},
      {"yall'd've", "y'all'd've"}, {"y'alld've", "y'all'd've"}, {"y'all'dve", "y'all'd've"}, {"youd", "you'd"},
      {"youd've", "you'd've"}, {"you'dve", "you'd've"}, {"youll", "you'll"}, {"youre", "you're"},
      {"youve", "you've"}};
  return m;
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  size_t pos = 0;
  while ((pos = s.find(from, pos)) != std::string::npos) {
    s.replace(pos, from.size(), to);
    pos += to.size();
  }
  return s;
}

bool is_digit(char c) { return c >= '0' && c <= '9'; }

}  // namespace

std::string vqa_normalize(const std::string& text) {
  // word_tokenize: lower; delete "," and "?"; "'s" -> " 's"; strip.
  std::string t = lower(text);
  t = replace_all(t, ",", "");
  t = replace_all(t, "?", "");
  t = replace_all(t, "'s", " 's");
  t = trim(t);
  // newlines/tabs -> spaces; strip.
  for (char& c : t)
    if (c == '\n' || c == '\t') c = ' ';
  t = trim(t);
  // process_punctuation: the tests look at the text before any replacement. COMMA_STRIP (digit,digit) can never
  // match here (commas were deleted above), so only the "p followed/preceded by a space" test matters.
  static const char* kPunct[] = {";", "/", "[", "]", "\"", "{", "}", "(", ")", "=", "+", "\\",
                                 "_", "-", ">", "<", "@", "`", ",", "?", "!"};
  std::string out = t;
  for (const char* p : kPunct) {
    const std::string ps(p);
    if (t.find(ps + " ") != std::string::npos || t.find(" " + ps) != std::string::npos)
      out = replace_all(out, ps, "");
    else
      out = replace_all(out, ps, " ");
  }
  // PERIOD_STRIP: delete "." not followed by a digit, at most 32 times (re.UNICODE passed as the count).
  {
    std::string r;
    int removed = 0;
    for (size_t i = 0; i < out.size(); ++i) {
      if (out[i] == '.' && removed < 32 && !(i + 1 < out.size() && is_digit(out[i + 1]))) {
        ++removed;
        continue;
      }
      r += out[i];
    }
    out = r;
  }
  // process_digit_article: lower, split, number words -> digits, drop articles, contractions, join.
  static const std::map<std::string, std::string> kNumbers = {
      {"none", "0"}, {"zero", "0"}, {"one", "1"}, {"two", "2"}, {"three", "3"}, {"four", "4"},
      {"five", "5"}, {"six", "6"}, {"seven", "7"}, {"eight", "8"}, {"nine", "9"}, {"ten", "10"}};
  std::istringstream is(lower(out));
  std::vector<std::string> words;
  std::string w;
  while (is >> w) {
    auto it = kNumbers.find(w);
    if (it != kNumbers.end()) w = it->second;
    if (w == "a" || w == "an" || w == "the") continue;
    words.push_back(w);
  }
  std::string res;
  for (size_t i = 0; i < words.size(); ++i) {
    auto it = contractions().find(words[i]);
    if (i) res += ' ';
    res += it != contractions().end() ? it->second : words[i];
  }
  return res;
}

// Average over the 10 leave-one-out subsets of min(1, matches among the other 9 / 3).
double vqa_soft_accuracy(const std::string& pred, const std::vector<std::string>& gt_answers) {
  const std::string p = vqa_normalize(pred);
  std::vector<std::string> gts;
  for (const auto& g : gt_answers) gts.push_back(vqa_normalize(g));
  if (gts.empty()) return 0.0;
  double sum = 0;
  for (size_t i = 0; i < gts.size(); ++i) {
    int matches = 0;
    for (size_t k = 0; k < gts.size(); ++k)
      if (k != i && gts[k] == p) ++matches;
    sum += std::min(1.0, matches / 3.0);
  }
  return sum / static_cast<double>(gts.size());
}

// ---------------------------------------------------------------------------------------------------------------
// shapes

namespace {
struct Confusion {
  int64_t tp = 0, fp = 0, tn = 0, fn = 0;
  void add(bool pred_yes, bool label_yes) {
    if (pred_yes && label_yes) ++tp;
    else if (pred_yes) ++fp;
    else if (label_yes) ++fn;
    else ++tn;
  }
  int64_t n() const { return tp + fp + tn + fn; }
  double precision() const { return frac(tp, tp + fp); }
  double recall() const { return frac(tp, tp + fn); }
  double f1() const {
    const double p = precision(), r = recall();
    return p + r > 0 ? 2 * p * r / (p + r) : 0.0;
  }
};
}  // namespace

std::map<std::string, std::string> read_shapes_ground_truth(const std::string& path) {
  std::map<std::string, std::string> gt;
  for_each_jsonl(path, false, [&](const json& j, int64_t line) {
    EQAT_CHECK(j.contains("question_id") && j.contains("text"), path, ":", line,
               ": ground-truth record needs question_id and text");
    gt[qid_text(j["question_id"])] = str_field(j, "text");
  });
  return gt;
}

ScoreReport score_shapes(const std::string& questions, const std::string& ground_truth, const std::string& answers,
                         const ScoreOptions& o) {
  std::vector<Question> qs = read_questions(questions);
  const std::map<std::string, std::string> gt = read_shapes_ground_truth(ground_truth);
  std::set<std::string> qids;
  for (const auto& q : qs) qids.insert(q.qid);
  std::vector<Answer> ans = read_answers(answers);
  const AnswerChecks checks = audit_answers(
      ans, AnswerKey::kQuestionId, [&](const std::string& id) { return qids.count(id) > 0; }, answers, o);
  std::map<std::string, const Answer*> by_qid;
  for (const auto& a : ans) by_qid.emplace(a.qid, &a);

  ScoreReport r;
  r.bench = "shapes";
  r.unit = "fraction";
  r.headline = "accuracy";
  std::vector<std::string> family_order;
  std::map<std::string, std::pair<int64_t, int64_t>> fam;  // family -> (correct, n)
  Confusion yn;
  int64_t correct = 0, n = 0, missing = 0;
  for (const auto& q : qs) {
    auto g = gt.find(q.qid);
    EQAT_CHECK(g != gt.end(), ground_truth, ": no ground truth for question_id ", q.qid_json, " (", questions, ":",
               q.line, ")");
    auto a = by_qid.find(q.qid);
    if (a == by_qid.end()) {
      ++missing;
      if (o.only_answered) continue;
    }
    const std::string pred = a == by_qid.end() ? "" : shapes_normalize(a->second->text);
    const std::string want = shapes_normalize(g->second);
    const bool ok = a != by_qid.end() && pred == want;
    if (a != by_qid.end()) r.correct[answer_key(*a->second)] = ok;
    const std::string family = q.category.empty() ? "default" : q.category;
    if (!fam.count(family)) family_order.push_back(family);
    fam[family].first += ok;
    fam[family].second += 1;
    correct += ok;
    ++n;
    if (want == "yes" || want == "no") yn.add(pred == "yes", want == "yes");
  }
  r.metrics.push_back({"accuracy", frac(correct, n)});
  r.metrics.push_back({"n", static_cast<double>(n)});
  if (yn.n() > 0) {
    r.metrics.push_back({"yes_no.f1", yn.f1()});
    r.metrics.push_back({"yes_no.precision", yn.precision()});
    r.metrics.push_back({"yes_no.recall", yn.recall()});
    r.metrics.push_back({"yes_no.n", static_cast<double>(yn.n())});
  }
  std::sort(family_order.begin(), family_order.end());
  for (const auto& f : family_order) {
    r.metrics.push_back({"families." + f + ".accuracy", frac(fam[f].first, fam[f].second)});
    r.metrics.push_back({"families." + f + ".n", static_cast<double>(fam[f].second)});
  }
  if (missing)
    r.notes.push_back(str_cat(missing, " questions have no answer",
                              o.only_answered ? " (not scored)" : " (scored as wrong)"));
  checks.add_to(r);
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// POPE (eval_pope.py)

ScoreReport score_pope(const std::string& annotation_dir, const std::string& questions, const std::string& answers,
                       const ScoreOptions& o) {
  std::map<std::string, std::string> category;  // qid -> split
  for (const auto& q : read_questions(questions)) category[q.qid] = q.category;
  std::vector<Answer> ans = read_answers(answers);
  // eval_pope.py would stop with a KeyError on an answer whose question_id is not in the question file. Such an
  // answer belongs to no split, so leaving it out scores every split exactly as the official script scores the
  // file without it: counted and noted like every other scorer's unknown ids (an error under --strict). A later
  // duplicate is dropped too (the official script would zip it with the next label, shifting the whole split).
  const AnswerChecks checks = audit_answers(
      ans, AnswerKey::kQuestionId, [&](const std::string& id) { return category.count(id) > 0; }, answers, o);

  std::vector<std::string> splits;
  for (const auto& e : list_dir(annotation_dir)) {
    if (e.size() > 15 && e.rfind("coco_pope_", 0) == 0 && e.compare(e.size() - 5, 5, ".json") == 0)
      splits.push_back(e);
  }
  EQAT_CHECK(!splits.empty(), annotation_dir, ": no coco_pope_<split>.json label files");
  std::sort(splits.begin(), splits.end());

  ScoreReport r;
  r.bench = "pope";
  r.headline = "f1_mean";
  double f1_sum = 0;
  int nsplits = 0;
  for (const auto& file : splits) {
    const std::string name = file.substr(10, file.size() - 15);
    const std::string path = path_join(annotation_dir, file);
    std::vector<bool> labels;
    for_each_jsonl(path, false, [&](const json& j, int64_t line) {
      const std::string l = str_field(j, "label");
      EQAT_CHECK(l == "yes" || l == "no", path, ":", line, ": label must be yes or no, got '", l, "'");
      labels.push_back(l == "yes");
    });
    // Answers of this split in answer-file order, zipped with the label lines (the official matching).
    std::vector<const Answer*> cur;
    for (const auto& a : ans)
      if (category[a.qid] == name) cur.push_back(&a);
    if (cur.empty()) {
      r.notes.push_back("split " + name + ": no answers");
      continue;
    }
    Confusion c;
    int64_t yes = 0;
    for (size_t i = 0; i < cur.size(); ++i) {
      const bool pred = pope_is_yes(cur[i]->text);
      yes += pred;
      if (i < labels.size()) {
        c.add(pred, labels[i]);
        r.correct[answer_key(*cur[i])] = pred == labels[i];
      }
    }
    if (cur.size() != labels.size())
      r.notes.push_back(str_cat("split ", name, ": ", cur.size(), " answers vs ", labels.size(),
                                " labels (matched by order, as eval_pope.py)"));
    const std::string k = "splits." + name + ".";
    r.metrics.push_back({k + "accuracy", pct(c.tp + c.tn, c.n())});
    r.metrics.push_back({k + "precision", 100.0 * c.precision()});
    r.metrics.push_back({k + "recall", 100.0 * c.recall()});
    r.metrics.push_back({k + "f1", 100.0 * c.f1()});
    r.metrics.push_back({k + "yes_ratio", pct(yes, cur.size())});
    r.metrics.push_back({k + "n", static_cast<double>(c.n())});
    f1_sum += 100.0 * c.f1();
    ++nsplits;
  }
  r.metrics.insert(r.metrics.begin(), {"f1_mean", nsplits ? f1_sum / nsplits : 0.0});
  checks.add_to(r);
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// MME (LLaVA convert_answer_to_mme.py + MME eval_tool calculation.py)

namespace {
const std::vector<std::string> kMmePerception = {"existence", "count",     "position", "color",   "posters",
                                                 "celebrity", "scene",     "landmark", "artwork", "OCR"};
const std::vector<std::string> kMmeCognition = {"commonsense_reasoning", "numerical_calculation",
                                                "text_translation", "code_reasoning"};
}  // namespace

ScoreReport score_mme(const std::string& gt_dir, const std::string& questions, const std::string& answers,
                      const ScoreOptions& o) {
  // GT: (category, image, question) -> yes/no.
  std::map<std::string, std::string> gt;
  std::set<std::string> gt_images;  // category \t image: the question ids the ground truth knows
  auto key = [](const std::string& c, const std::string& img, const std::string& q) {
    return c + '\t' + img + '\t' + q;
  };
  for (const auto& file : list_dir(gt_dir)) {
    if (file.size() < 5 || file.compare(file.size() - 4, 4, ".txt") != 0) continue;
    const std::string cat = file.substr(0, file.size() - 4);
    const std::string path = path_join(gt_dir, file);
    std::istringstream is(read_file(path));
    std::string line;
    int64_t ln = 0;
    while (std::getline(is, line)) {
      ++ln;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty()) continue;
      auto f = split(line, '\t');
      EQAT_CHECK(f.size() >= 3, path, ":", ln, ": expected image<TAB>question<TAB>answer");
      gt[key(cat, f[0], f[1])] = lower(trim(f[2]));
      gt_images.insert(cat + '\t' + f[0]);
    }
  }
  EQAT_CHECK(!gt.empty(), gt_dir, ": no MME ground-truth <category>.txt files");
  // The question file is only a fallback for answers without a prompt (LLaVA writes the question as `prompt`).
  std::map<std::string, std::string> qtext;
  if (!questions.empty())
    for (const auto& q : read_questions(questions)) qtext.emplace(q.qid, q.text);

  struct Row {
    std::string image, gt, pred;
    const Answer* a;
  };
  std::map<std::string, std::vector<Row>> rows;  // category -> rows in answer order
  std::vector<Answer> ans = read_answers(answers);
  // question_id is "<category>/<image>"; it is known when the ground truth has that image in that category (a
  // known image with a question the ground truth lacks stays an error below: the answer file is malformed).
  // Duplicates by id + prompt: MME asks two questions per image id.
  const AnswerChecks checks = audit_answers(
      ans, AnswerKey::kQuestionIdAndPrompt,
      [&](const std::string& id) {
        return gt_images.count(id.substr(0, id.find('/')) + '\t' + id.substr(id.rfind('/') + 1)) > 0;
      },
      answers, o);
  for (const auto& a : ans) {
    const std::string cat = a.qid.substr(0, a.qid.find('/'));
    const std::string image = a.qid.substr(a.qid.rfind('/') + 1);
    std::string prompt = a.prompt.empty() && qtext.count(a.qid) ? qtext[a.qid] : a.prompt;
    prompt = replace_all(prompt, "<image>", "");
    const std::string kShort = "Answer the question using a single word or phrase.";
    if (prompt.find(kShort) != std::string::npos) prompt = trim(replace_all(prompt, kShort, ""));
    prompt = trim(prompt);
    if (prompt.find("Please answer yes or no.") == std::string::npos) {
      prompt += " Please answer yes or no.";
      if (!gt.count(key(cat, image, prompt)))
        prompt = replace_all(prompt, " Please answer yes or no.", "  Please answer yes or no.");
    }
    auto g = gt.find(key(cat, image, prompt));
    EQAT_CHECK(g != gt.end(), answers, ":", a.line, ": no MME ground truth for category '", cat, "', image '",
               image, "', question '", prompt, "'");
    rows[cat].push_back({image, g->second, mme_parse(a.text), &a});
  }

  ScoreReport r;
  r.bench = "mme";
  r.headline = "perception";
  double perception = 0, cognition = 0;
  std::vector<std::pair<std::string, double>> cats;
  auto score_category = [&](const std::string& cat) -> double {
    auto& v = rows[cat];
    // calculation.py pairs consecutive lines per image; we check that each pair is one image.
    EQAT_CHECK(v.size() % 2 == 0, answers, ": MME category '", cat, "' has ", v.size(),
               " answers; the official scorer needs both questions of every image");
    int64_t correct = 0, plus = 0;
    for (size_t i = 0; i < v.size(); i += 2) {
      EQAT_CHECK(v[i].image == v[i + 1].image, answers, ":", v[i + 1].a->line, ": MME answers for image '",
                 v[i].image, "' are not consecutive (the official scorer pairs consecutive answers)");
      int img_ok = 0;
      for (size_t k = i; k < i + 2; ++k) {
        const bool ok = v[k].pred == v[k].gt;
        correct += ok;
        img_ok += ok;
        r.correct[answer_key(*v[k].a)] = ok;
      }
      plus += img_ok == 2;
    }
    const double acc = pct(correct, v.size()), accp = pct(plus, v.size() / 2);
    const std::string k = "categories." + cat + ".";
    cats.push_back({k + "acc", acc});
    cats.push_back({k + "acc_plus", accp});
    cats.push_back({k + "score", acc + accp});
    cats.push_back({k + "n", static_cast<double>(v.size())});
    return acc + accp;
  };
  int np = 0, nc = 0;
  for (const auto& c : kMmePerception)
    if (rows.count(c)) perception += score_category(c), ++np;
  for (const auto& c : kMmeCognition)
    if (rows.count(c)) cognition += score_category(c), ++nc;
  for (const auto& [c, _] : rows)
    EQAT_CHECK(std::find(kMmePerception.begin(), kMmePerception.end(), c) != kMmePerception.end() ||
                   std::find(kMmeCognition.begin(), kMmeCognition.end(), c) != kMmeCognition.end(),
               answers, ": unknown MME category '", c, "'");
  r.metrics.push_back({"perception", perception});
  r.metrics.push_back({"cognition", cognition});
  r.metrics.push_back({"total", perception + cognition});
  for (auto& c : cats) r.metrics.push_back(c);
  if (np < 10 || nc < 4)
    r.notes.push_back(str_cat("answers cover ", np, "/10 perception and ", nc,
                              "/4 cognition categories; totals sum the covered ones"));
  checks.add_to(r);
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// ScienceQA (eval_science_qa.py)

namespace {
struct SqaProblem {
  std::string pid;
  int answer = -1;  // index
  int n_choices = 0;
  bool image = false;
};

// Number of lettered options "A. …", "B. …" on their own lines of a LLaVA prompt.
int count_prompt_options(const std::string& prompt) {
  int n = 0;
  for (const auto& line : split(prompt, '\n')) {
    if (line.size() >= 3 && line[0] == static_cast<char>('A' + n) && line[1] == '.' && line[2] == ' ') ++n;
  }
  return n;
}

std::vector<SqaProblem> read_sqa_problems(const std::string& path) {
  json j = parse_json_file(path);
  std::vector<SqaProblem> out;
  if (j.is_array()) {  // LLaVA llava_test_CQM-A.json
    for (size_t i = 0; i < j.size(); ++i) {
      const json& e = j[i];
      EQAT_CHECK(e.is_object() && e.contains("id") && e.contains("conversations") &&
                     e["conversations"].is_array() && e["conversations"].size() >= 2,
                 path, ": entry ", i, ": expected {id, conversations: [human, gpt]}");
      SqaProblem p;
      p.pid = qid_text(e["id"]);
      const std::string human = str_field(e["conversations"][0], "value");
      const std::string letter = trim(str_field(e["conversations"][1], "value"));
      p.n_choices = count_prompt_options(human);
      EQAT_CHECK(letter.size() == 1 && letter[0] >= 'A' && letter[0] < 'A' + std::max(p.n_choices, 1), path,
                 ": entry ", p.pid, ": answer '", letter, "' is not one of its ", p.n_choices, " options");
      p.answer = letter[0] - 'A';
      p.image = e.contains("image") && !e["image"].is_null();
      out.push_back(p);
    }
  } else if (j.is_object()) {  // ScienceQA problems.json: the test split
    for (auto it = j.begin(); it != j.end(); ++it) {
      const json& e = it.value();
      if (str_field(e, "split") != "test") continue;
      EQAT_CHECK(e.contains("choices") && e["choices"].is_array() && e.contains("answer") &&
                     e["answer"].is_number_integer(),
                 path, ": problem ", it.key(), ": needs choices[] and an integer answer");
      SqaProblem p;
      p.pid = it.key();
      p.n_choices = static_cast<int>(e["choices"].size());
      p.answer = e["answer"].get<int>();
      p.image = e.contains("image") && !e["image"].is_null();
      out.push_back(p);
    }
  } else {
    throw_input_error(path + ": expected a list (LLaVA format) or an object (problems.json)");
  }
  return out;
}
}  // namespace

// Deviation: IMG membership comes from the problem's image field rather than "<image>" in the answer's prompt;
// the two agree for prompts built as model_vqa_science does, and ours also counts a missing IMG answer as IMG.
ScoreReport score_scienceqa(const std::string& problems, const std::string& answers, const ScoreOptions& o) {
  std::vector<SqaProblem> probs = read_sqa_problems(problems);
  std::set<std::string> pids;
  for (const auto& p : probs) pids.insert(p.pid);
  std::vector<Answer> ans = read_answers(answers);
  const AnswerChecks checks = audit_answers(
      ans, AnswerKey::kQuestionId, [&](const std::string& id) { return pids.count(id) > 0; }, answers, o);
  std::map<std::string, const Answer*> by_pid;
  for (const auto& a : ans) by_pid.emplace(a.qid, &a);
  ScoreReport r;
  r.bench = "scienceqa";
  r.headline = "img_accuracy";
  int64_t correct = 0, total = 0, img_correct = 0, img_total = 0, failed = 0, missing = 0;
  for (const auto& p : probs) {
    auto it = by_pid.find(p.pid);
    if (it == by_pid.end()) {
      ++missing;
      if (o.only_answered) continue;
    }
    std::string letter = it == by_pid.end() ? "FAILED" : sqa_extract(it->second->text);
    failed += letter == "FAILED";
    const int idx = (letter.size() == 1 && letter[0] - 'A' < p.n_choices) ? letter[0] - 'A' : -1;
    const bool ok = idx == p.answer;
    if (it != by_pid.end()) r.correct[answer_key(*it->second)] = ok;
    correct += ok;
    ++total;
    if (p.image) {
      img_correct += ok;
      ++img_total;
    }
  }
  r.metrics.push_back({"accuracy", pct(correct, total)});
  r.metrics.push_back({"img_accuracy", pct(img_correct, img_total)});
  r.metrics.push_back({"n", static_cast<double>(total)});
  r.metrics.push_back({"img_n", static_cast<double>(img_total)});
  r.metrics.push_back({"failed_extractions", static_cast<double>(failed)});
  if (missing)
    r.notes.push_back(str_cat(missing, " problems have no answer",
                              o.only_answered ? " (not scored)" : " (scored as wrong, as the official script)"));
  checks.add_to(r);
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// MMBench (circular evaluation)

namespace {
bool missing_option(const std::string& s) {
  const std::string l = lower(trim(s));
  return l.empty() || l == "nan" || l == "none";
}
}  // namespace

ScoreReport score_mmbench(const std::string& tsv, const std::string& answers, const ScoreOptions& o) {
  auto rows = read_tsv(tsv);
  EQAT_CHECK(rows.size() >= 2, tsv, ": empty TSV");
  std::map<std::string, size_t> col;
  for (size_t i = 0; i < rows[0].size(); ++i) col[rows[0][i]] = i;
  for (const char* c : {"index", "answer"}) EQAT_CHECK(col.count(c), tsv, ": no '", c, "' column");
  auto get = [&](const std::vector<std::string>& row, const std::string& c) -> std::string {
    auto it = col.find(c);
    return it == col.end() || it->second >= row.size() ? "" : row[it->second];
  };
  std::vector<int64_t> index(rows.size(), 0);  // per data row; rows[0] is the header
  std::set<std::string> known;
  for (size_t i = 1; i < rows.size(); ++i) {
    const std::string idx_s = trim(get(rows[i], "index"));
    try {
      index[i] = std::stoll(idx_s);
    } catch (...) {
      throw_input_error(str_cat(tsv, ": row ", i, ": bad index '", idx_s, "'"));
    }
    known.insert(std::to_string(index[i]));
  }
  std::vector<Answer> ans = read_answers(answers);
  const AnswerChecks checks = audit_answers(
      ans, AnswerKey::kQuestionId, [&](const std::string& id) { return known.count(id) > 0; }, answers, o);
  std::map<std::string, const Answer*> by_idx;
  for (const auto& a : ans) by_idx.emplace(a.qid, &a);

  ScoreReport r;
  r.bench = "mmbench";
  r.headline = "accuracy";
  struct Group {
    bool all_ok = true;
    bool any = false;
    std::string category;
  };
  std::map<int64_t, Group> groups;
  int64_t missing = 0, rows_ok = 0, rows_n = 0;
  for (size_t i = 1; i < rows.size(); ++i) {
    const auto& row = rows[i];
    const int64_t idx = index[i];
    std::vector<std::pair<std::string, std::string>> options;
    for (char L = 'A'; L <= 'Z'; ++L) {
      const std::string l(1, L);
      if (!col.count(l) || missing_option(get(row, l))) break;
      options.push_back({l, get(row, l)});
    }
    auto it = by_idx.find(std::to_string(idx));
    if (it == by_idx.end()) {
      ++missing;
      if (o.only_answered) continue;
    }
    const std::string pred = it == by_idx.end() ? "" : mmbench_extract(it->second->text, options);
    const bool ok = !pred.empty() && pred == trim(get(row, "answer"));
    if (it != by_idx.end()) r.correct[answer_key(*it->second)] = ok;
    Group& g = groups[idx % 1000000];
    g.any = true;
    g.all_ok = g.all_ok && ok;
    if (idx < 1000000) g.category = get(row, "category");
    rows_ok += ok;
    ++rows_n;
  }
  int64_t gok = 0;
  std::map<std::string, std::pair<int64_t, int64_t>> cat;
  for (const auto& [gid, g] : groups) {
    gok += g.all_ok;
    auto& c = cat[g.category.empty() ? "unknown" : g.category];
    c.first += g.all_ok;
    c.second += 1;
  }
  r.metrics.push_back({"accuracy", pct(gok, groups.size())});
  r.metrics.push_back({"n", static_cast<double>(groups.size())});
  r.metrics.push_back({"row_accuracy", pct(rows_ok, rows_n)});
  for (const auto& [c, v] : cat) r.metrics.push_back({"categories." + c, pct(v.first, v.second)});
  if (missing) r.notes.push_back(str_cat(missing, " rows have no answer"));
  checks.add_to(r);
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// TextVQA (eval_textvqa.py)

namespace {
// prompt_processor: the question line of a LLaVA TextVQA prompt, lowercased.
std::string textvqa_question(const std::string& prompt_in, const std::string& where) {
  const std::string prompt = trim(replace_all(prompt_in, "<image>", ""));
  auto lines = split(prompt, '\n');
  std::string q;
  if (prompt.rfind("OCR tokens: ", 0) == 0) {
    std::smatch m;
    static const std::regex re("Question: ([\\s\\S]*?) Short answer:");
    EQAT_CHECK(std::regex_search(prompt, m, re), where, ": cannot find the question in the prompt");
    q = m[1].str();
  } else if (prompt.find("Reference OCR token: ") != std::string::npos && lines.size() == 3) {
    q = prompt.rfind("Reference OCR token:", 0) == 0 ? lines[1] : lines[0];
  } else if (lines.size() == 2) {
    q = lines[0];
  } else {
    throw_input_error(where + ": unexpected TextVQA prompt shape (need question + OCR/suffix lines)");
  }
  return lower(q);
}
}  // namespace

ScoreReport score_textvqa(const std::string& gt_json, const std::string& answers, const ScoreOptions& o) {
  json j = parse_json_file(gt_json);
  EQAT_CHECK(j.is_object() && j.contains("data") && j["data"].is_array(), gt_json, ": expected {\"data\": [...]}");
  std::map<std::string, std::vector<std::string>> gt;  // image_id \t question.lower() -> answers
  std::set<std::string> image_ids;                      // the question ids answers carry
  for (const auto& e : j["data"]) {
    std::vector<std::string> a;
    if (e.contains("answers"))
      for (const auto& s : e["answers"]) a.push_back(s.is_string() ? s.get<std::string>() : s.dump());
    gt[str_field(e, "image_id") + '\t' + lower(str_field(e, "question"))] = a;
    image_ids.insert(str_field(e, "image_id"));
  }
  // An answer's question_id is the image id; its question comes from the prompt, so duplicates are by id + prompt.
  std::vector<Answer> ans = read_answers(answers);
  const AnswerChecks checks = audit_answers(
      ans, AnswerKey::kQuestionIdAndPrompt, [&](const std::string& id) { return image_ids.count(id) > 0; },
      answers, o);
  ScoreReport r;
  r.bench = "textvqa";
  r.headline = "accuracy";
  double sum = 0;
  int64_t n = 0;
  for (const auto& a : ans) {
    const std::string where = str_cat(answers, ":", a.line);
    auto it = gt.find(a.qid + '\t' + textvqa_question(a.prompt, where));
    EQAT_CHECK(it != gt.end(), where, ": no TextVQA ground truth for image_id ", a.qid);
    EQAT_CHECK(it->second.size() == 10, gt_json, ": question on image ", a.qid, " has ", it->second.size(),
               " answers; VQA accuracy needs 10");
    const double s = vqa_soft_accuracy(a.text, it->second);
    r.correct[answer_key(a)] = s > 0.5;
    sum += s;
    ++n;
  }
  r.metrics.push_back({"accuracy", pct(sum, n)});
  r.metrics.push_back({"n", static_cast<double>(n)});
  checks.add_to(r);
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// GQA, SEED, VQAv2

namespace {
std::string gqa_pred(const std::string& text) {
  std::string t = text;
  while (!t.empty() && t.back() == '.') t.pop_back();
  return lower(t);
}
}  // namespace

ScoreReport score_gqa(const std::string& gt_json, const std::string& answers, const ScoreOptions& o) {
  json j = parse_json_file(gt_json);
  EQAT_CHECK(j.is_object(), gt_json, ": expected {questionId: {answer, …}}");
  ScoreReport r;
  r.bench = "gqa";
  r.headline = "accuracy";
  std::vector<Answer> ans = read_answers(answers);
  const AnswerChecks checks = audit_answers(
      ans, AnswerKey::kQuestionId, [&](const std::string& id) { return j.contains(id); }, answers, o);
  std::map<std::string, const Answer*> by;
  for (const auto& a : ans) by.emplace(a.qid, &a);
  int64_t ok = 0, n = 0, missing = 0;
  for (auto it = j.begin(); it != j.end(); ++it) {
    auto a = by.find(it.key());
    if (a == by.end()) {
      ++missing;
      if (o.only_answered) continue;
    }
    const bool c = a != by.end() && gqa_pred(a->second->text) == str_field(it.value(), "answer");
    if (a != by.end()) r.correct[answer_key(*a->second)] = c;
    ok += c;
    ++n;
  }
  r.metrics.push_back({"accuracy", pct(ok, n)});
  r.metrics.push_back({"n", static_cast<double>(n)});
  if (missing) r.notes.push_back(str_cat(missing, " questions have no answer"));
  checks.add_to(r);
  return r;
}

ScoreReport score_seed(const std::string& gt_json, const std::string& answers, const ScoreOptions& o) {
  json j = parse_json_file(gt_json);
  EQAT_CHECK(j.is_object() && j.contains("questions") && j["questions"].is_array(), gt_json,
             ": expected {questions: [...]}");
  std::map<std::string, std::string> type_name;
  if (j.contains("question_type") && j["question_type"].is_object())
    for (auto it = j["question_type"].begin(); it != j["question_type"].end(); ++it)
      type_name[qid_text(it.value())] = it.key();
  std::set<std::string> qids;  // malformed entries are refused in the scoring loop below
  for (const auto& q : j["questions"])
    if (q.is_object() && q.contains("question_id")) qids.insert(qid_text(q["question_id"]));
  std::vector<Answer> ans = read_answers(answers);
  const AnswerChecks checks = audit_answers(
      ans, AnswerKey::kQuestionId, [&](const std::string& id) { return qids.count(id) > 0; }, answers, o);
  std::map<std::string, const Answer*> by;
  for (const auto& a : ans) by.emplace(a.qid, &a);
  ScoreReport r;
  r.bench = "seed";
  r.headline = "accuracy";
  int64_t ok = 0, n = 0, img_ok = 0, img_n = 0;
  std::map<std::string, std::pair<int64_t, int64_t>> types;
  for (const auto& q : j["questions"]) {
    EQAT_CHECK(q.is_object() && q.contains("question_id"), gt_json, ": each \"questions\" entry must be an object with a ",
               "\"question_id\"");
    const std::string qid = qid_text(q["question_id"]);
    auto a = by.find(qid);
    if (a == by.end() && o.only_answered) continue;
    const bool c = a != by.end() && a->second->text == str_field(q, "answer");
    if (a != by.end()) r.correct[answer_key(*a->second)] = c;
    ok += c;
    ++n;
    if (str_field(q, "data_type") == "image") img_ok += c, ++img_n;
    const std::string t = str_field(q, "question_type_id");
    auto& tv = types[type_name.count(t) ? type_name[t] : t];
    tv.first += c;
    tv.second += 1;
  }
  r.metrics.push_back({"accuracy", pct(ok, n)});
  r.metrics.push_back({"img_accuracy", pct(img_ok, img_n)});
  r.metrics.push_back({"n", static_cast<double>(n)});
  for (const auto& [t, v] : types) r.metrics.push_back({"types." + t, pct(v.first, v.second)});
  checks.add_to(r);
  return r;
}

// Without the question files every id is taken as known; the server would see a duplicate as two predictions.
AnswerChecks write_vqav2_upload(const std::string& answers, const std::string& out_json, const ScoreOptions& o) {
  std::vector<Answer> ans = read_answers(answers);
  const AnswerChecks checks = audit_answers(ans, AnswerKey::kQuestionId, nullptr, answers, o);
  json out = json::array();
  for (const auto& a : ans) {
    json qid = json::parse(a.qid_json);
    out.push_back({{"question_id", qid}, {"answer", vqa_normalize(a.text)}});
  }
  write_file_atomic(out_json, out.dump());
  return checks;
}

AnswerChecks write_gqa_predictions(const std::string& answers, const std::string& out_json, const ScoreOptions& o) {
  std::vector<Answer> ans = read_answers(answers);
  const AnswerChecks checks = audit_answers(ans, AnswerKey::kQuestionId, nullptr, answers, o);
  json out = json::array();
  for (const auto& a : ans) out.push_back({{"questionId", a.qid}, {"prediction", gqa_pred(a.text)}});
  write_file_atomic(out_json, out.dump());
  return checks;
}

}  // namespace eqat
