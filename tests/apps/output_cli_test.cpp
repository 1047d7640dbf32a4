// The eqat binary against careless outputs and careless flags (issue: "never lose a user's data"): every command
// that writes refuses foreign targets and its own inputs before doing any work, --overwrite replaces only eqat's
// own outputs of the same kind, quantize validates everything first and resumes only the run it saved, one run at a
// time writes an output, and numeric flags are range-checked (never cut to 32 bits).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "apps/cli_util.h"
#include "data/fs.h"
#include "data/output.h"
#include "model_test_util.h"

using namespace eqat;
using namespace eqat_test;
namespace fs = std::filesystem;

namespace {

// Every file under `dir` with its bytes: a directory's whole state, to show nothing changed.
std::map<std::string, std::string> snapshot(const std::string& dir) {
  std::map<std::string, std::string> m;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) m[fs::relative(e.path(), dir).string()] = slurp(e.path().string());
  return m;
}

// No temp names (NAME.tmp.PID.N) anywhere under `dir`.
void expect_no_temps(const std::string& dir) {
  for (const auto& e : fs::recursive_directory_iterator(dir))
    EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos) << e.path();
}

std::vector<std::string> convert_args(const std::string& out) {
  const std::string m = data_path("models/stories260K/");
  return {"convert", "llama2c", "--checkpoint", m + "stories260K.bin", "--tokenizer", m + "tok512.bin", "--out", out};
}

// RTN per-channel on a text model: the quickest quantize that runs the whole pipeline.
std::vector<std::string> quantize_args(const std::string& model, const std::string& out) {
  return {"quantize", "--model", model, "--out", out, "--method", "rtn", "--group-size", "-1",
          "--calib", data_path("text/tinyshakespeare.txt"), "--samples", "2", "--val-samples", "1",
          "--seq-len", "16", "--no-progress"};
}

std::vector<std::string> with(std::vector<std::string> a, const std::vector<std::string>& more) {
  a.insert(a.end(), more.begin(), more.end());
  return a;
}

}  // namespace

TEST(CliOutput, ConvertNeverReplacesForeignDataAndOverwritesOnlyItsOwn) {
  TempDir t;
  write_text(t.str("notes.txt"), "my notes");
  expect_input_error(run_eqat(convert_args(t.str("notes.txt"))), "notes.txt");
  EXPECT_EQ(slurp(t.str("notes.txt")), "my notes");
  fs::create_directories(t.str("photos/2026"));
  write_text(t.str("photos/2026/a.jpg"), "jpeg bytes");
  const auto before = snapshot(t.str("photos"));
  expect_input_error(run_eqat(with(convert_args(t.str("photos")), {"--overwrite"})), "not written by eqat");
  EXPECT_EQ(snapshot(t.str("photos")), before);

  // DIR/ works; a second run needs --overwrite; `.` is refused in one line.
  RunResult r = run_eqat(convert_args(t.str("st") + "/"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(fs::exists(t.str("st/config.json")));
  expect_input_error(run_eqat(convert_args(t.str("st"))), "--overwrite");
  r = run_eqat(with(convert_args(t.str("st")), {"--overwrite"}));
  EXPECT_EQ(r.code, 0) << r.err;
  const std::string cmd = "cd " + quote(t.str("st")) + " && " + quote(EQAT_BIN) + " convert llama2c --checkpoint " +
                          quote(data_path("models/stories260K/stories260K.bin")) + " --tokenizer " +
                          quote(data_path("models/stories260K/tok512.bin")) + " --out . --overwrite 2>" +
                          quote(t.str("err"));
  EXPECT_EQ(WEXITSTATUS(std::system(cmd.c_str())), 2);
  EXPECT_NE(slurp(t.str("err")).find("working directory"), std::string::npos) << slurp(t.str("err"));
  EXPECT_TRUE(fs::exists(t.str("st/config.json")));
  expect_no_temps(t.str());
}

TEST(CliOutput, QuantizeNeverWritesIntoItsInputs) {
  TempDir t;
  const std::string model = copy_fixture(t, "tiny_llama");
  const auto before = snapshot(model);
  expect_input_error(run_eqat(with(quantize_args(model, model), {"--overwrite"})), "is the input");
  expect_input_error(run_eqat(quantize_args(model, model + "/q")), "inside the input");
  expect_input_error(run_eqat(quantize_args(model + "/", model)), "is the input");
  // The calibration file is an input too.
  write_text(t.str("calib.txt"), slurp(data_path("text/tinyshakespeare.txt")));
  std::vector<std::string> a = quantize_args(model, t.str("calib.txt"));
  a[10] = t.str("calib.txt");  // --calib
  expect_input_error(run_eqat(a), "calib.txt");
  EXPECT_EQ(snapshot(model), before);
  EXPECT_FALSE(fs::exists(model + ".eqat-state"));
}

// Bad flags and inputs are refused before anything is created: no output, no state directory.
TEST(CliOutput, QuantizeValidatesEverythingBeforeWork) {
  TempDir t;
  const std::string model = fixture("tiny_llama"), out = t.str("q");
  fs::create_directory(t.str("calib.d"));
  const std::vector<std::pair<std::vector<std::string>, std::string>> bad = {
      {{"--bits", "4294967298"}, "--bits must be in [2, 8]"},
      {{"--bits", "5"}, "--bits must be 2, 3, 4 or 8"},
      {{"--group-size", "0"}, "--group-size"},
      {{"--samples", "0"}, "--samples"},
      {{"--seq-len", "99999999999999999999"}, "--seq-len"},
      {{"--epochs", "-1"}, "--epochs"},
      {{"--quant-lr", "nan"}, "--quant-lr"},
      {{"--e2e-micro-batch", "3", "--method", "efficientqat"}, "--e2e-batch must be a multiple"},
      {{"--threads", "100000"}, "--threads must be in [0, "},
      {{"--format", "gptq-v3"}, "--format"},
      {{"--calib", t.str("missing.txt")}, "missing.txt"},
      {{"--calib", t.str("calib.d")}, "not a regular file"},
      {{"--calib-images", t.str("nope")}, "--calib-images"},
      {{"--offload-dir", t.str("no/such/dir")}, "--offload-dir"},
      {{"--group-size-fallback", "per-row"}, "--group-size-fallback: expected ragged or per-channel"},
  };
  for (const auto& [flags, needle] : bad) {
    expect_input_error(run_eqat(with(quantize_args(model, out), flags)), needle);  // a later flag wins
    EXPECT_FALSE(fs::exists(out)) << needle;
    EXPECT_FALSE(fs::exists(out + ".eqat-state")) << needle << ": created before validation passed";
  }
}

TEST(CliOutput, QuantizeResumesOnlyTheRunItSavedAndOneRunAtATime) {
  TempDir t;
  const std::string model = fixture("tiny_llama"), out = t.str("q"), state = out + ".eqat-state";
  // A settings file from another run: --resume names the differences, and the file when it is corrupt.
  claim_dir(state, OutputKind::kQuantizeState);
  write_text(state + "/settings.json", R"({"--seed": 99, "--method": "rtn"})");
  RunResult r = run_eqat(with(quantize_args(model, out), {"--resume"}));
  expect_input_error(r, "--seed 99 -> 2");
  write_text(state + "/settings.json", "{ not json");
  expect_input_error(run_eqat(with(quantize_args(model, out), {"--resume"})), "settings.json");
  // Another run holds the lock.
  {
    FileLock other(state + "/.eqat-lock", "test");
    expect_input_error(run_eqat(quantize_args(model, out)), "another eqat run");
  }
  // Without --resume the stale state is never reused: the run starts over and removes it at the end.
  write_text(state + "/state.json", R"({"method": "gptq", "tag": "w8g-1", "blocks_done": 99})");
  r = run_eqat(quantize_args(model, out));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_FALSE(fs::exists(state));
  expect_no_temps(t.str());
  // The same command again needs --overwrite; a state directory eqat did not make is never touched.
  expect_input_error(run_eqat(quantize_args(model, out)), "--overwrite");
  fs::create_directory(t.str("q2.eqat-state"));
  write_text(t.str("q2.eqat-state/mine.txt"), "user data");
  expect_input_error(run_eqat(quantize_args(model, t.str("q2"))), "not an eqat quantize state");
  EXPECT_EQ(slurp(t.str("q2.eqat-state/mine.txt")), "user data");
}

TEST(CliOutput, EvalTrainAndDataRefuseForeignDirectories) {
  TempDir t;
  fs::create_directory(t.str("proj"));
  write_text(t.str("proj/scores.json"), "mine");
  write_text(t.str("proj/config.json"), "mine");
  const auto before = snapshot(t.str("proj"));
  expect_input_error(run_eqat({"eval", "--bench", "ppl", "--model", fixture("tiny_llama"), "--data",
                               data_path("text/tinyshakespeare.txt"), "--limit", "1", "--out", t.str("proj")}),
                     "not written by eqat");
  expect_input_error(run_eqat({"eval", "--bench", "ppl", "--model", fixture("tiny_llama"), "--data",
                               data_path("text/tinyshakespeare.txt"), "--out", fixture("tiny_llama") + "/run"}),
                     "inside the input");
  expect_input_error(run_eqat({"train-tiny", "--out", t.str("proj"), "--steps", "1"}), "not written by eqat");
  expect_input_error(run_eqat({"data", "shapes", "--out", t.str("proj"), "--train", "1", "--test", "1"}),
                     "not written by eqat");
  expect_input_error(run_eqat({"data", "shapes", "--out", t.str("big"), "--test", "1000000000000"}),
                     "--test must be in [0, 1000000]");
  EXPECT_EQ(snapshot(t.str("proj")), before);
  // An eval run is continued by a rerun, and only one run writes it at a time.
  const std::vector<std::string> ev = {"eval", "--bench", "ppl", "--model", fixture("tiny_llama"), "--data",
                                       data_path("text/tinyshakespeare.txt"), "--limit", "1", "--seq-len", "16",
                                       "--no-progress", "--out", t.str("run")};
  RunResult r = run_eqat(ev);
  ASSERT_EQ(r.code, 0) << r.err;
  r = run_eqat(ev);
  EXPECT_EQ(r.code, 0) << r.err;
  write_text(t.str("run/stale.txt"), "from the earlier run");
  r = run_eqat(with(ev, {"--overwrite"}));  // starts the run over: the earlier run's files go
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_FALSE(fs::exists(t.str("run/stale.txt")));
  EXPECT_TRUE(fs::exists(t.str("run/run.json")));
  {
    FileLock other(t.str("run/.eqat-lock"), "test");
    expect_input_error(run_eqat(ev), "another eqat run");
  }
  // train-tiny: an earlier run is continued with --resume or restarted with --overwrite, never silently reused.
  claim_dir(t.str("tt"), OutputKind::kTrainRun);
  write_text(t.str("tt/train_log.jsonl"), "{}\n");
  expect_input_error(run_eqat({"train-tiny", "--out", t.str("tt"), "--steps", "1"}), "--resume");
}

TEST(CliOutput, FileOutputsNeverReplaceForeignFiles) {
  TempDir t;
  write_text(t.str("keep.safetensors"), "my data");
  const std::vector<std::string> gen = {"generate", "--model", fixture("tiny_llama"), "--max-new-tokens", "1", "hi"};
  expect_input_error(run_eqat(with(gen, {"--dump-logits", t.str("keep.safetensors")})), "--overwrite");
  expect_input_error(run_eqat(with(gen, {"--dump-logits", t.str("keep.safetensors"), "--overwrite"})), "not an eqat");
  EXPECT_EQ(slurp(t.str("keep.safetensors")), "my data");
  expect_input_error(run_eqat(with(gen, {"--dump-logits", "/dev/null", "--overwrite"})), "not a regular file");
  // eqat's own dump is replaced with --overwrite.
  ASSERT_EQ(run_eqat(with(gen, {"--dump-logits", t.str("l.safetensors")})).code, 0);
  EXPECT_EQ(run_eqat(with(gen, {"--dump-logits", t.str("l.safetensors"), "--overwrite"})).code, 0);
  expect_input_error(run_eqat(with(gen, {"--dump-logits", fixture("tiny_llama") + "/x.safetensors"})),
                     "inside the input");
  write_text(t.str("index.html"), "<!DOCTYPE html><title>my site</title>");
  fs::create_directory(t.str("run1"));
  expect_input_error(run_eqat({"report", "--out", t.str("index.html"), "--overwrite", t.str("run1")}), "not an eqat");
  expect_input_error(run_eqat({"report", "--out", t.str("run1/r.html"), t.str("run1")}), "inside the input");
  EXPECT_EQ(slurp(t.str("index.html")), "<!DOCTYPE html><title>my site</title>");
  expect_no_temps(t.str());
}

TEST(CliOutput, NumericFlagsAreRangeCheckedNotTruncated) {
  const std::vector<std::string> gen = {"generate", "--model", fixture("tiny_llama"), "hi"};
  const std::vector<std::pair<std::vector<std::string>, std::string>> bad = {
      {{"--max-new-tokens", "-1"}, "--max-new-tokens must be in [0, "},
      {{"--max-new-tokens", "18446744073709551617"}, "--max-new-tokens must be in"},
      {{"--temperature", "nan"}, "--temperature must be in [0, 100]"},
      {{"--top-p", "1.5"}, "--top-p"},
      {{"--top-k", "4294967297"}, "--top-k"},
      {{"--seed", "1e3"}, "--seed: expected an integer"},
      {{"--threads", "100000"}, "--threads must be in [0, "},
  };
  for (const auto& [flags, needle] : bad) {
    std::vector<std::string> a = gen;
    a.insert(a.end() - 1, flags.begin(), flags.end());
    expect_input_error(run_eqat(a), needle);
  }
  expect_input_error(run_eqat({"eval", "--bench", "shapes", "--batch-size", "0", "--out", "/tmp/x"}), "--batch-size");
  expect_input_error(run_eqat({"bench", "decode", "--layers", "4294967297"}), "--layers must be in [1, 32]");
}

// Block-AP's two activation streams are sized before training: what memory cannot hold is refused (nothing left
// behind), and --offload-dir keeps them in a directory of the run's own, never over the files already there.
TEST(CliOutput, QuantizeSizesItsActivationCachesAndOffloadsBesideUserFiles) {
  TempDir t;
  const std::string model = fixture("tiny_llama");
  ::setenv("EQAT_MEMORY_LIMIT_MB", "1", 1);  // the tiny model's weights are mmapped; its caches need ~4 MiB
  RunResult r = run_eqat(with(quantize_args(model, t.str("q")), {"--samples", "256", "--seq-len", "64"}));
  ::unsetenv("EQAT_MEMORY_LIMIT_MB");
  expect_input_error(r, "activation caches");
  EXPECT_FALSE(fs::exists(t.str("q")));
  EXPECT_FALSE(fs::exists(t.str("q.eqat-state"))) << "a run that saved no progress leaves no state";

  fs::create_directory(t.str("scratch"));
  write_text(t.str("scratch/fp_train_0.safetensors"), "user file with a cache's name");
  r = run_eqat(with(quantize_args(model, t.str("q")), {"--offload-dir", t.str("scratch")}));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(snapshot(t.str("scratch")),
            (std::map<std::string, std::string>{{"fp_train_0.safetensors", "user file with a cache's name"}}));
}

// kill -9 in the middle of a quantize, then --resume: the run completes, and neither the killed run's temp names
// nor the state directory remain.
TEST(CliOutput, KilledQuantizeResumesAndLeavesNoTemps) {
  TempDir t;
  const std::string out = t.str("q");
  std::vector<std::string> args = with(quantize_args(fixture("tiny_llama"), out),
                                       {"--method", "efficientqat", "--bits", "2", "--epochs", "3", "--samples", "8",
                                        "--e2e-steps", "1", "--e2e-batch", "4"});
  const pid_t pid = ::fork();
  if (pid == 0) {
    std::vector<char*> argv{const_cast<char*>(EQAT_BIN)};
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    std::freopen("/dev/null", "w", stderr);
    ::execv(EQAT_BIN, argv.data());
    ::_exit(127);
  }
  // Kill once the first block's state is saved (tiny_llama has 3 blocks; each takes a second or more here).
  bool saved = false;
  for (int i = 0; i < 1200 && !saved; ++i) {
    saved = fs::exists(out + ".eqat-state/state.json");
    if (!saved) ::usleep(50 * 1000);
  }
  ::kill(pid, SIGKILL);
  int st = 0;
  ::waitpid(pid, &st, 0);
  ASSERT_TRUE(saved) << "the run never saved a block";
  ASSERT_FALSE(fs::exists(out + "/config.json")) << "the run finished before it was killed; kill earlier";
  RunResult r = run_eqat(with(args, {"--resume"}));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("resum"), std::string::npos) << r.err;
  EXPECT_TRUE(fs::exists(out + "/model.safetensors"));
  EXPECT_FALSE(fs::exists(out + ".eqat-state"));
  expect_no_temps(t.str());
}
