// llama2.c import: checkpoint -> HF Llama directory, tokenizer.bin -> SentencePiece ModelProto.
#include "data/llama2c.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <sentencepiece_processor.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "data/config.h"
#include "data/error.h"
#include "data/fs.h"
#include "data/safetensors.h"
#include "data/tokenizer.h"
#include "test_util.h"

namespace llama2c_test {

namespace fs = std::filesystem;
using eqat_test::data_path;
using eqat_test::TempDir;

const std::string kStories = data_path("models/stories260K/stories260K.bin");
const std::string kTok512 = data_path("models/stories260K/tok512.bin");
const std::string kLlama2Bin = data_path("tokenizers/llama2/tokenizer.bin");

// stories260K: dim 64, hidden 172, 5 layers, 8 heads, 4 kv heads, vocab 512 (shared), seq_len 512.
constexpr int64_t kDim = 64, kHidden = 172, kLayers = 5, kHeads = 8, kKvHeads = 4, kVocab = 512, kSeq = 512;
constexpr int64_t kHeadSize = kDim / kHeads, kKvDim = kHeadSize * kKvHeads;

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void spit(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A [rows, cols] float32 block read straight from the file at float index `offset` (after the 28-byte header).
at::Tensor raw_block(const std::string& file, int64_t offset, int64_t rows, int64_t cols) {
  std::ifstream in(file, std::ios::binary);
  in.seekg(28 + 4 * offset);
  at::Tensor t = at::empty({rows, cols}, at::kFloat);
  in.read(reinterpret_cast<char*>(t.data_ptr<float>()), static_cast<std::streamsize>(t.nbytes()));
  EXPECT_TRUE(in.good());
  return t;
}

// Names of leftovers next to `dir` (temp siblings of an atomic write).
std::vector<std::string> siblings_with_prefix(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir.parent_path()))
    if (e.path().filename().string().rfind(dir.filename().string(), 0) == 0) out.push_back(e.path().string());
  return out;
}

template <typename F>
std::string input_error_message(F&& f) {
  try {
    f();
  } catch (const eqat::InputError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected eqat::InputError";
  return "";
}

class Llama2cTest : public ::testing::Test {
 protected:
  // One conversion of stories260K shared by the tests that only read it.
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    eqat::convert_llama2c(kStories, kTok512, dir_->str("stories260K"));
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static std::string out() { return dir_->str("stories260K"); }
  static TempDir* dir_;
};
TempDir* Llama2cTest::dir_ = nullptr;

TEST_F(Llama2cTest, WritesHfDirectory) {
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
                        "special_tokens_map.json", "generation_config.json"})
    EXPECT_TRUE(eqat::file_exists(eqat::path_join(out(), f))) << f;

  const eqat::ModelConfig cfg = eqat::load_model_config(out());
  EXPECT_EQ(cfg.arch, eqat::Arch::kLlama);
  EXPECT_EQ(cfg.text.vocab_size, kVocab);
  EXPECT_EQ(cfg.text.hidden_size, kDim);
  EXPECT_EQ(cfg.text.intermediate_size, kHidden);
  EXPECT_EQ(cfg.text.num_hidden_layers, kLayers);
  EXPECT_EQ(cfg.text.num_attention_heads, kHeads);
  EXPECT_EQ(cfg.text.num_key_value_heads, kKvHeads);
  EXPECT_EQ(cfg.text.head_dim, kHeadSize);
  EXPECT_EQ(cfg.text.max_position_embeddings, kSeq);
  EXPECT_DOUBLE_EQ(cfg.text.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(cfg.text.rope_theta, 10000.0);
  EXPECT_EQ(cfg.text.rope_scaling.type, "none");
  EXPECT_TRUE(cfg.text.tie_word_embeddings);
  EXPECT_EQ(cfg.text.bos_token_id, 1);
  EXPECT_EQ(cfg.text.eos_token_id, 2);
}

TEST_F(Llama2cTest, TensorNamesAndShapes) {
  const eqat::Checkpoint ck = eqat::Checkpoint::open(out());
  std::map<std::string, std::vector<int64_t>> want = {{"model.embed_tokens.weight", {kVocab, kDim}},
                                                      {"model.norm.weight", {kDim}}};
  for (int i = 0; i < kLayers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    want[p + "self_attn.q_proj.weight"] = {kDim, kDim};
    want[p + "self_attn.k_proj.weight"] = {kKvDim, kDim};
    want[p + "self_attn.v_proj.weight"] = {kKvDim, kDim};
    want[p + "self_attn.o_proj.weight"] = {kDim, kDim};
    want[p + "mlp.gate_proj.weight"] = {kHidden, kDim};
    want[p + "mlp.up_proj.weight"] = {kHidden, kDim};
    want[p + "mlp.down_proj.weight"] = {kDim, kHidden};
    want[p + "input_layernorm.weight"] = {kDim};
    want[p + "post_attention_layernorm.weight"] = {kDim};
  }
  const std::vector<std::string> names = ck.names();
  EXPECT_EQ(names.size(), want.size());  // no lm_head.weight: the classifier is shared
  EXPECT_FALSE(ck.has("lm_head.weight"));
  for (const auto& [name, shape] : want) {
    ASSERT_TRUE(ck.has(name)) << name;
    EXPECT_EQ(ck.info(name).dtype, "F32") << name;
    EXPECT_EQ(ck.info(name).shape, shape) << name;
  }
}

// Wq/Wk are permuted per head from Meta's interleaved layout: HF row s*D/2 + j of head h = Meta row 2j + s.
// Everything else is copied unchanged (w1 -> gate, w3 -> up, w2 -> down).
TEST_F(Llama2cTest, PermutesWqWkAgainstRawFile) {
  const eqat::Checkpoint ck = eqat::Checkpoint::open(out());
  // Float offsets of each array in the file.
  const int64_t off_emb = 0, off_rms_att = kVocab * kDim, off_wq = off_rms_att + kLayers * kDim;
  const int64_t off_wk = off_wq + kLayers * kDim * kDim, off_wv = off_wk + kLayers * kKvDim * kDim;
  const int64_t off_wo = off_wv + kLayers * kKvDim * kDim, off_rms_ffn = off_wo + kLayers * kDim * kDim;
  const int64_t off_w1 = off_rms_ffn + kLayers * kDim, off_w2 = off_w1 + kLayers * kHidden * kDim;
  const int64_t off_w3 = off_w2 + kLayers * kDim * kHidden, off_final = off_w3 + kLayers * kHidden * kDim;

  EXPECT_TRUE(at::equal(ck.get("model.embed_tokens.weight"), raw_block(kStories, off_emb, kVocab, kDim)));
  EXPECT_TRUE(at::equal(ck.get("model.norm.weight"), raw_block(kStories, off_final, 1, kDim)[0]));
  const int64_t half = kHeadSize / 2;
  for (int64_t l = 0; l < kLayers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const at::Tensor mq = raw_block(kStories, off_wq + l * kDim * kDim, kDim, kDim);
    const at::Tensor mk = raw_block(kStories, off_wk + l * kKvDim * kDim, kKvDim, kDim);
    const at::Tensor hq = ck.get(p + "self_attn.q_proj.weight");
    const at::Tensor hk = ck.get(p + "self_attn.k_proj.weight");
    EXPECT_FALSE(at::equal(hq, mq)) << "Wq was not permuted";
    for (int64_t h = 0; h < kHeads; ++h)
      for (int64_t s = 0; s < 2; ++s)
        for (int64_t j = 0; j < half; ++j) {
          ASSERT_TRUE(at::equal(hq[h * kHeadSize + s * half + j], mq[h * kHeadSize + 2 * j + s]))
              << "q layer " << l << " head " << h << " s " << s << " j " << j;
          if (h < kKvHeads)
            ASSERT_TRUE(at::equal(hk[h * kHeadSize + s * half + j], mk[h * kHeadSize + 2 * j + s]))
                << "k layer " << l << " head " << h << " s " << s << " j " << j;
        }
    EXPECT_TRUE(at::equal(ck.get(p + "self_attn.v_proj.weight"),
                          raw_block(kStories, off_wv + l * kKvDim * kDim, kKvDim, kDim)));
    EXPECT_TRUE(at::equal(ck.get(p + "self_attn.o_proj.weight"),
                          raw_block(kStories, off_wo + l * kDim * kDim, kDim, kDim)));
    EXPECT_TRUE(at::equal(ck.get(p + "mlp.gate_proj.weight"),
                          raw_block(kStories, off_w1 + l * kHidden * kDim, kHidden, kDim)));
    EXPECT_TRUE(at::equal(ck.get(p + "mlp.down_proj.weight"),
                          raw_block(kStories, off_w2 + l * kDim * kHidden, kDim, kHidden)));
    EXPECT_TRUE(at::equal(ck.get(p + "mlp.up_proj.weight"),
                          raw_block(kStories, off_w3 + l * kHidden * kDim, kHidden, kDim)));
    EXPECT_TRUE(at::equal(ck.get(p + "input_layernorm.weight"),
                          raw_block(kStories, off_rms_att + l * kDim, 1, kDim)[0]));
    EXPECT_TRUE(at::equal(ck.get(p + "post_attention_layernorm.weight"),
                          raw_block(kStories, off_rms_ffn + l * kDim, 1, kDim)[0]));
  }
}

// The ModelProto rebuilt from llama2.c's tokenizer.bin equals Meta's tokenizer.model piece by piece and encodes
// llama.cpp's 46 Llama-2 test strings exactly like it.
TEST(Llama2cTokenizer, Llama2RebuildMatchesRealModel) {
  const std::string proto = eqat::llama2c_tokenizer_to_sentencepiece(kLlama2Bin);
  sentencepiece::SentencePieceProcessor rebuilt, real;
  ASSERT_TRUE(rebuilt.LoadFromSerializedProto(proto).ok());
  ASSERT_TRUE(real.Load(data_path("tokenizers/llama2/tokenizer.model")).ok());
  ASSERT_EQ(rebuilt.GetPieceSize(), 32000);
  ASSERT_EQ(real.GetPieceSize(), 32000);
  for (int i = 0; i < 32000; ++i) {
    ASSERT_EQ(rebuilt.IdToPiece(i), real.IdToPiece(i)) << i;
    ASSERT_EQ(rebuilt.GetScore(i), real.GetScore(i)) << i;
    ASSERT_EQ(rebuilt.IsControl(i), real.IsControl(i)) << i;
    ASSERT_EQ(rebuilt.IsUnknown(i), real.IsUnknown(i)) << i;
    ASSERT_EQ(rebuilt.IsByte(i), real.IsByte(i)) << i;
  }
  EXPECT_EQ(rebuilt.unk_id(), 0);
  EXPECT_EQ(rebuilt.bos_id(), 1);
  EXPECT_EQ(rebuilt.eos_id(), 2);
  EXPECT_EQ(rebuilt.pad_id(), -1);

  // llama.cpp's vectors: strings separated by "\n__ggml_vocab_test__\n"; one line of ids (no BOS) per string.
  const std::string inp = slurp(data_path("tokenizers/llama2/ggml-vocab-llama-spm.gguf.inp"));
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> texts;
  for (size_t pos = 0;;) {
    const size_t next = inp.find(sep, pos);
    if (next == std::string::npos) break;
    texts.push_back(inp.substr(pos, next - pos));
    pos = next + sep.size();
  }
  std::istringstream outs(slurp(data_path("tokenizers/llama2/ggml-vocab-llama-spm.gguf.out")));
  std::vector<std::vector<int>> expected;
  for (std::string line; std::getline(outs, line);) {
    std::istringstream ls(line);
    std::vector<int> ids;
    for (int id; ls >> id;) ids.push_back(id);
    expected.push_back(ids);
  }
  ASSERT_EQ(texts.size(), 46u);
  ASSERT_EQ(expected.size(), 46u);
  for (size_t i = 0; i < texts.size(); ++i) {
    std::vector<int> got, ref;
    ASSERT_TRUE(rebuilt.Encode(texts[i], &got).ok());
    ASSERT_TRUE(real.Encode(texts[i], &ref).ok());
    EXPECT_EQ(got, expected[i]) << "string " << i << ": '" << texts[i] << "'";
    EXPECT_EQ(got, ref) << "string " << i;
  }
}

// tok512: the rebuilt model loads, has llama2.c's layout and round-trips text (byte fallback included).
TEST_F(Llama2cTest, Tok512RoundTrips) {
  sentencepiece::SentencePieceProcessor sp;
  ASSERT_TRUE(sp.Load(eqat::path_join(out(), "tokenizer.model")).ok());
  ASSERT_EQ(sp.GetPieceSize(), 512);
  EXPECT_EQ(sp.IdToPiece(0), "<unk>");
  EXPECT_EQ(sp.IdToPiece(1), "<s>");
  EXPECT_EQ(sp.IdToPiece(2), "</s>");
  EXPECT_TRUE(sp.IsControl(1) && sp.IsControl(2) && sp.IsUnknown(0));
  EXPECT_EQ(sp.IdToPiece(13), "<0x0A>");
  EXPECT_TRUE(sp.IsByte(13));
  EXPECT_EQ(sp.IdToPiece(259), "\xE2\x96\x81t");  // "▁t": llama2.c stored " t"
  for (const std::string text : {"Once upon a time, there was a little girl named Lily.",
                                 "She loved to play outside in the park.\nThe end!",
                                 "  two  spaces, tab\tand \xC3\xA9t\xC3\xA9 \xF0\x9F\x99\x82 (bytes)"}) {
    std::vector<int> ids;
    ASSERT_TRUE(sp.Encode(text, &ids).ok());
    EXPECT_FALSE(ids.empty());
    for (int id : ids) EXPECT_NE(id, 0) << "unknown piece in '" << text << "'";  // byte fallback, no <unk>
    std::string back;
    ASSERT_TRUE(sp.Decode(ids, &back).ok());
    EXPECT_EQ(back, text);
  }
  // And through eqat's own tokenizer, from the converted directory (BOS first, as HF's LlamaTokenizer does).
  const eqat::Tokenizer tok = eqat::Tokenizer::load(out());
  const std::vector<int64_t> ids = tok.encode("Once upon a time", /*add_bos=*/true);
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids[0], 1);
  EXPECT_EQ(tok.decode(ids), "Once upon a time");
}

TEST(Llama2cErrors, TruncatedCheckpointNamesFileAndWritesNothing) {
  TempDir t;
  const std::string bin = slurp(kStories);
  const std::string bad = t.str("truncated.bin");
  spit(bad, bin.substr(0, bin.size() - 100));
  const std::string out = t.str("out");
  const std::string msg = input_error_message([&] { eqat::convert_llama2c(bad, kTok512, out); });
  EXPECT_NE(msg.find(bad), std::string::npos) << msg;
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << "one line: " << msg;
  EXPECT_FALSE(fs::exists(out));
  EXPECT_TRUE(siblings_with_prefix(out).empty());

  spit(bad, bin.substr(0, 20));  // shorter than the header
  EXPECT_NE(input_error_message([&] { eqat::convert_llama2c(bad, kTok512, out); }).find(bad), std::string::npos);
  EXPECT_FALSE(fs::exists(out));
}

TEST(Llama2cErrors, InconsistentHeader) {
  TempDir t;
  std::string bin = slurp(kStories);
  const std::string bad = t.str("bad.bin");
  int32_t heads = 3;  // dim 64 is not a multiple of 2 * 3
  std::memcpy(&bin[12], &heads, 4);
  spit(bad, bin);
  std::string msg = input_error_message([&] { eqat::convert_llama2c(bad, kTok512, t.str("out")); });
  EXPECT_NE(msg.find(bad), std::string::npos) << msg;
  EXPECT_NE(msg.find("n_heads"), std::string::npos) << msg;

  bin = slurp(kStories);
  int32_t zero = 0;
  std::memcpy(&bin[0], &zero, 4);  // dim 0
  spit(bad, bin);
  msg = input_error_message([&] { eqat::convert_llama2c(bad, kTok512, t.str("out")); });
  EXPECT_NE(msg.find(bad), std::string::npos) << msg;

  bin = slurp(kStories) + std::string(8, '\0');  // trailing bytes are inconsistent too
  spit(bad, bin);
  msg = input_error_message([&] { eqat::convert_llama2c(bad, kTok512, t.str("out")); });
  EXPECT_NE(msg.find("size mismatch"), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(t.str("out")));
}

TEST(Llama2cErrors, TokenizerProblems) {
  TempDir t;
  // Vocabulary mismatch: the 32000-entry Llama-2 tokenizer with the 512-vocab model.
  std::string msg = input_error_message([&] { eqat::convert_llama2c(kStories, kLlama2Bin, t.str("out")); });
  EXPECT_NE(msg.find("vocab_size 512"), std::string::npos) << msg;
  EXPECT_NE(msg.find(kLlama2Bin), std::string::npos) << msg;

  const std::string tok = slurp(kTok512);
  const std::string bad = t.str("tok_truncated.bin");
  spit(bad, tok.substr(0, tok.size() - 3));
  msg = input_error_message([&] { eqat::llama2c_tokenizer_to_sentencepiece(bad); });
  EXPECT_NE(msg.find(bad), std::string::npos) << msg;
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(t.str("out")));
}

// A failure after the checkpoint was already written (bad tokenizer) leaves an existing output untouched and no
// temp directory behind.
TEST(Llama2cErrors, FailedConversionIsAtomic) {
  TempDir t;
  const std::string out = t.str("model");
  // A previous eqat model at `out` (only those are ever replaced; see data/output.h).
  eqat::write_dir_atomic(out, eqat::OutputKind::kModel,
                         [](const std::string& tmp) { spit(tmp + "/marker.txt", "previous"); });
  const std::string tok = slurp(kTok512);
  const std::string bad = t.str("tok_truncated.bin");
  spit(bad, tok.substr(0, tok.size() - 3));
  EXPECT_THROW(eqat::convert_llama2c(kStories, bad, out), eqat::InputError);
  EXPECT_EQ(slurp(out + "/marker.txt"), "previous");
  EXPECT_FALSE(fs::exists(out + "/model.safetensors"));
  EXPECT_EQ(siblings_with_prefix(out), std::vector<std::string>{out});

  // The same call with a good tokenizer replaces the directory.
  eqat::convert_llama2c(kStories, kTok512, out);
  EXPECT_FALSE(fs::exists(out + "/marker.txt"));
  EXPECT_TRUE(fs::exists(out + "/model.safetensors"));
  EXPECT_EQ(siblings_with_prefix(out), std::vector<std::string>{out});

  // A directory eqat did not write is never replaced, even by a conversion that would succeed.
  const std::string user = t.str("user");
  fs::create_directories(user);
  spit(user + "/notes.txt", "mine");
  EXPECT_THROW(eqat::convert_llama2c(kStories, kTok512, user), eqat::InputError);
  EXPECT_EQ(slurp(user + "/notes.txt"), "mine");
  EXPECT_FALSE(fs::exists(user + "/model.safetensors"));
}

// A negative vocab_size marks an unshared classifier: wcls follows the freq_cis arrays and becomes lm_head.
TEST(Llama2cConvert, UnsharedClassifier) {
  TempDir t;
  const int32_t dim = 8, hidden = 12, layers = 2, heads = 2, kv_heads = 1, vocab = 5, seq = 4;
  const int64_t hs = dim / heads, kv = hs * kv_heads;
  const int64_t n = vocab * dim + layers * dim + layers * dim * dim + 2 * layers * kv * dim + layers * dim * dim +
                    layers * dim + 3 * layers * hidden * dim + dim + 2 * seq * (hs / 2) + vocab * dim;
  std::vector<float> w(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) w[static_cast<size_t>(i)] = 0.001f * static_cast<float>(i);
  const int32_t hdr[7] = {dim, hidden, layers, heads, kv_heads, -vocab, seq};
  std::string bin(reinterpret_cast<const char*>(hdr), sizeof(hdr));
  bin.append(reinterpret_cast<const char*>(w.data()), w.size() * 4);
  spit(t.str("tiny.bin"), bin);
  // tokenizer.bin with 5 entries: <unk>, <s>, </s>, " a", "b".
  std::string tok;
  const auto put_i32 = [&](int32_t v) { tok.append(reinterpret_cast<const char*>(&v), 4); };
  const auto put_entry = [&](float score, const std::string& s) {
    tok.append(reinterpret_cast<const char*>(&score), 4);
    put_i32(static_cast<int32_t>(s.size()));
    tok += s;
  };
  put_i32(7);
  put_entry(0, "<unk>");
  put_entry(0, "\n<s>\n");
  put_entry(0, "\n</s>\n");
  put_entry(-1, " a");
  put_entry(-2, "b");
  spit(t.str("tok.bin"), tok);

  eqat::convert_llama2c(t.str("tiny.bin"), t.str("tok.bin"), t.str("out"));
  const eqat::ModelConfig cfg = eqat::load_model_config(t.str("out"));
  EXPECT_FALSE(cfg.text.tie_word_embeddings);
  EXPECT_EQ(cfg.text.vocab_size, vocab);
  const eqat::Checkpoint ck = eqat::Checkpoint::open(t.str("out"));
  ASSERT_TRUE(ck.has("lm_head.weight"));
  const at::Tensor wcls = at::from_blob(w.data() + (n - vocab * dim), {vocab, dim}, at::kFloat);
  EXPECT_TRUE(at::equal(ck.get("lm_head.weight"), wcls));
  EXPECT_EQ(ck.info("model.layers.1.self_attn.k_proj.weight").shape, (std::vector<int64_t>{kv, dim}));

  sentencepiece::SentencePieceProcessor sp;
  ASSERT_TRUE(sp.Load(t.str("out/tokenizer.model")).ok());
  EXPECT_EQ(sp.GetPieceSize(), 5);
  EXPECT_EQ(sp.IdToPiece(3), "\xE2\x96\x81" "a");
}

// Fuzz finding (fuzz/llama2c_fuzz): a tokenizer.bin with only some byte tokens <0xHH> (or a token twice) was
// converted into a tokenizer.model that SentencePiece refuses to load ("byte piece <0x00> is found although
// byte_fallback is false", "already defined"): the import succeeded and wrote an unusable model. Now refused.
TEST(Llama2cErrors, TokenizerSentencePieceWouldRefuse) {
  TempDir t;
  const auto tokenizer_bin = [](const std::vector<std::string>& pieces) {
    std::string tok;
    const auto put_i32 = [&](int32_t v) { tok.append(reinterpret_cast<const char*>(&v), 4); };
    put_i32(8);
    for (const std::string& p : pieces) {
      const float score = 0.f;
      tok.append(reinterpret_cast<const char*>(&score), 4);
      put_i32(static_cast<int32_t>(p.size()));
      tok += p;
    }
    return tok;
  };
  const std::vector<std::string> base = {"<unk>", "\n<s>\n", "\n</s>\n"};
  std::vector<std::string> one_byte = base;
  one_byte.push_back("<0x41>");
  spit(t.str("bytes.bin"), tokenizer_bin(one_byte));
  std::string msg = input_error_message([&] { eqat::llama2c_tokenizer_to_sentencepiece(t.str("bytes.bin")); });
  EXPECT_NE(msg.find(t.str("bytes.bin") + ": has 1 byte tokens"), std::string::npos) << msg;

  std::vector<std::string> twice = base;
  twice.push_back(" a");
  twice.push_back(" a");
  spit(t.str("twice.bin"), tokenizer_bin(twice));
  msg = input_error_message([&] { eqat::llama2c_tokenizer_to_sentencepiece(t.str("twice.bin")); });
  EXPECT_NE(msg.find(t.str("twice.bin") + ": entries 3 and 4 are the same token"), std::string::npos) << msg;
}

}  // namespace llama2c_test
