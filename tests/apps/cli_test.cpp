// End-to-end tests of the eqat binary: outputs on the fixtures, and the bad-input contract — one line on stderr
// naming the file/argument, exit code 2, no crash, no partial output.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <tuple>
#include <sys/stat.h>
#include <sys/wait.h>

#include "data/safetensors.h"
#include "quant/cpu_bf16_gemm.h"
#include "quant/cpu_qgemv.h"
#include "apps/cli_util.h"
#include "model_test_util.h"

using namespace eqat;
using namespace eqat_test;
namespace fs = std::filesystem;

TEST(Cli, UsageAndHelp) {
  EXPECT_EQ(run_eqat({}).code, 2);
  EXPECT_EQ(run_eqat({"--help"}).code, 0);
  RunResult h = run_eqat({"ask", "--help"});
  EXPECT_EQ(h.code, 0);
  EXPECT_NE(h.out.find("--image"), std::string::npos);
  expect_input_error(run_eqat({"frobnicate"}), "frobnicate");
  expect_input_error(run_eqat({"generate", "--model", fixture("tiny_llama"), "--bogus", "x"}), "--bogus");
  expect_input_error(run_eqat({"generate", "--model", fixture("tiny_llama"), "--max-new-tokens", "abc", "hi"}),
                     "--max-new-tokens");
}

TEST(Cli, AskAnswersLikeTransformersAndDumpsLogits) {
  TempDir t;
  auto meta = load_json(fixture("tiny_llava/golden.json"));
  RunResult r = run_eqat({"ask", "--model", fixture("tiny_llava"), "--image", fixture("tiny_llava/image.png"),
                          "--max-new-tokens", "12", "--dump-logits", t.str("logits.safetensors"), "--print-prompt",
                          "What is in the picture?"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(strip(r.out), strip(meta["prompts"]["p0"]["greedy_text"].get<std::string>()));
  EXPECT_NE(r.err.find("prompt ids"), std::string::npos);
  auto dump = Checkpoint::open(t.str("logits.safetensors"));
  auto golden = Checkpoint::open(fixture("tiny_llava/golden.safetensors"));
  EXPECT_EQ(to_ids(dump.get("prompt_ids")), to_ids(golden.get("p0.input_ids")));
  EXPECT_LE(max_abs_diff(dump.get("logits"), golden.get("p0.greedy_logits")), kLogitTol);
}

// LLaVA-NeXT through the CLI: ask picks the checkpoint's template (mistral), tiles the image and expands its
// variable token count as HF's processor does; inspect gives the count for an image size; preprocess writes the
// tiles with the image's size.
TEST(Cli, LlavaNextAsksInspectsAndPreprocesses) {
  TempDir t;
  const std::string dir = fixture("tiny_llava_next_mistral");
  auto meta = load_json(dir + "/golden.json");
  auto golden = Checkpoint::open(dir + "/golden.safetensors");
  RunResult r = run_eqat({"ask", "--model", dir, "--image", dir + "/mid.png", "--max-new-tokens", "10",
                          "--dump-logits", t.str("logits.safetensors"), meta["question"].get<std::string>()});
  ASSERT_EQ(r.code, 0) << r.err;
  auto dump = Checkpoint::open(t.str("logits.safetensors"));
  EXPECT_EQ(to_ids(dump.get("prompt_ids")), to_ids(golden.get("mid.input_ids")));
  EXPECT_EQ(to_ids(dump.get("generated_ids")), meta["images"]["mid"]["greedy_ids"].get<std::vector<int64_t>>());
  EXPECT_LE(max_abs_diff(dump.get("logits"), golden.get("mid.greedy_logits")), kLogitTol);

  RunResult i = run_eqat({"inspect", dir, "--image-size", "90x40"});
  ASSERT_EQ(i.code, 0) << i.err;
  EXPECT_NE(i.out.find(": LlavaNextForConditionalGeneration\n"), std::string::npos) << i.out;
  EXPECT_NE(i.out.find("image 90x40: 60 image tokens"), std::string::npos) << i.out;
  RunResult j = run_eqat({"inspect", dir, "--json"});
  ASSERT_EQ(j.code, 0) << j.err;
  auto js = nlohmann::json::parse(j.out);
  EXPECT_EQ(js["llava"]["image_grid_pinpoints"].size(), 5u);
  EXPECT_EQ(js["llava"]["image_tokens_for"].size(), 2u);  // 640x480 and 1280x720
  expect_input_error(run_eqat({"inspect", dir, "--image-size", "90"}), "--image-size");
  expect_input_error(run_eqat({"inspect", fixture("tiny_llava"), "--image-size", "90x40"}), "not a LLaVA-NeXT model");

  RunResult p = run_eqat({"preprocess", "--model", dir, "--image", dir + "/wide.png", "--out", t.str("px.safetensors")});
  ASSERT_EQ(p.code, 0) << p.err;
  auto px = Checkpoint::open(t.str("px.safetensors"));
  EXPECT_TRUE(at::equal(px.get("pixel_values"), golden.get("wide.pixel_values")));
  EXPECT_EQ(to_ids(px.get("image_sizes")), to_ids(golden.get("wide.image_sizes")));
}

TEST(Cli, GenerateIsDeterministicAndMatchesTransformers) {
  auto meta = load_json(fixture("tiny_llama/golden.json"));
  std::vector<std::string> args{"generate", "--model", fixture("tiny_llama"), "--max-new-tokens", "16",
                                meta["prompt"]["text"].get<std::string>()};
  RunResult a = run_eqat(args), b = run_eqat(args);
  ASSERT_EQ(a.code, 0) << a.err;
  EXPECT_EQ(a.out, b.out);
  EXPECT_EQ(strip(a.out), strip(meta["prompt"]["greedy_text"].get<std::string>()));
  RunResult empty = run_eqat({"generate", "--model", fixture("tiny_llama"), "--max-new-tokens", "4", ""});
  EXPECT_EQ(empty.code, 0) << empty.err;
  // Static-shape decode steps (what a CUDA graph replays) give the same text; graph mode needs CUDA.
  std::vector<std::string> st = args;
  st.insert(st.begin() + 1, {"--decode", "static"});
  RunResult s = run_eqat(st);
  ASSERT_EQ(s.code, 0) << s.err;
  EXPECT_EQ(s.out, a.out);
  st[2] = "graph";
  expect_input_error(run_eqat(st), "CUDA");
  st[2] = "fast";
  expect_input_error(run_eqat(st), "--decode");
}

TEST(Cli, PreprocessWritesThePixelTensor) {
  TempDir t;
  RunResult r = run_eqat({"preprocess", "--model", fixture("tiny_llava"), "--image", fixture("tiny_llava/image.png"),
                          "--out", t.str("px.safetensors")});
  ASSERT_EQ(r.code, 0) << r.err;
  auto px = Checkpoint::open(t.str("px.safetensors"));
  auto golden = Checkpoint::open(fixture("tiny_llava/golden.safetensors"));
  EXPECT_TRUE(at::equal(px.get("pixel_values"), golden.get("pixel_values")));
}

TEST(Cli, InspectDescribesTheModel) {
  RunResult r = run_eqat({"inspect", fixture("tiny_llava"), "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["architecture"], "LlavaForConditionalGeneration");
  EXPECT_EQ(j["text"]["num_key_value_heads"], 2);
  EXPECT_GT(j["parameters"].get<int64_t>(), 0);
  EXPECT_EQ(j["decoder_family"], "llama");
  EXPECT_EQ(j["chat_template"], "llava-1.5");
  EXPECT_EQ(j["tokenizer"], "sentencepiece");
  // A Mistral decoder names itself and its window.
  RunResult m = run_eqat({"inspect", fixture("tiny_mistral")});
  ASSERT_EQ(m.code, 0) << m.err;
  EXPECT_NE(m.out.find(": MistralForCausalLM\n"), std::string::npos) << m.out;
  EXPECT_NE(m.out.find("decoder: mistral, 3 layers"), std::string::npos) << m.out;
  EXPECT_NE(m.out.find("sliding window 8"), std::string::npos) << m.out;
  EXPECT_NE(m.out.find("template mistral"), std::string::npos) << m.out;
}

TEST(Cli, BadCheckpointFiles) {
  TempDir t;
  const std::string dir = copy_fixture(t, "tiny_llama");
  const std::string st = dir + "/model.safetensors";
  const std::string good = slurp(st);
  auto ask = [&] { return run_eqat({"generate", "--model", dir, "--max-new-tokens", "2", "hi"}); };

  write_text(st, good.substr(0, good.size() / 2));  // truncated data
  expect_input_error(ask(), "model.safetensors");
  write_text(st, good.substr(0, 5));  // shorter than the length prefix
  expect_input_error(ask(), "model.safetensors");
  std::string huge = good;
  huge[7] = '\x7f';  // header length beyond the file
  write_text(st, huge);
  expect_input_error(ask(), "model.safetensors");
  std::string garbage = good;
  garbage[8] = '#';  // header is not JSON
  write_text(st, garbage);
  expect_input_error(ask(), "model.safetensors");

  // A missing tensor, and a shape the config disagrees with.
  {
    auto ck = Checkpoint::open(fixture("tiny_llama"));
    std::vector<std::pair<std::string, at::Tensor>> ts;
    for (const auto& n : ck.names())
      if (n != "model.norm.weight") ts.emplace_back(n, ck.get(n).clone());
    write_safetensors(st, ts);
    expect_input_error(ask(), "model.norm.weight");
    ts.emplace_back("model.norm.weight", at::ones({7}));
    write_safetensors(st, ts);
    expect_input_error(ask(), "model.norm.weight");
  }
}

TEST(Cli, BadConfigAndTokenizer) {
  TempDir t;
  const std::string dir = copy_fixture(t, "tiny_llama");
  auto ask = [&] { return run_eqat({"generate", "--model", dir, "--max-new-tokens", "2", "hi"}); };
  const std::string cfg = slurp(dir + "/config.json");
  write_text(dir + "/config.json", "{\"architectures\": [\"LlamaForCausalLM\"], ");
  expect_input_error(ask(), "config.json");
  fs::remove(dir + "/config.json");
  expect_input_error(ask(), "config.json");
  write_text(dir + "/config.json", cfg);
  fs::remove(dir + "/tokenizer.model");
  expect_input_error(ask(), "tokenizer");
}

TEST(Cli, BadImagesAndPrompts) {
  TempDir t;
  write_text(t.str("notes.png"), "this is not an image\n");
  const std::string png = slurp(fixture("tiny_llava/image.png"));
  write_text(t.str("trunc.png"), png.substr(0, png.size() / 3));
  write_text(t.str("empty.jpg"), "");
  for (const char* bad : {"notes.png", "trunc.png", "empty.jpg", "missing.png"}) {
    RunResult r = run_eqat({"ask", "--model", fixture("tiny_llava"), "--image", t.str(bad), "What?"});
    expect_input_error(r, bad);
    RunResult p = run_eqat({"preprocess", "--model", fixture("tiny_llava"), "--image", t.str(bad), "--out",
                            t.str("px.safetensors")});
    expect_input_error(p, bad);
    EXPECT_FALSE(fs::exists(t.str("px.safetensors"))) << "partial output after a failed run";
  }
  // A prompt longer than the context (tiny_llama: 256 positions).
  std::string long_prompt;
  for (int i = 0; i < 300; ++i) long_prompt += "word ";
  expect_input_error(run_eqat({"generate", "--model", fixture("tiny_llama"), long_prompt}), "context");
  // A text-only model cannot take an image.
  expect_input_error(run_eqat({"ask", "--model", fixture("tiny_llama"), "--image", fixture("tiny_llava/image.png"),
                               "What?"}),
                     "text-only");
  // Output into a missing directory fails cleanly and leaves nothing behind.
  expect_input_error(run_eqat({"generate", "--model", fixture("tiny_llama"), "--max-new-tokens", "2",
                               "--dump-logits", t.str("no/such/dir/l.safetensors"), "hi"}),
                     "l.safetensors");
}

TEST(Cli, ConvertLlama2cBadInput) {
  TempDir t;
  write_text(t.str("bad.bin"), std::string(10, '\0'));
  RunResult r = run_eqat({"convert", "llama2c", "--checkpoint", t.str("bad.bin"), "--tokenizer",
                          data_path("models/stories260K/tok512.bin"), "--out", t.str("out")});
  expect_input_error(r, "bad.bin");
  EXPECT_FALSE(fs::exists(t.str("out")));
}

TEST(Cli, Stories260KConvertsAndTellsAStory) {
  // The real pretrained llama2.c model: Karpathy's published greedy output from BOS begins with this sentence.
  TempDir t;
  RunResult c = run_eqat({"convert", "llama2c", "--checkpoint", data_path("models/stories260K/stories260K.bin"),
                          "--tokenizer", data_path("models/stories260K/tok512.bin"), "--out", t.str("stories")});
  ASSERT_EQ(c.code, 0) << c.err;
  RunResult g = run_eqat({"generate", "--model", t.str("stories"), "--max-new-tokens", "40", ""});
  ASSERT_EQ(g.code, 0) << g.err;
  EXPECT_EQ(g.out.rfind("Once upon a time, there was a little girl named Lily. She loved to play outside in the park.", 0),
            0u)
      << g.out;
}

// Without --calib a LLaVA model calibrates on the shapes world (image-text conversations, written into the run's
// state dir and removed with it); a text-only model must name its data.
TEST(Cli, QuantizeDefaultsToTheShapesWorldForLlava) {
  TempDir t;
  const std::string out = t.str("q");
  RunResult r = run_eqat({"quantize", "--model", fixture("tiny_llava"), "--out", out, "--method", "rtn", "--bits", "4",
                          "--group-size", "-1", "--samples", "6", "--val-samples", "2", "--no-progress"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("generating 8 shapes conversations"), std::string::npos) << r.err;
  EXPECT_TRUE(fs::exists(out + "/model.safetensors"));
  EXPECT_NE(slurp(out + "/config.json").find("\"quant_method\": \"gptq\""), std::string::npos);
  EXPECT_FALSE(fs::exists(out + ".eqat-state")) << "the state dir (with the generated data) must be removed";
  expect_input_error(run_eqat({"quantize", "--model", fixture("tiny_llama"), "--out", t.str("q2"), "--method", "rtn",
                              "--group-size", "-1"}),
                     "--calib");
  EXPECT_FALSE(fs::exists(t.str("q2")));
}

// EfficientQAT starts Block-AP from GPTQ's unrounded weights unless --init says otherwise (issue 18); the summary
// records the start that ran, GPTQ's column order (--gptq-order, natural by default), the batch and the rates, which
// from that start scale with the batch up to 8 at 2 bits (unrounded_lr_scale; the paper's 2 and rates from min-max).
TEST(Cli, EfficientQatStartsFromGptqUnroundedByDefault) {
  TempDir t;
  nlohmann::json phase;
  auto init_of = [&](const std::vector<std::string>& extra) {
    std::vector<std::string> args = {"quantize", "--model", fixture("tiny_llama"), "--bits", "2", "--group-size", "32",
                                     "--calib", data_path("text/tinyshakespeare.txt"), "--samples", "4",
                                     "--val-samples", "1", "--seq-len", "32", "--epochs", "1", "--e2e-steps", "1",
                                     "--no-progress", "--overwrite", "--out", t.str("q")};
    args.insert(args.end(), extra.begin(), extra.end());
    RunResult r = run_eqat(args);
    EXPECT_EQ(r.code, 0) << r.err;
    phase = nlohmann::json::parse(slurp(t.str("q") + "/eqat_quantize_summary.json"))["block_phase"];
    return phase["init"].get<std::string>() + "/" + phase["gptq_order"].get<std::string>();
  };
  // batch, quant lr, weight lr as the summary records them
  auto recipe = [&] {
    return std::tuple(phase["batch_size"].get<int64_t>(), phase["quant_lr"].get<double>(),
                      phase["weight_lr"].get<double>());
  };
  EXPECT_EQ(init_of({}), "gptq-unrounded/natural");
  EXPECT_EQ(recipe(), std::tuple(int64_t{2}, 2e-5, 2e-5));  // 4 samples: too few for larger batches
  EXPECT_EQ(init_of({"--batch-size", "4"}), "gptq-unrounded/natural");
  EXPECT_EQ(recipe(), std::tuple(int64_t{4}, 4e-5, 4e-5));  // the rates double with the batch
  EXPECT_EQ(init_of({"--batch-size", "8"}), "gptq-unrounded/natural");
  EXPECT_EQ(recipe(), std::tuple(int64_t{8}, 8e-5, 8e-5));  // and again at 8 (2 bits)
  EXPECT_EQ(init_of({"--batch-size", "16", "--weight-lr", "1e-4"}), "gptq-unrounded/natural");
  EXPECT_EQ(recipe(), std::tuple(int64_t{16}, 8e-5, 1e-4));  // the rates stop scaling at 8; a given rate is kept
  EXPECT_EQ(init_of({"--init", "minmax"}), "minmax/natural");
  EXPECT_EQ(recipe(), std::tuple(int64_t{2}, 1e-4, 2e-5));  // the paper's
  EXPECT_EQ(init_of({"--gptq-order", "gar"}), "gptq-unrounded/gar");
  expect_input_error(run_eqat({"quantize", "--model", fixture("tiny_llama"), "--out", t.str("q3"), "--gptq-order",
                              "desc", "--calib", data_path("text/tinyshakespeare.txt")}),
                     "--gptq-order");
  EXPECT_FALSE(fs::exists(t.str("q3")));
  // The hand-written step's GEMMs (--train-gemm, fp32 by default): the summary records the ones that ran; bf16 only
  // where the step runs by hand (data-parallel: two threads), not on one thread (LibTorch's autograd).
  init_of({"--threads", "2"});
  EXPECT_EQ(phase["train_gemm"], "fp32");
  if (cpu_bf16_gemm_available()) {
    init_of({"--threads", "2", "--train-gemm", "bf16"});
    EXPECT_EQ(phase["train_gemm"], "bf16");
    init_of({"--threads", "1", "--train-gemm", "bf16"});
    EXPECT_EQ(phase["train_gemm"], "fp32");
  } else {
    expect_input_error(run_eqat({"quantize", "--model", fixture("tiny_llama"), "--out", t.str("q3"), "--train-gemm",
                                "bf16", "--calib", data_path("text/tinyshakespeare.txt")}),
                       "--train-gemm");
  }
  expect_input_error(run_eqat({"quantize", "--model", fixture("tiny_llama"), "--out", t.str("q3"), "--train-gemm",
                              "fp16", "--calib", data_path("text/tinyshakespeare.txt")}),
                     "--train-gemm");
  EXPECT_FALSE(fs::exists(t.str("q3")));
}

// eval --exact-activations: a packed model is scored through the fp32-activation kernel, the very one
// EQAT_CPU_KERNEL=avx2 selects (the same KL to the last bit), and run.json records it. On an AVX-512 VNNI CPU the
// default (int8 activations) gives another KL: windows of 32 rows (at most 64 take the GEMV kernels) through
// tiny_llama's q_proj and MLP (N % 32 == 0, 4 bits) take that kernel.
TEST(Cli, EvalExactActivationsScoresTheWeightsAlone) {
  TempDir t;
  const std::string q = t.str("q"), text = data_path("text/tinyshakespeare.txt");
  RunResult r = run_eqat({"quantize", "--model", fixture("tiny_llama"), "--out", q, "--method", "rtn", "--bits", "4",
                          "--group-size", "32", "--calib", text, "--samples", "4", "--val-samples", "1", "--seq-len",
                          "32", "--no-progress"});
  ASSERT_EQ(r.code, 0) << r.err;
  auto kl = [&](const std::string& out, const std::vector<std::string>& extra) {
    std::vector<std::string> args = {"eval", "--bench", "kl", "--model", q, "--reference", fixture("tiny_llama"),
                                     "--data", text, "--seq-len", "32", "--limit", "4", "--batch-size", "1",
                                     "--no-progress", "--out", t.str(out)};
    args.insert(args.end(), extra.begin(), extra.end());
    RunResult e = run_eqat(args);
    EXPECT_EQ(e.code, 0) << e.err;
    return nlohmann::json::parse(slurp(t.str(out) + "/scores.json"))["kl_mean"].get<double>();
  };
  const double exact = kl("exact", {"--exact-activations"});
  EXPECT_GT(exact, 0.0);
  EXPECT_TRUE(nlohmann::json::parse(slurp(t.str("exact") + "/run.json"))["exact_activations"].get<bool>());
  const char* had = std::getenv("EQAT_CPU_KERNEL");
  const std::string saved = had ? had : "";
  setenv("EQAT_CPU_KERNEL", "avx2", 1);
  const double avx2 = kl("avx2", {});
  had ? setenv("EQAT_CPU_KERNEL", saved.c_str(), 1) : unsetenv("EQAT_CPU_KERNEL");
  EXPECT_EQ(exact, avx2);
  if (cpu_qgemm_isa() == CpuIsa::kVnni) EXPECT_NE(kl("default", {}), exact);
}

// ---------------------------------------------------------------------------------------------------------------
// Careless and hostile input (issue 16): each case is one line on stderr naming the argument or file, exit 2.

// Zero, negative, absurd or unparsable bench sizes: checked before any division or allocation.
TEST(Cli, BenchRefusesBadShapesAndCounts) {
  expect_input_error(run_eqat({"bench", "kernels", "--shapes", "0x4096"}), "--shapes");
  expect_input_error(run_eqat({"bench", "kernels", "--shapes", "4096x-1"}), "--shapes");
  expect_input_error(run_eqat({"bench", "kernels", "--shapes", "99999999x4096"}), "out of range");
  expect_input_error(run_eqat({"bench", "kernels", "--shapes", "4096xabc"}), "--shapes: expected an integer");
  expect_input_error(run_eqat({"bench", "kernels", "--shapes", "4096x100"}), "multiple of the group size");
  expect_input_error(run_eqat({"bench", "kernels", "--m", "0"}), "--m");
  expect_input_error(run_eqat({"bench", "kernels", "--threads", "1,,2"}), "--threads");
  expect_input_error(run_eqat({"bench", "kernels", "--formats", "Wxg128"}), "--formats");
  expect_input_error(run_eqat({"bench", "kernels", "--formats", "W4g99999999999999999999"}), "--formats");
  expect_input_error(run_eqat({"bench", "kernels", "--rotate-mb", "-5"}), "--rotate-mb");
  expect_input_error(run_eqat({"bench", "decode", "--prompt", "0"}), "--prompt");
  expect_input_error(run_eqat({"bench", "decode", "--new-tokens", "100000"}), "--new-tokens");
  expect_input_error(run_eqat({"bench", "decode", "--formats", "W4g96"}), "--formats");
  expect_input_error(run_eqat({"bench", "quant", "--iters", "0"}), "--iters");
  expect_input_error(run_eqat({"bench", "quant", "--seq-len", "1000000"}), "--seq-len");
  expect_input_error(run_eqat({"bench", "quant", "--bits", "4294967298"}), "--bits");
}

// More new tokens than the context: capped with one warning line, never an abort.
TEST(Cli, MaxNewTokensBeyondTheContextIsCappedWithAWarning) {
  RunResult r = run_eqat({"generate", "--model", fixture("tiny_llama"), "--max-new-tokens", "100000", "Hello"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("warning: --max-new-tokens 100000 capped at "), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("capped", r.err.find("capped") + 1), std::string::npos) << "one warning, not one per step";
  RunResult d = run_eqat({"generate", "--model", fixture("tiny_llama"), "Hello"});  // the default is no request
  ASSERT_EQ(d.code, 0) << d.err;
  EXPECT_EQ(d.err.find("warning"), std::string::npos) << d.err;
}

// A model with a NaN weight, and a config whose vocabulary disagrees with its checkpoint.
TEST(Cli, CorruptModelsAreRefusedAtLoad) {
  TempDir t;
  const std::string m = copy_fixture(t, "tiny_llama");
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  {
    Checkpoint ck = Checkpoint::open(fixture("tiny_llama"));
    for (const auto& n : ck.names()) tensors.emplace_back(n, ck.get(n).clone());
  }
  for (auto& [n, w] : tensors)
    if (n == "model.norm.weight") w[0] = std::numeric_limits<float>::quiet_NaN();
  write_safetensors(m + "/model.safetensors", tensors);
  for (const char* temp : {"0", "0.7"})
    expect_input_error(run_eqat({"generate", "--model", m, "--temperature", temp, "Hello"}), "'model.norm.weight'");

  const std::string v = copy_fixture(t, "tiny_llava");
  std::string cfg = slurp(v + "/config.json");
  const size_t p = cfg.find("\"vocab_size\"");
  ASSERT_NE(p, std::string::npos);
  cfg.replace(p, cfg.find_first_of(",}", p) - p, "\"vocab_size\": 2000000000");
  write_text(v + "/config.json", cfg);
  expect_input_error(run_eqat({"ask", "--model", v, "--image", fixture("tiny_llava/image.png"), "What?"}),
                     "vocab_size");
}

// Images that are not regular files, and a corrupt JPEG libjpeg only warns about.
TEST(Cli, HostileImagesAreRefusedOrWarned) {
  TempDir t;
  const std::string model = fixture("tiny_llava");
  expect_input_error(run_eqat({"ask", "--model", model, "--image", "/dev/zero", "What?"}), "/dev/zero");
  const std::string fifo = t.str("fifo.jpg");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  expect_input_error(run_eqat({"ask", "--model", model, "--image", fifo, "What?"}), "fifo.jpg: not a regular file");

  std::string jpg = slurp(data_path("images/extreme_ironing.jpg"));
  jpg.insert(jpg.size() - 2, "\x01\x02\x03");  // extraneous bytes before the end-of-image marker
  write_text(t.str("bad.jpg"), jpg);
  RunResult w = run_eqat({"ask", "--model", model, "--image", t.str("bad.jpg"), "--max-new-tokens", "2", "What?"});
  ASSERT_EQ(w.code, 0) << w.err;
  EXPECT_NE(w.err.find("warning: " + t.str("bad.jpg") + ": corrupt JPEG data"), std::string::npos) << w.err;
  expect_input_error(run_eqat({"ask", "--model", model, "--image", t.str("bad.jpg"), "--strict", "What?"}),
                     "bad.jpg: corrupt JPEG data");
}

// `eqat score` answer checks: a duplicate question id, an unknown id and a non-string text are counted in the
// JSON (exit 0), and with --strict refused in one line naming the file and the first offending line (exit 2).
TEST(Cli, ScoreCountsOrRefusesBadAnswerRecords) {
  TempDir t;
  write_text(t.str("a.jsonl"),
             "{\"question_id\": 0, \"prompt\": \"\", \"text\": \"blue\"}\n"
             "{\"question_id\": 2, \"prompt\": \"\", \"text\": 0}\n"
             "{\"question_id\": 0, \"prompt\": \"\", \"text\": \"red\"}\n"
             "{\"question_id\": 999, \"prompt\": \"\", \"text\": \"yes\"}\n");
  const std::vector<std::string> args = {"score",          "shapes", "--questions", data_path("bench/shapes/test.jsonl"),
                                         "--ground-truth", data_path("bench/shapes/test_answers.jsonl"),
                                         "--answers",      t.str("a.jsonl"), "--only-answered", "--json"};
  RunResult ok = run_eqat(args);
  ASSERT_EQ(ok.code, 0) << ok.err;
  EXPECT_NE(ok.out.find("\"answer_checks\": {\n    \"duplicates\": 1,\n    \"unknown_ids\": 1,\n"
                        "    \"non_string_text\": 1\n  }"),
            std::string::npos)
      << ok.out;
  EXPECT_NE(ok.out.find("\"accuracy\": 1.0"), std::string::npos) << ok.out;  // "blue" (first) and 0 -> "0" right
  std::vector<std::string> strict = args;
  strict.push_back("--strict");
  expect_input_error(run_eqat(strict), t.str("a.jsonl") + ": 1 duplicate question id (line 3: id 0), 1 unknown id "
                                       "(line 4: id 999), 1 non-string text (line 2: id 2); rerun without --strict");
}
