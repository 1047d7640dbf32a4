// Llama-family tokenizer: a SentencePiece model (tokenizer.model) plus the added tokens that HF keeps beside it
// (tokenizer.json "added_tokens", added_tokens.json, tokenizer_config.json "added_tokens_decoder"), e.g. <image>
// and <pad> in llava-hf. Encoding follows HF's LlamaTokenizer with legacy=True (or legacy=False when
// tokenizer_config.json says so: see legacy()): the text is split on added
// tokens (and on the special-token texts <s> </s> <unk>), each remaining chunk is SentencePiece-encoded on its
// own (each gets the dummy-prefix "▁"), BOS is prepended when asked, no EOS (LLAVA.md §4.2).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace eqat {

class ByteLevelBpe;

class Tokenizer {
 public:
  // `dir` holds tokenizer.model and optionally the HF JSON files, or (Llama-3 and other byte-level BPE models) a
  // tokenizer.json alone (data/bpe.h); BOS/EOS/pad then come from tokenizer_config.json. InputError naming the file
  // when missing/corrupt.
  static Tokenizer load(const std::string& dir);
  // From a tokenizer.model path alone (no added tokens).
  static Tokenizer from_model_file(const std::string& path);

  std::vector<int64_t> encode(const std::string& text, bool add_bos) const;
  // Decodes ids to text; special/control tokens (BOS, EOS, pad, added special tokens) are dropped when
  // skip_special. Like HF decode(...).strip() is NOT applied here.
  std::string decode(const std::vector<int64_t>& ids, bool skip_special = true) const;
  // The piece string of one id (for --print-prompt).
  std::string id_to_piece(int64_t id) const;
  int64_t piece_to_id(const std::string& piece) const;  // -1 when unknown (added tokens included)

  int64_t vocab_size() const;  // SentencePiece pieces + added tokens beyond them
  int64_t bos_id() const { return bos_id_; }
  int64_t eos_id() const { return eos_id_; }
  int64_t pad_id() const { return pad_id_; }      // -1 when none
  int64_t unk_id() const { return unk_id_; }
  // Id of an added token by content, -1 when absent (e.g. "<image>").
  int64_t added_token_id(const std::string& content) const;
  const std::map<std::string, int64_t>& added_tokens() const { return added_; }

  bool byte_level_bpe() const { return static_cast<bool>(bpe_); }
  // tokenizer_config.json "legacy" (default true). false: SentencePiece's dummy-prefix "▁" only at the very start of
  // the text, not on text after an added/special token (HF's Metaspace prepend_scheme "first").
  bool legacy() const { return legacy_; }

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

 private:
  Tokenizer();
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::shared_ptr<const ByteLevelBpe> bpe_;  // set: a byte-level BPE tokenizer.json instead of SentencePiece
  std::map<std::string, int64_t> added_;   // content -> id (beyond or inside the SP vocab)
  std::map<int64_t, bool> added_special_;  // id -> special
  int64_t bos_id_ = 1, eos_id_ = 2, pad_id_ = -1, unk_id_ = 0;
  bool legacy_ = true;
};

// Incremental detokenizer for streaming: feed ids one by one, get the newly completed text (never splits a
// UTF-8 sequence, handles SentencePiece's leading-space rule the way full decode() does).
class TokenStreamer {
 public:
  explicit TokenStreamer(const Tokenizer& tok) : tok_(tok) {}
  std::string push(int64_t id);
  std::string finish();  // whatever is still pending

 private:
  const Tokenizer& tok_;
  std::vector<int64_t> ids_;
  size_t emitted_ = 0;  // bytes of decode(ids_) already returned
};

// Writes tokenizer_config.json and special_tokens_map.json of a Llama sentencepiece tokenizer as HF writes them,
// and, with image_id >= 0, <image> (image_id) and <pad> (pad_id) as added special tokens (+ added_tokens.json).
void write_llama_tokenizer_files(const std::string& dir, int64_t image_id, int64_t pad_id, int64_t model_max_length);

}  // namespace eqat
