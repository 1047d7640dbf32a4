// The runner's mechanics on the tiny random-weight LLaVA fixture (answers are gibberish; what is checked is that
// batching does not change them, that a rerun resumes, that bad records are named or skipped, and the text
// metrics), plus the report on the resulting run directories.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "data/error.h"
#include "data/fs.h"
#include "data/safetensors.h"
#include "eval/report.h"
#include "eval/runner.h"
#include "test_util.h"

using eqat_test::data_path;
using eqat_test::TempDir;
using json = nlohmann::json;

namespace {

eqat::EvalOptions shapes_opts(const std::string& out) {
  eqat::EvalOptions o;
  o.bench = "shapes";
  o.model_dir = data_path("fixtures/tiny_llava");
  o.data = data_path("bench/shapes");
  o.out = out;
  o.max_new_tokens = 6;
  o.progress = false;
  return o;
}

std::vector<json> lines(const std::string& path) {
  std::vector<json> out;
  std::ifstream f(path);
  std::string l;
  while (std::getline(f, l))
    if (!l.empty()) out.push_back(json::parse(l));
  return out;
}

}  // namespace

TEST(Runner, BatchingMatchesBatchOneAndResumes) {
  TempDir t;
  auto o1 = shapes_opts(t.str("b1"));
  o1.batch_size = 1;
  eqat::EvalResult r1 = eqat::run_eval(o1);
  EXPECT_EQ(r1.total, 14);
  EXPECT_EQ(r1.answered, 14);
  ASSERT_TRUE(r1.scored);
  EXPECT_EQ(r1.score.get("n"), 14);

  // Batch of 4 (left padding: the prompts differ in length) in two sittings: first 5 questions, then the rest.
  auto o4 = shapes_opts(t.str("b4"));
  o4.batch_size = 4;
  o4.limit = 5;
  o4.strict_answers = true;  // the runner's own answer file, appended over runs, never repeats an answer
  eqat::EvalResult part = eqat::run_eval(o4);
  EXPECT_EQ(part.answered, 5);
  o4.limit = -1;
  eqat::EvalResult rest = eqat::run_eval(o4);
  EXPECT_EQ(rest.resumed, 5);
  EXPECT_EQ(rest.answered, 9);
  auto a1 = lines(t.str("b1/answers.jsonl")), a4 = lines(t.str("b4/answers.jsonl"));
  ASSERT_EQ(a1.size(), 14u);
  ASSERT_EQ(a4.size(), 14u);
  for (size_t i = 0; i < a1.size(); ++i) {
    EXPECT_EQ(a1[i]["question_id"], a4[i]["question_id"]);
    EXPECT_EQ(a1[i]["text"], a4[i]["text"]) << "question " << a1[i]["question_id"];
    EXPECT_EQ(a1[i]["prompt"], a4[i]["prompt"]);
    for (const char* k : {"answer_id", "model_id", "metadata"}) EXPECT_TRUE(a1[i].contains(k)) << k;
  }
  // A third run has nothing left to do.
  eqat::EvalResult again = eqat::run_eval(o4);
  EXPECT_EQ(again.answered, 0);
  EXPECT_EQ(again.resumed, 14);
  EXPECT_EQ(again.score.get("answer_checks.duplicates"), 0);
  EXPECT_EQ(again.score.get("answer_checks.unknown_ids"), 0);
  EXPECT_TRUE(eqat::file_exists(t.str("b4/scores.json")));

  // A torn last line (a killed run) is dropped and that question answered again.
  {
    std::string d = eqat::read_file(t.str("b4/answers.jsonl"));
    d.resize(d.size() - 10);
    eqat::write_file_atomic(t.str("b4/answers.jsonl"), d);
  }
  eqat::EvalResult repaired = eqat::run_eval(o4);
  EXPECT_EQ(repaired.answered, 1);
  EXPECT_EQ(lines(t.str("b4/answers.jsonl")).size(), 14u);
  EXPECT_EQ(repaired.score.get("answer_checks.duplicates"), 0);

  // Report over the two runs: self-contained HTML with thumbnails, Markdown table.
  eqat::ReportOptions ro;
  ro.runs = {t.str("b1"), t.str("b4")};
  ro.html = t.str("r.html");
  ro.markdown = t.str("r.md");
  eqat::write_report(ro);
  const std::string html = eqat::read_file(ro.html);
  EXPECT_NE(html.find("data:image/png;base64,"), std::string::npos);
  EXPECT_NE(html.find("families.colour.accuracy"), std::string::npos);
  EXPECT_EQ(html.find("src=\"/"), std::string::npos);  // nothing linked from disk
  const std::string md = eqat::read_file(ro.markdown);
  EXPECT_NE(md.find("| metric | b1 | b4 | Δ b4 |"), std::string::npos) << md;
}

// An answer file is resumed only by the model and generation settings that wrote it (answers.source).
TEST(Runner, RefusesToResumeAnotherModelsAnswers) {
  TempDir t;
  auto o = shapes_opts(t.str("out"));
  o.limit = 2;
  EXPECT_EQ(eqat::run_eval(o).answered, 2);
  auto expect_refused = [&](eqat::EvalOptions other, const char* why) {
    other.limit = -1;
    try {
      eqat::run_eval(other);
      ADD_FAILURE() << "resumed answers of " << why;
    } catch (const eqat::InputError& e) {
      EXPECT_NE(std::string(e.what()).find("answers.jsonl"), std::string::npos) << e.what();
    }
  };
  auto longer = o;
  longer.max_new_tokens = 7;
  expect_refused(longer, "other generation settings");
  std::filesystem::copy(data_path("fixtures/tiny_llava"), t.str("copy"), std::filesystem::copy_options::recursive);
  auto copied = o;
  copied.model_dir = t.str("copy");
  expect_refused(copied, "another model directory");
  o.limit = -1;
  eqat::EvalResult same = eqat::run_eval(o);  // the same model and settings resume
  EXPECT_EQ(same.resumed, 2);
  EXPECT_EQ(same.answered, 12);
}

TEST(Runner, BadRecordsNamedOrSkipped) {
  TempDir t;
  std::filesystem::create_directories(t.str("img"));
  std::filesystem::copy_file(data_path("bench/shapes/images/test_000000.png"), t.str("img/a.png"));
  std::filesystem::copy_file(data_path("bench/shapes/images/test_000001.png"), t.str("img/b.png"));
  // Two good questions, one with a missing image, one malformed line.
  std::ofstream(t.str("q.jsonl"))
      << R"({"question_id": 1, "image": "a.png", "text": "What color?", "category": "c"})" << "\n"
      << R"({"question_id": 2, "image": "nope.png", "text": "What shape?", "category": "c"})" << "\n"
      << "{not json\n"
      << R"({"question_id": 4, "image": "b.png", "text": "How many?", "category": "c"})" << "\n";
  eqat::EvalOptions o;
  o.bench = "llava";
  o.model_dir = data_path("fixtures/tiny_llava");
  o.data = t.str("q.jsonl");
  o.images = t.str("img");
  o.out = t.str("out");
  o.max_new_tokens = 3;
  o.batch_size = 2;
  o.progress = false;
  try {
    eqat::run_eval(o);
    FAIL() << "expected InputError";
  } catch (const eqat::InputError& e) {
    EXPECT_NE(std::string(e.what()).find("question 2"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("nope.png"), std::string::npos) << e.what();
  }
  o.skip_bad = true;
  eqat::EvalResult r = eqat::run_eval(o);
  EXPECT_EQ(r.skipped, 2);
  auto a = lines(t.str("out/answers.jsonl"));
  ASSERT_EQ(a.size(), 2u);  // questions 1 and 4
  // The image appears; a rerun answers question 2 and puts it back in question order (POPE/MME score by order).
  std::filesystem::copy_file(data_path("bench/shapes/images/test_000002.png"), t.str("img/nope.png"));
  r = eqat::run_eval(o);
  EXPECT_EQ(r.answered, 1);
  EXPECT_EQ(r.resumed, 2);
  EXPECT_EQ(r.skipped, 1);
  a = lines(t.str("out/answers.jsonl"));
  ASSERT_EQ(a.size(), 3u);
  EXPECT_EQ(a[0]["question_id"].get<int>(), 1);
  EXPECT_EQ(a[1]["question_id"].get<int>(), 2);
  EXPECT_EQ(a[2]["question_id"].get<int>(), 4);
}

TEST(Runner, ScienceQaPromptsAndTextOnly) {
  EXPECT_EQ(eqat::scienceqa_prompt("<image>\nContext: x\nQ?\nA. a\nB. b", true),
            "<image>\nContext: x\nQ?\nA. a\nB. b\nAnswer with the option's letter from the given choices directly.");
  EXPECT_EQ(eqat::scienceqa_prompt("Q?\nA. a\nB. b ", false),
            "Q?\nA. a\nB. b\nAnswer with the option's letter from the given choices directly.");
  // A text-only ScienceQA item runs without an image; an image item uses its picture.
  TempDir t;
  auto conv = [](const std::string& human, const std::string& letter) {
    return json::array({{{"from", "human"}, {"value", human}}, {{"from", "gpt"}, {"value", letter}}});
  };
  json sqa = json::array({{{"id", "1"}, {"conversations", conv("Q?\nA. a\nB. b", "A")}},
                          {{"id", "2"}, {"image", "images/test_000002.png"},
                           {"conversations", conv("<image>\nQ2?\nA. a\nB. b", "B")}}});
  eqat::write_file_atomic(t.str("sqa.json"), sqa.dump());
  eqat::EvalOptions o;
  o.bench = "scienceqa";
  o.model_dir = data_path("fixtures/tiny_llava");
  o.data = t.str("sqa.json");
  o.images = data_path("bench/shapes");
  o.out = t.str("out");
  o.max_new_tokens = 3;
  o.progress = false;
  eqat::EvalResult r = eqat::run_eval(o);
  ASSERT_TRUE(r.scored);
  EXPECT_EQ(r.score.get("n"), 2);
  EXPECT_EQ(r.score.get("img_n"), 1);
  auto a = lines(t.str("out/answers.jsonl"));
  ASSERT_EQ(a.size(), 2u);
  EXPECT_EQ(a[0]["prompt"].get<std::string>().find("<image>"), std::string::npos);
  EXPECT_EQ(a[1]["prompt"].get<std::string>().rfind("<image>\n", 0), 0u);
  EXPECT_FALSE(a[0]["metadata"].contains("image"));
}

TEST(Runner, PerplexityAndSelfKl) {
  TempDir t;
  std::string text;
  for (int i = 0; i < 40; ++i) text += "the quick brown fox jumps over the lazy dog. ";
  eqat::write_file_atomic(t.str("t.txt"), text);
  eqat::EvalOptions o;
  o.bench = "ppl";
  o.model_dir = data_path("fixtures/tiny_llava");
  o.data = t.str("t.txt");
  o.out = t.str("ppl");
  o.seq_len = 64;
  o.progress = false;
  eqat::EvalResult r = eqat::run_eval(o);
  const double ppl = r.score.get("ppl");
  EXPECT_TRUE(std::isfinite(ppl));
  EXPECT_GT(ppl, 1.0);
  // Non-overlapping windows: floor(tokens / 64).
  EXPECT_EQ(r.score.get("windows"), std::floor(r.score.get("tokens") / 64));
  EXPECT_GE(r.score.get("windows"), 2);
  // KL of a model against itself: 0 up to fp32 rounding of log-softmax (|Δ| ~ 1e-6 per term).
  o.bench = "kl";
  o.reference_dir = o.model_dir;
  o.out = t.str("kl");
  o.batch_size = 2;
  r = eqat::run_eval(o);
  EXPECT_NEAR(r.score.get("kl_mean"), 0.0, 1e-5);
  EXPECT_NEAR(r.score.get("top1_agreement"), 100.0, 1e-9);
  EXPECT_NEAR(r.score.get("ppl"), ppl, ppl * 1e-5);  // batch 2 vs 1: same windows
}

// Answer-token KL on shapes (--reference): 0 against itself (same computation twice, so exactly 0 up to the
// log-softmax subtraction, ~1e-7), and > 0 once one decoder weight of the reference is perturbed.
TEST(Runner, ShapesAnswerKlAgainstAReference) {
  TempDir t;
  auto o = shapes_opts(t.str("self"));
  o.reference_dir = o.model_dir;
  eqat::EvalResult r = eqat::run_eval(o);
  ASSERT_TRUE(r.scored);
  EXPECT_EQ(r.score.get("answer_kl_n"), 14);
  EXPECT_NEAR(r.score.get("answer_kl_mean"), 0.0, 1e-6);
  EXPECT_DOUBLE_EQ(r.score.get("answer_top1_agreement"), 100.0);

  // A copy of the fixture with one projection scaled: the distributions now differ.
  std::filesystem::copy(o.model_dir, t.str("ref"), std::filesystem::copy_options::recursive);
  {
    auto f = eqat::SafetensorsFile::open(t.str("ref") + "/model.safetensors");
    std::vector<std::pair<std::string, at::Tensor>> ts;
    bool changed = false;
    for (auto& [name, info] : f->tensors()) {
      at::Tensor x = f->get(name).clone();
      if (!changed && name.find("language_model") != std::string::npos && name.find("o_proj.weight") != std::string::npos)
        x.mul_(3.0), changed = true;
      ts.emplace_back(name, x);
    }
    ASSERT_TRUE(changed);
    eqat::write_safetensors(t.str("ref") + "/model.safetensors", ts);
  }
  auto o2 = shapes_opts(t.str("other"));
  o2.reference_dir = t.str("ref");
  r = eqat::run_eval(o2);
  EXPECT_GT(r.score.get("answer_kl_mean"), 1e-4);
  // Each question's KL is written (answer_kl.jsonl); the mean, median and standard error come from those values.
  std::vector<double> kls;
  std::set<std::string> ids;
  {
    std::ifstream f(t.str("other") + "/answer_kl.jsonl");
    std::string line;
    while (std::getline(f, line)) {
      const auto j = nlohmann::json::parse(line);
      ids.insert(j.at("question_id").dump());
      kls.push_back(j.at("kl").get<double>());
      EXPECT_GE(j.at("answer_tokens").get<int64_t>(), 2);  // at least one word and </s>
    }
  }
  ASSERT_EQ(kls.size(), 14u);
  EXPECT_EQ(ids.size(), 14u);
  double sum = 0, ss = 0;
  for (double k : kls) sum += k;
  const double mean = sum / 14;
  for (double k : kls) ss += (k - mean) * (k - mean);
  std::sort(kls.begin(), kls.end());
  // The file's values are the doubles the mean was summed from, in the same order: equal up to the JSON round trip
  // (nlohmann writes the shortest repr that reads back exactly) and the summation order (same here): 1e-12 relative.
  EXPECT_NEAR(r.score.get("answer_kl_mean"), mean, 1e-12 * mean);
  EXPECT_NEAR(r.score.get("answer_kl_median"), 0.5 * (kls[6] + kls[7]), 1e-12 * mean);
  EXPECT_NEAR(r.score.get("answer_kl_sem"), std::sqrt(ss / 13 / 14), 1e-9 * mean);
  EXPECT_GT(r.score.get("answer_kl_sem"), 0.0);
  // Only shapes (and kl) take a reference.
  auto o3 = shapes_opts(t.str("pope"));
  o3.bench = "pope";
  o3.reference_dir = o.model_dir;
  EXPECT_THROW(eqat::run_eval(o3), eqat::InputError);
}

TEST(Report, Base64) {
  EXPECT_EQ(eqat::base64_encode(""), "");
  EXPECT_EQ(eqat::base64_encode("f"), "Zg==");
  EXPECT_EQ(eqat::base64_encode("fo"), "Zm8=");
  EXPECT_EQ(eqat::base64_encode("foo"), "Zm9v");
  EXPECT_EQ(eqat::base64_encode("foobar"), "Zm9vYmFy");
}

TEST(Runner, MmbenchTsvWithBase64Images) {
  TempDir t;
  const std::string png = eqat::base64_encode(eqat::read_file(data_path("bench/shapes/images/test_000005.png")));
  const std::string q = "What color is the triangle?";
  const std::string header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n";
  const std::string row0 = "0\t" + q + "\tLook closely.\tblack\tpurple\tnan\tnan\tA\tcolour\t" + png + "\n";
  const std::string row1 = "1000000\t" + q + "\tnan\tpurple\tblack\tnan\tnan\tB\tcolour\t" + png + "\n";
  eqat::write_file_atomic(t.str("mmb.tsv"), header + row0 + row1);
  eqat::EvalOptions o;
  o.bench = "mmbench";
  o.model_dir = data_path("fixtures/tiny_llava");
  o.data = t.str("mmb.tsv");
  o.out = t.str("out");
  o.max_new_tokens = 2;
  o.progress = false;
  eqat::EvalResult r = eqat::run_eval(o);
  ASSERT_TRUE(r.scored);
  EXPECT_EQ(r.score.get("n"), 1);  // one circular group
  auto a = lines(t.str("out/answers.jsonl"));
  ASSERT_EQ(a.size(), 2u);
  EXPECT_EQ(a[0]["question_id"].get<int>(), 0);
  // The answer's prompt is model_vqa_mmbench's cur_prompt: hint, question, options; no suffix.
  EXPECT_EQ(a[0]["prompt"].get<std::string>(), "Look closely.\nWhat color is the triangle?\nA. black\nB. purple");
  EXPECT_EQ(a[1]["prompt"].get<std::string>(), "What color is the triangle?\nA. purple\nB. black");
}
