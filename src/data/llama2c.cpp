// llama2.c checkpoint + tokenizer import (llama2c.h). Formats: ../shared/data/SOURCES.md §1 (tokenizer.bin) and
// §2 (legacy "version 0" checkpoint). Both are little-endian; so is every host eqat targets.
#include "data/llama2c.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <utility>
#include <vector>

#include "data/config.h"
#include "data/error.h"
#include "data/fs.h"
#include "data/safetensors.h"

namespace eqat {
namespace {

using ordered_json = nlohmann::ordered_json;

// ------------------------------------------------------------------------------------------------ checkpoint

// The 7-int32 header. vocab_size < 0 marks an unshared classifier (wcls stored at the end).
struct Llama2cHeader {
  int32_t dim = 0, hidden_dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, vocab_size = 0, seq_len = 0;
  bool shared_classifier() const { return vocab_size > 0; }
  int64_t vocab() const { return vocab_size > 0 ? vocab_size : -static_cast<int64_t>(vocab_size); }
  int64_t head_size() const { return dim / n_heads; }
  int64_t kv_dim() const { return head_size() * n_kv_heads; }
};

constexpr int64_t kHeaderBytes = 7 * 4;

// Number of float32 values the file must hold after the header (freq_cis arrays and wcls included).
int64_t expected_floats(const Llama2cHeader& h) {
  const int64_t d = h.dim, f = h.hidden_dim, L = h.n_layers, V = h.vocab(), kv = h.kv_dim();
  int64_t n = V * d;            // token_embedding_table [V, d]
  n += L * d;                   // rms_att_weight [L, d]
  n += L * d * d;               // wq [L, d, d]
  n += 2 * L * kv * d;          // wk, wv [L, kv, d]
  n += L * d * d;               // wo [L, d, d]
  n += L * d;                   // rms_ffn_weight [L, d]
  n += 3 * L * f * d;           // w1 [L, f, d], w2 [L, d, f], w3 [L, f, d]
  n += d;                       // rms_final_weight [d]
  n += 2 * int64_t{h.seq_len} * (h.head_size() / 2);  // freq_cis_real, freq_cis_imag (unused)
  if (!h.shared_classifier()) n += V * d;              // wcls [V, d]
  return n;
}

// Reads and validates the header against the file length. Every problem is one InputError naming the file.
Llama2cHeader read_header(const std::string& path, std::ifstream& in, int64_t file_size) {
  EQAT_CHECK(file_size >= kHeaderBytes, path, ": not a llama2.c checkpoint (", file_size,
             " bytes, shorter than the 28-byte header)");
  int32_t v[7];
  in.read(reinterpret_cast<char*>(v), sizeof(v));
  EQAT_CHECK(in.good(), path, ": cannot read the llama2.c header");
  Llama2cHeader h{v[0], v[1], v[2], v[3], v[4], v[5], v[6]};
  // Bounds keep every size product below 2^62 and reject garbage (e.g. a version-1+ file starting with magic).
  const auto in_range = [](int64_t x, int64_t hi) { return x > 0 && x <= hi; };
  EQAT_CHECK(in_range(h.dim, 1 << 16) && in_range(h.hidden_dim, 1 << 18) && in_range(h.n_layers, 1 << 10) &&
                 in_range(h.n_heads, 1 << 10) && in_range(h.n_kv_heads, 1 << 10) && in_range(h.vocab(), 1 << 22) &&
                 in_range(h.seq_len, 1 << 22),
             path, ": implausible llama2.c header (dim ", h.dim, ", hidden_dim ", h.hidden_dim, ", n_layers ",
             h.n_layers, ", n_heads ", h.n_heads, ", n_kv_heads ", h.n_kv_heads, ", vocab_size ", h.vocab_size,
             ", seq_len ", h.seq_len, "); only the legacy version-0 format is supported");
  EQAT_CHECK(h.dim % h.n_heads == 0 && h.head_size() % 2 == 0, path, ": inconsistent llama2.c header: dim ", h.dim,
             " is not a multiple of 2*n_heads (n_heads ", h.n_heads, ")");
  EQAT_CHECK(h.n_kv_heads <= h.n_heads && h.n_heads % h.n_kv_heads == 0, path,
             ": inconsistent llama2.c header: n_heads ", h.n_heads, " is not a multiple of n_kv_heads ",
             h.n_kv_heads);
  const int64_t want = kHeaderBytes + 4 * expected_floats(h);
  EQAT_CHECK(file_size == want, path, ": llama2.c checkpoint size mismatch: the header (dim ", h.dim,
             ", hidden_dim ", h.hidden_dim, ", n_layers ", h.n_layers, ", n_heads ", h.n_heads, ", n_kv_heads ",
             h.n_kv_heads, ", vocab_size ", h.vocab_size, ", seq_len ", h.seq_len, ") implies ", want,
             " bytes, the file has ", file_size, file_size < want ? " (truncated?)" : "");
  return h;
}

// Reads `shape`-many float32 values at the current position.
at::Tensor read_floats(std::ifstream& in, const std::string& path, std::vector<int64_t> shape) {
  at::Tensor t = at::empty(shape, at::kFloat);
  in.read(reinterpret_cast<char*>(t.data_ptr<float>()), static_cast<std::streamsize>(t.nbytes()));
  EQAT_CHECK(in.good(), path, ": read failed inside the weights");
  return t;
}

// Meta's interleaved-RoPE rows -> HF rotate-half rows, per head: HF row s*D/2 + j = Meta row 2j + s.
// w: [n_heads * D, in] -> same shape. (Inverse of the row permutation in HF's convert_llama_weights_to_hf.)
at::Tensor meta_to_hf_rows(const at::Tensor& w, int64_t n_heads) {
  const int64_t rows = w.size(0), cols = w.size(1), D = rows / n_heads;
  return w.reshape({n_heads, D / 2, 2, cols}).transpose(1, 2).reshape({rows, cols}).contiguous();
}

// Reads the whole checkpoint into HF-named tensors (in HF order). `cfg` receives the Llama config.
std::vector<std::pair<std::string, at::Tensor>> read_checkpoint(const std::string& path, ModelConfig* cfg) {
  EQAT_CHECK(!is_directory(path), path, ": is a directory, expected a llama2.c checkpoint file");
  check_regular_file(path);
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  EQAT_CHECK(in.good(), path, ": cannot open for reading");
  const int64_t file_size = static_cast<int64_t>(in.tellg());
  in.seekg(0);
  const Llama2cHeader h = read_header(path, in, file_size);
  const int64_t d = h.dim, f = h.hidden_dim, L = h.n_layers, V = h.vocab(), kv = h.kv_dim();

  // File order (all layers of one kind together).
  at::Tensor emb = read_floats(in, path, {V, d});
  at::Tensor rms_att = read_floats(in, path, {L, d});
  at::Tensor wq = read_floats(in, path, {L, d, d});
  at::Tensor wk = read_floats(in, path, {L, kv, d});
  at::Tensor wv = read_floats(in, path, {L, kv, d});
  at::Tensor wo = read_floats(in, path, {L, d, d});
  at::Tensor rms_ffn = read_floats(in, path, {L, d});
  at::Tensor w1 = read_floats(in, path, {L, f, d});
  at::Tensor w2 = read_floats(in, path, {L, d, f});
  at::Tensor w3 = read_floats(in, path, {L, f, d});
  at::Tensor rms_final = read_floats(in, path, {d});
  in.seekg(static_cast<std::streamoff>(2 * 4 * int64_t{h.seq_len} * (h.head_size() / 2)), std::ios::cur);
  at::Tensor wcls;
  if (!h.shared_classifier()) wcls = read_floats(in, path, {V, d});

  std::vector<std::pair<std::string, at::Tensor>> out;
  out.emplace_back("model.embed_tokens.weight", emb);
  for (int64_t i = 0; i < L; ++i) {
    const std::string p = str_cat("model.layers.", i, ".");
    out.emplace_back(p + "self_attn.q_proj.weight", meta_to_hf_rows(wq[i], h.n_heads));
    out.emplace_back(p + "self_attn.k_proj.weight", meta_to_hf_rows(wk[i], h.n_kv_heads));
    out.emplace_back(p + "self_attn.v_proj.weight", wv[i].contiguous());
    out.emplace_back(p + "self_attn.o_proj.weight", wo[i].contiguous());
    out.emplace_back(p + "mlp.gate_proj.weight", w1[i].contiguous());
    out.emplace_back(p + "mlp.up_proj.weight", w3[i].contiguous());
    out.emplace_back(p + "mlp.down_proj.weight", w2[i].contiguous());
    out.emplace_back(p + "input_layernorm.weight", rms_att[i].contiguous());
    out.emplace_back(p + "post_attention_layernorm.weight", rms_ffn[i].contiguous());
  }
  out.emplace_back("model.norm.weight", rms_final);
  if (!h.shared_classifier()) out.emplace_back("lm_head.weight", wcls);

  cfg->arch = Arch::kLlama;
  LlamaConfig& t = cfg->text;
  t.vocab_size = V;
  t.hidden_size = d;
  t.intermediate_size = f;
  t.num_hidden_layers = L;
  t.num_attention_heads = h.n_heads;
  t.num_key_value_heads = h.n_kv_heads;
  t.head_dim = h.head_size();
  t.max_position_embeddings = h.seq_len;
  t.rms_norm_eps = 1e-5;  // llama2.c's run.c
  t.rope_theta = 10000.0;
  t.tie_word_embeddings = h.shared_classifier();
  t.bos_token_id = 1;
  t.eos_token_id = 2;
  t.pad_token_id = -1;
  t.torch_dtype = "float32";
  cfg->source_path = path;
  return out;
}

// ------------------------------------------------------------------------------------------------ tokenizer

struct Piece {
  std::string text;
  float score = 0.f;
  int type = 1;  // SentencePiece ModelProto.SentencePiece.Type: NORMAL 1, UNKNOWN 2, CONTROL 3, BYTE 6
};

// tokenizer.bin: int32 max_token_length, then per id: float32 score, int32 len, len bytes. llama2.c has no count;
// the entries run to the end of the file.
std::vector<Piece> read_tokenizer_bin(const std::string& path) {
  const std::string bytes = read_file(path);
  EQAT_CHECK(bytes.size() >= 4, path, ": not a llama2.c tokenizer (", bytes.size(), " bytes)");
  int32_t max_len = 0;
  std::memcpy(&max_len, bytes.data(), 4);
  EQAT_CHECK(max_len > 0 && max_len < (1 << 16), path, ": implausible max_token_length ", max_len,
             " (not a llama2.c tokenizer.bin?)");
  std::vector<Piece> pieces;
  size_t pos = 4;
  while (pos < bytes.size()) {
    EQAT_CHECK(bytes.size() - pos >= 8, path, ": truncated at entry ", pieces.size(), " (byte ", pos, ")");
    Piece p;
    int32_t len = 0;
    std::memcpy(&p.score, bytes.data() + pos, 4);
    std::memcpy(&len, bytes.data() + pos + 4, 4);
    pos += 8;
    EQAT_CHECK(len > 0 && len <= max_len && static_cast<size_t>(len) <= bytes.size() - pos, path,
               ": bad or truncated entry ", pieces.size(), " (length ", len, " at byte ", pos - 4, ")");
    p.text.assign(bytes.data() + pos, static_cast<size_t>(len));
    pos += static_cast<size_t>(len);
    pieces.push_back(std::move(p));
  }
  EQAT_CHECK(pieces.size() >= 3, path, ": only ", pieces.size(), " entries; expected <unk>, <s>, </s> first");
  return pieces;
}

bool is_byte_piece(const std::string& s) {
  if (s.size() != 6 || s.compare(0, 3, "<0x") != 0 || s[5] != '>') return false;
  for (int i = 3; i < 5; ++i)
    if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'A' && s[i] <= 'F'))) return false;
  return true;
}

// Restores SentencePiece pieces: llama2.c's export wrote "\n<s>\n" / "\n</s>\n" for the control tokens and
// replaced "▁" (U+2581) by a space everywhere else.
void restore_pieces(std::vector<Piece>& pieces, const std::string& path) {
  const auto strip_nl = [](const std::string& s) {
    return (s.size() >= 2 && s.front() == '\n' && s.back() == '\n') ? s.substr(1, s.size() - 2) : s;
  };
  EQAT_CHECK(pieces[0].text == "<unk>" && strip_nl(pieces[1].text) == "<s>" && strip_nl(pieces[2].text) == "</s>",
             path, ": ids 0/1/2 must be <unk>, <s>, </s> (llama2.c layout)");
  for (size_t i = 0; i < pieces.size(); ++i) {
    Piece& p = pieces[i];
    if (i == 0) {
      p.type = 2;  // UNKNOWN
    } else if (i <= 2) {
      p.text = strip_nl(p.text);
      p.type = 3;  // CONTROL
    } else if (is_byte_piece(p.text)) {
      p.type = 6;  // BYTE
    } else {
      std::string s;
      for (char c : p.text) s += (c == ' ') ? std::string("\xE2\x96\x81") : std::string(1, c);
      p.text = std::move(s);
      p.type = 1;  // NORMAL
    }
  }
  // What SentencePiece refuses to load must be refused here, not written as a tokenizer.model nothing can read
  // (found by fuzz/llama2c_fuzz): every piece once, and byte pieces all 256 (byte_fallback) or none.
  std::map<std::string, size_t> seen;
  int n_bytes = 0;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const auto [it, fresh] = seen.emplace(pieces[i].text, i);
    EQAT_CHECK(fresh, path, ": entries ", it->second, " and ", i, " are the same token '", pieces[i].text, "'");
    n_bytes += pieces[i].type == 6;
  }
  EQAT_CHECK(n_bytes == 0 || n_bytes == 256, path, ": has ", n_bytes,
             " byte tokens <0xHH>; a SentencePiece vocabulary has all 256 (byte fallback) or none");
}

// --- protobuf wire format (only what ModelProto needs) ---
void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out += static_cast<char>((v & 0x7F) | 0x80);
    v >>= 7;
  }
  out += static_cast<char>(v);
}
void put_key(std::string& out, int field, int wire) { put_varint(out, (static_cast<uint64_t>(field) << 3) | wire); }
// int32/enum/bool: varint; negative int32 is sign-extended to 64 bits (10 bytes), as protobuf does.
void put_int(std::string& out, int field, int64_t v) {
  put_key(out, field, 0);
  put_varint(out, static_cast<uint64_t>(v));
}
void put_bytes(std::string& out, int field, const std::string& s) {
  put_key(out, field, 2);
  put_varint(out, s.size());
  out += s;
}
void put_float(std::string& out, int field, float v) {
  put_key(out, field, 5);
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  for (int i = 0; i < 4; ++i) out += static_cast<char>((bits >> (8 * i)) & 0xFF);
}

// sentencepiece_model.proto field numbers (checked against sentencepiece_model_pb2 of sentencepiece 0.2):
// ModelProto: 1 pieces, 2 trainer_spec, 3 normalizer_spec. SentencePiece: 1 piece, 2 score, 3 type.
// TrainerSpec: 3 model_type (BPE = 2), 4 vocab_size, 25 split_digits, 26 allow_whitespace_only_pieces,
// 35 byte_fallback, 40 unk_id, 41 bos_id, 42 eos_id, 43 pad_id. NormalizerSpec: 1 name, 3 add_dummy_prefix,
// 4 remove_extra_whitespaces, 5 escape_whitespaces.
std::string serialize_model_proto(const std::vector<Piece>& pieces) {
  std::string out;
  int n_bytes = 0;
  for (const Piece& p : pieces) {
    std::string sp;
    put_bytes(sp, 1, p.text);
    put_float(sp, 2, p.score);
    put_int(sp, 3, p.type);
    put_bytes(out, 1, sp);
    n_bytes += p.type == 6;
  }
  std::string trainer;
  put_int(trainer, 3, 2);  // model_type BPE
  put_int(trainer, 4, static_cast<int64_t>(pieces.size()));
  put_int(trainer, 25, 1);  // split_digits (Llama-2's setting; training-time only)
  put_int(trainer, 26, 1);  // allow_whitespace_only_pieces
  put_int(trainer, 35, n_bytes == 256 ? 1 : 0);  // byte_fallback
  put_int(trainer, 40, 0);   // unk_id
  put_int(trainer, 41, 1);   // bos_id
  put_int(trainer, 42, 2);   // eos_id
  put_int(trainer, 43, -1);  // pad_id: none
  put_bytes(out, 2, trainer);
  std::string norm;
  put_bytes(norm, 1, "identity");
  put_int(norm, 3, 1);  // add_dummy_prefix
  put_int(norm, 4, 0);  // remove_extra_whitespaces
  put_int(norm, 5, 1);  // escape_whitespaces
  put_bytes(out, 3, norm);
  return out;
}

// ------------------------------------------------------------------------------------------------ JSON side files

std::string tokenizer_config_json(int64_t model_max_length) {
  ordered_json dec = ordered_json::object();
  const char* names[] = {"<unk>", "<s>", "</s>"};
  for (int i = 0; i < 3; ++i)
    dec[std::to_string(i)] = {{"content", names[i]}, {"lstrip", false}, {"normalized", false},
                              {"rstrip", false},     {"single_word", false}, {"special", true}};
  ordered_json j;
  j["add_bos_token"] = true;
  j["add_eos_token"] = false;
  j["added_tokens_decoder"] = std::move(dec);
  j["bos_token"] = "<s>";
  j["clean_up_tokenization_spaces"] = false;
  j["eos_token"] = "</s>";
  j["legacy"] = true;
  j["model_max_length"] = model_max_length;
  j["pad_token"] = nullptr;
  j["sp_model_kwargs"] = ordered_json::object();
  j["tokenizer_class"] = "LlamaTokenizer";
  j["unk_token"] = "<unk>";
  return j.dump(2) + "\n";
}

std::string special_tokens_map_json() {
  ordered_json j;
  for (auto [key, content] : {std::pair<const char*, const char*>{"bos_token", "<s>"},
                              {"eos_token", "</s>"},
                              {"unk_token", "<unk>"}})
    j[key] = {{"content", content}, {"lstrip", false}, {"normalized", false}, {"rstrip", false},
              {"single_word", false}};
  return j.dump(2) + "\n";
}

std::string generation_config_json() {
  ordered_json j;
  j["bos_token_id"] = 1;
  j["eos_token_id"] = 2;
  j["do_sample"] = false;
  return j.dump(2) + "\n";
}

}  // namespace

std::string llama2c_tokenizer_to_sentencepiece(const std::string& tokenizer_bin_path) {
  std::vector<Piece> pieces = read_tokenizer_bin(tokenizer_bin_path);
  restore_pieces(pieces, tokenizer_bin_path);
  return serialize_model_proto(pieces);
}

void convert_llama2c(const std::string& checkpoint_path, const std::string& tokenizer_path,
                     const std::string& out_dir) {
  // Everything, validation included, happens inside the temp directory: any failure leaves `out_dir` as it was.
  write_dir_atomic(out_dir, OutputKind::kModel, [&](const std::string& tmp) {
    ModelConfig cfg;
    std::vector<std::pair<std::string, at::Tensor>> tensors = read_checkpoint(checkpoint_path, &cfg);
    std::vector<Piece> pieces = read_tokenizer_bin(tokenizer_path);
    restore_pieces(pieces, tokenizer_path);
    EQAT_CHECK(static_cast<int64_t>(pieces.size()) == cfg.text.vocab_size, tokenizer_path, ": has ",
               pieces.size(), " tokens but the checkpoint ", checkpoint_path, " has vocab_size ",
               cfg.text.vocab_size);

    write_file_atomic(path_join(tmp, "config.json"), model_config_to_json(cfg));
    write_safetensors(path_join(tmp, "model.safetensors"), tensors, {{"format", "pt"}});
    tensors.clear();
    write_file_atomic(path_join(tmp, "tokenizer.model"), serialize_model_proto(pieces));
    write_file_atomic(path_join(tmp, "tokenizer_config.json"), tokenizer_config_json(cfg.text.max_position_embeddings));
    write_file_atomic(path_join(tmp, "special_tokens_map.json"), special_tokens_map_json());
    write_file_atomic(path_join(tmp, "generation_config.json"), generation_config_json());
  });
}

}  // namespace eqat
