// eqat ask / eqat generate: prompt building, streaming generation, --print-prompt and --dump-logits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdlib>
#include <iostream>

#include "args.h"
#include "commands.h"
#include "data/cpu.h"
#include "data/error.h"
#include "data/fs.h"
#include "data/output.h"
#include "data/safetensors.h"
#include "llm/generate.h"
#include "llm/prompt.h"
#include "vision/llava.h"

namespace eqat {

namespace {

std::vector<FlagSpec> generation_flags(const std::string& default_template) {
  return {
      {"max-new-tokens", "N", "maximum number of tokens to generate", "256"},
      {"temperature", "T", "sampling temperature; 0 = greedy (deterministic)", "0"},
      {"top-k", "K", "sample only from the K most likely tokens (0 = off)", "0"},
      {"top-p", "P", "nucleus sampling mass (1 = off)", "1"},
      {"seed", "S", "random seed for sampling", "0"},
      {"template", "NAME", "prompt template: llava-1.5 | hf | mistral | chatml | llama3 | none", default_template},
      {"print-prompt", "", "print the exact prompt text and token ids on stderr", ""},
      {"dump-logits", "FILE", "write the logits of the prompt's last position and of every step (safetensors)", ""},
      {"overwrite", "", kOverwriteHelp, ""},
      {"device", "DEV", "cpu | cuda[:N]", "cpu"},
      {"dtype", "T",
       "auto (the stored dtype; fp16 computes in float32 on the CPU, its weights kept fp16) | float32 | bfloat16 | "
       "float16",
       "auto"},
      {"threads", "N", "CPU threads (0 = LibTorch's default)", "0"},
      {"decode", "MODE",
       "decode steps: auto (graph on CUDA, else eager) | eager | static (fixed shapes) | graph (CUDA graph replay)",
       "auto"},
  };
}

// --dump-logits is checked before the model loads: never over a file eqat did not write, never into an input.
void check_dump_path(const ParsedArgs& a, std::vector<std::string> inputs) {
  if (!a.has("dump-logits")) return;
  inputs.push_back(a.has("model") ? a.str("model") : default_model_dir());
  check_output_file({a.str("dump-logits"), "--dump-logits", OutputKind::kTensors, a.flag("overwrite"), inputs});
}

// The flag's own bound; generation caps it further at the model's context.
constexpr int64_t kMaxNewTokensFlag = int64_t{1} << 24;

GenerateOptions generate_options(const ParsedArgs& a, const Model& m) {
  GenerateOptions o;
  o.max_new_tokens = a.i64("max-new-tokens", 0, kMaxNewTokensFlag);
  o.sampling.temperature = a.f64("temperature", 0, 100);
  o.sampling.top_k = a.i64("top-k", 0, INT32_MAX);
  o.sampling.top_p = a.f64("top-p", 0, 1);
  o.sampling.seed = static_cast<uint64_t>(a.i64("seed", 0, INT64_MAX));
  o.stop_ids = {m.tok->eos_id()};
  if (m.cfg.text.eos_token_id >= 0 && m.cfg.text.eos_token_id != m.tok->eos_id())
    o.stop_ids.push_back(m.cfg.text.eos_token_id);
  o.keep_logits = a.has("dump-logits");
  const std::string d = a.str("decode");
  using Decode = GenerateOptions::Decode;
  EQAT_CHECK(d == "auto" || d == "eager" || d == "static" || d == "graph",
             "--decode: expected auto, eager, static or graph, got '", d, "'");
  o.decode = d == "eager" ? Decode::Eager : d == "static" ? Decode::Static : d == "graph" ? Decode::Graph : Decode::Auto;
  return o;
}

// An explicit --threads applies from the start (the model's load included).
void apply_threads(const ParsedArgs& a) {
  if (a.threads() > 0) set_compute_threads(a.threads());
}

// With --threads 0 (auto), once the model is known: the idle cores (data/cpu.h), and one thread for tiny models:
// their ops are microseconds long, so OpenMP fork/join costs more than it gains (stories260K: 2070 tok/s on 1
// thread vs ~125 on 2 with a busy second core).
void auto_threads(const ParsedArgs& a, const Model& m) {
  if (a.threads() == 0) set_compute_threads(0, m.device.is_cpu() && m.cfg.text.hidden_size < 1024 ? 1 : 0);
}

void print_prompt(const Model& m, const std::string& prompt, const std::vector<int64_t>& ids) {
  std::cerr << "prompt: " << prompt << "\n";
  std::cerr << "prompt ids (" << ids.size() << "):";
  int64_t img = m.image_token_id();
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] == img && i > 0 && ids[i - 1] == img) continue;
    if (ids[i] == img) {
      size_t n = 0;
      while (i + n < ids.size() && ids[i + n] == img) ++n;
      std::cerr << " " << img << "x" << n;
    } else {
      std::cerr << " " << ids[i];
    }
  }
  std::cerr << std::endl;
}

void dump_logits(const std::string& path, const std::vector<int64_t>& prompt_ids, const GenerateResult& r) {
  std::vector<std::pair<std::string, at::Tensor>> t;
  t.emplace_back("prompt_ids", at::tensor(prompt_ids, at::kLong));
  t.emplace_back("generated_ids", at::tensor(r.tokens[0], at::kLong));
  if (!r.step_logits.empty()) t.emplace_back("logits", at::cat(r.step_logits, 0));  // [steps, V]
  write_safetensors(path, t, {{"format", "pt"}, {"producer", "eqat"}});
}

// Runs one prompt with streaming output; returns the generated ids.
int run_single(Model& m, const ParsedArgs& a, PromptTemplate tmpl, const std::string& prompt, const ImageInput& image) {
  std::vector<int64_t> ids = tokenize_prompt(*m.tok, prompt, tmpl, m.image_token_id(), prompt_image_tokens(m, image));
  if (a.flag("print-prompt")) print_prompt(m, prompt, ids);
  EQAT_CHECK(static_cast<int64_t>(ids.size()) <= model_context(m.cfg.text), "prompt: ", ids.size(),
             " tokens (image positions included) exceed the model's context of ", model_context(m.cfg.text));
  GenerateOptions opts = generate_options(a, m);
  const int64_t n_prompt = static_cast<int64_t>(ids.size());
  const int64_t fits = max_new_tokens_in_context(m.cfg.text, n_prompt, opts.max_new_tokens);
  if (fits < opts.max_new_tokens && a.has("max-new-tokens"))  // the default is a cap, not a request
    std::cerr << "warning: --max-new-tokens " << opts.max_new_tokens << " capped at " << fits << ": the model's context is "
              << model_context(m.cfg.text) << " positions and the prompt takes " << n_prompt << std::endl;
  at::Tensor embeds = embed_prompt(m, ids, image);
  at::Tensor valid = at::ones({1, embeds.size(1)}, at::kBool);
  TokenStreamer streamer(*m.tok);
  bool started = false;
  auto on_step = [&](const std::vector<int64_t>& step) {
    if (step[0] < 0) return;
    std::string piece = streamer.push(step[0]);
    if (!started) {  // LLaVA strips the answer: drop leading whitespace
      size_t b = piece.find_first_not_of(" \n\t");
      piece = b == std::string::npos ? "" : piece.substr(b);
      started = !piece.empty();
    }
    std::cout << piece << std::flush;
  };
  GenerateResult r = generate(m.lm, embeds, valid, opts, on_step);
  std::cout << streamer.finish() << std::endl;
  const double tps = r.decode_steps > 0 ? r.decode_steps / r.decode_seconds : 0.0;
  std::cerr << "[" << ids.size() << " prompt tokens, prefill " << static_cast<int>(r.prefill_seconds * 1000)
            << " ms; " << r.tokens[0].size() << " new tokens, " << static_cast<int>(tps * 10) / 10.0
            << " tok/s decode" << (r.cuda_graph ? ", CUDA graph" : "") << "]" << std::endl;
  if (a.has("dump-logits")) dump_logits(a.str("dump-logits"), ids, r);
  return 0;
}

LoadOptions load_options(const ParsedArgs& a) {
  LoadOptions lo;
  lo.device = a.str("device");
  lo.dtype = a.str("dtype");
  lo.fuse_projections = true;
  lo.weights_as_stored = true;
  return lo;
}

}  // namespace

int cmd_ask(const Argv& argv);
int cmd_generate(const Argv& argv);
const bool kRegistered = register_command("ask", cmd_ask, "answer a question about an image (LLaVA models)") &&
                         register_command("generate", cmd_generate, "generate text from a prompt (Llama/LLaVA)");

int cmd_ask(const Argv& argv) {
  CommandSpec spec{"ask", "eqat ask [--model DIR] --image FILE [options] \"QUESTION\"",
                   "Answers a question about an image with a LLaVA model; the answer streams to stdout.", {}, 1, 1};
  spec.flags = {{"model", "DIR", "LLaVA model directory (default: the embedded default model)", ""},
                {"image", "FILE", "image file (JPEG, PNG, BMP, GIF)", ""},
                {"strict", "", "refuse a corrupt JPEG that libjpeg would decode with a warning", ""}};
  for (auto& f : generation_flags("llava-1.5")) spec.flags.push_back(f);
  ParsedArgs a = parse_args(spec, argv);
  const std::string image = a.require("image");
  check_dump_path(a, {image});
  const std::string question = a.positional()[0];
  EQAT_CHECK(!question.empty(), "QUESTION is empty");
  apply_threads(a);
  Image decoded = load_image(image, a.flag("strict"));  // bad images fail before the model is loaded
  const std::string dir = resolve_model_dir(a.str("model"), "ask");
  Model m = load_model(dir, load_options(a));
  auto_threads(a, m);
  EQAT_CHECK(m.multimodal(), dir, ": is a text-only model (", architecture_name(m.cfg),
             "); use 'eqat generate' for it");
  PromptTemplate tmpl = parse_template(a.has("template") ? a.str("template") : model_template(dir, "llava-1.5"));
  std::string prompt = render_prompt(tmpl, question, /*with_image=*/true);
  EQAT_CHECK(count_image_markers(prompt) == 1, "QUESTION: with --template none the prompt must contain exactly one ",
             "<image> marker, found ", count_image_markers(prompt));
  return run_single(m, a, tmpl, prompt, prepare_image(m, decoded));
}

int cmd_generate(const Argv& argv) {
  CommandSpec spec{"generate", "eqat generate --model DIR [options] \"PROMPT\"",
                   "Generates text from a prompt (text only). An empty prompt starts from BOS.", {}, 1, 1};
  spec.flags = {{"model", "DIR", "model directory (Llama or LLaVA)", ""}};
  for (auto& f : generation_flags("none")) spec.flags.push_back(f);
  ParsedArgs a = parse_args(spec, argv);
  check_dump_path(a, {});
  apply_threads(a);
  const std::string dir = resolve_model_dir(a.str("model"), "generate");
  Model m = load_model(dir, load_options(a));
  auto_threads(a, m);
  PromptTemplate tmpl = parse_template(a.str("template"));
  std::string prompt = render_prompt(tmpl, a.positional()[0], /*with_image=*/false);
  EQAT_CHECK(count_image_markers(prompt) == 0, "PROMPT contains <image> but 'eqat generate' takes no image; use ",
             "'eqat ask --image FILE'");
  return run_single(m, a, tmpl, prompt, ImageInput());
}

std::string default_model_dir() {
  if (const char* env = std::getenv("EQAT_DEFAULT_MODEL")) return env;
  const std::string dir = std::string(EQAT_SOURCE_DIR) + "/models/shapes-llava";
  return is_directory(dir) ? dir : "";
}

std::string resolve_model_dir(const std::string& flag_value, const std::string& command) {
  if (!flag_value.empty()) return flag_value;
  const std::string d = default_model_dir();
  EQAT_CHECK(!d.empty(), "no --model given and the embedded default model (models/shapes-llava) is not in this ",
             "build yet; pass --model DIR (see eqat ", command, " --help)");
  return d;
}

}  // namespace eqat
