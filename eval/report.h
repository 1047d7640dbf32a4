// eqat report: eval runs side by side (score table with deltas against the first run, per-category rows) and an
// examples page (thumbnail, question, each run's answer; disagreements highlighted). One self-contained HTML file
// (thumbnails embedded as base64 PNG) and optionally a Markdown table.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace eqat {

struct ReportOptions {
  std::vector<std::string> runs;  // eqat eval --out directories; the first is the baseline for deltas
  std::string html;               // output .html
  std::string markdown;           // optional output .md
  int64_t examples = 40;          // examples shown (disagreements first)
  int64_t thumb = 128;            // thumbnail edge in px
};

void write_report(const ReportOptions& o);

// Building blocks, exposed for tests.
std::string base64_encode(const std::string& bytes);
// Reads RUN/scores.json and flattens it to dotted keys ("splits.random.f1"), in file order.
std::vector<std::pair<std::string, double>> read_flat_scores(const std::string& run_dir);
std::string markdown_table(const std::vector<std::string>& run_names,
                           const std::vector<std::vector<std::pair<std::string, double>>>& scores);

}  // namespace eqat
