// Byte-level BPE read from a Hugging Face tokenizer.json (the format of Llama-3, GPT-2 and their kin), producing the
// ids HF `tokenizers` produces:
//   1. added tokens (tokenizer.json "added_tokens": <|begin_of_text|>, <|eot_id|>, ...) are cut out of the text first,
//      leftmost-longest, honouring their lstrip/rstrip flags;
//   2. each remaining chunk is pre-tokenized by the "Split" regexes (PCRE2 in UTF + Unicode-property mode, so \p{L},
//      \p{N}, (?i:...) and (?!\S) mean what they mean in HF's Oniguruma/fancy-regex), behaviour "Isolated": matches
//      and the text between them become pieces; a "ByteLevel" step with use_regex applies GPT-2's own regex;
//   3. each piece's UTF-8 bytes map to GPT-2's printable byte alphabet (space -> "Ġ", newline -> "Ċ", ...) and are
//      merged by rank ("merges", lowest first, leftmost among equals); with "ignore_merges" a piece that is itself
//      in the vocabulary is one token.
// Decoding maps the byte alphabet back to bytes; added tokens decode to their text (special ones dropped on request).
// Anything else in the file (a normalizer, another model type, another Split behaviour) is refused by name.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace eqat {

class ByteLevelBpe {
 public:
  // InputError naming the file for a missing or malformed file or an unsupported feature.
  static ByteLevelBpe load(const std::string& tokenizer_json_path);
  // The same from the parsed file (callers that already read it); `source` names it in messages.
  static ByteLevelBpe from_json(const nlohmann::json& tokenizer_json, const std::string& source);
  // Whether a tokenizer.json describes a byte-level BPE (model.type BPE decoded by a ByteLevel decoder; Llama-2's
  // SentencePiece conversions decode with ByteFallback instead).
  static bool describes_byte_level_bpe(const std::string& tokenizer_json_path);
  static bool describes_byte_level_bpe(const nlohmann::json& tokenizer_json);

  std::vector<int64_t> encode(const std::string& text) const;  // no BOS/EOS (the caller adds them)
  std::string decode(const std::vector<int64_t>& ids, bool skip_special) const;
  std::string id_to_token(int64_t id) const;      // the vocabulary string (byte alphabet) or the added token's text
  int64_t token_to_id(const std::string& token) const;  // -1 when absent; added tokens included
  int64_t vocab_size() const;                     // one past the largest id
  const std::map<std::string, int64_t>& added_tokens() const;  // content -> id
  bool is_special(int64_t id) const;              // an added token marked "special"

  ByteLevelBpe(ByteLevelBpe&&) noexcept;
  ByteLevelBpe& operator=(ByteLevelBpe&&) noexcept;
  ~ByteLevelBpe();

 private:
  ByteLevelBpe();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace eqat
