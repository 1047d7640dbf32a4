// libFuzzer target for the tokenizer files (src/data/tokenizer.cpp): tokenizer.model (SentencePiece protobuf,
// parsed by libsentencepiece), tokenizer.json, added_tokens.json and tokenizer_config.json as Tokenizer::load
// reads them, then encode/decode on fuzzer-chosen text and ids.
//
// Input (fuzz_util.h): flags byte, then sections
//   0 tokenizer.model   1 tokenizer.json   2 added_tokens.json   3 tokenizer_config.json   4 text to encode
// flags bit 0/1/2: write tokenizer.json / added_tokens.json / tokenizer_config.json (when its section exists);
// bit 3: load through Tokenizer::from_model_file instead of Tokenizer::load.
//
// eqat::InputError is the expected outcome for bad files. Findings: any other exception, a sanitizer report, or a
// loaded tokenizer that breaks what callers rely on (checked below; violations abort): encode() ids inside
// [0, vocab_size), a BOS first when asked, the streamed text equal to decode(), piece_to_id(id_to_piece(id)) == id
// for added tokens.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "data/error.h"
#include "data/tokenizer.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const fuzz::Input in = fuzz::split_input(data, size);
  if (!in.has(0)) return 0;
  const std::string& dir = fuzz::scratch_dir();
  const std::string model = fuzz::write(dir, "tokenizer.model", in.get(0));
  const char* json_names[] = {"tokenizer.json", "added_tokens.json", "tokenizer_config.json"};
  for (int i = 0; i < 3; ++i)
    if ((in.flags >> i & 1) && in.has(1 + i)) fuzz::write(dir, json_names[i], in.get(1 + i));

  try {
    const eqat::Tokenizer tok = (in.flags & 8) ? eqat::Tokenizer::from_model_file(model) : eqat::Tokenizer::load(dir);
    const int64_t vocab = tok.vocab_size();
    if (vocab <= 0) std::abort();

    const std::string& text = in.get(4);
    for (bool bos : {false, true}) {
      if (bos && tok.bos_id() < 0) continue;  // encode(text, true) is an InputError then (no BOS to prepend)
      const std::vector<int64_t> ids = tok.encode(text, bos);
      if (bos && (ids.empty() || ids[0] != tok.bos_id())) std::abort();
      for (int64_t id : ids)
        if (id < 0 || id >= vocab) std::abort();
      (void)tok.decode(ids, true);
      (void)tok.decode(ids, false);
      for (int64_t id : ids) (void)tok.id_to_piece(id);
    }

    // Arbitrary ids (two text bytes each), including ids past the vocabulary, which decode() skips.
    std::vector<int64_t> ids;
    for (size_t i = 0; i + 1 < text.size() && ids.size() < 256; i += 2)
      ids.push_back((static_cast<uint8_t>(text[i]) << 8 | static_cast<uint8_t>(text[i + 1])) % (vocab + 4));
    const std::string full = tok.decode(ids);
    (void)tok.decode(ids, false);
    eqat::TokenStreamer streamer(tok);
    std::string streamed;
    for (int64_t id : ids) streamed += streamer.push(id);
    streamed += streamer.finish();
    if (streamed != full) std::abort();

    for (const auto& [content, id] : tok.added_tokens()) {
      if (id < 0 || id >= vocab) std::abort();
      if (tok.piece_to_id(content) != id || tok.added_token_id(content) != id) std::abort();
      (void)tok.id_to_piece(id);
    }
    (void)tok.piece_to_id(text);
  } catch (const eqat::InputError& e) {
    fuzz::rejected(e);
  }
  return 0;
}
