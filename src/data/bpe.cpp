#include "data/bpe.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <functional>
#include <unordered_map>

#include "data/error.h"
#include "data/json_util.h"

namespace eqat {

namespace {

// GPT-2's byte alphabet: printable bytes stand for themselves, the other 68 move to U+0100.. in byte order.
struct ByteAlphabet {
  std::array<std::string, 256> to_char;  // byte -> its character, UTF-8
  std::unordered_map<std::string, uint8_t> to_byte;
  ByteAlphabet() {
    int next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const int cp = printable ? b : next++;
      std::string s;
      if (cp < 0x80) {
        s.push_back(static_cast<char>(cp));
      } else {  // every code point here is below U+0800: two bytes
        s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
        s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
      }
      to_char[b] = s;
      to_byte[s] = static_cast<uint8_t>(b);
    }
  }
};
const ByteAlphabet& alphabet() {
  static const ByteAlphabet a;
  return a;
}

size_t utf8_len(unsigned char c) { return c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1; }

// GPT-2's pre-tokenizer regex (ByteLevel with use_regex).
constexpr const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class Regex {
 public:
  Regex(const std::string& pattern, const std::string& source) {
    int err = 0;
    PCRE2_SIZE off = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                          PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &off, nullptr);
    if (!code_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      throw_input_error(str_cat(source, ": pre-tokenizer regex does not compile at offset ", off, " (",
                                reinterpret_cast<const char*>(msg), "): ", pattern));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // best effort: the interpreter is used when JIT is unavailable
  }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  ~Regex() { pcre2_code_free(code_); }

  // "Isolated" split: every match is a piece, and so is the text between matches.
  void split(const std::string& s, std::vector<std::string>* out) const {
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    const auto* subj = reinterpret_cast<PCRE2_SPTR>(s.data());
    size_t pos = 0, last = 0;
    while (pos <= s.size()) {
      const int rc = pcre2_match(code_, subj, s.size(), pos, 0, md, nullptr);
      if (rc < 0) break;  // no more matches (or the rest is invalid UTF-8: it stays one piece)
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      if (ov[0] > last) out->push_back(s.substr(last, ov[0] - last));
      if (ov[1] > ov[0]) {
        out->push_back(s.substr(ov[0], ov[1] - ov[0]));
        pos = last = ov[1];
      } else {  // an empty match: step over one character
        last = ov[0];
        pos = ov[0] + (ov[0] < s.size() ? utf8_len(static_cast<unsigned char>(s[ov[0]])) : 1);
      }
    }
    if (last < s.size()) out->push_back(s.substr(last));
    pcre2_match_data_free(md);
  }

 private:
  pcre2_code* code_ = nullptr;
};

struct Step {
  std::shared_ptr<Regex> regex;  // split by it (Isolated)
  bool prefix_space = false;     // ByteLevel add_prefix_space
};

}  // namespace

struct ByteLevelBpe::Impl {
  std::unordered_map<std::string, int64_t> vocab;
  std::vector<std::string> id_to_token;
  struct PairHash {
    size_t operator()(const std::pair<int64_t, int64_t>& p) const {
      return std::hash<int64_t>()(p.first * 1000003 ^ p.second);
    }
  };
  std::unordered_map<std::pair<int64_t, int64_t>, std::pair<int64_t, int64_t>, PairHash> merges;  // -> (rank, id)
  bool ignore_merges = false;
  std::vector<Step> steps;
  struct Added {
    std::string content;
    int64_t id;
    bool special, lstrip, rstrip;
  };
  std::vector<Added> added;  // longest content first (leftmost-longest matching)
  std::map<std::string, int64_t> added_map;
  std::unordered_map<int64_t, const Added*> added_by_id;
  int64_t size = 0;

  void bpe(const std::string& piece, std::vector<int64_t>* out) const;
  void encode_chunk(const std::string& chunk, std::vector<int64_t>* out) const;
};

ByteLevelBpe::ByteLevelBpe() : impl_(std::make_unique<Impl>()) {}
ByteLevelBpe::ByteLevelBpe(ByteLevelBpe&&) noexcept = default;
ByteLevelBpe& ByteLevelBpe::operator=(ByteLevelBpe&&) noexcept = default;
ByteLevelBpe::~ByteLevelBpe() = default;

bool ByteLevelBpe::describes_byte_level_bpe(const std::string& path) {
  return describes_byte_level_bpe(parse_json_path(path));
}

bool ByteLevelBpe::describes_byte_level_bpe(const nlohmann::json& j) {
  const auto is = [](const nlohmann::json& o, const char* key, const char* type) {
    return o.is_object() && o.contains(key) && o[key].is_object() && o[key].value("type", "") == type;
  };
  return is(j, "model", "BPE") && is(j, "decoder", "ByteLevel");
}

ByteLevelBpe ByteLevelBpe::load(const std::string& path) { return from_json(parse_json_path(path), path); }

ByteLevelBpe ByteLevelBpe::from_json(const nlohmann::json& j, const std::string& path) {
  ByteLevelBpe t;
  Impl& m = *t.impl_;
  try {
    EQAT_CHECK(j.is_object() && j.contains("model") && j["model"].is_object(), path, ": no \"model\" object");
    const auto& model = j["model"];
    EQAT_CHECK(model.value("type", "") == "BPE", path, ": model type '", model.value("type", "?"),
               "' is not supported (byte-level BPE only)");
    EQAT_CHECK(!model.contains("byte_fallback") || model["byte_fallback"].is_null() || !model["byte_fallback"].get<bool>(),
               path, ": BPE with byte_fallback (SentencePiece-style) is not a byte-level BPE");
    EQAT_CHECK(!j.contains("normalizer") || j["normalizer"].is_null(), path, ": normalizer '",
               j["normalizer"].is_object() ? j["normalizer"].value("type", "?") : std::string("?"),
               "' is not supported");
    m.ignore_merges = model.value("ignore_merges", false);
    for (const auto& [tok, id] : model.at("vocab").items()) {
      const int64_t i = id.get<int64_t>();
      EQAT_CHECK(i >= 0 && i < (int64_t{1} << 31), path, ": vocab id ", i, " out of range");
      m.vocab[tok] = i;
      m.size = std::max(m.size, i + 1);
    }
    const auto& merges = model.at("merges");
    EQAT_CHECK(merges.is_array(), path, ": \"merges\" must be a list");
    for (size_t r = 0; r < merges.size(); ++r) {
      std::string a, b;
      if (merges[r].is_string()) {  // "a b"
        const std::string s = merges[r].get<std::string>();
        const size_t sp = s.find(' ');
        EQAT_CHECK(sp != std::string::npos, path, ": merge ", r, " '", s, "' is not two tokens");
        a = s.substr(0, sp), b = s.substr(sp + 1);
      } else {  // ["a", "b"]
        EQAT_CHECK(merges[r].is_array() && merges[r].size() == 2, path, ": merge ", r, " is not a pair");
        a = merges[r][0].get<std::string>(), b = merges[r][1].get<std::string>();
      }
      auto ia = m.vocab.find(a), ib = m.vocab.find(b), iab = m.vocab.find(a + b);
      EQAT_CHECK(ia != m.vocab.end() && ib != m.vocab.end() && iab != m.vocab.end(), path, ": merge ", r, " '", a,
                 " ", b, "' names a token outside the vocabulary");
      m.merges.emplace(std::make_pair(ia->second, ib->second), std::make_pair(static_cast<int64_t>(r), iab->second));
    }

    // Pre-tokenizer: a ByteLevel step is required (the byte alphabet is what the vocabulary is written in).
    bool byte_level = false;
    std::function<void(const nlohmann::json&)> add_step = [&](const nlohmann::json& p) {
      const std::string type = p.value("type", "");
      if (type == "Sequence") {
        for (const auto& q : p.at("pretokenizers")) add_step(q);
      } else if (type == "Split") {
        EQAT_CHECK(p.value("behavior", "") == "Isolated" && !p.value("invert", false), path,
                   ": Split pre-tokenizer with behavior '", p.value("behavior", "?"), "'",
                   p.value("invert", false) ? " inverted" : "", " is not supported (Isolated only)");
        const auto& pat = p.at("pattern");
        std::string re;
        if (pat.contains("Regex")) {
          re = pat["Regex"].get<std::string>();
        } else {  // a literal string: quote it
          re = "\\Q" + pat.at("String").get<std::string>() + "\\E";
        }
        m.steps.push_back({std::make_shared<Regex>(re, path), false});
      } else if (type == "ByteLevel") {
        byte_level = true;
        Step s;
        s.prefix_space = p.value("add_prefix_space", false);
        if (p.value("use_regex", true)) s.regex = std::make_shared<Regex>(kGpt2Pattern, path);
        m.steps.push_back(s);
      } else {
        throw_input_error(str_cat(path, ": pre-tokenizer '", type, "' is not supported"));
      }
    };
    EQAT_CHECK(j.contains("pre_tokenizer") && j["pre_tokenizer"].is_object(), path, ": no pre_tokenizer");
    add_step(j["pre_tokenizer"]);
    EQAT_CHECK(byte_level, path, ": the pre-tokenizer has no ByteLevel step (not a byte-level BPE)");
    EQAT_CHECK(j.contains("decoder") && j["decoder"].is_object() && j["decoder"].value("type", "") == "ByteLevel",
               path, ": decoder must be ByteLevel");

    if (j.contains("added_tokens") && j["added_tokens"].is_array())
      for (const auto& a : j["added_tokens"]) {
        Impl::Added x{a.at("content").get<std::string>(), a.at("id").get<int64_t>(), a.value("special", false),
                      a.value("lstrip", false), a.value("rstrip", false)};
        EQAT_CHECK(!x.content.empty() && x.id >= 0 && x.id < (int64_t{1} << 31), path, ": bad added token '",
                   x.content, "'");
        m.added.push_back(x);
        m.size = std::max(m.size, x.id + 1);
      }
  } catch (const nlohmann::json::exception& e) {
    throw_input_error(str_cat(path, ": malformed tokenizer.json (", json_error_message(e), ")"));
  }
  std::stable_sort(m.added.begin(), m.added.end(),
                   [](const Impl::Added& a, const Impl::Added& b) { return a.content.size() > b.content.size(); });
  for (const auto& a : m.added) {
    m.added_map[a.content] = a.id;
  }
  for (const auto& a : m.added) m.added_by_id[a.id] = &a;
  m.id_to_token.assign(static_cast<size_t>(m.size), "");
  for (const auto& [tok, id] : m.vocab) m.id_to_token[id] = tok;
  for (const auto& a : m.added) m.id_to_token[a.id] = a.content;
  return t;
}

void ByteLevelBpe::Impl::bpe(const std::string& piece, std::vector<int64_t>* out) const {
  const ByteAlphabet& ab = alphabet();
  std::string mapped;
  for (unsigned char c : piece) mapped += ab.to_char[c];
  if (ignore_merges) {
    auto it = vocab.find(mapped);
    if (it != vocab.end()) {
      out->push_back(it->second);
      return;
    }
  }
  std::vector<int64_t> ids;
  for (unsigned char c : piece) {
    auto it = vocab.find(ab.to_char[c]);
    // A vocabulary without some byte cannot spell this piece; HF drops such bytes (no unk for byte-level BPE).
    if (it != vocab.end()) ids.push_back(it->second);
  }
  // Merge the lowest-ranked adjacent pair (the leftmost among equals) until none is in the merge table.
  while (ids.size() > 1) {
    int64_t best_rank = INT64_MAX, best_id = -1;
    size_t best_pos = 0;
    for (size_t i = 0; i + 1 < ids.size(); ++i) {
      auto it = merges.find({ids[i], ids[i + 1]});
      if (it != merges.end() && it->second.first < best_rank)
        best_rank = it->second.first, best_id = it->second.second, best_pos = i;
    }
    if (best_id < 0) break;
    ids[best_pos] = best_id;
    ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(best_pos) + 1);
  }
  out->insert(out->end(), ids.begin(), ids.end());
}

void ByteLevelBpe::Impl::encode_chunk(const std::string& chunk, std::vector<int64_t>* out) const {
  std::vector<std::string> pieces{chunk}, next;
  for (const Step& s : steps) {
    next.clear();
    for (auto& p : pieces) {
      if (s.prefix_space && (p.empty() || p[0] != ' ')) p = " " + p;
      if (s.regex) s.regex->split(p, &next);
      else next.push_back(p);
    }
    pieces.swap(next);
  }
  for (const auto& p : pieces)
    if (!p.empty()) bpe(p, out);
}

std::vector<int64_t> ByteLevelBpe::encode(const std::string& text) const {
  const Impl& m = *impl_;
  std::vector<int64_t> out;
  auto is_ws = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; };
  size_t start = 0;
  while (start < text.size()) {
    // The leftmost added token; at one position the longest (m.added is longest first).
    size_t best = std::string::npos;
    const Impl::Added* hit = nullptr;
    for (const auto& a : m.added) {
      const size_t p = text.find(a.content, start);
      if (p != std::string::npos && (p < best || (p == best && hit && a.content.size() > hit->content.size())))
        best = p, hit = &a;
    }
    if (!hit) break;
    size_t chunk_end = best, next = best + hit->content.size();
    if (hit->lstrip)
      while (chunk_end > start && is_ws(text[chunk_end - 1])) --chunk_end;
    if (hit->rstrip)
      while (next < text.size() && is_ws(text[next])) ++next;
    if (chunk_end > start) m.encode_chunk(text.substr(start, chunk_end - start), &out);
    out.push_back(hit->id);
    start = next;
  }
  if (start < text.size()) m.encode_chunk(text.substr(start), &out);
  return out;
}

std::string ByteLevelBpe::decode(const std::vector<int64_t>& ids, bool skip_special) const {
  const Impl& m = *impl_;
  const ByteAlphabet& ab = alphabet();
  std::string out;
  for (int64_t id : ids) {
    if (id < 0 || id >= m.size) continue;
    auto a = m.added_by_id.find(id);
    if (a != m.added_by_id.end()) {
      if (!(skip_special && a->second->special)) out += a->second->content;
      continue;
    }
    const std::string& tok = m.id_to_token[static_cast<size_t>(id)];
    for (size_t i = 0; i < tok.size();) {
      const size_t n = std::min(utf8_len(static_cast<unsigned char>(tok[i])), tok.size() - i);
      auto b = ab.to_byte.find(tok.substr(i, n));
      if (b != ab.to_byte.end()) out.push_back(static_cast<char>(b->second));
      else out += tok.substr(i, n);  // not in the byte alphabet: kept as written
      i += n;
    }
  }
  return out;
}

std::string ByteLevelBpe::id_to_token(int64_t id) const {
  return id >= 0 && id < impl_->size ? impl_->id_to_token[static_cast<size_t>(id)] : std::string();
}

int64_t ByteLevelBpe::token_to_id(const std::string& token) const {
  auto a = impl_->added_map.find(token);
  if (a != impl_->added_map.end()) return a->second;
  auto v = impl_->vocab.find(token);
  return v == impl_->vocab.end() ? -1 : v->second;
}

int64_t ByteLevelBpe::vocab_size() const { return impl_->size; }
const std::map<std::string, int64_t>& ByteLevelBpe::added_tokens() const { return impl_->added_map; }
bool ByteLevelBpe::is_special(int64_t id) const {
  auto a = impl_->added_by_id.find(id);
  return a != impl_->added_by_id.end() && a->second->special;
}

}  // namespace eqat
