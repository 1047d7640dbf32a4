// Output safety: eqat never deletes or replaces anything it did not create (README "Bad input").
//
// Every directory eqat writes holds a marker file (kOutputMarker) naming the kind of output. Before any work, a
// command checks its output path once (check_*), and refuses in one line (InputError, exit 2):
//   - an existing target that is not an eqat output of the same kind (a user's file, an unrelated directory);
//   - an eqat output of the same kind when --overwrite was not given (replaced directories and files);
//   - an output equal to, inside, or containing one of the command's inputs (`quantize --model X --out X`);
//   - `.`, `/`, the working directory or one of its ancestors as a replaced directory.
// An empty existing directory counts as free. Writers re-check at the moment of replacement
// (write_dir_atomic in fs.h), so a check that was skipped or raced still cannot delete foreign data.
// Temp names (`NAME.tmp.PID.N`) left by killed runs are removed when the next run checks the same output.
#pragma once

#include <string>
#include <vector>

namespace eqat {

enum class OutputKind {
  kModel,       // a model directory (convert, quantize, train-tiny's final model)
  kDataset,     // data shapes
  kEvalRun,     // eval --out (continued by a rerun)
  kTrainRun,    // train-tiny --out (continued with --resume)
  kCheckpoint,  // train-tiny's OUT/checkpoint (replaced on every save)
  kQuantizeState,  // quantize's OUT.eqat-state/ (resume)
  kTensors,     // a .safetensors file (preprocess, --dump-logits)
  kReport,      // report --out (HTML)
  kMarkdown,    // report --markdown
  kUpload,      // score --out (VQAv2/GQA upload JSON)
  kCount
};
const char* output_kind_name(OutputKind k);

inline constexpr const char* kOutputMarker = ".eqat-output";

struct OutputTarget {
  std::string path;                 // as the user gave it
  std::string flag;                 // the argument, e.g. "--out"
  OutputKind kind = OutputKind::kModel;
  bool overwrite = false;           // --overwrite was given
  std::vector<std::string> inputs;  // paths the command reads (empty entries are ignored)
};

// A directory built under a temp name and renamed into place. Returns the path without trailing slashes.
std::string check_replaced_dir(const OutputTarget& t);

// A directory written in place and continued by a rerun (eval, train-tiny). An existing eqat output of the same
// kind is continued when `may_continue`, replaced when --overwrite (the caller clears it), and refused otherwise.
// Returns the path without trailing slashes. Nothing is created: call claim_dir once validation has passed.
std::string check_in_place_dir(const OutputTarget& t, bool may_continue);

// A file written atomically. An existing file is replaced only with --overwrite and only when its content shows it
// is an eqat output of `kind` (safetensors metadata, the report's generator tag, an upload's JSON shape).
std::string check_output_file(const OutputTarget& t);

// Creates `dir` if needed and writes its marker (in-place outputs). `start_over`: empties an earlier output of
// `kind` first (--overwrite), keeping the marker and the lock file (`.eqat-*`); a directory with another marker or
// none is never emptied.
void claim_dir(const std::string& dir, OutputKind kind, bool start_over = false);
// Writes the marker into a directory being built (write_dir_atomic does this for its temp directory).
void write_output_marker(const std::string& dir, OutputKind kind);
// The kind a directory's marker names; false when it has none (or it is unreadable).
bool read_output_marker(const std::string& dir, OutputKind* kind);
// True when `dir` is missing, an empty directory, or an eqat output of `kind`.
bool replaceable_dir(const std::string& dir, OutputKind kind);

// Removes temp files/dirs named `PREFIX.tmp.PID.N[...]` in `dir` whose process is gone (a killed run's leftovers).
// An empty prefix matches every name.
void remove_stale_temps(const std::string& dir, const std::string& prefix = "");

// An exclusive advisory lock (flock) on `path`, held for the object's lifetime. A second holder is refused with
// an InputError naming `what` and the pid that holds it.
class FileLock {
 public:
  FileLock(const std::string& path, const std::string& what);
  ~FileLock();
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;

 private:
  int fd_ = -1;
};

}  // namespace eqat
