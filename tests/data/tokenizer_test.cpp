// Tokenizer tests: llama.cpp's 46 Llama-2 SentencePiece vectors, the LLaVA prompt goldens of LLAVA.md §4.2,
// special-token splitting, decode round trips, streaming, and the error messages.
#include "data/tokenizer.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "data/error.h"
#include "test_util.h"

namespace eqat {
namespace tokenizer_test {

using eqat_test::data_path;

using eqat_test::TempDir;
using Ids = std::vector<int64_t>;

const char kLlamaDir[] = "tokenizers/llama2";

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// Fills `dir` like a llava-hf tokenizer: the Llama-2 model plus <image>=32000, <pad>=32001 declared by `file`.
void make_llava_hf_dir(const TempDir& dir, const std::string& file) {
  write(dir.str("tokenizer.model"), slurp(data_path(std::string(kLlamaDir) + "/tokenizer.model")));
  if (file == "tokenizer_config.json") {
    write(dir.str(file), R"({"added_tokens_decoder": {
        "0": {"content": "<unk>", "special": true}, "1": {"content": "<s>", "special": true},
        "2": {"content": "</s>", "special": true}, "32000": {"content": "<image>", "special": true},
        "32001": {"content": "<pad>", "special": true}},
      "bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": false}, "pad_token": "<pad>",
      "unk_token": "<unk>", "legacy": true})");
  } else if (file == "added_tokens.json") {
    write(dir.str(file), R"({"<image>": 32000, "<pad>": 32001})");
  } else if (file == "tokenizer.json") {
    write(dir.str(file), R"({"version": "1.0", "added_tokens": [
        {"id": 0, "content": "<unk>", "special": true}, {"id": 32000, "content": "<image>", "special": true},
        {"id": 32001, "content": "<pad>", "special": true}], "model": {"type": "BPE"}})");
  }
}

// A serialized SentencePiece ModelProto with the given pieces (sentencepiece_model.proto: ModelProto 1 pieces,
// 2 trainer_spec; SentencePiece 1 piece, 2 score, 3 type; TrainerSpec 3 model_type, 40..42 unk/bos/eos ids) —
// enough for the hand-made models the fuzz regressions need (fuzz/README.md).
struct SpPiece {
  std::string text;
  int type;  // NORMAL 1, UNKNOWN 2, CONTROL 3
};
std::string sp_model_proto(const std::vector<SpPiece>& pieces, int model_type) {
  const auto varint = [](std::string& out, uint64_t v) {
    for (; v >= 0x80; v >>= 7) out += static_cast<char>((v & 0x7F) | 0x80);
    out += static_cast<char>(v);
  };
  const auto field_int = [&](std::string& out, int field, uint64_t v) {
    varint(out, static_cast<uint64_t>(field) << 3);
    varint(out, v);
  };
  const auto field_bytes = [&](std::string& out, int field, const std::string& b) {
    varint(out, static_cast<uint64_t>(field) << 3 | 2);
    varint(out, b.size());
    out += b;
  };
  std::string model;
  for (const SpPiece& p : pieces) {
    std::string sp;
    field_bytes(sp, 1, p.text);
    sp += std::string("\x15\x00\x00\x80\xbf", 5);  // field 2 (fixed32): score -1.0f
    field_int(sp, 3, static_cast<uint64_t>(p.type));
    field_bytes(model, 1, sp);
  }
  std::string trainer;
  field_int(trainer, 3, static_cast<uint64_t>(model_type));  // 1 unigram, 2 BPE
  field_int(trainer, 40, 0);
  field_int(trainer, 41, 1);
  field_int(trainer, 42, 2);
  field_bytes(model, 2, trainer);
  return model;
}

Ids replace_id(Ids ids, int64_t from, int64_t to) {
  for (auto& id : ids)
    if (id == from) id = to;
  return ids;
}

TEST(Tokenizer, LlamaCppVocabVectors) {
  const Tokenizer tok = Tokenizer::load(data_path(kLlamaDir));
  EXPECT_EQ(tok.vocab_size(), 32000);
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_EQ(tok.unk_id(), 0);
  EXPECT_EQ(tok.pad_id(), -1);

  // .inp: strings separated by "\n__ggml_vocab_test__\n" (the file also ends with one); .out: one line of ids
  // (no BOS) per string.
  std::string inp = slurp(data_path(std::string(kLlamaDir) + "/ggml-vocab-llama-spm.gguf.inp"));
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> texts;
  for (size_t pos; (pos = inp.find(sep)) != std::string::npos; inp.erase(0, pos + sep.size()))
    texts.push_back(inp.substr(0, pos));
  std::istringstream out(slurp(data_path(std::string(kLlamaDir) + "/ggml-vocab-llama-spm.gguf.out")));
  std::vector<Ids> expected;
  for (std::string line; std::getline(out, line);) {
    std::istringstream ls(line);
    Ids ids;
    for (int64_t id; ls >> id;) ids.push_back(id);
    expected.push_back(ids);
  }
  ASSERT_EQ(texts.size(), 46u);
  ASSERT_EQ(expected.size(), 46u);
  for (size_t i = 0; i < texts.size(); ++i) {
    const Ids ids = tok.encode(texts[i], /*add_bos=*/false);
    EXPECT_EQ(ids, expected[i]) << "vector " << i << ": \"" << texts[i] << "\"";
    // Decoding the ids alone gives the text back: the dummy prefix is removed once, at the start.
    EXPECT_EQ(tok.decode(ids), texts[i]) << "vector " << i;
    Ids with_bos = tok.encode(texts[i], /*add_bos=*/true);
    ASSERT_FALSE(with_bos.empty());
    EXPECT_EQ(with_bos[0], 1);
    EXPECT_EQ(Ids(with_bos.begin() + 1, with_bos.end()), expected[i]);
    EXPECT_EQ(tok.decode(with_bos), texts[i]) << "BOS is skipped as special, vector " << i;
  }
}

// transformers' test_processor_llava.py expectation for llava-hf/llava-1.5-7b-hf (LLAVA.md §4.2): 29871 on both
// sides of the added <image> token (legacy per-chunk dummy prefix).
TEST(Tokenizer, LlavaHfAddedTokenGolden) {
  const Ids expected = {1,    3148, 1001, 29901, 29871, 32000, 29871, 13,   5618,  338,
                        4318, 297,  445,  1967,  29973, 319,   1799,  9047, 13566, 29901};
  for (const char* file : {"tokenizer_config.json", "added_tokens.json", "tokenizer.json"}) {
    SCOPED_TRACE(file);
    TempDir dir;
    make_llava_hf_dir(dir, file);
    const Tokenizer tok = Tokenizer::load(dir.str());
    EXPECT_EQ(tok.vocab_size(), 32002);
    EXPECT_EQ(tok.added_token_id("<image>"), 32000);
    EXPECT_EQ(tok.added_token_id("<pad>"), 32001);
    EXPECT_EQ(tok.added_token_id("<nope>"), -1);
    EXPECT_EQ(tok.piece_to_id("<image>"), 32000);
    EXPECT_EQ(tok.piece_to_id("▁Hello"), 15043);
    EXPECT_EQ(tok.piece_to_id("<unk>"), 0);
    EXPECT_EQ(tok.piece_to_id("definitely-not-a-piece"), -1);
    EXPECT_EQ(tok.id_to_piece(32001), "<pad>");
    EXPECT_EQ(tok.id_to_piece(13), "<0x0A>");
    EXPECT_EQ(tok.encode("USER: <image>\nWhat is shown in this image? ASSISTANT:", true), expected);
    // HF's decode of the same ids shows the two spaces around the skipped <image> (LLAVA.md §4.2).
    EXPECT_EQ(tok.decode(expected), "USER:  \nWhat is shown in this image? ASSISTANT:");
    EXPECT_EQ(tok.decode(expected, /*skip_special=*/false),
              "<s> USER: <image> \nWhat is shown in this image? ASSISTANT:");
  }
  TempDir dir;
  make_llava_hf_dir(dir, "tokenizer_config.json");
  EXPECT_EQ(Tokenizer::load(dir.str()).pad_id(), 32001);
}

// Original LLaVA splits on "<image>" and joins with -200; an added <image> token (32000) in the same position
// gives the same sequence with 32000 in place of -200 (LLAVA.md §4.2, the 50- and 63-id traces).
TEST(Tokenizer, LlavaPromptGoldens) {
  TempDir dir;
  make_llava_hf_dir(dir, "added_tokens.json");
  const Tokenizer tok = Tokenizer::load(dir.str());
  const std::string llava_v1 =
      "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
      "detailed, and polite answers to the human's questions. USER: <image>\nPlease describe this image in "
      "detail. ASSISTANT:";
  const Ids expected50 = {1,     319,   13563, 1546,  263,   12758, 5199,  322,   385,  23116, 21082, 20255, 29889,
                          450,   20255, 4076,  8444,  29892, 13173, 29892, 322,   1248, 568,   6089,  304,   278,
                          5199,  29915, 29879, 5155,  29889, 3148,  1001,  29901, 29871, -200, 29871, 13,    12148,
                          8453,  445,   1967,  297,   9493,  29889, 319,   1799,  9047,  13566, 29901};
  ASSERT_EQ(expected50.size(), 50u);
  EXPECT_EQ(replace_id(tok.encode(llava_v1, true), 32000, -200), expected50);

  const std::string pope =
      "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
      "detailed, and polite answers to the user's questions. USER: <image>\nIs there a snowboard in the image?\n"
      "Answer the question using a single word or phrase. ASSISTANT:";
  const Ids expected63 = {1,     319,   13563, 1546,  263,   12758, 1404,  322,  385,   23116, 21082, 20255, 29889,
                          450,   20255, 4076,  8444,  29892, 13173, 29892, 322,  1248,  568,   6089,  304,   278,
                          1404,  29915, 29879, 5155,  29889, 3148,  1001,  29901, 29871, -200,  29871, 13,    3624,
                          727,   263,   15007, 3377,  297,   278,   1967,  29973, 13,    22550, 278,   1139,  773,
                          263,   2323,  1734,  470,   16549, 29889, 319,   1799,  9047,  13566, 29901};
  ASSERT_EQ(expected63.size(), 63u);
  EXPECT_EQ(replace_id(tok.encode(pope, true), 32000, -200), expected63);

  // Without the added token (bare tokenizer.model) "<image>" is ordinary text and the split does not happen.
  const Tokenizer bare = Tokenizer::from_model_file(data_path(std::string(kLlamaDir) + "/tokenizer.model"));
  EXPECT_EQ(bare.added_token_id("<image>"), -1);
  const Ids bare_ids = bare.encode(pope, true);
  EXPECT_EQ(std::count(bare_ids.begin(), bare_ids.end(), 32000), 0);
  EXPECT_NE(replace_id(bare_ids, 32000, -200), expected63);
}

TEST(Tokenizer, SpecialTokenTextSplits) {
  const Tokenizer tok = Tokenizer::load(data_path(kLlamaDir));
  // Multi-turn vicuna_v1 prompts carry a literal "</s>" after each answer: it must be the EOS id, not
  // "▁</", "s", ">" (1533, 29879, 29958), and each side is encoded as its own chunk.
  const Ids ids = tok.encode("ASSISTANT: Yes.</s>USER: Why?", false);
  Ids expected = tok.encode("ASSISTANT: Yes.", false);
  expected.push_back(2);
  const Ids tail = tok.encode("USER: Why?", false);
  expected.insert(expected.end(), tail.begin(), tail.end());
  EXPECT_EQ(ids, expected);
  EXPECT_EQ(tok.encode("</s>", false), Ids({2}));
  Ids hi = tok.encode("Hi", false);
  hi.insert(hi.begin(), 1);
  EXPECT_EQ(tok.encode("<s>Hi", false), hi);
  EXPECT_EQ(tok.encode("<unk>", false), Ids({0}));
  // Longest match first: "</s>" is not read as "<" + "/s>" and adjacent specials need no text between them.
  EXPECT_EQ(tok.encode("<s></s><s>", false), Ids({1, 2, 1}));

  // Decoding: specials dropped by default, kept verbatim on request; the space after a special token stays.
  EXPECT_EQ(tok.decode({1, 15043, 3186, 2}), "Hello world");
  EXPECT_EQ(tok.decode({1, 15043, 3186, 2}, /*skip_special=*/false), "<s> Hello world</s>");
  EXPECT_EQ(tok.decode({15043, 2, 3186}), "Hello world");
  EXPECT_EQ(tok.decode({}), "");
  // Byte-fallback ids: "\n" is <0x0A> (13); an incomplete UTF-8 sequence becomes U+FFFD, as in SentencePiece.
  EXPECT_EQ(tok.decode({15043, 13}), "Hello\n");
  EXPECT_EQ(tok.decode({15043, 0xF0 + 3}), "Hello\xEF\xBF\xBD");
  // Ids past the tokenizer (llava-hf's padded vocabulary rows) decode to nothing; negative ids are a bug.
  EXPECT_EQ(tok.decode({15043, 32000, 3186}), "Hello world");
  EXPECT_THROW(tok.decode({-1}), std::logic_error);
}

TEST(Tokenizer, StreamingMatchesFullDecode) {
  TempDir dir;
  make_llava_hf_dir(dir, "tokenizer_config.json");
  const Tokenizer tok = Tokenizer::load(dir.str());
  const std::vector<std::string> texts = {
      "Hello world",
      " leading space and  double  spaces",
      "emoji 🦙🚀 and 👩‍👩‍👧 family",         // 4-byte sequences through byte fallback
      "中文分词测试，日本語のテキスト、한국어",  // CJK: some pieces, some byte fallback
      "mixed\n\ttabs\nand ünïcödé ✅",
      "🦙",  // a text that is nothing but byte tokens
  };
  for (const auto& text : texts) {
    SCOPED_TRACE(text);
    Ids ids = tok.encode(text, true);
    ids.push_back(32000);  // an added special token in the middle of generation
    ids.push_back(29871);  // "▁"
    ids.push_back(2);
    const std::string full = tok.decode(ids);
    TokenStreamer streamer(tok);
    std::string streamed;
    for (int64_t id : ids) {
      const std::string piece = streamer.push(id);
      // Every chunk is complete UTF-8 on its own (a terminal can print it immediately).
      for (size_t i = 0; i < piece.size();) {
        const unsigned char c = static_cast<unsigned char>(piece[i]);
        const size_t n = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
        ASSERT_LE(i + n, piece.size()) << "chunk ends inside a UTF-8 sequence";
        i += n;
      }
      EXPECT_EQ(piece.find("\xEF\xBF\xBD"), std::string::npos) << "a half-decoded character leaked";
      streamed += piece;
    }
    streamed += streamer.finish();
    EXPECT_EQ(streamed, full);
    EXPECT_EQ(full, text + " ");
  }
  // The pending bytes of an unfinished character come out on finish() (as U+FFFD, like decode()).
  TokenStreamer s(tok);
  EXPECT_EQ(s.push(15043), "Hello");
  EXPECT_EQ(s.push(0xF0 + 3), "");
  EXPECT_EQ(s.finish(), "\xEF\xBF\xBD");
}

TEST(Tokenizer, Errors) {
  TempDir empty;
  try {
    Tokenizer::load(empty.str());
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_EQ(std::string(e.what()), empty.str() + ": no tokenizer.model and no byte-level BPE tokenizer.json (the tokenizer is required)");
  }
  TempDir corrupt;
  write(corrupt.str("tokenizer.model"), "this is not a protobuf\n");
  try {
    Tokenizer::load(corrupt.str());
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(corrupt.str("tokenizer.model")), std::string::npos) << e.what();
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
  }
  TempDir truncated;
  const std::string model = slurp(data_path(std::string(kLlamaDir) + "/tokenizer.model"));
  write(truncated.str("tokenizer.model"), model.substr(0, model.size() / 3));
  EXPECT_THROW(Tokenizer::load(truncated.str()), InputError);

  TempDir bad_json;
  make_llava_hf_dir(bad_json, "");
  write(bad_json.str("tokenizer_config.json"), "{\"added_tokens_decoder\": ");
  try {
    Tokenizer::load(bad_json.str());
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer_config.json"), std::string::npos) << e.what();
  }
  // An added token may not silently re-map an id that tokenizer.model already uses.
  TempDir clash;
  make_llava_hf_dir(clash, "");
  write(clash.str("added_tokens.json"), R"({"<image>": 5})");
  EXPECT_THROW(Tokenizer::load(clash.str()), InputError);
  const Tokenizer tok = Tokenizer::load(data_path(kLlamaDir));
  EXPECT_THROW(tok.id_to_piece(32000), InputError);
}

// Fuzz finding (tokenizer_fuzz): libsentencepiece's trie builder throws Darts::Details::Exception (not a status)
// for a unigram model whose piece starts with a NUL byte; it escaped Tokenizer::load as a non-InputError.
TEST(Tokenizer, SentencePieceLoaderExceptionIsInputError) {
  TempDir dir;
  write(dir.str("tokenizer.model"), sp_model_proto({{"<unk>", 2}, {"<s>", 3}, {"</s>", 3},
                                                    {std::string("\0h", 2), 1}, {"a", 1}},
                                                   /*model_type=*/1));
  try {
    Tokenizer::load(dir.str());
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(dir.str("tokenizer.model") + ": not a valid SentencePiece model"),
              std::string::npos)
        << e.what();
  }
}

// Fuzz finding (tokenizer_fuzz): a model without a control "<s>" has bos_id -1, and encode(text, true) used to
// prepend that -1 (which later indexes the embedding table).
TEST(Tokenizer, NoBosTokenRefusesAddBos) {
  TempDir dir;
  write(dir.str("tokenizer.model"),
        sp_model_proto({{"<unk>", 2}, {"<s>", 1}, {"</s>", 3}, {"a", 1}, {"b", 1}}, /*model_type=*/2));
  const Tokenizer tok = Tokenizer::load(dir.str());
  EXPECT_EQ(tok.bos_id(), -1);
  const Ids plain = tok.encode("ab", false);
  for (int64_t id : plain) EXPECT_GE(id, 0);
  try {
    tok.encode("ab", true);
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("defines no BOS token"), std::string::npos) << e.what();
  }
}

// Fuzz finding (a probe written for tokenizer_fuzz): an added-token id of 2^63 - 1 passed the JSON checks and
// vocab_size() = id + 1 overflowed int64 (UBSan). Added-token ids are bounded by INT32_MAX in every file.
TEST(Tokenizer, AddedTokenIdBeyondInt32IsRefused) {
  for (const std::string file : {"added_tokens.json", "tokenizer_config.json"}) {
    TempDir dir;
    make_llava_hf_dir(dir, "");
    write(dir.str(file), file == "added_tokens.json"
                             ? R"({"<x>": 9223372036854775807})"
                             : R"({"added_tokens_decoder": {"9223372036854775807": {"content": "<x>"}}})");
    try {
      Tokenizer::load(dir.str());
      FAIL() << "expected InputError for " << file;
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(file + ": added token \"<x>\" has id 9223372036854775807"),
                std::string::npos)
          << e.what();
    }
  }
}

}  // namespace tokenizer_test
}  // namespace eqat

// tokenizer_config.json "legacy": false — HF (transformers 5.24.0 AutoTokenizer on the tiny_llava tokenizer files,
// the ids below) puts SentencePiece's "▁" only at the very start of the text, not after <image> or </s>; with the
// flag absent or true every chunk gets it, as LLaVA's training did. Chunks that begin with a space are left out of
// the legacy list: there SentencePiece (and HF's slow tokenizer, which LLaVA used) add "▁" before the space's own
// "▁", which transformers 5's Metaspace pre-tokenizer does not; eqat follows SentencePiece.
TEST(Tokenizer, LegacyFalseDropsTheDummyPrefixAfterSpecialTokens) {
  const std::vector<std::pair<std::string, std::vector<int64_t>>> legacy = {
      {"USER: <image>\nWhat is it? ASSISTANT:",
       {1, 451, 300, 485, 487, 474, 451, 512, 451, 13, 489, 293, 353, 348, 493, 299, 477, 477, 471, 477, 479, 480, 483,
        479, 474}},
      {"Hello</s>USER: hi ASSISTANT:",
       {1, 341, 439, 454, 2, 451, 300, 485, 487, 474, 284, 460, 299, 477, 477, 471, 477, 479, 480, 483, 479, 474}},
      {"<image>\nfoo", {1, 512, 451, 13, 469, 454, 454}},
      {"</s>start", {1, 2, 358, 290, 453}}};
  const std::vector<std::pair<std::string, std::vector<int64_t>>> non_legacy = {
      {"USER: <image>\nWhat is it? ASSISTANT:",
       {1, 451, 300, 485, 487, 474, 451, 512, 13, 489, 293, 353, 348, 493, 299, 477, 477, 471, 477, 479, 480, 483, 479,
        474}},
      {"Hello</s>USER: hi ASSISTANT:",
       {1, 341, 439, 454, 2, 300, 485, 487, 474, 284, 460, 299, 477, 477, 471, 477, 479, 480, 483, 479, 474}},
      {"<image>\nfoo", {1, 512, 13, 469, 454, 454}},
      {"a <image> b", {1, 262, 451, 512, 271}},
      {"x</s> y", {1, 451, 506, 2, 278}},
      {"</s>start", {1, 2, 301, 290, 453}},
      {"two  spaces<image>  after", {1, 259, 467, 454, 451, 442, 455, 468, 281, 512, 451, 262, 469, 418}}};
  for (bool flag : {true, false}) {
    eqat_test::TempDir t;
    for (const char* f : {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"})
      std::filesystem::copy(eqat_test::data_path(std::string("fixtures/tiny_llava/") + f), t.path / f);
    nlohmann::json tc = nlohmann::json::parse(eqat::tokenizer_test::slurp(t.str("tokenizer_config.json")));
    tc["legacy"] = flag;
    std::ofstream(t.str("tokenizer_config.json")) << tc.dump();
    eqat::Tokenizer tok = eqat::Tokenizer::load(t.str());
    EXPECT_EQ(tok.legacy(), flag);
    for (const auto& [text, ids] : flag ? legacy : non_legacy)
      EXPECT_EQ(tok.encode(text, true), ids) << "legacy " << flag << ": " << nlohmann::json(text).dump();
  }
}
