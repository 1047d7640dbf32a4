// config.json -> ModelConfig. The only file that touches config JSON (HOUSE_STYLE.md rule 7). Depends on
// nlohmann_json, error.h and fs.h only (no LibTorch), so fuzz/config_fuzz.cpp compiles it with sanitizers.
//
// Defaults follow transformers (LLAVA.md §1.2), including its two-level rule for the vision tower: a LLaVA config
// *without* vision_config gets CLIP ViT-L/14-336, while a vision_config that is present but omits a field gets
// CLIPVisionConfig's own default for that field (ViT-B/32 numbers). JSON null counts as absent everywhere, as
// HF writes e.g. "rope_scaling": null and "pad_token_id": null.
#include "data/config.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <limits>
#include <utility>

#include "data/error.h"
#include "data/fs.h"

namespace eqat {
namespace {

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

// Real configs nest 3 deep (quantization_config.meta.x); the bound only stops "[[[[..." inputs.
constexpr int kMaxJsonDepth = 32;
// Upper bound for any dimension: far above real models (vocab ~256k, context ~1M) and small enough that derived
// products such as (image_size / patch_size)^2 or hidden * n_layer cannot overflow int64.
constexpr int64_t kMaxDim = int64_t{1} << 31;

// Typed, null-tolerant access to one JSON object; every error names the file and the dotted key.
class Reader {
 public:
  Reader(const json& obj, std::string prefix, const std::string& source)
      : obj_(obj), prefix_(std::move(prefix)), source_(source) {}

  const json* find(const std::string& key) const {
    auto it = obj_.find(key);
    return it == obj_.end() || it->is_null() ? nullptr : &*it;
  }
  bool has(const std::string& key) const { return find(key) != nullptr; }
  std::string name(const std::string& key) const { return "'" + prefix_ + key + "'"; }

  int64_t get_int(const std::string& key, int64_t def) const {
    const json* v = find(key);
    return v ? to_int(*v, key) : def;
  }
  int64_t to_int(const json& v, const std::string& key) const {
    if (v.is_number_unsigned()) {
      EQAT_CHECK(v.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), source_, ": ",
                 name(key), " = ", v.get<uint64_t>(), " is too large");
      return static_cast<int64_t>(v.get<uint64_t>());
    }
    EQAT_CHECK(v.is_number_integer(), source_, ": ", name(key), " must be an integer, got ", v.type_name());
    return v.get<int64_t>();
  }
  double get_double(const std::string& key, double def) const {
    const json* v = find(key);
    if (!v) return def;
    EQAT_CHECK(v->is_number(), source_, ": ", name(key), " must be a number, got ", v->type_name());
    const double d = v->get<double>();
    EQAT_CHECK(std::isfinite(d), source_, ": ", name(key), " must be finite");
    return d;
  }
  bool get_bool(const std::string& key, bool def) const {
    const json* v = find(key);
    if (!v) return def;
    EQAT_CHECK(v->is_boolean(), source_, ": ", name(key), " must be true or false, got ", v->type_name());
    return v->get<bool>();
  }
  std::string get_string(const std::string& key, const std::string& def) const {
    const json* v = find(key);
    if (!v) return def;
    EQAT_CHECK(v->is_string(), source_, ": ", name(key), " must be a string, got ", v->type_name());
    return v->get<std::string>();
  }
  // nullptr when absent; InputError when present but not an object.
  const json* get_object(const std::string& key) const {
    const json* v = find(key);
    EQAT_CHECK(!v || v->is_object(), source_, ": ", name(key), " must be an object, got ",
               v ? v->type_name() : "null");
    return v;
  }
  Reader sub(const json& obj, const std::string& key) const { return Reader(obj, prefix_ + key + ".", source_); }

  void check_dim(const std::string& key, int64_t v) const {
    EQAT_CHECK(v >= 1 && v <= kMaxDim, source_, ": ", name(key), " = ", v, " must be in [1, ", kMaxDim, "]");
  }
  const std::string& source() const { return source_; }

 private:
  const json& obj_;
  std::string prefix_;
  const std::string& source_;
};

// Token ids: int, null (none), or (newer configs, e.g. Llama 3) a list whose first entry is the primary one.
int64_t get_token_id(const Reader& r, const std::string& key, int64_t def) {
  const json* v = r.find(key);
  if (!v) return def;
  if (v->is_array()) {
    EQAT_CHECK(!v->empty(), r.source(), ": ", r.name(key), " is an empty list");
    return r.to_int(v->front(), key);
  }
  return r.to_int(*v, key);
}

// rope_scaling (and the newer rope_parameters, which carries the same keys plus rope_theta).
RopeScaling parse_rope_scaling(const Reader& r) {
  RopeScaling rs;
  std::string type = r.get_string("rope_type", r.get_string("type", ""));  // rope_type wins, as in transformers
  EQAT_CHECK(!type.empty(), r.source(), ": ", r.name("rope_type"), " (or 'type') is missing");
  if (type == "default") return rs;  // plain RoPE
  EQAT_CHECK(type == "linear" || type == "dynamic" || type == "llama3", r.source(), ": rope scaling type '", type,
             "' is not supported (supported: linear, dynamic, llama3)");
  rs.type = type;
  EQAT_CHECK(r.has("factor"), r.source(), ": ", r.name("factor"), " is required for rope scaling '", type, "'");
  rs.factor = r.get_double("factor", 1.0);
  EQAT_CHECK(rs.factor >= 1.0, r.source(), ": ", r.name("factor"), " = ", rs.factor, " must be >= 1");
  if (type == "llama3") {
    // transformers requires all four keys for llama3 and so do we: a silent default would change every frequency.
    for (const char* k : {"low_freq_factor", "high_freq_factor", "original_max_position_embeddings"})
      EQAT_CHECK(r.has(k), r.source(), ": ", r.name(k), " is required for rope scaling 'llama3'");
    rs.low_freq_factor = r.get_double("low_freq_factor", rs.low_freq_factor);
    rs.high_freq_factor = r.get_double("high_freq_factor", rs.high_freq_factor);
    rs.original_max_position_embeddings =
        r.get_int("original_max_position_embeddings", rs.original_max_position_embeddings);
    r.check_dim("original_max_position_embeddings", rs.original_max_position_embeddings);
    // The smoothing ramp divides by (high - low).
    EQAT_CHECK(rs.low_freq_factor > 0 && rs.high_freq_factor > rs.low_freq_factor, r.source(), ": llama3 rope needs ",
               "0 < low_freq_factor < high_freq_factor, got ", rs.low_freq_factor, " and ", rs.high_freq_factor);
  }
  return rs;
}

// `top` (LLaVA only) supplies keys text_config lacks: HF's llava configs keep vocab_size, pad_token_id,
// tie_word_embeddings and torch_dtype at the top level.
LlamaConfig parse_llama(const Reader& r, const Reader* top, const std::string& model_type) {
  LlamaConfig c;
  c.model_type = model_type;
  if (model_type == "mistral" && r.has("sliding_window") && !r.find("sliding_window")->is_null()) {
    c.sliding_window = r.get_int("sliding_window", 0);
    r.check_dim("sliding_window", c.sliding_window);
  }
  auto fb_int = [&](const char* k, int64_t def) { return top ? top->get_int(k, def) : def; };
  c.vocab_size = r.get_int("vocab_size", fb_int("vocab_size", c.vocab_size));
  c.hidden_size = r.get_int("hidden_size", c.hidden_size);
  c.intermediate_size = r.get_int("intermediate_size", c.intermediate_size);
  c.num_hidden_layers = r.get_int("num_hidden_layers", c.num_hidden_layers);
  c.num_attention_heads = r.get_int("num_attention_heads", c.num_attention_heads);
  c.num_key_value_heads = r.get_int("num_key_value_heads", c.num_attention_heads);
  c.max_position_embeddings = r.get_int("max_position_embeddings", c.max_position_embeddings);
  for (const auto& [k, v] : {std::pair<const char*, int64_t>{"vocab_size", c.vocab_size},
                              {"hidden_size", c.hidden_size},
                              {"intermediate_size", c.intermediate_size},
                              {"num_hidden_layers", c.num_hidden_layers},
                              {"num_attention_heads", c.num_attention_heads},
                              {"num_key_value_heads", c.num_key_value_heads},
                              {"max_position_embeddings", c.max_position_embeddings}})
    r.check_dim(k, v);
  if (r.has("head_dim")) {
    c.head_dim = r.get_int("head_dim", 0);
    r.check_dim("head_dim", c.head_dim);
  } else {
    EQAT_CHECK(c.hidden_size % c.num_attention_heads == 0, r.source(), ": ", r.name("hidden_size"), " = ",
               c.hidden_size, " is not divisible by ", r.name("num_attention_heads"), " = ", c.num_attention_heads,
               " (and no head_dim is given)");
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  EQAT_CHECK(c.num_attention_heads % c.num_key_value_heads == 0, r.source(), ": ", r.name("num_attention_heads"),
             " = ", c.num_attention_heads, " is not a multiple of ", r.name("num_key_value_heads"), " = ",
             c.num_key_value_heads);

  c.rms_norm_eps = r.get_double("rms_norm_eps", c.rms_norm_eps);
  EQAT_CHECK(c.rms_norm_eps > 0, r.source(), ": ", r.name("rms_norm_eps"), " must be positive");
  c.rope_theta = r.get_double("rope_theta", c.rope_theta);
  if (const json* rp = r.get_object("rope_parameters")) {  // transformers >= 5 layout
    Reader pr = r.sub(*rp, "rope_parameters");
    c.rope_theta = pr.get_double("rope_theta", c.rope_theta);
    if (pr.has("rope_type") || pr.has("type")) c.rope_scaling = parse_rope_scaling(pr);
  }
  if (const json* rs = r.get_object("rope_scaling")) c.rope_scaling = parse_rope_scaling(r.sub(*rs, "rope_scaling"));
  EQAT_CHECK(c.rope_theta > 0, r.source(), ": ", r.name("rope_theta"), " must be positive");

  c.tie_word_embeddings =
      r.get_bool("tie_word_embeddings", top ? top->get_bool("tie_word_embeddings", false) : c.tie_word_embeddings);
  c.attention_bias = r.get_bool("attention_bias", c.attention_bias);
  c.mlp_bias = r.get_bool("mlp_bias", c.mlp_bias);
  c.hidden_act = r.get_string("hidden_act", c.hidden_act);
  EQAT_CHECK(c.hidden_act == "silu", r.source(), ": ", r.name("hidden_act"), " = '", c.hidden_act,
             "' is not supported (Llama uses silu)");

  // Token ids: text_config, else the top level, else LlamaConfig's defaults (bos 1, eos 2, no pad).
  c.bos_token_id = get_token_id(r, "bos_token_id", top ? get_token_id(*top, "bos_token_id", 1) : 1);
  c.eos_token_id = get_token_id(r, "eos_token_id", top ? get_token_id(*top, "eos_token_id", 2) : 2);
  c.pad_token_id = get_token_id(r, "pad_token_id", top ? get_token_id(*top, "pad_token_id", -1) : -1);
  EQAT_CHECK(c.bos_token_id >= 0, r.source(), ": ", r.name("bos_token_id"), " must be non-negative");
  EQAT_CHECK(c.eos_token_id >= 0, r.source(), ": ", r.name("eos_token_id"), " must be non-negative");
  EQAT_CHECK(c.pad_token_id >= -1, r.source(), ": ", r.name("pad_token_id"), " must be non-negative or null");

  // "dtype" is the transformers >= 4.56 spelling of "torch_dtype".
  auto get_dtype = [](const Reader& rr, const std::string& def) {
    return rr.get_string("torch_dtype", rr.get_string("dtype", def));
  };
  c.torch_dtype = get_dtype(r, top ? get_dtype(*top, c.torch_dtype) : c.torch_dtype);
  return c;
}

VisionConfig parse_vision(const Reader& r) {
  VisionConfig v;  // CLIPVisionConfig defaults
  const std::string mt = r.get_string("model_type", "clip_vision_model");
  EQAT_CHECK(mt == "clip_vision_model", r.source(), ": ", r.name("model_type"), " = '", mt,
             "' is not supported (supported: clip_vision_model)");
  v.hidden_size = r.get_int("hidden_size", v.hidden_size);
  v.intermediate_size = r.get_int("intermediate_size", v.intermediate_size);
  v.num_hidden_layers = r.get_int("num_hidden_layers", v.num_hidden_layers);
  v.num_attention_heads = r.get_int("num_attention_heads", v.num_attention_heads);
  v.image_size = r.get_int("image_size", v.image_size);
  v.patch_size = r.get_int("patch_size", v.patch_size);
  v.num_channels = r.get_int("num_channels", v.num_channels);
  for (const auto& [k, val] : {std::pair<const char*, int64_t>{"hidden_size", v.hidden_size},
                                {"intermediate_size", v.intermediate_size},
                                {"num_hidden_layers", v.num_hidden_layers},
                                {"num_attention_heads", v.num_attention_heads},
                                {"image_size", v.image_size},
                                {"patch_size", v.patch_size},
                                {"num_channels", v.num_channels}})
    r.check_dim(k, val);
  EQAT_CHECK(v.hidden_size % v.num_attention_heads == 0, r.source(), ": ", r.name("hidden_size"), " = ",
             v.hidden_size, " is not divisible by ", r.name("num_attention_heads"), " = ", v.num_attention_heads);
  EQAT_CHECK(v.image_size % v.patch_size == 0, r.source(), ": ", r.name("image_size"), " = ", v.image_size,
             " is not a multiple of ", r.name("patch_size"), " = ", v.patch_size);
  v.layer_norm_eps = r.get_double("layer_norm_eps", v.layer_norm_eps);
  EQAT_CHECK(v.layer_norm_eps > 0, r.source(), ": ", r.name("layer_norm_eps"), " must be positive");
  v.hidden_act = r.get_string("hidden_act", v.hidden_act);
  EQAT_CHECK(v.hidden_act == "quick_gelu" || v.hidden_act == "gelu", r.source(), ": ", r.name("hidden_act"), " = '",
             v.hidden_act, "' is not supported (supported: quick_gelu, gelu)");
  return v;
}

QuantizationConfig parse_quant(const Reader& r) {
  QuantizationConfig q;
  q.present = true;
  q.quant_method = r.get_string("quant_method", "");
  EQAT_CHECK(q.quant_method == "gptq", r.source(), ": ", r.name("quant_method"), " = '", q.quant_method,
             "' is not supported (supported: gptq)");
  EQAT_CHECK(r.has("bits"), r.source(), ": ", r.name("bits"), " is required");
  q.bits = r.get_int("bits", 0);
  EQAT_CHECK(q.bits == 2 || q.bits == 3 || q.bits == 4 || q.bits == 8, r.source(), ": ", r.name("bits"), " = ",
             q.bits, " is not supported (2, 3, 4 or 8)");
  // Absent keys take transformers' GPTQConfig defaults (group 128, symmetric, no act-order), not the struct's
  // "no quantization" defaults.
  q.group_size = r.get_int("group_size", 128);
  EQAT_CHECK(q.group_size == -1 || (q.group_size >= 1 && q.group_size <= kMaxDim), r.source(), ": ",
             r.name("group_size"), " = ", q.group_size, " must be -1 (per channel) or positive");
  q.sym = r.get_bool("sym", true);
  q.desc_act = r.get_bool("desc_act", false);
  // GPTQModel writes "format"; "checkpoint_format" is the older key and wins when both exist.
  q.checkpoint_format = r.get_string("checkpoint_format", r.get_string("format", "gptq"));
  EQAT_CHECK(q.checkpoint_format == "gptq" || q.checkpoint_format == "gptq_v2", r.source(), ": ",
             r.name("checkpoint_format"), " = '", q.checkpoint_format, "' is not supported (gptq, gptq_v2)");
  return q;
}

Arch identify_arch(const Reader& r) {
  // architectures[0] decides when present: the original LLaVA config says model_type "llava" too, but its
  // LlavaLlamaForCausalLM layout is not llava-hf's, so model_type alone must not accept it.
  if (const json* a = r.find("architectures")) {
    EQAT_CHECK(a->is_array(), r.source(), ": 'architectures' must be a list, got ", a->type_name());
    if (!a->empty()) {
      EQAT_CHECK(a->front().is_string(), r.source(), ": 'architectures' must hold strings");
      const std::string name = a->front().get<std::string>();
      if (name == "LlamaForCausalLM" || name == "MistralForCausalLM") return Arch::kLlama;
      if (name == "LlavaForConditionalGeneration" || name == "LlavaNextForConditionalGeneration") return Arch::kLlava;
      EQAT_CHECK(false, r.source(), ": unsupported architecture '", name,
                 "' (supported: LlamaForCausalLM, MistralForCausalLM, LlavaForConditionalGeneration, "
                 "LlavaNextForConditionalGeneration)");
    }
  }
  const std::string mt = r.get_string("model_type", "");
  EQAT_CHECK(!mt.empty(), r.source(), ": neither 'architectures' nor 'model_type' is set; cannot tell the model");
  if (mt == "llama" || mt == "mistral") return Arch::kLlama;
  if (mt == "llava" || mt == "llava_next") return Arch::kLlava;
  EQAT_CHECK(false, r.source(), ": unsupported architecture '", mt,
             "' (model_type; supported: llama, mistral, llava, llava_next)");
  return Arch::kCount;
}

// LLaVA-NeXT: image_grid_pinpoints (transformers' LlavaNextConfig default when absent). The grid features are viewed
// as whole tiles of the vision tower, so every pinpoint must be a multiple of its image size, and the view needs the
// CLS-less "default" feature strategy (with "full" transformers' view of the tiles fails too).
void parse_anyres(const Reader& r, ModelConfig* cfg) {
  const int64_t tile = cfg->vision.image_size;
  EQAT_CHECK(cfg->vision_feature_select_strategy == "default", r.source(),
             ": 'vision_feature_select_strategy' = 'full' is not supported for LLaVA-NeXT (its tiles are unpadded "
             "as grids of patches, without the CLS token)");
  std::vector<GridPoint>& pins = cfg->image_grid_pinpoints;
  if (const json* g = r.find("image_grid_pinpoints")) {
    EQAT_CHECK(g->is_array() && !g->empty() && g->size() <= 1024, r.source(),
               ": 'image_grid_pinpoints' must be a non-empty list of [height, width] pairs");
    for (const json& p : *g) {
      EQAT_CHECK(p.is_array() && p.size() == 2, r.source(), ": 'image_grid_pinpoints' entries must be [height, width]");
      pins.push_back({r.to_int(p[0], "image_grid_pinpoints"), r.to_int(p[1], "image_grid_pinpoints")});
    }
  } else {
    pins = {{336, 672}, {672, 336}, {672, 672}, {1008, 336}, {336, 1008}};
  }
  for (const GridPoint& p : pins)
    EQAT_CHECK(p.height > 0 && p.width > 0 && p.height <= 64 * tile && p.width <= 64 * tile && p.height % tile == 0 &&
                   p.width % tile == 0,
               r.source(), ": 'image_grid_pinpoints' entry [", p.height, ", ", p.width,
               "] must be a positive multiple (at most 64x) of the vision tower's image size ", tile);
}

void parse_llava(const Reader& r, ModelConfig* cfg) {
  if (const json* t = r.get_object("text_config")) {
    Reader tr = r.sub(*t, "text_config");
    const std::string mt = tr.get_string("model_type", "llama");
    EQAT_CHECK(mt == "llama" || mt == "mistral", r.source(), ": ", tr.name("model_type"), " = '", mt,
               "' is not supported (supported: llama, mistral)");
    cfg->text = parse_llama(tr, &r, mt);
  } else {
    json empty = json::object();
    cfg->text = parse_llama(r.sub(empty, "text_config"), &r, "llama");
  }

  if (const json* v = r.get_object("vision_config")) {
    cfg->vision = parse_vision(r.sub(*v, "vision_config"));
  } else {
    // transformers' LlavaConfig builds CLIP ViT-L/14-336 when vision_config is absent.
    VisionConfig& vc = cfg->vision;
    vc.hidden_size = 1024;
    vc.intermediate_size = 4096;
    vc.num_hidden_layers = 24;
    vc.num_attention_heads = 16;
    vc.image_size = 336;
    vc.patch_size = 14;
  }
  const VisionConfig& vc = cfg->vision;

  // image_token_id is the newer name; both present and different means a hand-edited config.
  cfg->image_token_index = r.get_int("image_token_index", r.get_int("image_token_id", cfg->image_token_index));
  EQAT_CHECK(!r.has("image_token_index") || !r.has("image_token_id") ||
                 r.get_int("image_token_id", 0) == cfg->image_token_index,
             r.source(), ": 'image_token_index' and 'image_token_id' disagree");
  // Not checked against vocab_size: transformers' defaults (32000 in a 32000 vocab) put it just outside, and the
  // image positions are overwritten by projected features before any embedding lookup could matter.
  EQAT_CHECK(cfg->image_token_index >= 0, r.source(), ": 'image_token_index' must be non-negative");

  cfg->projector_hidden_act = r.get_string("projector_hidden_act", cfg->projector_hidden_act);
  EQAT_CHECK(cfg->projector_hidden_act == "gelu", r.source(), ": 'projector_hidden_act' = '",
             cfg->projector_hidden_act, "' is not supported (supported: gelu)");

  if (const json* l = r.find("vision_feature_layer"); l && l->is_array())
    EQAT_CHECK(false, r.source(), ": 'vision_feature_layer' as a list of layers is not supported");
  cfg->vision_feature_layer = r.get_int("vision_feature_layer", cfg->vision_feature_layer);
  // Indexes the L+1 hidden states (embeddings output, then each layer), Python-style negatives allowed.
  const int64_t n_layer = vc.num_hidden_layers;
  EQAT_CHECK(cfg->vision_feature_layer >= -(n_layer + 1) && cfg->vision_feature_layer <= n_layer, r.source(),
             ": 'vision_feature_layer' = ", cfg->vision_feature_layer, " is outside [", -(n_layer + 1), ", ", n_layer,
             "] for a ", n_layer, "-layer vision tower");

  cfg->vision_feature_select_strategy = r.get_string("vision_feature_select_strategy", "default");
  EQAT_CHECK(cfg->vision_feature_select_strategy == "default" || cfg->vision_feature_select_strategy == "full",
             r.source(), ": 'vision_feature_select_strategy' = '", cfg->vision_feature_select_strategy,
             "' must be 'default' or 'full'");

  // image_seq_length: transformers defaults to 576 whatever the geometry. The number of <image> positions must
  // equal the number of visual tokens, so when the key is absent we use the geometry's count (576 for
  // ViT-L/14-336 with "default", i.e. HF's value whenever HF's default is right) and an explicit value must agree.
  const int64_t tokens = vc.num_patches() + (cfg->vision_feature_select_strategy == "full" ? 1 : 0);
  cfg->image_seq_length = r.get_int("image_seq_length", tokens);
  EQAT_CHECK(cfg->image_seq_length == tokens, r.source(), ": 'image_seq_length' = ", cfg->image_seq_length,
             " disagrees with the vision tower, which yields ", tokens, " tokens ((", vc.image_size, "/",
             vc.patch_size, ")^2 patches, strategy '", cfg->vision_feature_select_strategy, "')");

  cfg->multimodal_projector_bias = r.get_bool("multimodal_projector_bias", cfg->multimodal_projector_bias);
  if (cfg->anyres) parse_anyres(r, cfg);
}

json parse_json_bounded(const std::string& text, const std::string& source) {
  auto cb = [&](int depth, json::parse_event_t, json&) {
    EQAT_CHECK(depth <= kMaxJsonDepth, source, ": JSON nested deeper than ", kMaxJsonDepth, " levels");
    return true;
  };
  try {
    return json::parse(text, cb);
  } catch (const json::parse_error& e) {
    // Only the position: e.what() quotes the offending bytes, which may be binary.
    EQAT_CHECK(false, source, ": not valid JSON (parse error at byte ", e.byte, ")");
  } catch (const json::exception& e) {
    // Found by the fuzzer: a number literal beyond double range ("1e309") throws out_of_range, not parse_error.
    EQAT_CHECK(false, source, ": not valid JSON (", e.id == 406 ? "number out of range" : "malformed", ")");
  }
  return {};
}

// ------------------------------------------------------------------------------------------------ writer

// Appends the Llama fields to `j` (the top level for llama, text_config for llava).
void append_llama_json(const LlamaConfig& c, ordered_json& j) {
  if (c.model_type == "mistral")
    j["sliding_window"] = c.sliding_window > 0 ? ordered_json(c.sliding_window) : ordered_json(nullptr);
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["head_dim"] = c.head_dim;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  if (c.rope_scaling.type == "none") {
    j["rope_scaling"] = nullptr;
  } else {
    ordered_json rs;
    rs["rope_type"] = c.rope_scaling.type;
    rs["factor"] = c.rope_scaling.factor;
    if (c.rope_scaling.type == "llama3") {
      rs["low_freq_factor"] = c.rope_scaling.low_freq_factor;
      rs["high_freq_factor"] = c.rope_scaling.high_freq_factor;
      rs["original_max_position_embeddings"] = c.rope_scaling.original_max_position_embeddings;
    }
    j["rope_scaling"] = std::move(rs);
  }
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["attention_bias"] = c.attention_bias;
  j["mlp_bias"] = c.mlp_bias;
  j["hidden_act"] = c.hidden_act;
  j["bos_token_id"] = c.bos_token_id;
  j["eos_token_id"] = c.eos_token_id;
  j["pad_token_id"] = c.pad_token_id < 0 ? ordered_json(nullptr) : ordered_json(c.pad_token_id);
  j["torch_dtype"] = c.torch_dtype;
}

}  // namespace

const char* architecture_name(const ModelConfig& cfg) {
  if (cfg.arch == Arch::kLlama) return cfg.text.model_type == "mistral" ? "MistralForCausalLM" : "LlamaForCausalLM";
  return cfg.anyres ? "LlavaNextForConditionalGeneration" : "LlavaForConditionalGeneration";
}

const char* arch_name(Arch a) {
  switch (a) {
    case Arch::kLlama:
      return "LlamaForCausalLM";
    case Arch::kLlava:
      return "LlavaForConditionalGeneration";
    case Arch::kCount:
      break;
  }
  return "unknown";
}

ModelConfig parse_model_config(const std::string& json_text, const std::string& source) {
  const json root = parse_json_bounded(json_text, source);
  EQAT_CHECK(root.is_object(), source, ": must be a JSON object, got ", root.type_name());
  Reader r(root, "", source);
  ModelConfig cfg;
  cfg.source_path = source;
  cfg.arch = identify_arch(r);
  if (cfg.arch == Arch::kLlama) {
    // Mistral: by architectures[0] or, without it, model_type (identify_arch accepted one of them).
    bool mistral = r.get_string("model_type", "") == "mistral";
    if (const json* a = r.find("architectures"); a && !a->empty())
      mistral = a->front().get<std::string>() == "MistralForCausalLM";
    cfg.text = parse_llama(r, nullptr, mistral ? "mistral" : "llama");
  } else {
    std::string name = r.get_string("model_type", "");
    if (const json* a = r.find("architectures"); a && !a->empty()) name = a->front().get<std::string>();
    cfg.anyres = name == "llava_next" || name == "LlavaNextForConditionalGeneration";
    parse_llava(r, &cfg);
  }
  if (const json* q = r.get_object("quantization_config")) cfg.quant = parse_quant(r.sub(*q, "quantization_config"));
  return cfg;
}

ModelConfig load_model_config(const std::string& dir_or_file) {
  std::string path = dir_or_file;
  if (is_directory(dir_or_file)) {
    path = path_join(dir_or_file, "config.json");
    EQAT_CHECK(file_exists(path), dir_or_file, ": no config.json in this directory");
  }
  return parse_model_config(read_file(path), path);
}

std::string model_config_to_json(const ModelConfig& cfg) {
  ordered_json j;
  j["architectures"] = {architecture_name(cfg)};
  if (cfg.arch == Arch::kLlama) {
    j["model_type"] = cfg.text.model_type;
    append_llama_json(cfg.text, j);
  } else {
    EQAT_ASSERT(cfg.arch == Arch::kLlava, "bad arch");
    j["model_type"] = cfg.anyres ? "llava_next" : "llava";
    j["image_token_index"] = cfg.image_token_index;
    if (cfg.anyres) {
      ordered_json pins = ordered_json::array();
      for (const GridPoint& p : cfg.image_grid_pinpoints) pins.push_back({p.height, p.width});
      j["image_grid_pinpoints"] = std::move(pins);
    }
    j["projector_hidden_act"] = cfg.projector_hidden_act;
    j["vision_feature_layer"] = cfg.vision_feature_layer;
    j["vision_feature_select_strategy"] = cfg.vision_feature_select_strategy;
    j["image_seq_length"] = cfg.image_seq_length;
    j["multimodal_projector_bias"] = cfg.multimodal_projector_bias;
    j["tie_word_embeddings"] = cfg.text.tie_word_embeddings;
    j["torch_dtype"] = cfg.text.torch_dtype;
    ordered_json t;
    t["model_type"] = cfg.text.model_type;
    append_llama_json(cfg.text, t);
    j["text_config"] = std::move(t);
    ordered_json v;
    const VisionConfig& vc = cfg.vision;
    v["model_type"] = "clip_vision_model";
    v["hidden_size"] = vc.hidden_size;
    v["intermediate_size"] = vc.intermediate_size;
    v["num_hidden_layers"] = vc.num_hidden_layers;
    v["num_attention_heads"] = vc.num_attention_heads;
    v["image_size"] = vc.image_size;
    v["patch_size"] = vc.patch_size;
    v["num_channels"] = vc.num_channels;
    v["layer_norm_eps"] = vc.layer_norm_eps;
    v["hidden_act"] = vc.hidden_act;
    j["vision_config"] = std::move(v);
  }
  if (cfg.quant.present) {
    ordered_json q;
    q["quant_method"] = cfg.quant.quant_method;
    q["bits"] = cfg.quant.bits;
    q["group_size"] = cfg.quant.group_size;
    q["sym"] = cfg.quant.sym;
    q["desc_act"] = cfg.quant.desc_act;
    q["checkpoint_format"] = cfg.quant.checkpoint_format;
    j["quantization_config"] = std::move(q);
  }
  // replace: a hand-built config with a non-UTF-8 string must not throw a JSON exception out of a writer.
  return j.dump(2, ' ', false, ordered_json::error_handler_t::replace) + "\n";
}

}  // namespace eqat
