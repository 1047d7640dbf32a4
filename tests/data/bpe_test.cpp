// Byte-level BPE (data/bpe.h) against HF tokenizers on a Llama-3-style tokenizer.json
// (fixtures/bpe_llama3, tools/make_bpe_fixture.py): ids for ASCII, accents, CJK, emoji, digits, whitespace runs and
// special tokens inside text must be identical, and so must decoding with and without special tokens.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>

#include "data/bpe.h"
#include "data/tokenizer.h"
#include "data/error.h"
#include "model_test_util.h"

using namespace eqat;
using namespace eqat_test;

TEST(Bpe, IdsAndDecodingEqualHfTokenizersOnHundredsOfStrings) {
  ByteLevelBpe tok = ByteLevelBpe::load(fixture("bpe_llama3/tokenizer.json"));
  const nlohmann::json g = load_json(fixture("bpe_llama3/golden.json"));
  const int64_t bos = g["bos_id"].get<int64_t>();
  EXPECT_EQ(tok.vocab_size(), g["vocab_size"].get<int64_t>());
  EXPECT_EQ(tok.token_to_id("<|begin_of_text|>"), bos);
  EXPECT_TRUE(tok.is_special(bos));
  size_t bad = 0;
  const auto& cases = g["cases"];
  ASSERT_GE(cases.size(), 250u);
  for (const auto& c : cases) {
    const std::string text = c["text"].get<std::string>();
    std::vector<int64_t> ids{bos};
    for (int64_t id : tok.encode(text)) ids.push_back(id);
    const auto want = c["ids"].get<std::vector<int64_t>>();
    if (ids != want && ++bad <= 5) ADD_FAILURE() << "ids differ for " << nlohmann::json(text).dump();
    EXPECT_EQ(tok.decode(want, false), c["decoded"].get<std::string>()) << nlohmann::json(text).dump();
    EXPECT_EQ(tok.decode(want, true), c["decoded_skip_special"].get<std::string>()) << nlohmann::json(text).dump();
  }
  EXPECT_EQ(bad, 0u) << "of " << cases.size() << " strings";
}

TEST(Bpe, RefusesWhatItDoesNotImplementNamingTheFile) {
  TempDir t;
  auto write = [&](const std::string& body) {
    std::ofstream(t.str("tokenizer.json")) << body;
    return t.str("tokenizer.json");
  };
  auto message = [](const std::string& path) {
    try {
      ByteLevelBpe::load(path);
    } catch (const InputError& e) {
      return std::string(e.what());
    }
    return std::string("loaded");
  };
  EXPECT_NE(message(write("{not json")).find("tokenizer.json"), std::string::npos);
  EXPECT_NE(message(write(R"({"model": {"type": "Unigram"}})")).find("Unigram"), std::string::npos);
  nlohmann::json j = load_json(fixture("bpe_llama3/tokenizer.json"));
  j["normalizer"] = {{"type", "NFC"}};
  EXPECT_NE(message(write(j.dump())).find("NFC"), std::string::npos);
  j = load_json(fixture("bpe_llama3/tokenizer.json"));
  j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed";
  EXPECT_NE(message(write(j.dump())).find("Removed"), std::string::npos);
  j = load_json(fixture("bpe_llama3/tokenizer.json"));
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
  EXPECT_NE(message(write(j.dump())).find("does not compile"), std::string::npos);
  j = load_json(fixture("bpe_llama3/tokenizer.json"));
  j["model"]["merges"].push_back({"nope", "never"});
  EXPECT_NE(message(write(j.dump())).find("outside the vocabulary"), std::string::npos);
  // A SentencePiece-style tokenizer.json (no ByteLevel step) is not a byte-level BPE.
  j = load_json(fixture("bpe_llama3/tokenizer.json"));
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"String", " "}}}, {"behavior", "Isolated"}, {"invert", false}};
  EXPECT_NE(message(write(j.dump())).find("no ByteLevel step"), std::string::npos);
  EXPECT_FALSE(ByteLevelBpe::describes_byte_level_bpe(write(R"({"model": {"type": "Unigram"}})")));
  EXPECT_TRUE(ByteLevelBpe::describes_byte_level_bpe(fixture("bpe_llama3/tokenizer.json")));
}

// The same fixture through Tokenizer (what models use): a directory with tokenizer.json and no tokenizer.model
// loads as byte-level BPE, BOS/EOS come from tokenizer_config.json, and streaming decode (TokenStreamer) never
// emits half a UTF-8 character although byte-level tokens split emoji and CJK characters.
TEST(Bpe, TokenizerLoadsAByteLevelDirectoryAndStreamsWholeCharacters) {
  Tokenizer tok = Tokenizer::load(fixture("bpe_llama3"));
  EXPECT_TRUE(tok.byte_level_bpe());
  EXPECT_EQ(tok.bos_id(), tok.piece_to_id("<|begin_of_text|>"));
  EXPECT_EQ(tok.eos_id(), tok.piece_to_id("<|eot_id|>"));
  EXPECT_EQ(tok.added_token_id("<|start_header_id|>"), tok.piece_to_id("<|start_header_id|>"));
  const nlohmann::json g = load_json(fixture("bpe_llama3/golden.json"));
  for (const auto& c : g["cases"]) {
    const std::string text = c["text"].get<std::string>();
    const auto ids = c["ids"].get<std::vector<int64_t>>();
    ASSERT_EQ(tok.encode(text, /*add_bos=*/true), ids) << nlohmann::json(text).dump();
    EXPECT_EQ(tok.decode(ids, /*skip_special=*/true), c["decoded_skip_special"].get<std::string>());
    // Streaming: every chunk is whole UTF-8, and the chunks add up to decode().
    TokenStreamer st(tok);
    std::string streamed;
    for (size_t i = 1; i < ids.size(); ++i) {
      const std::string piece = st.push(ids[i]);
      size_t k = 0;
      while (k < piece.size()) {  // whole characters only
        const unsigned char b = static_cast<unsigned char>(piece[k]);
        const size_t n = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : 4;
        ASSERT_LE(k + n, piece.size()) << "half a character streamed for " << nlohmann::json(text).dump();
        k += n;
      }
      streamed += piece;
    }
    streamed += st.finish();
    EXPECT_EQ(streamed, tok.decode(std::vector<int64_t>(ids.begin() + 1, ids.end())));
  }
}
