// Random-weight checkpoints in the real shapes of the models users bring (llava-1.5-7b/13b, llama-2-7b), to prove
// the scale path (load, quantize, export, serve) where no real weights exist. Each --like entry is one config.json,
// verbatim as the llava-hf / meta-llama upload has it; everything else (tensor names and shapes) follows from the
// config through eqat's own model definition, so the checkpoint loads exactly as a real one would.
// Written as a stream: HF's sharding (model-0000k-of-0000n.safetensors + model.safetensors.index.json, ~5 GB per
// shard), one tensor in memory at a time. Weights at the real init scale: Linear/Embedding/Conv N(0, 0.02²)
// (initializer_range), norms 1, biases 0, so activations stay finite through 40 layers.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <vector>

namespace eqat {

struct RandomModelOptions {
  std::string like;                       // an entry of random_model_likes()
  std::string out;                        // output directory (validated by the caller)
  std::string tokenizer;                  // the Llama-2 sentencepiece tokenizer.model to copy
  c10::ScalarType dtype = c10::ScalarType::Half;
  uint64_t seed = 0;
  uint64_t shard_bytes = 5'000'000'000;   // HF's default max_shard_size "5GB"
  // Shrinks the entry for tests: layers of decoder and vision tower (0: as configured). Names and widths stay real.
  int64_t layers = 0;
  // A JSON merge patch (RFC 7386) applied to the entry's config after `layers` (tests: smaller widths through the
  // same code path). Empty: none.
  std::string config_patch;
};

std::vector<std::string> random_model_likes();
// The entry's config.json text; InputError naming --like and the choices when unknown.
std::string random_model_config(const std::string& like);
// Writes the model directory (atomically, via write_dir_atomic). Returns the parameter count.
int64_t write_random_model(const RandomModelOptions& o);

}  // namespace eqat
