// libFuzzer target for the llama2.c importer (src/data/llama2c.cpp): a legacy version-0 checkpoint .bin and a
// llama2.c tokenizer.bin, converted by convert_llama2c into an HF-style directory (config.json, model.safetensors,
// tokenizer.model, ...), exactly as `eqat convert --from llama2c` does.
//
// Input (fuzz_util.h): flags byte, then sections 0 checkpoint .bin, 1 tokenizer.bin.
// flags bit 0: only llama2c_tokenizer_to_sentencepiece(tokenizer.bin) (the fuzzer reaches the tokenizer rules
// without having to match a checkpoint's vocab_size).
//
// eqat::InputError is the expected outcome for bad files. Findings: any other exception, a sanitizer report, a
// hang or unbounded memory (the header's sizes must be checked against the file before anything is allocated),
// and an accepted input whose output eqat cannot read back: the SentencePiece model the importer builds must load
// (Tokenizer::from_model_file / Tokenizer::load), and the written config.json and model.safetensors must open.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "data/config.h"
#include "data/error.h"
#include "data/fs.h"
#include "data/llama2c.h"
#include "data/safetensors.h"
#include "data/tokenizer.h"
#include "fuzz_util.h"

namespace {

// An accepted input produced files eqat itself rejects: report it as a finding with the loader's message.
[[noreturn]] void unreadable_output(const eqat::InputError& e) {
  fprintf(stderr, "llama2c_fuzz: the importer accepted the input but wrote unreadable output: %s\n", e.what());
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const fuzz::Input in = fuzz::split_input(data, size);
  if (!in.has(1)) return 0;
  const std::string& dir = fuzz::scratch_dir();
  const std::string ckpt = fuzz::write(dir, "model.bin", in.get(0));
  const std::string tok = fuzz::write(dir, "tokenizer.bin", in.get(1));

  if (in.flags & 1) {
    std::string proto;
    try {
      proto = eqat::llama2c_tokenizer_to_sentencepiece(tok);
    } catch (const eqat::InputError& e) {
      fuzz::rejected(e);
      return 0;
    }
    const std::string model = fuzz::write(dir, "tokenizer.model", proto);
    try {
      (void)eqat::Tokenizer::from_model_file(model);
    } catch (const eqat::InputError& e) {
      unreadable_output(e);
    }
    return 0;
  }

  const std::string out = dir + "/out";
  try {
    eqat::convert_llama2c(ckpt, tok, out);
  } catch (const eqat::InputError& e) {
    fuzz::rejected(e);
    return 0;
  }
  try {
    const eqat::ModelConfig cfg = eqat::load_model_config(out);
    const eqat::Tokenizer t = eqat::Tokenizer::load(out);
    if (t.vocab_size() != cfg.text.vocab_size) std::abort();
    const eqat::Checkpoint c = eqat::Checkpoint::open(out);
    if (c.names().empty()) std::abort();
  } catch (const eqat::InputError& e) {
    unreadable_output(e);
  }
  return 0;
}
