// The procedural shapes world (src/data/shapes.h): determinism, balance, answers consistent with the scene, and
// the dataset files in LLaVA's formats.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <map>
#include <set>
#include <sstream>

#include "data/error.h"
#include "data/fs.h"
#include "data/image.h"
#include "data/shapes.h"
#include "test_util.h"

namespace eqat {
namespace {

std::string strip_suffix(const std::string& q) { return q.substr(0, q.find('\n')); }

TEST(Shapes, SameSeedSameBytesAndText) {
  for (int family : {-1, 0, 4, 6}) {
    ShapesSample a = shapes_sample(7, 3, family), b = shapes_sample(7, 3, family);
    EXPECT_EQ(a.image.rgb, b.image.rgb);
    EXPECT_EQ(shapes_png(a.image), shapes_png(b.image));
    ASSERT_EQ(a.qa.size(), b.qa.size());
    for (size_t i = 0; i < a.qa.size(); ++i) {
      EXPECT_EQ(a.qa[i].question, b.qa[i].question);
      EXPECT_EQ(a.qa[i].answer, b.qa[i].answer);
    }
  }
  EXPECT_NE(shapes_sample(7, 3).image.rgb, shapes_sample(7, 4).image.rgb);
  EXPECT_NE(shapes_sample(7, 3).image.rgb, shapes_sample(8, 3).image.rgb);
}

TEST(Shapes, PngRoundTripsToThePixels) {
  ShapesSample s = shapes_sample(1, 0);
  Image back = decode_image(shapes_png(s.image), "sample");
  EXPECT_EQ(back.width, kShapesImageSize);
  EXPECT_EQ(back.rgb, s.image.rgb);
}

TEST(Shapes, TestSplitIsBalancedAndExistsIsHalfNo) {
  auto items = shapes_test_split(5, 1400);
  std::map<std::string, int> per;
  int yes = 0, exists = 0;
  for (const auto& it : items) {
    per[it.category]++;
    if (it.category == "exists") exists++, yes += it.answer == "yes";
  }
  ASSERT_EQ(per.size(), 7u);
  for (auto& [name, n] : per) EXPECT_EQ(n, 200) << name;
  EXPECT_GT(yes, 0.4 * exists);
  EXPECT_LT(yes, 0.6 * exists);
}

TEST(Shapes, TrainingSamplesCoverEveryFamily) {
  std::map<ShapesFamily, int> per;
  for (int64_t i = 0; i < 700; ++i) {
    ShapesSample s = shapes_sample(3, i);
    bool has_required = false;
    for (const auto& qa : s.qa) per[qa.family]++, has_required |= static_cast<int>(qa.family) == i % 7;
    EXPECT_TRUE(has_required) << i;
  }
  for (auto& [f, n] : per) EXPECT_GT(n, 350) << shapes_family_name(f);
}

// per_family > 1 (the trainer's packed questions): same image, the per_family-1 questions first drawn, more
// distinct questions, still at most per_family of each family.
TEST(Shapes, MoreQuestionsPerFamilyKeepTheImageAndAddDistinctQuestions) {
  size_t more = 0;
  for (int64_t i = 0; i < 50; ++i) {
    ShapesSample one = shapes_sample(3, i), three = shapes_sample(3, i, -1, 3);
    EXPECT_EQ(one.image.rgb, three.image.rgb);
    std::set<std::string> q1, q3;
    std::map<ShapesFamily, int> per;
    for (const auto& qa : one.qa) q1.insert(qa.question);
    for (const auto& qa : three.qa) q3.insert(qa.question), per[qa.family]++;
    EXPECT_EQ(q3.size(), three.qa.size()) << "repeated question, sample " << i;
    for (const auto& q : q1) EXPECT_TRUE(q3.count(q)) << q;
    for (auto& [f, n] : per) EXPECT_LE(n, 3) << shapes_family_name(f);
    more += three.qa.size() - one.qa.size();
  }
  EXPECT_GT(more, 50u * 5);  // most families have several distinct questions per scene
}

// Re-derives each answer from the scene objects.
TEST(Shapes, AnswersAgreeWithTheScene) {
  for (int64_t i = 0; i < 700; ++i) {
    ShapesSample s = shapes_sample(11, i, static_cast<int>(i % 7));
    const ShapesQA& qa = s.qa[0];
    const std::string q = strip_suffix(qa.question);
    auto kind_in = [&](const std::string& text) {
      for (int k = 0; k < kShapesKinds; ++k)
        if (text.find(std::string(" ") + shapes_kind_name(k)) != std::string::npos) return k;
      return -1;
    };
    auto colour_in = [&](const std::string& text) {
      for (int c = 0; c < kShapesColours; ++c)
        if (text.find(std::string(" ") + shapes_colour_name(c) + " ") != std::string::npos) return c;
      return -1;
    };
    switch (qa.family) {
      case ShapesFamily::kColour: {
        const int k = kind_in(q);
        int n = 0;
        for (auto& o : s.objects)
          if (o.kind == k) {
            ++n;
            EXPECT_EQ(qa.answer, shapes_colour_name(o.colour)) << q;
          }
        EXPECT_EQ(n, 1) << q;
        break;
      }
      case ShapesFamily::kShape: {
        const int c = colour_in(q);
        int n = 0;
        for (auto& o : s.objects)
          if (o.colour == c) {
            ++n;
            EXPECT_EQ(qa.answer, shapes_kind_name(o.kind)) << q;
          }
        EXPECT_EQ(n, 1) << q;
        break;
      }
      case ShapesFamily::kCount:
        if (q == "How many shapes are there?") EXPECT_EQ(qa.answer, std::to_string(s.objects.size()));
        EXPECT_GE(std::stoi(qa.answer), 0);
        EXPECT_LE(std::stoi(qa.answer), 4);
        break;
      case ShapesFamily::kExists: {
        const int k = kind_in(q), c = colour_in(q);
        bool present = false;
        for (auto& o : s.objects) present |= o.kind == k && o.colour == c;
        EXPECT_EQ(qa.answer, present ? "yes" : "no") << q;
        break;
      }
      case ShapesFamily::kPosition:
        EXPECT_TRUE(qa.answer == "left" || qa.answer == "right" || qa.answer == "above" || qa.answer == "below");
        break;
      case ShapesFamily::kChoice: {
        ASSERT_EQ(qa.answer.size(), 1u);
        const std::string opt = "\n" + qa.answer + ". ";
        const size_t p = qa.question.find(opt);
        ASSERT_NE(p, std::string::npos);
        const std::string chosen = qa.question.substr(p + opt.size(), qa.question.find('\n', p + 1) - p - opt.size());
        // The chosen option answers the underlying colour/shape question.
        const int k = kind_in(q), c = colour_in(q);
        for (auto& o : s.objects) {
          if (q.rfind("What color", 0) == 0 && o.kind == k) EXPECT_EQ(chosen, shapes_colour_name(o.colour));
          if (q.rfind("What shape", 0) == 0 && o.colour == c) EXPECT_EQ(chosen, shapes_kind_name(o.kind));
        }
        EXPECT_NE(qa.question.find("Answer with the option's letter from the given choices directly."),
                  std::string::npos);
        break;
      }
      case ShapesFamily::kDescribe: {
        std::string expect;
        for (size_t j = 0; j < s.objects.size(); ++j) {
          if (j) expect += j + 1 == s.objects.size() ? " and " : ", ";
          expect += std::string(s.objects[j].colour == 1 ? "an " : "a ") + shapes_colour_name(s.objects[j].colour) +
                    " " + shapes_kind_name(s.objects[j].kind);
        }
        EXPECT_TRUE(shapes_answer_matches(qa.answer, expect)) << qa.answer << " vs " << expect;
        break;
      }
      default:
        FAIL();
    }
    if (qa.family != ShapesFamily::kChoice && qa.family != ShapesFamily::kDescribe)
      EXPECT_NE(qa.question.find("\nAnswer the question using a single word or phrase."), std::string::npos);
  }
}

// hard_choice 1: every multiple-choice question offers, besides the answer, the other objects' colours (shapes)
// as far as four options go; the image, the answer's option text and every other question stay as with 0.
TEST(Shapes, HardChoiceDistractorsNameTheOtherObjects) {
  int hard = 0, differs = 0;
  for (int64_t i = 0; i < 140; ++i) {
    ShapesSample easy = shapes_sample(13, i, -1, 2), s = shapes_sample(13, i, -1, 2, 1.0);
    EXPECT_EQ(easy.image.rgb, s.image.rgb);
    ASSERT_EQ(easy.qa.size(), s.qa.size());
    for (size_t j = 0; j < s.qa.size(); ++j) {
      const ShapesQA &e = easy.qa[j], &h = s.qa[j];
      ASSERT_EQ(e.family, h.family);
      if (h.family != ShapesFamily::kChoice) {
        EXPECT_EQ(e.question, h.question);
        EXPECT_EQ(e.answer, h.answer);
        continue;
      }
      auto option = [](const ShapesQA& qa, char letter) {
        const std::string tag = std::string("\n") + letter + ". ";
        const size_t p = qa.question.find(tag);
        return p == std::string::npos ? std::string()
                                      : qa.question.substr(p + tag.size(), qa.question.find('\n', p + 1) - p - tag.size());
      };
      EXPECT_EQ(strip_suffix(e.question), strip_suffix(h.question));  // the same underlying question
      EXPECT_EQ(option(e, e.answer[0]), option(h, h.answer[0]));       // and the same right option
      std::set<std::string> opts, want;
      for (char l : {'A', 'B', 'C', 'D'}) opts.insert(option(h, l));
      EXPECT_EQ(opts.size(), 4u);
      const bool colour = h.question.rfind("What color", 0) == 0;
      for (const auto& o : s.objects) {
        const std::string name = colour ? shapes_colour_name(o.colour) : shapes_kind_name(o.kind);
        if (name != option(h, h.answer[0])) want.insert(name);
      }
      for (const auto& w : want) EXPECT_TRUE(opts.count(w)) << h.question << " lacks " << w;  // at most 3 others
      hard += !want.empty();
      differs += e.question != h.question;
    }
  }
  EXPECT_GT(hard, 100);   // most scenes have other objects to name
  EXPECT_GT(differs, 20);  // and random distractors often missed them
}

TEST(Shapes, NormalisedExactMatch) {
  EXPECT_TRUE(shapes_answer_matches(" Yes.\n", "yes"));
  EXPECT_TRUE(shapes_answer_matches("A red star.", "a red star"));
  EXPECT_FALSE(shapes_answer_matches("yes yes", "yes"));
}

TEST(Shapes, DatasetFilesInLlavaFormats) {
  eqat_test::TempDir tmp;
  const std::string dir = tmp.str("ds");
  write_shapes_dataset(dir, 5, 14, 2);
  auto train = nlohmann::json::parse(read_file(dir + "/train.json"));
  ASSERT_EQ(train.size(), 5u);
  for (auto& t : train) {
    EXPECT_TRUE(file_exists(dir + "/images/" + t["image"].get<std::string>()));
    auto& conv = t["conversations"];
    ASSERT_EQ(conv.size(), 2u);  // single-turn, as the default model is trained and asked
    EXPECT_EQ(conv[0]["from"], "human");
    EXPECT_EQ(conv[1]["from"], "gpt");
    EXPECT_EQ(conv[0]["value"].get<std::string>().rfind("<image>\n", 0), 0u);
  }
  std::istringstream q(read_file(dir + "/test.jsonl")), a(read_file(dir + "/test_answers.jsonl"));
  std::string lq, la;
  int n = 0;
  while (std::getline(q, lq) && std::getline(a, la)) {
    auto jq = nlohmann::json::parse(lq), ja = nlohmann::json::parse(la);
    EXPECT_EQ(jq["question_id"], ja["question_id"]);
    for (const char* k : {"question_id", "image", "text", "category"}) EXPECT_TRUE(jq.contains(k)) << k;
    EXPECT_TRUE(file_exists(dir + "/images/" + jq["image"].get<std::string>()));
    ++n;
  }
  EXPECT_EQ(n, 14);
  // --choice-by-word: the same split with its choice questions asking for the option's text.
  const std::string dw = tmp.str("dw");
  write_shapes_dataset(dw, 0, 14, 2, 0.0, /*choice_by_word=*/true);
  std::istringstream q0(read_file(dir + "/test.jsonl")), a0(read_file(dir + "/test_answers.jsonl"));
  std::istringstream q1(read_file(dw + "/test.jsonl")), a1(read_file(dw + "/test_answers.jsonl"));
  std::string l0, m0, l1, m1;
  int choices = 0;
  while (std::getline(q0, l0) && std::getline(a0, m0) && std::getline(q1, l1) && std::getline(a1, m1)) {
    auto j0 = nlohmann::json::parse(l0), j1 = nlohmann::json::parse(l1);
    const std::string t0 = j0["text"], t1 = j1["text"], x0 = nlohmann::json::parse(m0)["text"],
                      x1 = nlohmann::json::parse(m1)["text"];
    EXPECT_EQ(j0["category"], j1["category"]);
    if (j0["category"] != "choice") {
      EXPECT_EQ(t0, t1);
      EXPECT_EQ(x0, x1);
      continue;
    }
    ++choices;
    const ShapesQA w = shapes_choice_by_word({ShapesFamily::kChoice, t0, x0});
    EXPECT_EQ(t1, w.question);
    EXPECT_EQ(x1, w.answer);
  }
  EXPECT_EQ(choices, 2);  // questions 5 and 12
}

TEST(Shapes, WithoutFormatLineStripsOnlyTheTrailingLine) {
  const std::string q = "Is there a red star in the image?";
  EXPECT_EQ(shapes_without_format_line(q + "\n" + kLlavaShortAnswerPrompt), q);
  EXPECT_EQ(shapes_without_format_line("Which?\nA. red\nB. blue\n" + std::string(kLlavaOptionAnswerPrompt)),
            "Which?\nA. red\nB. blue");
  EXPECT_EQ(shapes_without_format_line("Describe the image in one sentence."), "Describe the image in one sentence.");
  EXPECT_EQ(shapes_without_format_line(kLlavaShortAnswerPrompt), kLlavaShortAnswerPrompt);  // no newline: kept
}

TEST(Shapes, ChoiceByWordAsksForTheAskedObjectsAttribute) {
  int choices = 0;
  for (int64_t i = 0; i < 60; ++i) {
    ShapesSample s = shapes_sample(21, i, -1, 2, 0.5);
    for (const ShapesQA& qa : s.qa) {
      const ShapesQA w = shapes_choice_by_word(qa);
      if (qa.family != ShapesFamily::kChoice) {
        EXPECT_EQ(w.question, qa.question);
        EXPECT_EQ(w.answer, qa.answer);
        continue;
      }
      ++choices;
      // Same question and options; the letter line became the short-answer line.
      const std::string bare = shapes_without_format_line(qa.question);
      EXPECT_EQ(w.question, bare + "\n" + kLlavaShortAnswerPrompt);
      EXPECT_NE(bare.find(std::string("\n") + qa.answer + ". " + w.answer + (qa.answer == "D" ? "" : "\n")),
                std::string::npos)
          << qa.question << " -> " << w.answer;
      // The word is the asked object's attribute, read off the scene (the name in the question is unique).
      const bool colour = qa.question.rfind("What color is the ", 0) == 0;
      std::string want;
      for (const auto& o : s.objects) {
        const std::string kind = shapes_kind_name(o.kind), col = shapes_colour_name(o.colour);
        if (colour && strip_suffix(qa.question) == "What color is the " + kind + "?") want = col;
        if (!colour && strip_suffix(qa.question) == "What shape is the " + col + " object?") want = kind;
      }
      EXPECT_EQ(w.answer, want) << qa.question;
    }
  }
  EXPECT_GT(choices, 50);
  ShapesQA bad{ShapesFamily::kChoice, "What color is the star?\nA. red\nB. blue", "C"};
  EXPECT_THROW(shapes_choice_by_word(bad), InputError);
}

TEST(Shapes, FewerOptionsKeepTheRightOneAndReletter) {
  int choices = 0, differ = 0;
  for (int64_t i = 0; i < 60; ++i) {
    for (const ShapesQA& qa : shapes_sample(22, i, -1, 1, 0.5).qa) {
      if (qa.family != ShapesFamily::kChoice) {
        EXPECT_EQ(shapes_choice_fewer_options(qa, 2, 1).question, qa.question);
        continue;
      }
      ++choices;
      const std::vector<std::string> all = shapes_choice_options(qa.question);
      ASSERT_EQ(all.size(), 4u) << qa.question;
      const std::string right = all[static_cast<size_t>(qa.answer[0] - 'A')];
      for (int keep : {2, 3, 4}) {
        const ShapesQA f = shapes_choice_fewer_options(qa, keep, static_cast<uint64_t>(i));
        const std::vector<std::string> kept = shapes_choice_options(f.question);
        ASSERT_EQ(kept.size(), static_cast<size_t>(keep)) << f.question;
        ASSERT_EQ(f.answer.size(), 1u);
        EXPECT_EQ(kept[static_cast<size_t>(f.answer[0] - 'A')], right) << f.question;
        size_t at = 0;  // kept options keep their order
        for (const auto& o : kept) {
          while (at < all.size() && all[at] != o) ++at;
          EXPECT_LT(at, all.size()) << o << " is not an option of " << qa.question;
        }
        EXPECT_EQ(strip_suffix(f.question), strip_suffix(qa.question));
        EXPECT_EQ(f.question.substr(shapes_without_format_line(f.question).size()),
                  qa.question.substr(shapes_without_format_line(qa.question).size()));  // same format line
        EXPECT_EQ(f.question, shapes_choice_fewer_options(qa, keep, static_cast<uint64_t>(i)).question);
        if (keep == 4) EXPECT_EQ(f.question, qa.question);
      }
      std::set<std::string> variants;
      for (uint64_t d = 0; d < 6; ++d) variants.insert(shapes_choice_fewer_options(qa, 2, d).question);
      differ += variants.size() > 1;
    }
  }
  EXPECT_GT(choices, 30);
  EXPECT_GT(differ, choices / 2);  // the draw picks which wrong options stay
  EXPECT_THROW(shapes_choice_fewer_options(shapes_sample(22, 5, 5, 1).qa[0], 1, 0), InputError);
}

TEST(Shapes, InTheImageMovesOnlyTheObjectsName) {
  for (int f = 0; f < 7; ++f) {
    const ShapesQA qa = shapes_sample(23, f, f, 1).qa[0];
    const ShapesQA r = shapes_in_the_image(qa);
    EXPECT_EQ(r.answer, qa.answer);
    const auto fam = static_cast<ShapesFamily>(f);
    if (fam != ShapesFamily::kColour && fam != ShapesFamily::kShape && fam != ShapesFamily::kChoice) {
      EXPECT_EQ(r.question, qa.question);
      continue;
    }
    const size_t q = qa.question.find('?');
    EXPECT_EQ(r.question, qa.question.substr(0, q) + " in the image" + qa.question.substr(q)) << qa.question;
  }
}

// Row/column questions: the answer is the named object's row (column) counted from 1 at the top (left), the name
// picks exactly one object, the questions are distinct, and only objects unique by colour and shape are asked about.
TEST(Shapes, LocateQuestionsReadOffTheNamedObjectsCell) {
  int64_t asked = 0, rows = 0;
  for (int64_t i = 0; i < 200; ++i) {
    const ShapesSample s = shapes_sample(31, i);
    const auto qs = shapes_locate_questions(s.objects, 8, static_cast<uint64_t>(i));
    int unique = 0;
    for (const auto& o : s.objects) {
      int same = 0;
      for (const auto& p : s.objects) same += p.kind == o.kind && p.colour == o.colour;
      unique += same == 1;
    }
    ASSERT_EQ(qs.size(), static_cast<size_t>(2 * unique));
    std::set<std::string> seen;
    for (const auto& qa : qs) {
      EXPECT_TRUE(seen.insert(qa.question).second) << qa.question;
      EXPECT_EQ(qa.family, ShapesFamily::kPosition);
      const std::string stem = shapes_without_format_line(qa.question);
      ASSERT_NE(stem, qa.question);  // ends with the short-answer line
      const bool row = stem.rfind("Which row is the ", 0) == 0;
      ASSERT_TRUE(row || stem.rfind("Which column is the ", 0) == 0) << stem;
      int matches = 0;
      for (const auto& o : s.objects) {
        const std::string name = std::string(shapes_colour_name(o.colour)) + " " + shapes_kind_name(o.kind);
        if (stem.find(" the " + name + " in?") == std::string::npos) continue;
        ++matches;
        EXPECT_EQ(qa.answer, std::to_string(1 + (row ? o.cell / kShapesGrid : o.cell % kShapesGrid))) << stem;
      }
      EXPECT_EQ(matches, 1) << stem;
      rows += row;
      ++asked;
    }
    // n caps the count; the first questions do not depend on n.
    const auto two = shapes_locate_questions(s.objects, 2, static_cast<uint64_t>(i));
    ASSERT_EQ(two.size(), std::min<size_t>(2, qs.size()));
    for (size_t k = 0; k < two.size(); ++k) EXPECT_EQ(two[k].question, qs[k].question);
  }
  ASSERT_GT(asked, 400);
  EXPECT_EQ(rows * 2, asked);  // every unique object is asked both ways
  EXPECT_TRUE(shapes_locate_questions(shapes_sample(31, 0).objects, 0, 1).empty());
  EXPECT_THROW(shapes_locate_questions(shapes_sample(31, 0).objects, 9, 1), InputError);
}

// Confusable-pair position questions: worded and answered like the family's own, only about pairs in a row or a
// column that share a colour or a shape, distinct, and all such ordered pairs when n allows.
TEST(Shapes, ConfusablePositionQuestionsAskAboutPairsSharingAnAttribute) {
  int64_t asked = 0;
  for (int64_t i = 0; i < 300; ++i) {
    const ShapesSample s = shapes_sample(37, i);
    const auto qs = shapes_confusable_position_questions(s.objects, 8, static_cast<uint64_t>(i));
    auto name = [](const ShapesObject& o) { return std::string(shapes_colour_name(o.colour)) + " " + shapes_kind_name(o.kind); };
    auto unique = [&](const ShapesObject& o) {
      int same = 0;
      for (const auto& p : s.objects) same += p.kind == o.kind && p.colour == o.colour;
      return same == 1;
    };
    std::set<std::string> want;  // the expected questions: every qualifying ordered pair
    std::map<std::string, std::string> answer;
    for (const auto& A : s.objects)
      for (const auto& B : s.objects) {
        if (&A == &B || !unique(A) || !unique(B) || (A.colour != B.colour && A.kind != B.kind)) continue;
        const int ra = A.cell / kShapesGrid, ca = A.cell % kShapesGrid, rb = B.cell / kShapesGrid, cb = B.cell % kShapesGrid;
        if (ra != rb && ca != cb) continue;
        const std::string q = "Where is the " + name(A) + " relative to the " + name(B) + "?";
        want.insert(q);
        answer[q] = ra == rb ? (ca < cb ? "left" : "right") : (ra < rb ? "above" : "below");
      }
    std::set<std::string> got;
    for (const auto& qa : qs) {
      EXPECT_EQ(qa.family, ShapesFamily::kPosition);
      const std::string stem = shapes_without_format_line(qa.question);
      ASSERT_NE(stem, qa.question);  // ends with the short-answer line
      ASSERT_TRUE(want.count(stem)) << stem;
      EXPECT_EQ(qa.answer, answer[stem]) << stem;
      EXPECT_TRUE(got.insert(stem).second) << stem;
    }
    EXPECT_EQ(got.size(), std::min<size_t>(8, want.size()));
    asked += static_cast<int64_t>(qs.size());
  }
  ASSERT_GT(asked, 30);  // the case is common enough to train on
  EXPECT_THROW(shapes_confusable_position_questions(shapes_sample(37, 0).objects, 9, 1), InputError);
}

}  // namespace
}  // namespace eqat
