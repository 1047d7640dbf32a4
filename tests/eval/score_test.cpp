// Scorers on the real question / ground-truth files (tests/data/bench, see tests/data/SOURCES.md) with synthetic
// predictions whose scores are derived by hand in the comments.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <fstream>
#include <map>
#include <sstream>

#include "data/error.h"
#include "data/fs.h"
#include "eval/score.h"
#include "test_util.h"

using eqat_test::data_path;
using eqat_test::TempDir;
using json = nlohmann::json;

namespace {

std::string bench(const std::string& rel) { return data_path("bench/" + rel); }

// Writes LLaVA answer JSONL: one record per (question_id JSON, prompt, text).
void write_answers(const std::string& path, const std::vector<std::tuple<json, std::string, std::string>>& rows) {
  std::ofstream f(path);
  for (const auto& [qid, prompt, text] : rows) {
    json j = {{"question_id", qid}, {"prompt", prompt}, {"text", text}, {"answer_id", "x"},
              {"model_id", "test"}, {"metadata", json::object()}};
    f << j.dump() << "\n";
  }
}

std::vector<json> read_jsonl(const std::string& path) {
  std::vector<json> out;
  std::ifstream f(path);
  std::string line;
  while (std::getline(f, line))
    if (!line.empty()) out.push_back(json::parse(line));
  return out;
}

constexpr double kEps = 1e-9;  // every expected value below is an exact ratio of counts

}  // namespace

// ---- shapes ----------------------------------------------------------------------------------------------------

TEST(ShapesScore, ExactMatchPerFamilyAndYesNoF1) {
  // 14 real questions of the standard split (2 per family). Answer all correctly except: the second colour
  // question (id 7) and the first exists question (id 3, gt "yes", answered "no"). Case, surrounding spaces and a
  // trailing period are normalised away.
  TempDir t;
  std::vector<std::tuple<json, std::string, std::string>> rows;
  auto gt = read_jsonl(bench("shapes/test_answers.jsonl"));
  for (const auto& g : gt) {
    const int id = g["question_id"].get<int>();
    std::string text = g["text"].get<std::string>();
    if (id == 7) text = "green";
    if (id == 3) text = "no";
    if (id == 0) text = "  Blue. ";
    rows.push_back({id, "", text});
  }
  write_answers(t.str("a.jsonl"), rows);
  eqat::ScoreReport r =
      eqat::score_shapes(bench("shapes/test.jsonl"), bench("shapes/test_answers.jsonl"), t.str("a.jsonl"));
  EXPECT_EQ(r.unit, "fraction");
  EXPECT_NEAR(r.get("accuracy"), 12.0 / 14.0, kEps);
  EXPECT_NEAR(r.get("families.colour.accuracy"), 0.5, kEps);
  EXPECT_NEAR(r.get("families.exists.accuracy"), 0.5, kEps);
  EXPECT_NEAR(r.get("families.describe.accuracy"), 1.0, kEps);
  // yes/no: gt id3 yes (pred no: FN), id10 no (pred no: TN) -> TP 0 -> precision 0, recall 0, F1 0.
  EXPECT_NEAR(r.get("yes_no.f1"), 0.0, kEps);
  EXPECT_EQ(r.get("yes_no.n"), 2);
  EXPECT_EQ(r.get("n"), 14);
  // JSON: accuracy top-level, per-family breakdown.
  json j = json::parse(eqat::score_to_json(r));
  EXPECT_NEAR(j["accuracy"].get<double>(), 12.0 / 14.0, kEps);
  EXPECT_EQ(j["families"]["count"]["n"].get<int>(), 2);
}

TEST(ShapesScore, MissingAnswersAreWrongUnlessOnlyAnswered) {
  TempDir t;
  auto gt = read_jsonl(bench("shapes/test_answers.jsonl"));
  std::vector<std::tuple<json, std::string, std::string>> rows;
  for (size_t i = 0; i < 7; ++i) rows.push_back({gt[i]["question_id"], "", gt[i]["text"].get<std::string>()});
  write_answers(t.str("a.jsonl"), rows);
  auto r = eqat::score_shapes(bench("shapes/test.jsonl"), bench("shapes/test_answers.jsonl"), t.str("a.jsonl"));
  EXPECT_NEAR(r.get("accuracy"), 0.5, kEps);  // 7 right of 14
  eqat::ScoreOptions o;
  o.only_answered = true;
  r = eqat::score_shapes(bench("shapes/test.jsonl"), bench("shapes/test_answers.jsonl"), t.str("a.jsonl"), o);
  EXPECT_NEAR(r.get("accuracy"), 1.0, kEps);
  EXPECT_NEAR(r.get("yes_no.f1"), 1.0, kEps);  // id 3: gt yes, pred yes -> TP 1, no FP/FN
}

// ---- POPE ------------------------------------------------------------------------------------------------------

TEST(PopeParse, LlavaRules) {
  EXPECT_TRUE(eqat::pope_is_yes("Yes"));
  EXPECT_FALSE(eqat::pope_is_yes("No"));
  EXPECT_FALSE(eqat::pope_is_yes("no"));
  EXPECT_TRUE(eqat::pope_is_yes("NO"));      // only "No", "not", "no" count
  EXPECT_TRUE(eqat::pope_is_yes("None"));
  EXPECT_FALSE(eqat::pope_is_yes("Yes, but not really"));  // comma deleted, "not" is a word
  EXPECT_TRUE(eqat::pope_is_yes("Yes. No"));  // only the text before the first "."
  EXPECT_FALSE(eqat::pope_is_yes("There is no dog. Yes"));
  EXPECT_TRUE(eqat::pope_is_yes("No,there"));  // "Nothere" after comma removal
  EXPECT_TRUE(eqat::pope_is_yes(""));
}

namespace {
// Answers for every question of llava_pope_test.jsonl (8910), text chosen per (index in split, label).
template <typename Fn>
std::string pope_answers(const TempDir& t, Fn text_for) {
  std::map<std::string, std::vector<std::string>> labels;
  for (const char* s : {"adversarial", "popular", "random"})
    for (const auto& j : read_jsonl(bench(std::string("pope/coco_pope_") + s + ".json")))
      labels[s].push_back(j["label"].get<std::string>());
  std::map<std::string, size_t> seen;
  std::vector<std::tuple<json, std::string, std::string>> rows;
  for (const auto& q : read_jsonl(bench("pope/llava_pope_test.jsonl"))) {
    const std::string cat = q["category"].get<std::string>();
    const std::string label = labels[cat].at(seen[cat]++);
    rows.push_back({q["question_id"], q["text"].get<std::string>(), text_for(label)});
  }
  write_answers(t.str("pope.jsonl"), rows);
  return t.str("pope.jsonl");
}
}  // namespace

TEST(PopeScore, AllYes) {
  // All "yes": TP = #yes labels, FP = #no labels, TN = FN = 0 -> recall 100, precision = accuracy = yes share,
  // yes-ratio 100. Random split: 1500 yes of 2910 -> P = 1500/2910; popular/adversarial: 1500 of 3000 -> 50.
  TempDir t;
  const std::string a = pope_answers(t, [](const std::string&) { return "Yes"; });
  auto r = eqat::score_pope(bench("pope"), bench("pope/llava_pope_test.jsonl"), a);
  const double p_rand = 1500.0 / 2910.0, f1_rand = 2 * p_rand / (p_rand + 1), f1_half = 2 * 0.5 / 1.5;
  EXPECT_NEAR(r.get("splits.random.precision"), 100 * p_rand, 1e-9);
  EXPECT_NEAR(r.get("splits.random.accuracy"), 100 * p_rand, 1e-9);
  EXPECT_NEAR(r.get("splits.random.recall"), 100, 1e-9);
  EXPECT_NEAR(r.get("splits.random.yes_ratio"), 100, 1e-9);
  EXPECT_NEAR(r.get("splits.random.f1"), 100 * f1_rand, 1e-9);
  EXPECT_NEAR(r.get("splits.popular.f1"), 100 * f1_half, 1e-9);
  EXPECT_NEAR(r.get("splits.adversarial.precision"), 50, 1e-9);
  EXPECT_NEAR(r.get("f1_mean"), 100 * (f1_rand + 2 * f1_half) / 3, 1e-9);
  EXPECT_EQ(r.get("splits.random.n"), 2910);
  json j = json::parse(eqat::score_to_json(r));
  EXPECT_TRUE(j["splits"]["adversarial"].contains("yes_ratio"));
  EXPECT_TRUE(j.contains("f1_mean"));
}

TEST(PopeScore, PerfectWithPhrasingAndAllNo) {
  TempDir t;
  // The right answer phrased as a sentence: "Yes, there is." / "No, there is not." -> 100 everywhere.
  std::string a = pope_answers(t, [](const std::string& l) {
    return l == "yes" ? std::string("Yes, there is.") : std::string("No, there is not.");
  });
  auto r = eqat::score_pope(bench("pope"), bench("pope/llava_pope_test.jsonl"), a);
  for (const char* s : {"random", "popular", "adversarial"}) {
    EXPECT_NEAR(r.get(std::string("splits.") + s + ".accuracy"), 100, 1e-9) << s;
    EXPECT_NEAR(r.get(std::string("splits.") + s + ".f1"), 100, 1e-9) << s;
    EXPECT_NEAR(r.get(std::string("splits.") + s + ".yes_ratio"), 50 * (std::string(s) == "random" ? 3000.0 / 2910 : 1),
                1e-9);
  }
  // All "no": TP = FP = 0 -> precision, recall, F1 0 (the official script would divide by zero); accuracy =
  // no share (random 1410/2910), yes-ratio 0.
  a = pope_answers(t, [](const std::string&) { return "no"; });
  r = eqat::score_pope(bench("pope"), bench("pope/llava_pope_test.jsonl"), a);
  EXPECT_NEAR(r.get("splits.random.accuracy"), 100.0 * 1410 / 2910, 1e-9);
  EXPECT_NEAR(r.get("splits.random.yes_ratio"), 0, 1e-9);
  EXPECT_NEAR(r.get("f1_mean"), 0, 1e-9);
}

// An unknown question id is counted and not scored (eval_pope.py would stop with a KeyError); --strict refuses it
// naming the file and the line.
TEST(PopeScore, UnknownQuestionIdNamesTheRecord) {
  TempDir t;
  write_answers(t.str("a.jsonl"), {{99999, "", "yes"}});
  auto r = eqat::score_pope(bench("pope"), bench("pope/llava_pope_test.jsonl"), t.str("a.jsonl"));
  EXPECT_EQ(r.get("answer_checks.unknown_ids"), 1);
  EXPECT_EQ(r.get("f1_mean"), 0);  // no split has an answer
  eqat::ScoreOptions strict;
  strict.strict = true;
  try {
    eqat::score_pope(bench("pope"), bench("pope/llava_pope_test.jsonl"), t.str("a.jsonl"), strict);
    FAIL() << "expected InputError";
  } catch (const eqat::InputError& e) {
    EXPECT_NE(std::string(e.what()).find("a.jsonl: 1 unknown id (line 1: id 99999)"), std::string::npos) << e.what();
  }
}

// ---- MME -------------------------------------------------------------------------------------------------------

TEST(MmeParse, OfficialRules) {
  EXPECT_EQ(eqat::mme_parse("Yes"), "yes");
  EXPECT_EQ(eqat::mme_parse("NO"), "no");
  EXPECT_EQ(eqat::mme_parse("Yes, it is."), "yes");
  EXPECT_EQ(eqat::mme_parse("Not at all"), "no");   // "not " contains "no"
  EXPECT_EQ(eqat::mme_parse("I think yes"), "other");  // only the first 4 characters are looked at
  EXPECT_EQ(eqat::mme_parse("nobody"), "no");
  EXPECT_EQ(eqat::mme_parse(""), "other");
  EXPECT_EQ(eqat::mme_parse("y"), "other");
}

namespace {
// MME answers in llava_mme.jsonl order; text_for(gt "yes"/"no", index of the question within its image).
template <typename Fn>
std::string mme_answers(const TempDir& t, Fn text_for) {
  // GT by (category, image, question without " Please answer yes or no.").
  std::map<std::string, std::string> gt;
  for (const auto& f : {"OCR", "artwork", "celebrity", "code_reasoning", "color", "commonsense_reasoning", "count",
                        "existence", "landmark", "numerical_calculation", "position", "posters", "scene",
                        "text_translation"}) {
    std::ifstream in(bench(std::string("mme/ground_truth/") + f + ".txt"));
    std::string line;
    while (std::getline(in, line)) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty()) continue;
      std::istringstream ls(line);
      std::string img, q, a;
      std::getline(ls, img, '\t'), std::getline(ls, q, '\t'), std::getline(ls, a, '\t');
      const size_t p = q.find("Please answer yes or no.");
      q = q.substr(0, p);
      while (!q.empty() && q.back() == ' ') q.pop_back();
      gt[std::string(f) + "|" + img + "|" + q] = a == "Yes" ? "yes" : "no";
    }
  }
  std::vector<std::tuple<json, std::string, std::string>> rows;
  std::map<std::string, int> per_image;
  for (const auto& q : read_jsonl(bench("mme/llava_mme.jsonl"))) {
    const std::string qid = q["question_id"].get<std::string>(), text = q["text"].get<std::string>();
    const std::string cat = qid.substr(0, qid.find('/')), img = qid.substr(qid.rfind('/') + 1);
    const std::string question = text.substr(0, text.find('\n'));
    const std::string k = cat + "|" + img + "|" + question;
    EXPECT_TRUE(gt.count(k)) << k;
    rows.push_back({qid, text, text_for(gt[k], per_image[cat + "|" + img]++)});
  }
  write_answers(t.str("mme.jsonl"), rows);
  return t.str("mme.jsonl");
}
}  // namespace

TEST(MmeScore, FirstQuestionOfEveryImageRight) {
  // Right on the first question of every image, wrong on the second -> acc 50, acc+ 0, score 50 per category;
  // perception = 10 × 50 = 500, cognition = 4 × 50 = 200.
  TempDir t;
  const std::string a = mme_answers(t, [](const std::string& gt, int k) {
    return k == 0 ? gt : (gt == "yes" ? std::string("No") : std::string("Yes"));
  });
  auto r = eqat::score_mme(bench("mme/ground_truth"), bench("mme/llava_mme.jsonl"), a);
  EXPECT_NEAR(r.get("categories.artwork.acc"), 50, 1e-9);
  EXPECT_NEAR(r.get("categories.artwork.acc_plus"), 0, 1e-9);
  EXPECT_NEAR(r.get("categories.OCR.score"), 50, 1e-9);
  EXPECT_NEAR(r.get("perception"), 500, 1e-9);
  EXPECT_NEAR(r.get("cognition"), 200, 1e-9);
  EXPECT_EQ(r.get("categories.posters.n"), 294);
  EXPECT_TRUE(r.notes.empty());
  json j = json::parse(eqat::score_to_json(r));
  EXPECT_TRUE(j["categories"]["code_reasoning"].contains("acc_plus"));
}

TEST(MmeScore, AllRightAndOther) {
  TempDir t;
  // All right (as "Yes."/"No, ...") -> 200 per category, perception 2000, cognition 800.
  std::string a = mme_answers(t, [](const std::string& gt, int) {
    return gt == "yes" ? std::string("Yes.") : std::string("No, it is not.");
  });
  auto r = eqat::score_mme(bench("mme/ground_truth"), "", a);
  EXPECT_NEAR(r.get("perception"), 2000, 1e-9);
  EXPECT_NEAR(r.get("cognition"), 800, 1e-9);
  // Second question answered with an unparsable text ("other", always wrong), first right -> same as above: 50.
  a = mme_answers(t, [](const std::string& gt, int k) { return k == 0 ? gt : std::string("maybe"); });
  r = eqat::score_mme(bench("mme/ground_truth"), "", a);
  EXPECT_NEAR(r.get("categories.scene.score"), 50, 1e-9);
}

// ---- ScienceQA -------------------------------------------------------------------------------------------------

TEST(SqaExtract, OfficialRules) {
  EXPECT_EQ(eqat::sqa_extract("B"), "B");
  EXPECT_EQ(eqat::sqa_extract("C. the moon"), "C");
  EXPECT_EQ(eqat::sqa_extract("C.the moon"), "FAILED");  // needs ". "
  EXPECT_EQ(eqat::sqa_extract("The answer is D."), "D");
  EXPECT_EQ(eqat::sqa_extract("I think The answer is A, because"), "A");  // "." matches any character
  EXPECT_EQ(eqat::sqa_extract("The answer is A. The answer is B."), "FAILED");  // two matches
  EXPECT_EQ(eqat::sqa_extract("The answer is A"), "FAILED");  // nothing after the letter
  EXPECT_EQ(eqat::sqa_extract("F"), "FAILED");
  EXPECT_EQ(eqat::sqa_extract("b"), "FAILED");
  EXPECT_EQ(eqat::sqa_extract(" A"), "FAILED");
}

namespace {
template <typename Fn>
std::string sqa_answers(const TempDir& t, Fn text_for) {
  std::ifstream f(bench("scienceqa/llava_test_CQM-A.json"));
  json all = json::parse(f);
  std::vector<std::tuple<json, std::string, std::string>> rows;
  for (const auto& e : all)
    rows.push_back({e["id"], e["conversations"][0]["value"].get<std::string>(),
                    text_for(e["conversations"][1]["value"].get<std::string>())});
  write_answers(t.str("sqa.jsonl"), rows);
  return t.str("sqa.jsonl");
}
}  // namespace

TEST(SqaScore, CountsFromTheRealFile) {
  TempDir t;
  const std::string problems = bench("scienceqa/llava_test_CQM-A.json");
  // Right letter in all three accepted forms, rotating -> 100 / 100.
  int i = 0;
  auto r = eqat::score_scienceqa(problems, sqa_answers(t, [&](const std::string& g) {
                                   const int k = i++ % 3;
                                   return k == 0 ? g : k == 1 ? g + ". yes" : "The answer is " + g + ".";
                                 }));
  EXPECT_NEAR(r.get("accuracy"), 100, 1e-9);
  EXPECT_NEAR(r.get("img_accuracy"), 100, 1e-9);
  EXPECT_EQ(r.get("n"), 4241);
  EXPECT_EQ(r.get("img_n"), 2017);
  // Always "A": right exactly where the answer is A: 1700 of 4241 overall, 713 of the 2017 with an image
  // (LLAVA.md §5.4 letter counts; the image-subset count 713 was tallied from the file).
  r = eqat::score_scienceqa(problems, sqa_answers(t, [](const std::string&) { return std::string("A"); }));
  EXPECT_NEAR(r.get("accuracy"), 100.0 * 1700 / 4241, 1e-9);
  EXPECT_NEAR(r.get("img_accuracy"), 100.0 * 713 / 2017, 1e-9);
  // Unparsable -> FAILED -> wrong.
  r = eqat::score_scienceqa(problems, sqa_answers(t, [](const std::string& g) { return "(" + g + ")"; }));
  EXPECT_NEAR(r.get("accuracy"), 0, 1e-9);
  EXPECT_EQ(r.get("failed_extractions"), 4241);
}

// ---- VQA normaliser, MMBench extraction, TextVQA, GQA, SEED ----------------------------------------------------

TEST(VqaNormalize, EvalAiRules) {
  EXPECT_EQ(eqat::vqa_normalize("Two"), "2");
  EXPECT_EQ(eqat::vqa_normalize("The Dog."), "dog");
  EXPECT_EQ(eqat::vqa_normalize("a dog, a cat"), "dog cat");
  EXPECT_EQ(eqat::vqa_normalize("3.5"), "3.5");              // "." before a digit stays
  EXPECT_EQ(eqat::vqa_normalize("dont"), "don't");
  EXPECT_EQ(eqat::vqa_normalize("man's hat"), "man 's hat");
  EXPECT_EQ(eqat::vqa_normalize("red-white"), "red white");  // no adjacent space: "-" -> " "
  EXPECT_EQ(eqat::vqa_normalize("red - white"), "red white");  // " -" present: "-" deleted
  EXPECT_EQ(eqat::vqa_normalize("yes!"), "yes");
  EXPECT_EQ(eqat::vqa_normalize("  Line\nbreak\t"), "line break");
  EXPECT_EQ(eqat::vqa_normalize("none"), "0");
}

TEST(VqaAccuracy, TenChooseNine) {
  // k matching annotators -> 10-choose-9 average of min(1, matches/3): 0, 0.3, 0.6, 0.9, 1.0 for k = 0..4.
  auto gts = [](int k) {
    std::vector<std::string> g(10, "cat");
    for (int i = 0; i < k; ++i) g[i] = "dog";
    return g;
  };
  EXPECT_NEAR(eqat::vqa_soft_accuracy("dog", gts(0)), 0.0, 1e-12);
  EXPECT_NEAR(eqat::vqa_soft_accuracy("dog", gts(1)), 0.3, 1e-12);
  EXPECT_NEAR(eqat::vqa_soft_accuracy("Dog.", gts(2)), 0.6, 1e-12);
  EXPECT_NEAR(eqat::vqa_soft_accuracy("a dog", gts(3)), 0.9, 1e-12);
  EXPECT_NEAR(eqat::vqa_soft_accuracy("dog", gts(4)), 1.0, 1e-12);
}

TEST(MmbenchExtract, Rules) {
  std::vector<std::pair<std::string, std::string>> opts = {{"A", "red apple"}, {"B", "green pear"}, {"C", "blue"}};
  EXPECT_EQ(eqat::mmbench_extract("B", opts), "B");
  EXPECT_EQ(eqat::mmbench_extract("(C)", opts), "C");
  EXPECT_EQ(eqat::mmbench_extract("The answer is A.", opts), "A");
  EXPECT_EQ(eqat::mmbench_extract("A or B", opts), "");  // two letters, no option text
  EXPECT_EQ(eqat::mmbench_extract("It is a green pear", opts), "B");  // by option text
  EXPECT_EQ(eqat::mmbench_extract("Cannot determine the answer", opts), "Z");
  EXPECT_EQ(eqat::mmbench_extract("A is what I would say if I had to pick one of these", opts), "");  // not last 5
}

TEST(TextVqaScore, MatchesByImageAndQuestion) {
  TempDir t;
  json gt = {{"data",
              {{{"image_id", "img1"}, {"question", "What brand?"}, {"question_id", 1},
                {"answers", {"nike", "nike", "nike", "adidas", "nike", "nike", "nike", "nike", "nike", "nike"}}},
               {{"image_id", "img2"}, {"question", "What number?"}, {"question_id", 2},
                {"answers", {"2", "two", "2", "3", "3", "3", "4", "5", "6", "7"}}}}}};
  eqat::write_file_atomic(t.str("gt.json"), gt.dump());
  write_answers(t.str("a.jsonl"),
                {{"img1", "What brand?\nReference OCR token: NIKE\nAnswer the question using a single word or phrase.",
                  "Nike"},
                 {"img2", "What number?\nAnswer the question using a single word or phrase.", "two"}});
  auto r = eqat::score_textvqa(t.str("gt.json"), t.str("a.jsonl"));
  // img1: 9 "nike" -> 1.0; img2: "two" -> "2" matches 3 annotators -> 0.9. Mean 0.95 -> 95 %.
  EXPECT_NEAR(r.get("accuracy"), 95.0, 1e-9);
}

TEST(GqaSeedScore, ExactMatch) {
  TempDir t;
  eqat::write_file_atomic(t.str("gqa.json"), R"({"q1": {"answer": "left"}, "q2": {"answer": "no"}})");
  write_answers(t.str("a.jsonl"), {{"q1", "", "Left."}, {"q2", "", "yes"}});
  EXPECT_NEAR(eqat::score_gqa(t.str("gqa.json"), t.str("a.jsonl")).get("accuracy"), 50.0, 1e-9);
  eqat::write_file_atomic(t.str("seed.json"), R"({"question_type": {"Scene": 1},
    "questions": [{"question_id": "1", "answer": "A", "question_type_id": 1, "data_type": "image"},
                  {"question_id": "2", "answer": "B", "question_type_id": 1, "data_type": "image"}]})");
  write_answers(t.str("s.jsonl"), {{"1", "", "A"}, {"2", "", "B."}});  // "B." is not "B": no extraction
  auto r = eqat::score_seed(t.str("seed.json"), t.str("s.jsonl"));
  EXPECT_NEAR(r.get("accuracy"), 50.0, 1e-9);
  EXPECT_NEAR(r.get("types.Scene"), 50.0, 1e-9);
}

TEST(MmbenchScore, CircularEvaluation) {
  // Question 0 with two rotations (index 0, 1000000), question 1 with one row. Q0: right on both -> 1;
  // Q1: wrong -> 0. Circular accuracy 50 %; row accuracy 2/3.
  TempDir t;
  eqat::write_file_atomic(t.str("mmb.tsv"),
                          "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\n"
                          "0\tWhat?\tnan\tcat\tdog\tnan\tnan\tA\tobj\n"
                          "1000000\tWhat?\tnan\tdog\tcat\tnan\tnan\tB\tobj\n"
                          "1\tWhere?\tnan\tleft\tright\tup\tnan\tC\tpos\n");
  write_answers(t.str("a.jsonl"), {{0, "", "A"}, {1000000, "", "B. cat"}, {1, "", "A"}});
  auto r = eqat::score_mmbench(t.str("mmb.tsv"), t.str("a.jsonl"));
  EXPECT_NEAR(r.get("accuracy"), 50.0, 1e-9);
  EXPECT_NEAR(r.get("row_accuracy"), 200.0 / 3, 1e-9);
  EXPECT_NEAR(r.get("categories.obj"), 100.0, 1e-9);
}

TEST(Vqav2Upload, NormalisedAnswers) {
  TempDir t;
  write_answers(t.str("a.jsonl"), {{7, "", "Two dogs."}});
  eqat::write_vqav2_upload(t.str("a.jsonl"), t.str("up.json"));
  json j = json::parse(eqat::read_file(t.str("up.json")));
  EXPECT_EQ(j[0]["question_id"].get<int>(), 7);
  EXPECT_EQ(j[0]["answer"].get<std::string>(), "2 dogs");
}

TEST(Answers, MalformedLineNamesFileAndLine) {
  TempDir t;
  eqat::write_file_atomic(t.str("a.jsonl"), "{\"question_id\": 1, \"text\": \"yes\"}\n{oops\n");
  try {
    eqat::read_answers(t.str("a.jsonl"));
    FAIL();
  } catch (const eqat::InputError& e) {
    EXPECT_NE(std::string(e.what()).find("a.jsonl:2"), std::string::npos) << e.what();
  }
  // A torn (unterminated) last line is tolerated when resuming.
  eqat::write_file_atomic(t.str("b.jsonl"), "{\"question_id\": 1, \"text\": \"yes\"}\n{\"question_id\": 2, \"te");
  EXPECT_EQ(eqat::read_answers(t.str("b.jsonl"), true).size(), 1u);
}

// Fuzz findings (fuzz/eval_fuzz, fuzz/README.md).
// Category names come from the data and may contain dots: "categories.a" then "categories.a.b" made score_to_json
// index into a number (nlohmann type_error escaping `eqat score`). The colliding metric now keeps its whole key.
TEST(ScoreJson, DottedDataNamesDoNotCollide) {
  TempDir t;
  std::ofstream(t.str("mmb.tsv")) << "index\tquestion\tA\tB\tanswer\tcategory\n"
                                     "0\tq\tx\ty\tA\ta\n"
                                     "1\tq\tx\ty\tA\ta.b\n";
  write_answers(t.str("a.jsonl"), {{0, "", "A"}, {1, "", "B"}});
  const eqat::ScoreReport r = eqat::score_mmbench(t.str("mmb.tsv"), t.str("a.jsonl"));
  EXPECT_NEAR(r.get("categories.a"), 100.0, kEps);
  EXPECT_NEAR(r.get("categories.a.b"), 0.0, kEps);
  const json j = json::parse(eqat::score_to_json(r));
  EXPECT_NEAR(j["categories"]["a"].get<double>(), 100.0, kEps);
  EXPECT_NEAR(j["categories.a.b"].get<double>(), 0.0, kEps);
  EXPECT_FALSE(eqat::score_to_text(r).empty());

  // The reverse order: a leaf where an object already is.
  eqat::ScoreReport rev;
  rev.bench = "x";
  rev.metrics = {{"s.a.b", 1.0}, {"s.a", 2.0}};
  const json k = json::parse(eqat::score_to_json(rev));
  EXPECT_EQ(k["s"]["a"]["b"].get<double>(), 1.0);
  EXPECT_EQ(k["s.a"].get<double>(), 2.0);
}

// SEED-Bench "questions" entries were indexed without a check: a number made nlohmann throw type_error, an
// object without question_id read freed memory (operator[] on a missing key of a const object).
TEST(GqaSeedScore, SeedQuestionsMustBeObjectsWithId) {
  TempDir t;
  write_answers(t.str("s.jsonl"), {{"1", "", "A"}});
  for (const char* gt : {R"({"questions": [1]})", R"({"questions": [{"answer": "A"}]})"}) {
    std::ofstream(t.str("seed.json")) << gt;
    try {
      eqat::score_seed(t.str("seed.json"), t.str("s.jsonl"));
      ADD_FAILURE() << "accepted " << gt;
    } catch (const eqat::InputError& e) {
      EXPECT_NE(std::string(e.what()).find("seed.json: each \"questions\" entry must be an object"), std::string::npos)
          << e.what();
    }
  }
}

// ---- answer checks: duplicates, unknown ids, non-string text (issue 16) ------------------------------------------

namespace {
void write_jsonl(const std::string& path, const std::vector<json>& rows) {
  std::ofstream f(path);
  for (const auto& j : rows) f << j.dump() << "\n";
}

// The three counts in the report and in its JSON (as integers).
void expect_checks(const eqat::ScoreReport& r, int dup, int unknown, int non_string) {
  EXPECT_EQ(r.get("answer_checks.duplicates"), dup);
  EXPECT_EQ(r.get("answer_checks.unknown_ids"), unknown);
  EXPECT_EQ(r.get("answer_checks.non_string_text"), non_string);
  const json j = json::parse(eqat::score_to_json(r));
  ASSERT_TRUE(j.contains("answer_checks")) << j.dump();
  EXPECT_TRUE(j["answer_checks"]["duplicates"].is_number_integer());
  EXPECT_EQ(j["answer_checks"]["duplicates"].get<int>(), dup);
  EXPECT_EQ(j["answer_checks"]["unknown_ids"].get<int>(), unknown);
  EXPECT_EQ(j["answer_checks"]["non_string_text"].get<int>(), non_string);
  EXPECT_NE(eqat::score_to_text(r).find("answer_checks.duplicates"), std::string::npos);
}

// fn(strict options) must throw one InputError containing every needle.
template <typename Fn>
void expect_strict_error(Fn fn, const std::vector<std::string>& needles) {
  eqat::ScoreOptions o;
  o.strict = true;
  try {
    fn(o);
    ADD_FAILURE() << "expected InputError under strict";
  } catch (const eqat::InputError& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << msg << "\nlacks: " << n;
  }
}
}  // namespace

TEST(AnswerChecks, Shapes) {
  // Every question answered right except id 1, whose FIRST answer (line 2) is wrong; its duplicate (line 15) is
  // right and must be ignored -> 13/14 (a map keeping the last answer would give 14/14). Line 3 answers id 2
  // (gt "0") with the number 0: counted, scored as "0" -> right. Line 16 answers an id the questions lack.
  TempDir t;
  std::vector<json> rows;
  for (const auto& g : read_jsonl(bench("shapes/test_answers.jsonl"))) {
    const int id = g["question_id"].get<int>();
    json a = {{"question_id", id}, {"prompt", ""}, {"text", g["text"]}};
    if (id == 1) a["text"] = "square";
    if (id == 2) a["text"] = 0;
    rows.push_back(a);
  }
  rows.push_back({{"question_id", 1}, {"prompt", ""}, {"text", "circle"}});
  rows.push_back({{"question_id", 999}, {"prompt", ""}, {"text", "yes"}});
  write_jsonl(t.str("a.jsonl"), rows);
  auto score = [&](const eqat::ScoreOptions& o) {
    return eqat::score_shapes(bench("shapes/test.jsonl"), bench("shapes/test_answers.jsonl"), t.str("a.jsonl"), o);
  };
  const eqat::ScoreReport r = score({});
  EXPECT_NEAR(r.get("accuracy"), 13.0 / 14.0, kEps);
  EXPECT_EQ(r.get("n"), 14);
  EXPECT_FALSE(r.correct.at(eqat::answer_key("1", "")));
  EXPECT_TRUE(r.correct.at(eqat::answer_key("2", "")));
  expect_checks(r, 1, 1, 1);
  ASSERT_EQ(r.notes.size(), 3u);
  EXPECT_NE(r.notes[0].find("line 15: id 1"), std::string::npos) << r.notes[0];
  EXPECT_NE(r.notes[1].find("line 16: id 999"), std::string::npos) << r.notes[1];
  EXPECT_NE(r.notes[2].find("line 3: id 2"), std::string::npos) << r.notes[2];
  expect_strict_error(score, {t.str("a.jsonl") + ": 1 duplicate question id (line 15: id 1), 1 unknown id (line 16: "
                              "id 999), 1 non-string text (line 3: id 2); rerun without --strict"});
  // A clean file: zero counts, strict passes.
  write_answers(t.str("b.jsonl"), {{0, "", "blue"}});
  eqat::ScoreOptions strict;
  strict.strict = true;
  const eqat::ScoreReport clean =
      eqat::score_shapes(bench("shapes/test.jsonl"), bench("shapes/test_answers.jsonl"), t.str("b.jsonl"), strict);
  expect_checks(clean, 0, 0, 0);
  EXPECT_EQ(clean.notes.size(), 1u);  // only "13 questions have no answer"
}

TEST(AnswerChecks, Pope) {
  // All answers right; line 1 (label yes) answered with the number 0 -> "0" -> yes (right); a wrong duplicate of
  // line 2 (label no) and an unknown id appended. Both dropped: every split stays at 100 and the adversarial split
  // keeps 3000 answers for its 3000 labels (kept, the duplicate would be a 3001st answer: no label to zip with,
  // but a yes-ratio of 1501/3001).
  TempDir t;
  std::vector<json> rows = read_jsonl(
      pope_answers(t, [](const std::string& l) { return l == "yes" ? std::string("Yes") : std::string("No"); }));
  ASSERT_EQ(rows.size(), 8910u);
  rows[0]["text"] = 0;
  json dup = rows[1];
  dup["text"] = "Yes";
  rows.push_back(dup);
  rows.push_back({{"question_id", 99999}, {"prompt", "x"}, {"text", "Yes"}});
  write_jsonl(t.str("pope.jsonl"), rows);
  auto score = [&](const eqat::ScoreOptions& o) {
    return eqat::score_pope(bench("pope"), bench("pope/llava_pope_test.jsonl"), t.str("pope.jsonl"), o);
  };
  const eqat::ScoreReport r = score({});
  for (const char* s : {"random", "popular", "adversarial"})
    EXPECT_NEAR(r.get(std::string("splits.") + s + ".accuracy"), 100, 1e-9) << s;
  EXPECT_NEAR(r.get("splits.adversarial.yes_ratio"), 50, 1e-9);
  EXPECT_EQ(r.get("splits.adversarial.n"), 3000);
  EXPECT_FALSE(r.correct.empty());
  EXPECT_TRUE(r.correct.at(eqat::answer_key(rows[1]["question_id"].dump(), rows[1]["prompt"].get<std::string>())));
  expect_checks(r, 1, 1, 1);
  expect_strict_error(score, {t.str("pope.jsonl") + ": 1 duplicate question id (line 8911: id 2)",
                              "1 unknown id (line 8912: id 99999)", "1 non-string text (line 1: id 1)"});
}

TEST(AnswerChecks, Mme) {
  // All right; the second record answered with `true` ("true": neither yes nor no -> wrong); a wrong duplicate of
  // the first record (same id AND prompt) and an image the ground truth lacks appended. The two questions of one
  // image share its id but differ in prompt: not duplicates. Category of record 2 (n answers, n/2 images): acc
  // (n-1)/n, acc+ (n/2-1)/(n/2); kept, the duplicate would make the count odd (an error).
  TempDir t;
  std::vector<json> rows = read_jsonl(mme_answers(t, [](const std::string& gt, int) {
    return gt == "yes" ? std::string("Yes") : std::string("No");
  }));
  ASSERT_EQ(rows[0]["question_id"], rows[1]["question_id"]);
  rows[1]["text"] = true;
  json dup = rows[0];
  dup["text"] = dup["text"] == "Yes" ? "No" : "Yes";
  rows.push_back(dup);
  rows.push_back({{"question_id", "existence/not_there.jpg"}, {"prompt", "Is there a cat?"}, {"text", "Yes"}});
  write_jsonl(t.str("mme.jsonl"), rows);
  const std::string qid = rows[0]["question_id"].get<std::string>(), cat = qid.substr(0, qid.find('/'));
  auto score = [&](const eqat::ScoreOptions& o) {
    return eqat::score_mme(bench("mme/ground_truth"), bench("mme/llava_mme.jsonl"), t.str("mme.jsonl"), o);
  };
  const eqat::ScoreReport r = score({});
  const double n = r.get("categories." + cat + ".n");
  ASSERT_GT(n, 2);
  EXPECT_NEAR(r.get("categories." + cat + ".acc"), 100 * (n - 1) / n, 1e-9);
  EXPECT_NEAR(r.get("categories." + cat + ".acc_plus"), 100 * (n / 2 - 1) / (n / 2), 1e-9);
  EXPECT_TRUE(r.correct.at(eqat::answer_key(qid, rows[0]["prompt"].get<std::string>())));
  expect_checks(r, 1, 1, 1);
  const std::string lines = std::to_string(rows.size() - 1);
  expect_strict_error(score, {t.str("mme.jsonl") + ": 1 duplicate question id + prompt (line " + lines + ": id \"" +
                                  qid + "\")",
                              "1 unknown id (line " + std::to_string(rows.size()) + ": id \"existence/not_there.jpg\")",
                              "1 non-string text (line 2: id \"" + qid + "\")"});
}

TEST(AnswerChecks, ScienceQa) {
  // All right; the first problem's answer repeated (wrong) at the end, an unknown id, and the second problem
  // answered with the number 1 ("1": FAILED, wrong) -> 4240 of 4241, one failed extraction.
  TempDir t;
  std::vector<json> rows = read_jsonl(sqa_answers(t, [](const std::string& g) { return g; }));
  json dup = rows[0];
  dup["text"] = dup["text"] == "A" ? "B" : "A";
  rows[1]["text"] = 1;
  rows.push_back(dup);
  rows.push_back({{"question_id", "no-such-problem"}, {"prompt", ""}, {"text", "A"}});
  write_jsonl(t.str("sqa.jsonl"), rows);
  auto score = [&](const eqat::ScoreOptions& o) {
    return eqat::score_scienceqa(bench("scienceqa/llava_test_CQM-A.json"), t.str("sqa.jsonl"), o);
  };
  const eqat::ScoreReport r = score({});
  EXPECT_NEAR(r.get("accuracy"), 100.0 * 4240 / 4241, 1e-9);
  EXPECT_EQ(r.get("failed_extractions"), 1);
  EXPECT_TRUE(r.correct.at(eqat::answer_key(rows[0]["question_id"].get<std::string>(),
                                            rows[0]["prompt"].get<std::string>())));
  expect_checks(r, 1, 1, 1);
  expect_strict_error(score, {t.str("sqa.jsonl") + ": 1 duplicate question id (line 4242: id \"4\")",
                              "1 unknown id (line 4243: id \"no-such-problem\")", "1 non-string text (line 2"});
}

TEST(AnswerChecks, OtherScorersAndUploads) {
  TempDir t;
  // GQA: q1 answered twice (first right), q9 unknown -> 100 % of the one question.
  eqat::write_file_atomic(t.str("gqa.json"), R"({"q1": {"answer": "left"}})");
  write_answers(t.str("g.jsonl"), {{"q1", "", "left"}, {"q1", "", "right"}, {"q9", "", "no"}});
  auto r = eqat::score_gqa(t.str("gqa.json"), t.str("g.jsonl"));
  EXPECT_NEAR(r.get("accuracy"), 100, 1e-9);
  expect_checks(r, 1, 1, 0);
  // The GQA prediction file keeps the first answer of q1 (the unknown q9 stays: no question file to know it by).
  expect_checks([&] {
    eqat::ScoreReport u;
    u.bench = "x";
    eqat::write_gqa_predictions(t.str("g.jsonl"), t.str("gp.json")).add_to(u);
    return u;
  }(), 1, 0, 0);
  json gp = json::parse(eqat::read_file(t.str("gp.json")));
  ASSERT_EQ(gp.size(), 2u);
  EXPECT_EQ(gp[0]["prediction"], "left");
  // SEED.
  eqat::write_file_atomic(t.str("seed.json"), R"({"questions": [{"question_id": "1", "answer": "A"}]})");
  write_answers(t.str("s.jsonl"), {{"1", "", "A"}, {"1", "", "B"}, {"2", "", "A"}});
  r = eqat::score_seed(t.str("seed.json"), t.str("s.jsonl"));
  EXPECT_NEAR(r.get("accuracy"), 100, 1e-9);
  expect_checks(r, 1, 1, 0);
  // MMBench: row index 0 answered twice (first right), index 7 unknown.
  std::ofstream(t.str("mmb.tsv")) << "index\tquestion\tA\tB\tanswer\tcategory\n0\tq\tx\ty\tA\tc\n";
  write_answers(t.str("m.jsonl"), {{0, "", "A"}, {0, "", "B"}, {7, "", "A"}});
  r = eqat::score_mmbench(t.str("mmb.tsv"), t.str("m.jsonl"));
  EXPECT_NEAR(r.get("accuracy"), 100, 1e-9);
  expect_checks(r, 1, 1, 0);
  // TextVQA: duplicates by image id + prompt; an image id the ground truth lacks.
  json gt = {{"data", {{{"image_id", "img1"}, {"question", "What brand?"},
                        {"answers", {"nike", "nike", "nike", "nike", "nike", "nike", "nike", "nike", "nike", "nike"}}}}}};
  eqat::write_file_atomic(t.str("tv.json"), gt.dump());
  const std::string p = "What brand?\nAnswer the question using a single word or phrase.";
  write_answers(t.str("tv.jsonl"), {{"img1", p, "nike"}, {"img1", p, "puma"}, {"img2", p, "nike"}});
  r = eqat::score_textvqa(t.str("tv.json"), t.str("tv.jsonl"));
  EXPECT_NEAR(r.get("accuracy"), 100, 1e-9);
  expect_checks(r, 1, 1, 0);
  // VQAv2 upload: one entry per question id, the first answer; strict refuses before writing.
  write_answers(t.str("v.jsonl"), {{7, "", "Two"}, {7, "", "three"}});
  const eqat::AnswerChecks vc = eqat::write_vqav2_upload(t.str("v.jsonl"), t.str("up.json"));
  EXPECT_EQ(vc.duplicates, 1);
  json up = json::parse(eqat::read_file(t.str("up.json")));
  ASSERT_EQ(up.size(), 1u);
  EXPECT_EQ(up[0]["answer"], "2");
  expect_strict_error([&](const eqat::ScoreOptions& o) { eqat::write_vqav2_upload(t.str("v.jsonl"), t.str("up2.json"), o); },
                      {"v.jsonl: 1 duplicate question id (line 2: id 7)"});
  EXPECT_FALSE(eqat::file_exists(t.str("up2.json")));
}

// A category read from a TSV need not be UTF-8: score_to_json threw nlohmann's type_error 316 on dump (found by
// fuzz/eval_fuzz). Invalid bytes now become U+FFFD.
TEST(ScoreJson, NonUtf8NamesAreReplaced) {
  eqat::ScoreReport r;
  r.bench = "mmbench";
  r.metrics = {{"categories.a\xB4z", 50.0}};
  r.notes = {"note \xFF"};
  const json j = json::parse(eqat::score_to_json(r));
  EXPECT_NEAR(j["categories"]["a\xEF\xBF\xBDz"].get<double>(), 50.0, kEps);
  EXPECT_EQ(j["notes"][0].get<std::string>(), "note \xEF\xBF\xBD");
}
