// eqat data shapes: writes a dataset of the procedural "shapes" world (src/data/shapes.h).
#include <iostream>

#include "args.h"
#include "commands.h"
#include "data/error.h"
#include "data/output.h"
#include "data/shapes.h"

namespace eqat {

int cmd_data(const Argv& argv);
namespace {
const bool kRegistered = register_command("data", cmd_data, "generate a dataset (data shapes --out DIR)");
}  // namespace

int cmd_data(const Argv& argv) {
  CommandSpec spec{"data", "eqat data shapes --out DIR [--train N] [--test N] [--seed S] [--hard-choice P] [--choice-by-word]",
                   "Writes the procedural shapes world: DIR/train.json (LLaVA instruction JSON), DIR/test.jsonl "
                   "(LLaVA eval questions), DIR/test_answers.jsonl and DIR/images/*.png. Test questions come from "
                   "a stream disjoint from the training images.",
                   {{"out", "DIR", "output directory (written atomically)", ""},
                    {"overwrite", "", kOverwriteHelp, ""},
                    {"train", "N", "training images (one single-turn conversation each)", "1000"},
                    {"test", "N", "test questions (one image each, families balanced)", "700"},
                    {"seed", "S", "seed", "1"},
                    {"hard-choice", "P", "probability that a multiple-choice question's distractors name the "
                     "other objects' colours/shapes first (0: the standard world)", "0"},
                    {"choice-by-word", "", "the test split's multiple-choice questions ask for the right option's text, "
                     "not its letter (a diagnostic: does the model find the answer with the options in view?)", ""}},
                   1, 1};
  ParsedArgs a = parse_args(spec, argv);
  EQAT_CHECK(a.positional()[0] == "shapes", "data: unknown world '", a.positional()[0], "' (only: shapes)");
  const std::string out = check_replaced_dir({a.require("out"), "--out", OutputKind::kDataset, a.flag("overwrite"), {}});
  // Each image is a ~1-4 KB PNG plus a JSON record: 10^6 images are a few GB, the most a dataset here should be.
  constexpr int64_t kMaxImages = 1000000;
  const int64_t train = a.i64("train", 0, kMaxImages), test = a.i64("test", 0, kMaxImages);
  const int64_t seed = a.i64("seed", 0, INT64_MAX);
  const double hard = a.f64("hard-choice", 0, 1);
  write_shapes_dataset(out, train, test, static_cast<uint64_t>(seed), hard, a.flag("choice-by-word"));
  std::cerr << "wrote " << out << ": " << train << " training conversations, " << test << " test questions"
            << std::endl;
  return 0;
}

}  // namespace eqat
