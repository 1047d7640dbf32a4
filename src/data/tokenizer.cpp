// Llama-family tokenizer (see tokenizer.h): SentencePiece for plain text, HF added tokens split out first.
// Decoding follows SentencePiece's piece-to-text rules ("▁" -> space, byte pieces -> UTF-8 with U+FFFD for
// invalid bytes) but removes the dummy-prefix space only once, from the first kept piece, the way HF decodes
// generated ids: pieces after a skipped or kept special token keep their space.
#include "data/tokenizer.h"

#include <cctype>
#include <cstdlib>

#include <sentencepiece_processor.h>

#include <algorithm>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <utility>

#include "data/bpe.h"
#include "data/error.h"
#include "data/fs.h"

namespace eqat {
namespace {

using json = nlohmann::json;

const char kSpaceMark[] = "\xE2\x96\x81";       // U+2581 "▁", SentencePiece's whitespace symbol
const char kReplacementChar[] = "\xEF\xBF\xBD";  // U+FFFD

json parse_json_file(const std::string& path) {
  const std::string text = read_file(path);
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  EQAT_CHECK(!j.is_discarded(), path, ": not valid JSON");
  EQAT_CHECK(j.is_object(), path, ": expected a JSON object at the top level");
  return j;
}

// A special-token field of tokenizer_config.json / special_tokens_map.json: a string, an AddedToken object
// {"content": ...}, or null. Returns "" when absent or null.
std::string token_content(const json& obj, const char* key, const std::string& source) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return "";
  if (it->is_string()) return it->get<std::string>();
  EQAT_CHECK(it->is_object() && it->contains("content") && (*it)["content"].is_string(), source, ": \"", key,
             "\" must be a string or an object with a string \"content\"");
  return (*it)["content"].get<std::string>();
}

// "special" of an added-token entry; absent means special (HF's AddedToken entries in these files always are).
bool special_flag(const json& t, const std::string& source) {
  auto it = t.find("special");
  if (it == t.end() || it->is_null()) return true;
  EQAT_CHECK(it->is_boolean(), source, ": added token \"special\" must be true or false");
  return it->get<bool>();
}

int64_t json_id(const json& v, const std::string& source, const std::string& what) {
  EQAT_CHECK(v.is_number_integer() && v.get<int64_t>() >= 0, source, ": ", what, " needs a non-negative integer id");
  return v.get<int64_t>();
}

// Length of the valid UTF-8 sequence starting at s[i], or 0 when it is invalid or incomplete. Follows the
// Unicode "well-formed" table (no overlongs, no surrogates, nothing above U+10FFFF).
size_t utf8_valid_len(const std::string& s, size_t i) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  if (c < 0x80) return 1;
  size_t n;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (i + n > s.size()) return 0;
  if (b(i + 1) < lo || b(i + 1) > hi) return 0;
  for (size_t k = 2; k < n; ++k)
    if (b(i + k) < 0x80 || b(i + k) > 0xBF) return 0;
  return n;
}

// Byte-fallback pieces decode as UTF-8 with every byte that does not start a valid sequence replaced by U+FFFD,
// which is what SentencePiece does; HF fast tokenizers would replace a whole invalid run instead, but this rule
// keeps decode(prefix) a prefix of decode(all), which streaming relies on.
void flush_bytes(std::string* bytes, std::string* out) {
  size_t i = 0;
  while (i < bytes->size()) {
    const size_t n = utf8_valid_len(*bytes, i);
    if (n == 0) {
      out->append(kReplacementChar);
      ++i;
    } else {
      out->append(*bytes, i, n);
      i += n;
    }
  }
  bytes->clear();
}

// "<0xAB>" -> 0xAB.
int byte_piece_value(const std::string& piece) {
  // The piece text comes from tokenizer.model (sentencepiece marks it BYTE but does not check its spelling).
  auto hex = [](char c) { return std::isxdigit(static_cast<unsigned char>(c)) != 0; };
  EQAT_CHECK(piece.size() == 6 && piece.compare(0, 3, "<0x") == 0 && piece[5] == '>' && hex(piece[3]) && hex(piece[4]),
             "tokenizer.model: byte piece '", piece, "' is not of the form <0xHH>");
  return static_cast<int>(std::strtol(piece.substr(3, 2).c_str(), nullptr, 16));
}

std::string replace_space_marks(const std::string& piece) {
  std::string out;
  out.reserve(piece.size());
  for (size_t i = 0; i < piece.size();) {
    if (piece.compare(i, 3, kSpaceMark) == 0) {
      out.push_back(' ');
      i += 3;
    } else {
      out.push_back(piece[i++]);
    }
  }
  return out;
}

}  // namespace

Tokenizer::Tokenizer() : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_model_file(const std::string& path) {
  const std::string bytes = read_file(path);
  Tokenizer tok;
  sentencepiece::util::Status status;
  try {
    status = tok.sp_->LoadFromSerializedProto(bytes);
  } catch (const std::exception& e) {
    // libsentencepiece validates less than it builds: e.g. an empty piece in a unigram model makes its trie
    // builder (darts_clone) throw instead of returning a status.
    throw_input_error(str_cat(path, ": not a valid SentencePiece model (", e.what(), ")"));
  }
  EQAT_CHECK(status.ok(), path, ": not a valid SentencePiece model (", status.ToString(), ")");
  EQAT_CHECK(tok.sp_->GetPieceSize() > 0, path, ": SentencePiece model has no pieces");
  // SentencePiece reports -1 for ids the model does not define; Llama models define all three.
  tok.unk_id_ = tok.sp_->unk_id();
  tok.bos_id_ = tok.sp_->bos_id();
  tok.eos_id_ = tok.sp_->eos_id();
  tok.pad_id_ = tok.sp_->pad_id();
  return tok;
}

Tokenizer Tokenizer::load(const std::string& dir) {
  const std::string model_path = path_join(dir, "tokenizer.model");
  const std::string tj_path = path_join(dir, "tokenizer.json");
  // Byte-level BPE models (Llama-3, ...) ship tokenizer.json without tokenizer.model (read once: it can be MBs).
  json bpe_json;
  if (!file_exists(model_path) && file_exists(tj_path)) {
    bpe_json = parse_json_file(tj_path);
    if (!ByteLevelBpe::describes_byte_level_bpe(bpe_json)) bpe_json = json();
  }
  const bool bpe = !bpe_json.is_null();
  EQAT_CHECK(bpe || file_exists(model_path), dir,
             ": no tokenizer.model and no byte-level BPE tokenizer.json (the tokenizer is required)");
  Tokenizer tok = bpe ? Tokenizer() : from_model_file(model_path);
  if (bpe) {
    tok.bpe_ = std::make_shared<const ByteLevelBpe>(ByteLevelBpe::from_json(bpe_json, tj_path));
    for (const auto& [content, id] : tok.bpe_->added_tokens()) {
      tok.added_[content] = id;
      tok.added_special_[id] = tok.bpe_->is_special(id);
    }
    tok.bos_id_ = tok.eos_id_ = tok.unk_id_ = tok.pad_id_ = -1;  // named by tokenizer_config.json below
  }

  const std::string tc_path = path_join(dir, "tokenizer_config.json");
  const json tc = file_exists(tc_path) ? parse_json_file(tc_path) : json();
  if (!tok.bpe_) {  // SentencePiece: the added tokens come from the HF files around tokenizer.model
    const auto add = [&tok](const std::string& content, int64_t id, bool special, const std::string& source) {
      EQAT_CHECK(!content.empty(), source, ": added token ", id, " has empty content");
      // Token ids are int32 everywhere (SentencePiece, HF, embedding rows); the bound also keeps vocab_size() = id + 1
      // from overflowing.
      EQAT_CHECK(id <= INT32_MAX, source, ": added token \"", content, "\" has id ", id, ", beyond the largest token id ",
                 INT32_MAX);
      auto it = tok.added_.find(content);
      EQAT_CHECK(it == tok.added_.end() || it->second == id, source, ": added token \"", content,
                 "\" has two ids (", it == tok.added_.end() ? 0 : it->second, " and ", id, ")");
      tok.added_[content] = id;
      tok.added_special_[id] = special;
    };

    // The three files overlap (recent checkpoints carry all of them with identical content); each one only adds.
    if (file_exists(tj_path)) {
      const json tj = parse_json_file(tj_path);
      if (tj.contains("added_tokens") && !tj["added_tokens"].is_null()) {
        EQAT_CHECK(tj["added_tokens"].is_array(), tj_path, ": \"added_tokens\" must be an array");
        for (const json& t : tj["added_tokens"]) {
          EQAT_CHECK(t.is_object() && t.contains("id") && t.contains("content") && t["content"].is_string(), tj_path,
                     ": each \"added_tokens\" entry needs \"id\" and \"content\"");
          add(t["content"].get<std::string>(), json_id(t["id"], tj_path, "added token"),
              special_flag(t, tj_path), tj_path);
        }
      }
    }
    const std::string at_path = path_join(dir, "added_tokens.json");
    if (file_exists(at_path)) {
      // {content: id} without a special flag: LLaVA's entries (<image>, <pad>, <im_start>...) are all
      // control-like, so they count as special unless another file says otherwise.
      const json at = parse_json_file(at_path);
      for (const auto& [content, id] : at.items()) {
        const int64_t i = json_id(id, at_path, "\"" + content + "\"");
        const bool special = tok.added_special_.count(i) ? tok.added_special_[i] : true;
        add(content, i, special, at_path);
      }
    }
    if (file_exists(tc_path)) {
      if (tc.contains("added_tokens_decoder") && !tc["added_tokens_decoder"].is_null()) {
        EQAT_CHECK(tc["added_tokens_decoder"].is_object(), tc_path, ": \"added_tokens_decoder\" must be an object");
        for (const auto& [key, t] : tc["added_tokens_decoder"].items()) {
          int64_t id = -1;
          try {
            size_t used = 0;
            id = std::stoll(key, &used);
            if (used != key.size()) id = -1;
          } catch (const std::exception&) {
          }
          EQAT_CHECK(id >= 0, tc_path, ": \"added_tokens_decoder\" key \"", key, "\" is not a token id");
          EQAT_CHECK(t.is_object() && t.contains("content") && t["content"].is_string(), tc_path,
                     ": \"added_tokens_decoder\" entry ", key, " needs a string \"content\"");
          add(t["content"].get<std::string>(), id, special_flag(t, tc_path), tc_path);
        }
      }
    }

    // Added ids inside the SentencePiece range must name the same piece (tokenizer.json repeats <unk> <s> </s>);
    // anything else would silently re-map a vocabulary entry.
    for (const auto& [content, id] : tok.added_) {
      if (id < tok.sp_->GetPieceSize())
        EQAT_CHECK(tok.sp_->IdToPiece(static_cast<int>(id)) == content, dir, ": added token \"", content, "\" reuses id ",
                   id, ", which tokenizer.model assigns to \"", tok.sp_->IdToPiece(static_cast<int>(id)), "\"");
    }
  }

  if (tc.is_object()) {
    const auto resolve = [&](const char* key, int64_t* field, bool allow_unset) {
      const std::string content = token_content(tc, key, tc_path);
      if (content.empty()) {
        if (allow_unset && tc.contains(key)) *field = -1;  // an explicit null pad_token means "no pad"
        return;
      }
      const int64_t id = tok.piece_to_id(content);
      EQAT_CHECK(id >= 0, tc_path, ": ", key, " \"", content, "\" is not in the vocabulary");
      *field = id;
    };
    resolve("bos_token", &tok.bos_id_, false);
    resolve("eos_token", &tok.eos_id_, false);
    resolve("unk_token", &tok.unk_id_, false);
    resolve("pad_token", &tok.pad_id_, true);
    if (tc.contains("legacy") && tc["legacy"].is_boolean()) tok.legacy_ = tc["legacy"].get<bool>();
  }
  return tok;
}

int64_t Tokenizer::vocab_size() const {
  if (bpe_) return bpe_->vocab_size();
  int64_t n = sp_->GetPieceSize();
  for (const auto& [content, id] : added_) n = std::max(n, id + 1);
  return n;
}

int64_t Tokenizer::added_token_id(const std::string& content) const {
  auto it = added_.find(content);
  return it == added_.end() ? -1 : it->second;
}

int64_t Tokenizer::piece_to_id(const std::string& piece) const {
  const int64_t added = added_token_id(piece);
  if (added >= 0) return added;
  if (bpe_) return bpe_->token_to_id(piece);
  const int id = sp_->PieceToId(piece);
  // SentencePiece answers unk_id for unknown pieces; only "<unk>" itself may legitimately map there.
  if (id < 0 || (sp_->IsUnknown(id) && sp_->IdToPiece(id) != piece)) return -1;
  return id;
}

std::string Tokenizer::id_to_piece(int64_t id) const {
  EQAT_CHECK(id >= 0 && id < vocab_size(), "token id ", id, " is out of range [0, ", vocab_size(), ")");
  if (bpe_) return bpe_->id_to_token(id);
  if (id < sp_->GetPieceSize()) return sp_->IdToPiece(static_cast<int>(id));
  for (const auto& [content, i] : added_)
    if (i == id) return content;
  return "";  // a hole between the SentencePiece vocabulary and a higher added id
}

std::vector<int64_t> Tokenizer::encode(const std::string& text, bool add_bos) const {
  if (bpe_) {
    std::vector<int64_t> ids;
    if (add_bos) {
      EQAT_CHECK(bos_id_ >= 0, "the tokenizer defines no BOS token (tokenizer_config.json names no bos_token), so ",
                 "none can be prepended");
      ids.push_back(bos_id_);
    }
    for (int64_t id : bpe_->encode(text)) ids.push_back(id);
    return ids;
  }
  // Texts that are split out of the input and map straight to one id: every added token plus the special
  // pieces' own spelling (multi-turn vicuna prompts contain a literal "</s>"). Longest match wins at a position,
  // as in HF's added-token trie.
  std::vector<std::pair<std::string, int64_t>> splitters(added_.begin(), added_.end());
  for (int64_t id : {unk_id_, bos_id_, eos_id_}) {
    if (id < 0 || id >= sp_->GetPieceSize()) continue;
    const std::string& piece = sp_->IdToPiece(static_cast<int>(id));
    if (!added_.count(piece)) splitters.emplace_back(piece, id);
  }
  std::sort(splitters.begin(), splitters.end(),
            [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });

  std::vector<int64_t> ids;
  if (add_bos) {
    // SentencePiece reports bos_id -1 when tokenizer.model has no control "<s>"; -1 must never reach a model.
    EQAT_CHECK(bos_id_ >= 0, "the tokenizer defines no BOS token (tokenizer.model has no control piece \"<s>\" and ",
               "tokenizer_config.json names no bos_token), so none can be prepended");
    ids.push_back(bos_id_);
  }
  std::vector<int> chunk_ids;
  const auto encode_chunk = [&](size_t begin, size_t end) {
    if (begin >= end) return;
    // legacy (LLaVA's training): every chunk gets SentencePiece's dummy-prefix "▁". Non-legacy: only a chunk at the
    // start of the text; later ones are encoded behind the unk piece's text, whose pieces are then dropped (HF's
    // own way of encoding without the prefix).
    std::string chunk = text.substr(begin, end - begin);
    size_t drop = 0;
    if (!legacy_ && begin > 0 && unk_id_ >= 0) {
      const std::string unk = sp_->IdToPiece(static_cast<int>(unk_id_));
      std::vector<int> unk_ids;
      EQAT_CHECK(sp_->Encode(unk, &unk_ids).ok(), "SentencePiece failed to encode the unk piece");
      drop = unk_ids.size();
      chunk = unk + chunk;
    }
    const auto status = sp_->Encode(chunk, &chunk_ids);
    EQAT_CHECK(status.ok(), "SentencePiece failed to encode text (", status.ToString(), ")");
    ids.insert(ids.end(), chunk_ids.begin() + static_cast<std::ptrdiff_t>(std::min(drop, chunk_ids.size())),
               chunk_ids.end());
  };
  size_t chunk_begin = 0;
  for (size_t i = 0; i < text.size();) {
    const std::pair<std::string, int64_t>* match = nullptr;
    for (const auto& s : splitters) {
      if (text.compare(i, s.first.size(), s.first) == 0) {
        match = &s;  // sorted longest first
        break;
      }
    }
    if (match == nullptr) {
      ++i;
      continue;
    }
    encode_chunk(chunk_begin, i);
    ids.push_back(match->second);
    i += match->first.size();
    chunk_begin = i;
  }
  encode_chunk(chunk_begin, text.size());
  return ids;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids, bool skip_special) const {
  if (bpe_) {
    for (int64_t id : ids) EQAT_ASSERT(id >= 0, "cannot decode negative token id ", id);
    return bpe_->decode(ids, skip_special);
  }
  const int64_t n_sp = sp_->GetPieceSize();
  const int64_t n_vocab = vocab_size();
  std::string out, bytes;
  bool at_start = true;  // nothing kept yet: the next normal piece carries the dummy prefix
  for (int64_t id : ids) {
    // Ids past the tokenizer (llava-hf pads embed/lm_head to a multiple of 64: rows 32002..32063 have no piece)
    // decode to nothing, as HF's fast tokenizers do; a negative id is a caller bug.
    EQAT_ASSERT(id >= 0, "cannot decode negative token id ", id);
    if (id >= n_vocab) continue;
    if (id >= n_sp || added_special_.count(id)) {
      // An added token (or an SP id that the HF files list as added): its text verbatim.
      auto sp_it = added_special_.find(id);
      const bool special = sp_it != added_special_.end() ? sp_it->second : true;
      if (special && skip_special) continue;
      flush_bytes(&bytes, &out);
      out += id_to_piece(id);
      at_start = false;
      continue;
    }
    const int i = static_cast<int>(id);
    if (sp_->IsControl(i) || sp_->IsUnknown(i) || id == pad_id_) {
      // HF counts <s> </s> <unk> and the pad token as special; unskipped they appear as their piece text.
      if (skip_special) continue;
      flush_bytes(&bytes, &out);
      out += sp_->IdToPiece(i);
      at_start = false;
      continue;
    }
    if (sp_->IsByte(i)) {
      bytes.push_back(static_cast<char>(byte_piece_value(sp_->IdToPiece(i))));
      at_start = false;
      continue;
    }
    flush_bytes(&bytes, &out);
    std::string text = replace_space_marks(sp_->IdToPiece(i));
    // The dummy prefix added at encode time: one space, removed once and only from the first kept piece (a
    // lone "▁" first piece becomes empty and the next piece keeps its space, as HF's Strip decoder does).
    if (at_start && !text.empty() && text[0] == ' ') text.erase(0, 1);
    at_start = false;
    out += text;
  }
  flush_bytes(&bytes, &out);
  return out;
}

namespace {
// Bytes of `s` that can be shown now: everything except a trailing incomplete UTF-8 sequence and trailing
// U+FFFD (an incomplete byte-fallback character that the next byte token may still complete).
size_t stable_prefix_len(const std::string& s) {
  size_t end = s.size();
  for (;;) {
    if (end >= 3 && s.compare(end - 3, 3, kReplacementChar) == 0) {
      end -= 3;
      continue;
    }
    // Walk back over continuation bytes to the lead byte of the last character.
    size_t lead = end;
    while (lead > 0 && end - lead < 4 && (static_cast<unsigned char>(s[lead - 1]) & 0xC0) == 0x80) --lead;
    if (lead > 0 && end - lead < 4) {
      const size_t start = lead - 1;
      if (utf8_valid_len(s, start) == 0 && static_cast<unsigned char>(s[start]) >= 0xC0) end = start;
    }
    return end;
  }
}
}  // namespace

std::string TokenStreamer::push(int64_t id) {
  ids_.push_back(id);
  // Re-decoding everything keeps the result identical to decode() by construction; answers are at most a few
  // thousand tokens, so the quadratic cost stays in the microseconds-per-token range.
  const std::string full = tok_.decode(ids_);
  const size_t stable = stable_prefix_len(full);
  if (stable <= emitted_) return "";
  std::string fresh = full.substr(emitted_, stable - emitted_);
  emitted_ = stable;
  return fresh;
}

std::string TokenStreamer::finish() {
  const std::string full = tok_.decode(ids_);
  std::string rest = emitted_ < full.size() ? full.substr(emitted_) : "";
  emitted_ = full.size();
  return rest;
}

void write_llama_tokenizer_files(const std::string& dir, int64_t image_id, int64_t pad_id, int64_t model_max_length) {
  using nlohmann::ordered_json;
  const bool added = image_id >= 0;
  auto tok = [](const std::string& content) {
    return ordered_json{{"content", content}, {"lstrip", false}, {"normalized", false}, {"rstrip", false},
                        {"single_word", false}, {"special", true}};
  };
  ordered_json dec;
  dec["0"] = tok("<unk>"), dec["1"] = tok("<s>"), dec["2"] = tok("</s>");
  if (added) {
    dec[std::to_string(image_id)] = tok("<image>");
    dec[std::to_string(pad_id)] = tok("<pad>");
  }
  ordered_json cfg{{"add_bos_token", true},      {"add_eos_token", false},   {"added_tokens_decoder", dec},
                   {"bos_token", "<s>"},         {"clean_up_tokenization_spaces", false},
                   {"eos_token", "</s>"},        {"legacy", true},           {"model_max_length", model_max_length}};
  if (added) cfg["pad_token"] = "<pad>";
  cfg["padding_side"] = "left";
  cfg["sp_model_kwargs"] = ordered_json::object();
  cfg["tokenizer_class"] = "LlamaTokenizer";
  cfg["unk_token"] = "<unk>";
  cfg["use_default_system_prompt"] = false;
  write_file_atomic(path_join(dir, "tokenizer_config.json"), cfg.dump(2) + "\n");
  if (added)
    write_file_atomic(path_join(dir, "added_tokens.json"),
                      ordered_json{{"<image>", image_id}, {"<pad>", pad_id}}.dump(2) + "\n");
  auto sp = [](const std::string& c) {
    return ordered_json{{"content", c}, {"lstrip", false}, {"normalized", false}, {"rstrip", false}, {"single_word", false}};
  };
  ordered_json special{{"bos_token", sp("<s>")}, {"eos_token", sp("</s>")}};
  if (added) special["pad_token"] = sp("<pad>");
  special["unk_token"] = sp("<unk>");
  write_file_atomic(path_join(dir, "special_tokens_map.json"), special.dump(2) + "\n");
}

}  // namespace eqat
