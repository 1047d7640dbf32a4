// eqat data shapes: writes a dataset of the procedural "shapes" world (src/data/shapes.h).
#include <iostream>

#include "args.h"
#include "commands.h"
#include "data/error.h"
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
                   {{"out", "DIR", "output directory (replaced atomically)", ""},
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
  const std::string out = a.require("out");
  check_output_path(out, "--out", /*is_dir=*/true);
  const int64_t train = a.i64("train"), test = a.i64("test"), seed = a.i64("seed");
  EQAT_CHECK(train >= 0, "--train: must be >= 0");
  EQAT_CHECK(test >= 0, "--test: must be >= 0");
  EQAT_CHECK(seed >= 0, "--seed: must be >= 0");
  const double hard = a.f64("hard-choice");
  EQAT_CHECK(hard >= 0 && hard <= 1, "--hard-choice: must be in [0, 1], got ", hard);
  write_shapes_dataset(out, train, test, static_cast<uint64_t>(seed), hard, a.flag("choice-by-word"));
  std::cerr << "wrote " << out << ": " << train << " training conversations, " << test << " test questions"
            << std::endl;
  return 0;
}

}  // namespace eqat
