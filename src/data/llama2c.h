// Import of llama2.c checkpoints (legacy "version 0" format, ../shared/data/SOURCES.md §2) into an HF-style
// Llama directory: config.json, model.safetensors (fp32), tokenizer.model (a SentencePiece ModelProto built from
// llama2.c's tokenizer.bin), tokenizer_config.json, generation_config.json.
// llama2.c keeps Wq/Wk in Meta's interleaved-RoPE layout; they are permuted into HF's rotate-half layout
// (HF row s*D/2 + j = Meta row 2j + s, per head; LLAVA.md §2.5).
#pragma once

#include <string>

namespace eqat {

void convert_llama2c(const std::string& checkpoint_path, const std::string& tokenizer_path,
                     const std::string& out_dir);

// Builds a serialized SentencePiece ModelProto (BPE, byte_fallback, identity normalizer, dummy prefix) from a
// llama2.c tokenizer.bin. Exposed for tests.
std::string llama2c_tokenizer_to_sentencepiece(const std::string& tokenizer_bin_path);

}  // namespace eqat
