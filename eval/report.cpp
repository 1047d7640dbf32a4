// eqat report (see report.h). Reads only files an eval run wrote: run.json, scores.json, answers.jsonl,
// judged.jsonl; thumbnails come from each answer's metadata.image.
#include "eval/report.h"

#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <cmath>
#include <filesystem>
#include <iomanip>
#include <map>
#include <set>
#include <sstream>

#include "data/error.h"
#include "data/json_util.h"
#include "data/fs.h"
#include "eval/score.h"
#include "eval/text_util.h"

namespace eqat {

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

std::string base64_encode(const std::string& in) {
  static const char* kAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    const uint32_t v = (static_cast<uint8_t>(in[i]) << 16) | (static_cast<uint8_t>(in[i + 1]) << 8) |
                       static_cast<uint8_t>(in[i + 2]);
    out += kAlphabet[v >> 18], out += kAlphabet[(v >> 12) & 63], out += kAlphabet[(v >> 6) & 63],
        out += kAlphabet[v & 63];
  }
  if (i + 1 == in.size()) {
    const uint32_t v = static_cast<uint8_t>(in[i]) << 16;
    out += kAlphabet[v >> 18], out += kAlphabet[(v >> 12) & 63], out += "==";
  } else if (i + 2 == in.size()) {
    const uint32_t v = (static_cast<uint8_t>(in[i]) << 16) | (static_cast<uint8_t>(in[i + 1]) << 8);
    out += kAlphabet[v >> 18], out += kAlphabet[(v >> 12) & 63], out += kAlphabet[(v >> 6) & 63], out += '=';
  }
  return out;
}

namespace {

void flatten(const ordered_json& j, const std::string& prefix, std::vector<std::pair<std::string, double>>& out) {
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string key = prefix.empty() ? it.key() : prefix + "." + it.key();
    if (it->is_object())
      flatten(*it, key, out);
    else if (it->is_number())
      out.push_back({key, it->get<double>()});
    else if (it->is_null())
      out.push_back({key, std::nan("")});
  }
}

struct Run {
  std::string dir, name, bench, unit;
  std::vector<std::pair<std::string, double>> scores;
  std::vector<Answer> answers;
  std::map<std::string, bool> judged;  // answer_key -> correct
  std::map<std::string, std::string> image;  // answer_key -> image path
};

std::string run_name(const std::string& dir) {
  std::string base = std::filesystem::path(dir).filename().string();
  if (base.empty()) base = std::filesystem::path(dir).parent_path().filename().string();
  return base;
}

Run load_run(const std::string& dir) {
  Run r;
  r.dir = dir;
  EQAT_CHECK(is_directory(dir), dir, ": not a run directory (expected eqat eval --out DIR)");
  json run = json::object();
  const std::string rj = path_join(dir, "run.json");
  if (file_exists(rj)) {
    try {
      run = json::parse(read_file(rj));
    } catch (const json::exception& e) {
      throw_input_error(str_cat(rj, ": malformed JSON (", json_error_message(e), ")"));
    }
  }
  r.name = run_name(dir);
  r.bench = run.value("bench", std::string());
  if (file_exists(path_join(dir, "scores.json"))) {
    r.scores = read_flat_scores(dir);
    ordered_json s = ordered_json::parse(read_file(path_join(dir, "scores.json")));
    r.unit = s.value("unit", std::string());
    if (r.bench.empty()) r.bench = s.value("bench", std::string());
  }
  const std::string ans = path_join(dir, "answers.jsonl");
  if (file_exists(ans)) r.answers = read_answers(ans, true);
  for (const auto& a : r.answers) {
    try {
      json m = json::parse(a.metadata_json);
      if (m.is_object() && m.contains("image") && m["image"].is_string())
        r.image[answer_key(a)] = m["image"].get<std::string>();
    } catch (const json::exception&) {
    }
  }
  const std::string jd = path_join(dir, "judged.jsonl");
  if (file_exists(jd)) {
    std::istringstream is(read_file(jd));
    std::string line;
    while (std::getline(is, line)) {
      if (trim(line).empty()) continue;
      json j = json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.is_object() || !j.contains("question_id")) continue;
      const std::string qid =
          j["question_id"].is_string() ? j["question_id"].get<std::string>() : j["question_id"].dump();
      r.judged[answer_key(qid, j.value("prompt", std::string()))] = j.value("correct", false);
    }
  }
  return r;
}

std::string fmt(double v, const std::string& key) {
  if (!std::isfinite(v)) return "–";
  std::ostringstream os;
  if (is_count_key(key))
    os << static_cast<int64_t>(v);
  else
    os << std::fixed << std::setprecision(std::fabs(v) < 10 ? 4 : 2) << v;
  return os.str();
}

std::string fmt_delta(double d, const std::string& key) {
  if (!std::isfinite(d)) return "";
  std::string s = fmt(d, key);
  return d > 0 ? "+" + s : s;
}

// Union of metric keys, in the order they first appear.
std::vector<std::string> metric_keys(const std::vector<std::vector<std::pair<std::string, double>>>& scores) {
  std::vector<std::string> keys;
  std::set<std::string> seen;
  for (const auto& s : scores)
    for (const auto& kv : s)
      if (seen.insert(kv.first).second) keys.push_back(kv.first);
  return keys;
}

double lookup(const std::vector<std::pair<std::string, double>>& s, const std::string& k) {
  for (const auto& kv : s)
    if (kv.first == k) return kv.second;
  return std::nan("");
}

// A thumbnail as a data: URI (OpenCV decode, INTER_AREA resize, PNG encode); empty if the image is unreadable.
std::string thumbnail_uri(const std::string& path, int64_t edge) {
  if (path.empty() || !file_exists(path)) return "";
  cv::Mat img = cv::imread(path, cv::IMREAD_COLOR);
  if (img.empty()) return "";
  const double s = static_cast<double>(edge) / std::max(img.cols, img.rows);
  if (s < 1.0) cv::resize(img, img, cv::Size(), s, s, cv::INTER_AREA);
  std::vector<uchar> png;
  if (!cv::imencode(".png", img, png)) return "";
  return "data:image/png;base64," + base64_encode(std::string(png.begin(), png.end()));
}

}  // namespace

std::vector<std::pair<std::string, double>> read_flat_scores(const std::string& run_dir) {
  const std::string path = path_join(run_dir, "scores.json");
  ordered_json j;
  try {
    j = ordered_json::parse(read_file(path));
  } catch (const json::exception& e) {
    throw_input_error(str_cat(path, ": malformed JSON (", json_error_message(e), ")"));
  }
  EQAT_CHECK(j.is_object(), path, ": expected a JSON object");
  std::vector<std::pair<std::string, double>> out;
  flatten(j, "", out);
  return out;
}

std::string markdown_table(const std::vector<std::string>& names,
                           const std::vector<std::vector<std::pair<std::string, double>>>& scores) {
  std::ostringstream os;
  os << "| metric |";
  for (const auto& n : names) os << " " << n << " |";
  for (size_t i = 1; i < names.size(); ++i) os << " Δ " << names[i] << " |";
  os << "\n|---|";
  for (size_t i = 0; i < 2 * names.size() - 1; ++i) os << "---:|";
  os << "\n";
  for (const auto& k : metric_keys(scores)) {
    os << "| " << k << " |";
    for (const auto& s : scores) os << " " << fmt(lookup(s, k), k) << " |";
    const double base = lookup(scores[0], k);
    for (size_t i = 1; i < scores.size(); ++i) os << " " << fmt_delta(lookup(scores[i], k) - base, k) << " |";
    os << "\n";
  }
  return os.str();
}

void write_report(const ReportOptions& o) {
  EQAT_CHECK(!o.runs.empty(), "report: give at least one run directory");
  std::vector<Run> runs;
  for (const auto& d : o.runs) runs.push_back(load_run(d));
  // Disambiguate equal names (e.g. two runs both called "out").
  for (size_t i = 0; i < runs.size(); ++i)
    for (size_t k = 0; k < i; ++k)
      if (runs[k].name == runs[i].name) runs[i].name += " (" + std::to_string(i + 1) + ")";
  std::vector<std::string> names;
  std::vector<std::vector<std::pair<std::string, double>>> scores;
  for (const auto& r : runs) names.push_back(r.name), scores.push_back(r.scores);

  std::ostringstream h;
  h << "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>eqat report</title><style>"
       "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
       "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}th{background:#f3f3f3}"
       "td.num{text-align:right;font-variant-numeric:tabular-nums}.pos{color:#1a7f37}.neg{color:#c62828}"
       "tr.dis{background:#fff4e5}.ok{color:#1a7f37}.bad{color:#c62828}img{image-rendering:pixelated}"
       "pre{white-space:pre-wrap;margin:0;font-family:inherit}</style></head><body>\n";
  h << "<h1>eqat evaluation report</h1>\n<h2>Runs</h2><table><tr><th>run</th><th>benchmark</th><th>directory</th>"
       "<th>answers</th></tr>\n";
  for (const auto& r : runs)
    h << "<tr><td>" << html_escape(r.name) << "</td><td>" << html_escape(r.bench) << "</td><td>"
      << html_escape(r.dir) << "</td><td class=num>" << r.answers.size() << "</td></tr>\n";
  h << "</table>\n<h2>Scores</h2><p>Δ columns: difference to the first run (" << html_escape(names[0])
    << "). Units as each scores.json states (LLaVA benchmarks in percent, shapes in fractions 0–1).</p>\n";
  h << "<table><tr><th>metric</th>";
  for (const auto& n : names) h << "<th>" << html_escape(n) << "</th>";
  for (size_t i = 1; i < names.size(); ++i) h << "<th>Δ " << html_escape(names[i]) << "</th>";
  h << "</tr>\n";
  for (const auto& k : metric_keys(scores)) {
    h << "<tr><td>" << html_escape(k) << "</td>";
    for (const auto& s : scores) h << "<td class=num>" << fmt(lookup(s, k), k) << "</td>";
    const double base = lookup(scores[0], k);
    for (size_t i = 1; i < scores.size(); ++i) {
      const double d = lookup(scores[i], k) - base;
      h << "<td class=\"num " << (d > 0 ? "pos" : d < 0 ? "neg" : "") << "\">" << fmt_delta(d, k) << "</td>";
    }
    h << "</tr>\n";
  }
  h << "</table>\n";

  // Examples: answers of the first run that every run has; disagreements first.
  std::vector<std::map<std::string, const Answer*>> by_key(runs.size());
  for (size_t i = 0; i < runs.size(); ++i)
    for (const auto& a : runs[i].answers) by_key[i][answer_key(a)] = &a;
  std::vector<std::string> agree, disagree;
  for (const auto& a : runs[0].answers) {
    const std::string k = answer_key(a);
    bool all = true, differ = false;
    for (size_t i = 1; i < runs.size(); ++i) {
      auto it = by_key[i].find(k);
      if (it == by_key[i].end()) {
        all = false;
        break;
      }
      differ = differ || it->second->text != a.text;
    }
    if (!all) continue;
    (differ ? disagree : agree).push_back(k);
  }
  std::vector<std::string> shown;
  for (const auto& k : disagree)
    if (static_cast<int64_t>(shown.size()) < o.examples) shown.push_back(k);
  for (const auto& k : agree)
    if (static_cast<int64_t>(shown.size()) < o.examples) shown.push_back(k);
  h << "<h2>Examples</h2><p>" << disagree.size() << " of " << disagree.size() + agree.size()
    << " shared questions have differing answers (highlighted, shown first); " << shown.size()
    << " shown.</p>\n<table><tr><th>image</th><th>question</th>";
  for (const auto& n : names) h << "<th>" << html_escape(n) << "</th>";
  h << "</tr>\n";
  std::set<std::string> dis(disagree.begin(), disagree.end());
  for (const auto& k : shown) {
    const Answer& a0 = *by_key[0][k];
    std::string img;
    for (const auto& r : runs)
      if (img.empty() && r.image.count(k)) img = r.image.at(k);
    const std::string uri = thumbnail_uri(img, o.thumb);
    h << "<tr" << (dis.count(k) ? " class=dis" : "") << "><td>";
    if (!uri.empty()) h << "<img src=\"" << uri << "\" alt=\"" << html_escape(img) << "\">";
    h << "</td><td><pre>" << html_escape(a0.prompt.empty() ? a0.qid : a0.prompt) << "</pre><small>id "
      << html_escape(a0.qid) << "</small></td>";
    for (size_t i = 0; i < runs.size(); ++i) {
      const Answer& a = *by_key[i][k];
      auto j = runs[i].judged.find(k);
      std::string mark;
      if (j != runs[i].judged.end()) mark = j->second ? " <span class=ok>✓</span>" : " <span class=bad>✗</span>";
      h << "<td><pre>" << html_escape(a.text) << "</pre>" << mark << "</td>";
    }
    h << "</tr>\n";
  }
  h << "</table>\n</body></html>\n";
  write_file_atomic(o.html, h.str());
  if (!o.markdown.empty()) write_file_atomic(o.markdown, "<!-- eqat report -->\n" + markdown_table(names, scores));
}

}  // namespace eqat
