// "shapes": the procedural image world the embedded default model is trained and evaluated on (issue 3).
//
// A sample is a 96×96 RGB image of 1–4 anti-aliased shapes (circle, square, triangle, star, cross, ellipse) in
// 8 colours and 2 sizes, one per cell of a 3×3 grid (32 px cells, jittered inside the cell), on a light
// background with a vertical tint gradient, plus questions about it in seven families:
//   colour    "What color is the star?"                      -> "red"
//   shape     "What shape is the blue object?"               -> "circle"
//   count     "How many shapes / red shapes / stars are there?" -> "0".."4"
//   exists    "Is there a red star in the image?"            -> "yes" | "no" (half no; 2/3 of the no's are
//             adversarial in POPE's sense: the shape is present in another colour, or the colour on another shape)
//   position  "Where is the red star relative to the blue circle?" -> "left" | "right" | "above" | "below"
//   choice    MMBench-style lettered options                 -> "A".."D"
//   describe  "Describe the image in one sentence."         -> "A red star and a blue circle." (reading order)
// Short-answer families end with LLaVA's "\nAnswer the question using a single word or phrase."; choice ends with
// "\nAnswer with the option's letter from the given choices directly."
//
// Determinism: everything derives from (seed, index) through std::mt19937_64 (bit-exact by the standard) with
// explicit integer->real maps (no std::*_distribution) and OpenCV's fixed-point drawing, so a (seed, index)
// gives identical pixels and text on every machine (and identical PNG bytes for the same zlib).
//
// Seeds: training uses seed 1 by default (eqat train-tiny --seed); the standard test split uses
// kShapesStandardTestSeed, a different stream, so test images never appear in training.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/image.h"

namespace eqat {

inline constexpr int kShapesImageSize = 96;  // px (square)
inline constexpr int kShapesGrid = 3;        // 3×3 cells of 32 px
inline constexpr int kShapesKinds = 6;
inline constexpr int kShapesColours = 8;
inline constexpr uint64_t kShapesStandardTestSeed = 20260417;  // the standard 1000-question test split
inline constexpr int64_t kShapesStandardTestSize = 1000;

// LLaVA-1.5's answer-format prompts (the last line of a short-answer / multiple-choice question).
inline constexpr const char* kLlavaShortAnswerPrompt = "Answer the question using a single word or phrase.";
inline constexpr const char* kLlavaOptionAnswerPrompt = "Answer with the option's letter from the given choices directly.";

// The question without its trailing answer-format line (either of the two above); other text unchanged.
std::string shapes_without_format_line(const std::string& question);

enum class ShapesFamily { kColour, kShape, kCount, kExists, kPosition, kChoice, kDescribe, kNum };
const char* shapes_family_name(ShapesFamily f);  // colour | shape | count | exists | position | choice | describe
const char* shapes_kind_name(int kind);          // circle, square, triangle, star, cross, ellipse
const char* shapes_colour_name(int colour);      // red, orange, yellow, green, blue, purple, brown, black

struct ShapesObject {
  int kind = 0;    // [0, kShapesKinds)
  int colour = 0;  // [0, kShapesColours)
  int size = 0;    // 0 small, 1 large
  int cell = 0;    // row-major cell index [0, 9)
  int x16 = 0, y16 = 0;  // centre in 1/16 px
};

struct ShapesQA {
  ShapesFamily family = ShapesFamily::kColour;
  std::string question;  // including the answer-format suffix
  std::string answer;
};

// The options of a multiple-choice question ("\nA. red\nB. blue..."), in letter order; empty for other questions.
std::vector<std::string> shapes_choice_options(const std::string& question);

// Rewrites of a question for training (the evaluation asks the questions as generated; `eqat data shapes
// --choice-by-word` writes a diagnostic split with the first); each returns questions of other families unchanged.
// A multiple-choice question asked for the right option's text instead of its letter: the options stay, the
// letter line becomes the short-answer line ("...\nD. star\nAnswer the question using a single word or phrase." →
// "star"), so the model must work out the asked object's attribute with the options in view.
ShapesQA shapes_choice_by_word(const ShapesQA& qa);
// The same multiple-choice question with only `keep` (>= 2) options: the right one and wrong ones picked by `draw`,
// re-lettered in their order (MMBench has 2 to 4 options). Moves the question's words relative to its end.
ShapesQA shapes_choice_fewer_options(const ShapesQA& qa, int keep, uint64_t draw);
// A colour, shape or multiple-choice question with " in the image" before its '?' ("What color is the star in the
// image?"): the same question, its object named at another distance from the end of the prompt.
ShapesQA shapes_in_the_image(const ShapesQA& qa);
// Training-only questions for the sub-skill behind the position family (find a named object, read off its cell):
// up to n distinct questions about objects whose colour-shape pair is unique in the scene,
//   "Which row is the red star in?"    -> "1" (top) | "2" | "3" (bottom)
//   "Which column is the red star in?" -> "1" (left) | "2" | "3" (right)
// with the short-answer line, family kPosition. `draw` picks the objects and rows/columns (from every such
// object × {row, column}, shuffled); fewer than n when the scene has fewer, none when no pair is unique.
std::vector<ShapesQA> shapes_locate_questions(const std::vector<ShapesObject>& objects, int n, uint64_t draw);
// Training-only position questions (the family's own wording and answers) about the pairs a look-up by one
// attribute confuses: both objects share their colour ("the red star relative to the red circle") or their shape.
// Up to n distinct ordered pairs picked by `draw`; none when the scene has no such pair in a row or column. (A model
// that found objects by colour first answered 7 of 13 same-colour standard-split questions right, against 99 of 113
// pairs of distinct colour and shape; models/SOURCES.md, "Position".)
std::vector<ShapesQA> shapes_confusable_position_questions(const std::vector<ShapesObject>& objects, int n, uint64_t draw);

struct ShapesSample {
  std::vector<ShapesObject> objects;  // in reading (cell) order
  Image image;                        // kShapesImageSize² RGB
  std::vector<ShapesQA> qa;
};

// One sample. family >= 0 (a ShapesFamily): the scene is drawn so that this family is answerable and qa holds
// exactly one question of it (the eval layout). family < 0: a training sample, qa holds one question of every
// family the scene supports (index % 7 is guaranteed), in a shuffled order; per_family > 1 adds up to that many
// distinct questions of each family (training: the trainer asks them all about one image, sharing its prefix).
// The image does not depend on per_family, and per_family 1 is the original stream.
// hard_choice: the probability that a multiple-choice question's distractors are first the colours (shapes) of
// the scene's other objects — the options a model that only checks "is this option in the image?" cannot tell
// apart. It only changes option texts and letters (a separate random stream), never the image or other questions.
ShapesSample shapes_sample(uint64_t seed, int64_t index, int family = -1, int per_family = 1, double hard_choice = 0.0);

// PNG bytes of a sample image (OpenCV imencode, default compression).
std::string shapes_png(const Image& img);

// One evaluation question (LLaVA eval JSONL fields + the ground truth and the pixels).
struct ShapesEvalItem {
  int64_t question_id = 0;
  std::string image;     // file name, e.g. "test_000042.png"
  std::string text;      // the question
  std::string category;  // the family name
  std::string answer;
  Image pixels;
};
// n questions from `seed`: question i is about image i and of family i % 7 (balanced).
std::vector<ShapesEvalItem> shapes_test_split(uint64_t seed, int64_t n, double hard_choice = 0.0);
// The standard split: shapes_test_split(kShapesStandardTestSeed, kShapesStandardTestSize).
std::vector<ShapesEvalItem> shapes_standard_test_split();

// Exact match after normalisation (trim, lowercase, one trailing '.' dropped).
std::string shapes_normalize_answer(const std::string& s);
bool shapes_answer_matches(const std::string& prediction, const std::string& answer);

// Every sentence the world can produce a piece of (for tokenizer training): the questions and answers of
// `n` training samples plus every colour/shape/number word.
std::vector<std::string> shapes_corpus(uint64_t seed, int64_t n);

// Writes a dataset directory (atomically): train.json (LLaVA instruction JSON, one single-turn conversation per
// image — image i asks its question of family i % 7, so the families are balanced — which is how the default model
// is trained and asked), test.jsonl (eval questions), test_answers.jsonl ({question_id, text}) and images/*.png.
// choice_by_word: the test split's multiple-choice questions go through shapes_choice_by_word (category "choice").
void write_shapes_dataset(const std::string& dir, int64_t train_n, int64_t test_n, uint64_t seed,
                          double hard_choice = 0.0, bool choice_by_word = false);

}  // namespace eqat
