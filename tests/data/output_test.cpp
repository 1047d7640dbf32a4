// Output safety (src/data/output.h): eqat never deletes or replaces what it did not create, never writes into its
// own inputs, cleans up after killed runs, and lets one run at a time write an output.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "data/error.h"
#include "data/fs.h"
#include "data/output.h"
#include "data/safetensors.h"
#include "test_util.h"

#include <ATen/ATen.h>

using namespace eqat;
using eqat_test::TempDir;
namespace fs = std::filesystem;

namespace {

void put(const std::string& path, const std::string& s) { std::ofstream(path, std::ios::binary) << s; }
std::string get(const std::string& path) { return read_file(path); }

// A pid that belonged to a process that has exited (a killed run's temp names carry such pids).
long dead_pid() {
  const pid_t p = ::fork();
  if (p == 0) ::_exit(0);
  int st = 0;
  ::waitpid(p, &st, 0);
  return p;
}

// Runs `f` and returns the InputError's message ("" when nothing was thrown).
template <typename F>
std::string input_error(F&& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

OutputTarget dir_target(const std::string& p, bool overwrite = false, std::vector<std::string> inputs = {}) {
  return {p, "--out", OutputKind::kModel, overwrite, std::move(inputs)};
}

// An eqat model directory as write_dir_atomic leaves it.
std::string make_model_dir(const std::string& p) {
  write_dir_atomic(p, OutputKind::kModel, [](const std::string& tmp) { put(tmp + "/config.json", "{}"); });
  return p;
}

}  // namespace

TEST(Output, ReplacedDirRefusesWhatEqatDidNotWrite) {
  TempDir t;
  put(t.str("notes.txt"), "keep me");
  EXPECT_NE(input_error([&] { check_replaced_dir(dir_target(t.str("notes.txt"), true)); }).find("not a directory"),
            std::string::npos);
  fs::create_directory(t.str("user"));
  put(t.str("user/a.txt"), "keep me");
  const std::string foreign = input_error([&] { check_replaced_dir(dir_target(t.str("user"), true)); });
  EXPECT_NE(foreign.find("was not written by eqat"), std::string::npos) << foreign;
  // A marker of another kind is not enough, --overwrite or not.
  write_dir_atomic(t.str("ds"), OutputKind::kDataset, [](const std::string& tmp) { put(tmp + "/train.json", "[]"); });
  EXPECT_NE(input_error([&] { check_replaced_dir(dir_target(t.str("ds"), true)); }).find("is an eqat dataset, not a model"),
            std::string::npos);
  // The same kind needs --overwrite.
  make_model_dir(t.str("m"));
  EXPECT_NE(input_error([&] { check_replaced_dir(dir_target(t.str("m"))); }).find("--overwrite"), std::string::npos);
  EXPECT_EQ(check_replaced_dir(dir_target(t.str("m"), true)), t.str("m"));
  // Missing and empty directories are free; trailing slashes are dropped.
  EXPECT_EQ(check_replaced_dir(dir_target(t.str("new") + "//")), t.str("new"));
  fs::create_directory(t.str("empty"));
  EXPECT_EQ(check_replaced_dir(dir_target(t.str("empty") + "/")), t.str("empty"));
  // A missing parent, a symlink.
  EXPECT_NE(input_error([&] { check_replaced_dir(dir_target(t.str("no/such/out"))); }).find("does not exist"),
            std::string::npos);
  fs::create_directory_symlink(t.str("m"), t.str("link"));
  EXPECT_NE(input_error([&] { check_replaced_dir(dir_target(t.str("link"), true)); }).find("symbolic link"),
            std::string::npos);
  EXPECT_EQ(get(t.str("notes.txt")), "keep me");
  EXPECT_EQ(get(t.str("user/a.txt")), "keep me");
}

TEST(Output, ReplacedDirRefusesTheWorkingDirectoryAndItsParents) {
  TempDir t;
  fs::create_directories(t.str("a/b"));
  const fs::path old = fs::current_path();
  fs::current_path(t.str("a/b"));
  for (const std::string& p : std::vector<std::string>{".", "./", "..", t.str("a"), "/"})
    EXPECT_NE(input_error([&] { check_replaced_dir(dir_target(p, true)); }).find("working directory"), std::string::npos)
        << p;
  EXPECT_EQ(check_replaced_dir(dir_target("sub")), "sub");  // below the working directory is fine
  fs::current_path(old);
}

TEST(Output, OutputNeverOverlapsAnInput) {
  TempDir t;
  make_model_dir(t.str("model"));
  fs::create_directory_symlink(t.str("model"), t.str("alias"));
  const std::string in = t.str("model");
  EXPECT_NE(input_error([&] { check_replaced_dir(dir_target(in, true, {in})); }).find("is the input"), std::string::npos);
  EXPECT_NE(input_error([&] { check_replaced_dir(dir_target(t.str("alias") + "/", true, {in})); }).find("is the input"),
            std::string::npos)
      << "a symlink to the input is the input";
  EXPECT_NE(input_error([&] { check_replaced_dir(dir_target(in + "/q", true, {in})); }).find("inside the input"),
            std::string::npos);
  EXPECT_NE(input_error([&] { check_replaced_dir(dir_target(t.str(), true, {in + "/config.json"})); })
                .find("contains the input"),
            std::string::npos);
  EXPECT_NE(input_error([&] {
              check_output_file({in + "/x.safetensors", "--dump-logits", OutputKind::kTensors, false, {in}});
            }).find("inside the input"),
            std::string::npos);
  EXPECT_EQ(check_replaced_dir(dir_target(t.str("model-q"), false, {in, ""})), t.str("model-q"))
      << "a sibling whose name extends the input's is not inside it";
}

TEST(Output, WriteDirAtomicReplacesOnlyItsOwnKind) {
  TempDir t;
  fs::create_directory(t.str("user"));
  put(t.str("user/a.txt"), "keep me");
  bool filled = false;
  const std::string msg = input_error([&] {
    write_dir_atomic(t.str("user"), OutputKind::kModel, [&](const std::string&) { filled = true; });
  });
  EXPECT_NE(msg.find("not an eqat model"), std::string::npos) << msg;
  EXPECT_FALSE(filled) << "refused before any work";
  EXPECT_EQ(get(t.str("user/a.txt")), "keep me");

  make_model_dir(t.str("m"));
  write_dir_atomic(t.str("m/"), OutputKind::kModel, [](const std::string& tmp) { put(tmp + "/v2", "x"); });
  EXPECT_TRUE(fs::exists(t.str("m/v2")));
  EXPECT_FALSE(fs::exists(t.str("m/config.json"))) << "replaced as a whole";
  OutputKind k;
  ASSERT_TRUE(read_output_marker(t.str("m"), &k));
  EXPECT_EQ(k, OutputKind::kModel);
  // A failing fill leaves the previous output and no temp names.
  EXPECT_THROW(write_dir_atomic(t.str("m"), OutputKind::kModel, [](const std::string&) { throw InputError("boom"); }),
               InputError);
  EXPECT_TRUE(fs::exists(t.str("m/v2")));
  for (const auto& e : fs::directory_iterator(t.str()))
    EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos) << e.path();
}

// Files written in place inside a fill (write_file_in_temp_dir: a dataset's images, no fsync or rename each) arrive
// with the directory's rename, whole; a fill that fails after some of them leaves none behind; an unwritable path is
// an InputError naming it.
TEST(Output, FilesWrittenInPlaceInsideAFillArriveWithItsRename) {
  TempDir t;
  write_dir_atomic(t.str("ds"), OutputKind::kDataset, [](const std::string& tmp) {
    fs::create_directory(tmp + "/images");
    for (int i = 0; i < 3; ++i)
      write_file_in_temp_dir(tmp + "/images/" + std::to_string(i) + ".png", std::string(i + 1, 'x'));
  });
  for (int i = 0; i < 3; ++i) EXPECT_EQ(get(t.str("ds/images/" + std::to_string(i) + ".png")), std::string(i + 1, 'x'));
  EXPECT_THROW(write_dir_atomic(t.str("ds2"), OutputKind::kDataset,
                                [](const std::string& tmp) {
                                  write_file_in_temp_dir(tmp + "/a.png", "a");
                                  throw InputError("boom");
                                }),
               InputError);
  EXPECT_FALSE(fs::exists(t.str("ds2")));
  for (const auto& e : fs::directory_iterator(t.str()))
    EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos) << e.path();
  const std::string msg = input_error([&] { write_file_in_temp_dir(t.str("missing/a.png"), "a"); });
  EXPECT_NE(msg.find(t.str("missing/a.png")), std::string::npos) << msg;
}

TEST(Output, KilledRunsLeftoversAreRemovedAndASwapIsUndone) {
  TempDir t;
  const long dead = dead_pid();
  const std::string stale = t.str("out.tmp." + std::to_string(dead) + ".42");
  fs::create_directory(stale);
  put(stale + "/model.safetensors", "half written");
  const std::string mine = t.str("out.tmp." + std::to_string(::getpid()) + ".7");  // a live run's temp: kept
  fs::create_directory(mine);
  put(t.str("outer.tmp." + std::to_string(dead) + ".1"), "another output's temp: kept");
  check_replaced_dir(dir_target(t.str("out")));
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_TRUE(fs::exists(mine));
  EXPECT_TRUE(fs::exists(t.str("outer.tmp." + std::to_string(dead) + ".1")));

  // Killed between "move the previous output aside" and "rename the new one in": the previous one comes back.
  const std::string aside = t.str("m.tmp." + std::to_string(dead) + ".9.old");
  make_model_dir(aside);
  check_replaced_dir(dir_target(t.str("m"), true));
  EXPECT_TRUE(fs::exists(t.str("m/config.json")));
  EXPECT_FALSE(fs::exists(aside));

  // In-place outputs: a killed run's temp files inside are removed by the next run.
  claim_dir(t.str("run"), OutputKind::kEvalRun);
  put(t.str("run/answers.jsonl"), "{}\n");
  put(t.str("run/answers.jsonl.tmp." + std::to_string(dead) + ".5"), "partial");
  check_in_place_dir({t.str("run"), "--out", OutputKind::kEvalRun, false, {}}, true);
  EXPECT_FALSE(fs::exists(t.str("run/answers.jsonl.tmp." + std::to_string(dead) + ".5")));
  EXPECT_TRUE(fs::exists(t.str("run/answers.jsonl")));
}

TEST(Output, InPlaceDirsContinueOnlyTheirOwnKind) {
  TempDir t;
  auto target = [&](const std::string& p, bool overwrite = false) {
    return OutputTarget{p, "--out", OutputKind::kTrainRun, overwrite, {}};
  };
  fs::create_directory(t.str("user"));
  put(t.str("user/config.json"), "mine");
  EXPECT_NE(input_error([&] { check_in_place_dir(target(t.str("user"), true), true); }).find("not written by eqat"),
            std::string::npos);
  claim_dir(t.str("run"), OutputKind::kTrainRun);
  put(t.str("run/log"), "x");
  EXPECT_NE(input_error([&] { check_in_place_dir(target(t.str("run")), false); }).find("--resume"), std::string::npos);
  EXPECT_EQ(check_in_place_dir(target(t.str("run")), true), t.str("run"));
  EXPECT_EQ(check_in_place_dir(target(t.str("run"), true), false), t.str("run"));
  {
    FileLock lock(t.str("run/.eqat-lock"), "run");
    claim_dir(t.str("run"), OutputKind::kTrainRun, /*start_over=*/true);
    EXPECT_FALSE(fs::exists(t.str("run/log")));
    EXPECT_TRUE(fs::exists(t.str("run/.eqat-lock"))) << "the held lock survives a start-over";
  }
  OutputKind k;
  EXPECT_TRUE(read_output_marker(t.str("run"), &k));
  EXPECT_NE(input_error([&] { claim_dir(t.str("run"), OutputKind::kEvalRun); }).find("train-tiny run"),
            std::string::npos);
  EXPECT_EQ(get(t.str("user/config.json")), "mine");
}

TEST(Output, FilesAreReplacedOnlyWhenTheyAreEqatsOwn) {
  TempDir t;
  auto target = [&](const std::string& p, OutputKind kind, bool overwrite) {
    return OutputTarget{p, "--out", kind, overwrite, {}};
  };
  put(t.str("user.safetensors"), "not a tensor file");
  EXPECT_NE(input_error([&] { check_output_file(target(t.str("user.safetensors"), OutputKind::kTensors, false)); })
                .find("--overwrite"),
            std::string::npos);
  EXPECT_NE(input_error([&] { check_output_file(target(t.str("user.safetensors"), OutputKind::kTensors, true)); })
                .find("is not an eqat safetensors file"),
            std::string::npos);
  // Another tool's safetensors (no producer) is not eqat's; eqat's own is.
  write_safetensors(t.str("hf.safetensors"), {{"x", at::zeros({2})}}, {{"format", "pt"}, {"producer", "hf"}});
  EXPECT_NE(input_error([&] { check_output_file(target(t.str("hf.safetensors"), OutputKind::kTensors, true)); })
                .find("not an eqat"),
            std::string::npos);
  write_safetensors(t.str("mine.safetensors"), {{"x", at::zeros({2})}});
  EXPECT_EQ(check_output_file(target(t.str("mine.safetensors"), OutputKind::kTensors, true)), t.str("mine.safetensors"));
  // Reports and uploads are recognised by their content.
  put(t.str("r.html"), "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>eqat report</title>");
  EXPECT_NO_THROW(check_output_file(target(t.str("r.html"), OutputKind::kReport, true)));
  put(t.str("page.html"), "<!DOCTYPE html><title>my notes</title>");
  EXPECT_THROW(check_output_file(target(t.str("page.html"), OutputKind::kReport, true)), InputError);
  put(t.str("r.md"), "<!-- eqat report -->\n| metric |");
  EXPECT_NO_THROW(check_output_file(target(t.str("r.md"), OutputKind::kMarkdown, true)));
  put(t.str("README.md"), "# my project");
  EXPECT_THROW(check_output_file(target(t.str("README.md"), OutputKind::kMarkdown, true)), InputError);
  put(t.str("up.json"), R"([{"question_id": 1, "answer": "yes"}])");
  EXPECT_NO_THROW(check_output_file(target(t.str("up.json"), OutputKind::kUpload, true)));
  put(t.str("cfg.json"), R"({"question_id": 1})");
  EXPECT_THROW(check_output_file(target(t.str("cfg.json"), OutputKind::kUpload, true)), InputError);
  // Never a directory, a device or a trailing slash.
  EXPECT_NE(input_error([&] { check_output_file(target(t.str(), OutputKind::kTensors, true)); }).find("directory"),
            std::string::npos);
  EXPECT_NE(input_error([&] { check_output_file(target("/dev/null", OutputKind::kTensors, true)); })
                .find("not a regular file"),
            std::string::npos);
  EXPECT_NE(input_error([&] { check_output_file(target(t.str("x/"), OutputKind::kTensors, false)); }).find("directory"),
            std::string::npos);
  EXPECT_EQ(get(t.str("user.safetensors")), "not a tensor file");
  EXPECT_EQ(get(t.str("README.md")), "# my project");
}

TEST(Output, OneWriterAtATime) {
  TempDir t;
  FileLock first(t.str("lock"), "--out X");
  const std::string msg = input_error([&] { FileLock second(t.str("lock"), "--out X"); });
  EXPECT_NE(msg.find("another eqat run (pid " + std::to_string(::getpid()) + ")"), std::string::npos) << msg;
}

// Inputs are read only from regular files of bounded size: a FIFO would block forever, /dev/zero never ends.
TEST(Fs, ReadsOnlyRegularFilesOfBoundedSize) {
  TempDir t;
  ASSERT_EQ(::mkfifo(t.str("config.json").c_str(), 0644), 0);
  EXPECT_NE(input_error([&] { read_file(t.str("config.json")); }).find("not a regular file"), std::string::npos);
  EXPECT_NE(input_error([&] { SafetensorsFile::open(t.str("config.json")); }).find("not a regular file"),
            std::string::npos)
      << "opening a FIFO for mmap would block until a writer appears";
  EXPECT_NE(input_error([&] { read_file("/dev/zero"); }).find("not a regular file"), std::string::npos);
  put(t.str("ten.txt"), "0123456789");
  EXPECT_EQ(read_file(t.str("ten.txt"), 10), "0123456789");
  EXPECT_NE(input_error([&] { read_file(t.str("ten.txt"), 9); }).find("more than the 9"), std::string::npos);
  fs::create_symlink("/dev/zero", t.str("zero.safetensors"));
  EXPECT_NE(input_error([&] { SafetensorsFile::open(t.str("zero.safetensors")); }).find("not a regular file"),
            std::string::npos);
}
