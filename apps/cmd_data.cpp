// eqat data shapes: writes a dataset of the procedural "shapes" world (src/data/shapes.h).
// eqat data random-model: a random-weight checkpoint in the real shapes of llava-1.5-7b/13b or llama-2-7b
// (src/vision/random_model.h).
#include <iostream>

#include "args.h"
#include "commands.h"
#include "data/error.h"
#include "data/output.h"
#include "data/memory.h"
#include "data/shapes.h"
#include "vision/random_model.h"

namespace eqat {

int cmd_data(const Argv& argv);
namespace {
const bool kRegistered = register_command(
    "data", cmd_data, "generate a dataset (data shapes) or a random-weight model (data random-model --like M)");

int cmd_random_model(const Argv& argv) {
  std::string likes;
  for (const auto& l : random_model_likes()) likes += (likes.empty() ? "" : " | ") + l;
  CommandSpec spec{"data", "eqat data random-model --like " + likes + " --out DIR [--dtype float16] [--seed S]",
                   "Writes a random-weight checkpoint in the real shapes of a model users bring: the upload's "
                   "config.json, preprocessor and tokenizer files (the Llama-2 tokenizer; LLaVA adds <image> and "
                   "<pad>), and sharded safetensors named and indexed as HF writes them. Written as a stream, one "
                   "tensor in memory at a time. Weights at HF's init scale (N(0, 0.02^2), norms 1, biases 0).",
                   {{"like", "M", "the model whose shapes to copy: " + likes, ""},
                    {"out", "DIR", "output directory (written atomically)", ""},
                    {"overwrite", "", kOverwriteHelp, ""},
                    {"dtype", "T", "float16 | bfloat16 | float32", "float16"},
                    {"seed", "S", "seed", "0"},
                    {"shard-size", "MB", "largest shard in MB (HF: 5000)", "5000"},
                    {"layers", "N", "decoder (and vision) layers, for a smaller model of the same widths (0: as the model has)", "0"},
                    {"tokenizer", "FILE", "the Llama-2 sentencepiece tokenizer.model to include",
                     std::string(EQAT_SOURCE_DIR) + "/tests/data/tokenizers/llama2/tokenizer.model"}},
                   0, 0};
  ParsedArgs a = parse_args(spec, argv);
  RandomModelOptions o;
  o.like = a.require("like");
  random_model_config(o.like);  // an unknown name is refused before anything else
  o.out = check_replaced_dir({a.require("out"), "--out", OutputKind::kModel, a.flag("overwrite"), {}});
  const std::string dt = a.str("dtype");
  EQAT_CHECK(dt == "float16" || dt == "bfloat16" || dt == "float32", "--dtype: expected float16, bfloat16 or float32, got '",
             dt, "'");
  o.dtype = dt == "float16" ? c10::ScalarType::Half : dt == "bfloat16" ? c10::ScalarType::BFloat16 : c10::ScalarType::Float;
  o.seed = static_cast<uint64_t>(a.i64("seed", 0, INT64_MAX));
  o.shard_bytes = static_cast<uint64_t>(a.i64("shard-size", 1, 1 << 30)) * 1000000ull;
  o.layers = a.i64("layers", 0, 1000);
  o.tokenizer = a.str("tokenizer");
  const int64_t params = write_random_model(o);
  std::cerr << "wrote " << o.out << ": " << o.like << " shapes, " << params << " parameters ("
            << format_bytes(static_cast<double>(params) * c10::elementSize(o.dtype)) << " of " << dt << ")" << std::endl;
  return 0;
}
}  // namespace

int cmd_data(const Argv& argv) {
  if (!argv.empty() && argv[0] == "random-model") return cmd_random_model(Argv(argv.begin() + 1, argv.end()));
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
