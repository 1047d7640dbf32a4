// eqat preprocess / inspect / convert.
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cstdlib>
#include <iomanip>
#include <iostream>
#include <map>

#include "args.h"
#include "commands.h"
#include "data/anyres.h"
#include "data/config.h"
#include "data/error.h"
#include "data/fs.h"
#include "data/image.h"
#include "data/llama2c.h"
#include "data/output.h"
#include "data/safetensors.h"
#include "llm/generate.h"
#include "llm/prompt.h"

namespace eqat {

int cmd_preprocess(const Argv& argv);
int cmd_inspect(const Argv& argv);
int cmd_convert(const Argv& argv);
namespace {
const bool kRegistered =
    register_command("preprocess", cmd_preprocess, "write the pixel tensor exactly as the model sees it") &&
    register_command("inspect", cmd_inspect, "describe a model directory") &&
    register_command("convert", cmd_convert, "convert llama2.c checkpoints into an HF-style directory");
}  // namespace

int cmd_preprocess(const Argv& argv) {
  CommandSpec spec{"preprocess", "eqat preprocess [--model DIR] --image FILE --out FILE.safetensors",
                   "Writes the pixel tensor [1,3,S,S] float32 exactly as the model sees it (key 'pixel_values').",
                   {{"model", "DIR", "model whose preprocessor_config.json to use (default: the embedded default "
                                     "model, else LLaVA-1.5's 336 px settings)", ""},
                    {"image", "FILE", "image file", ""},
                    {"strict", "", "refuse a corrupt JPEG that libjpeg would decode with a warning", ""},
                    {"out", "FILE", "output .safetensors file", ""},
                    {"overwrite", "", kOverwriteHelp, ""},
                    {"aspect", "MODE", "override the aspect mode: pad (LLaVA-1.5) | crop (llava-hf default)", ""}},
                   0, 0};
  ParsedArgs a = parse_args(spec, argv);
  const std::string image = a.require("image");
  const std::string out = check_output_file(
      {a.require("out"), "--out", OutputKind::kTensors, a.flag("overwrite"), {image, a.str("model")}});
  Image img = load_image(image, a.flag("strict"));
  ImageProcessorConfig ipc;
  bool anyres = false;
  std::vector<GridPoint> pinpoints;
  std::string dir = a.str("model");
  if (dir.empty()) dir = default_model_dir();
  if (!dir.empty()) {
    ModelConfig cfg = load_model_config(dir);
    EQAT_CHECK(cfg.arch == Arch::kLlava, dir, ": is a text-only model; it has no image preprocessor");
    ipc = load_image_processor_config(dir, cfg.vision.image_size);
    anyres = cfg.anyres;
    pinpoints = cfg.image_grid_pinpoints;
  } else {
    std::cerr << "preprocess: no model given; using LLaVA-1.5 settings (336 px, pad)" << std::endl;
  }
  if (a.has("aspect")) {
    const std::string mode = a.str("aspect");
    EQAT_CHECK(mode == "pad" || mode == "crop", "--aspect: expected pad or crop, got '", mode, "'");
    ipc.aspect_mode = mode;
  }
  if (anyres) {  // LLaVA-NeXT: the tiles as HF's LlavaNextImageProcessor gives them, with the image's size
    at::Tensor px = preprocess_anyres(img, ipc, pinpoints).contiguous();
    at::Tensor sizes = at::tensor(std::vector<int64_t>{img.height, img.width}, at::kLong);
    write_safetensors(out, {{"pixel_values", px}, {"image_sizes", sizes}}, {{"format", "pt"}, {"anyres", "1"}});
    std::cerr << "wrote " << out << " pixel_values [" << px.size(0) << ", 3, " << px.size(2) << ", " << px.size(3)
              << "] (anyres: the base image, then " << px.size(0) - 1 << " tiles)" << std::endl;
    return 0;
  }
  at::Tensor px = preprocess_image(img, ipc).unsqueeze(0).contiguous();
  write_safetensors(out, {{"pixel_values", px}}, {{"format", "pt"}, {"aspect_mode", ipc.aspect_mode}});
  std::cerr << "wrote " << out << " pixel_values [1, 3, " << px.size(2) << ", " << px.size(3) << "]" << std::endl;
  return 0;
}

int cmd_inspect(const Argv& argv) {
  CommandSpec spec{"inspect", "eqat inspect DIR [--json] [--image-size WxH]",
                   "Describes a model directory: architecture, dims, parameters, dtypes, files, quantization.",
                   {{"json", "", "print JSON instead of text", ""},
                    {"image-size", "WxH", "LLaVA-NeXT: the image-token count of an image of this size "
                                          "(default: 640x480 and 1280x720)", ""}},
                   1, 1};
  ParsedArgs a = parse_args(spec, argv);
  const std::string dir = a.positional()[0];
  EQAT_CHECK(is_directory(dir), dir, ": not a directory");
  ModelConfig cfg = load_model_config(dir);
  std::vector<std::pair<int64_t, int64_t>> sizes = {{640, 480}, {1280, 720}};  // (width, height)
  if (a.has("image-size")) {
    const std::string v = a.str("image-size");
    const size_t x = v.find('x');
    char* end = nullptr;
    const long long w = x == std::string::npos ? 0 : std::strtoll(v.c_str(), &end, 10);
    const bool w_ok = x != std::string::npos && end == v.c_str() + x;
    const long long h = w_ok ? std::strtoll(v.c_str() + x + 1, &end, 10) : 0;
    EQAT_CHECK(w_ok && *end == '\0' && w > 0 && h > 0 && w <= 65535 && h <= 65535, "--image-size: expected WxH "
               "(e.g. 640x480, each side 1 to 65535), got '", v, "'");
    EQAT_CHECK(cfg.anyres, "--image-size: ", dir, " is not a LLaVA-NeXT model (its image-token count does not depend "
               "on the image's size)");
    sizes = {{w, h}};
  }
  Checkpoint ckpt = Checkpoint::open(dir);
  std::map<std::string, int64_t> dtype_params;
  int64_t params = 0;
  std::map<std::string, int64_t> component_params;
  for (const auto& name : ckpt.names()) {
    const TensorInfo& ti = ckpt.info(name);
    int64_t n = 1;
    for (int64_t d : ti.shape) n *= d;
    params += n;
    dtype_params[ti.dtype] += n;
    std::string comp = name.find("vision_tower") != std::string::npos            ? "vision_tower"
                       : name.find("multi_modal_projector") != std::string::npos ? "projector"
                                                                                 : "language_model";
    component_params[comp] += n;
  }
  nlohmann::json j;
  j["path"] = dir;
  const LlamaConfig& t = cfg.text;
  const std::string arch = architecture_name(cfg);
  j["architecture"] = arch;
  // What a user needs to know to prompt it: the decoder family, the context eqat serves, the chat template it picks
  // and the tokenizer kind (from the files: tokenizer.model is SentencePiece, a lone tokenizer.json byte-level BPE).
  const std::string tokenizer = file_exists(path_join(dir, "tokenizer.model"))  ? "sentencepiece"
                                : file_exists(path_join(dir, "tokenizer.json")) ? "byte-level BPE (tokenizer.json)"
                                                                                : "none";
  const std::string tmpl = model_template(dir, cfg.arch == Arch::kLlava ? "llava-1.5" : "none");
  j["decoder_family"] = t.model_type;
  j["sliding_window"] = t.sliding_window > 0 ? nlohmann::json(t.sliding_window) : nlohmann::json(nullptr);
  j["context"] = model_context(t);
  j["chat_template"] = tmpl;
  j["tokenizer"] = tokenizer;
  j["text"] = {{"hidden_size", t.hidden_size}, {"intermediate_size", t.intermediate_size},
               {"num_hidden_layers", t.num_hidden_layers}, {"num_attention_heads", t.num_attention_heads},
               {"num_key_value_heads", t.num_key_value_heads}, {"head_dim", t.head_dim},
               {"vocab_size", t.vocab_size}, {"max_position_embeddings", t.max_position_embeddings},
               {"rope_theta", t.rope_theta}, {"rms_norm_eps", t.rms_norm_eps},
               {"tie_word_embeddings", t.tie_word_embeddings}};
  if (cfg.arch == Arch::kLlava) {
    const VisionConfig& v = cfg.vision;
    j["vision"] = {{"hidden_size", v.hidden_size}, {"num_hidden_layers", v.num_hidden_layers},
                   {"num_attention_heads", v.num_attention_heads}, {"image_size", v.image_size},
                   {"patch_size", v.patch_size}};
    j["llava"] = {{"image_token_index", cfg.image_token_index}, {"image_seq_length", cfg.image_seq_length},
                  {"vision_feature_layer", cfg.vision_feature_layer},
                  {"vision_feature_select_strategy", cfg.vision_feature_select_strategy},
                  {"projector_hidden_act", cfg.projector_hidden_act}};
    if (cfg.anyres) {
      nlohmann::json pins = nlohmann::json::array(), counts = nlohmann::json::array();
      for (const GridPoint& p : cfg.image_grid_pinpoints) pins.push_back({p.height, p.width});
      j["llava"]["image_grid_pinpoints"] = pins;
      for (const auto& [w, h] : sizes) {
        const AnyresLayout l = anyres_layout(cfg, h, w);
        counts.push_back({{"width", w}, {"height", h}, {"image_tokens", l.tokens}, {"tiles", l.grid_rows * l.grid_cols},
                          {"grid", {l.grid_rows, l.grid_cols}}});
      }
      j["llava"]["image_tokens_for"] = counts;
    }
  }
  j["parameters"] = params;
  j["parameters_by_component"] = component_params;
  j["parameters_by_dtype"] = dtype_params;
  j["tensor_count"] = ckpt.names().size();
  nlohmann::json files = nlohmann::json::array();
  for (const auto& f : ckpt.files()) files.push_back({{"file", f->path()}, {"bytes", f->file_size()}});
  j["files"] = files;
  j["total_bytes"] = ckpt.total_bytes();
  if (cfg.quant.present) {
    j["quantization"] = {{"quant_method", cfg.quant.quant_method}, {"bits", cfg.quant.bits},
                         {"group_size", cfg.quant.group_size}, {"sym", cfg.quant.sym},
                         {"desc_act", cfg.quant.desc_act}, {"checkpoint_format", cfg.quant.checkpoint_format}};
  } else {
    j["quantization"] = nullptr;
  }
  if (a.flag("json")) {
    std::cout << j.dump(2) << std::endl;
    return 0;
  }
  std::cout << dir << ": " << arch << "\n";
  std::cout << "  decoder: " << t.model_type << ", " << t.num_hidden_layers << " layers, hidden " << t.hidden_size << ", ffn "
            << t.intermediate_size << ", heads " << t.num_attention_heads << " (kv " << t.num_key_value_heads
            << ", head_dim " << t.head_dim << "), vocab " << t.vocab_size << ", context "
            << model_context(t) << ", rope_theta " << t.rope_theta << (t.tie_word_embeddings ? ", tied lm_head" : "")
            << (t.sliding_window > 0 ? ", sliding window " + std::to_string(t.sliding_window) : std::string()) << "\n";
  std::cout << "  prompt:  template " << tmpl << ", tokenizer " << tokenizer << "\n";
  if (cfg.arch == Arch::kLlava) {
    const VisionConfig& v = cfg.vision;
    std::cout << "  vision:  " << v.num_hidden_layers << " layers, hidden " << v.hidden_size << ", heads "
              << v.num_attention_heads << ", " << v.image_size << " px / patch " << v.patch_size << "; feature layer "
              << cfg.vision_feature_layer << " (" << cfg.vision_feature_select_strategy << "), "
              << cfg.image_seq_length << (cfg.anyres ? " tokens per tile" : " image tokens") << "\n";
    if (cfg.anyres) {
      std::cout << "  anyres:  grid pinpoints";
      for (const GridPoint& p : cfg.image_grid_pinpoints) std::cout << " " << p.width << "x" << p.height;
      std::cout << "\n";
      for (const auto& [w, h] : sizes) {
        const AnyresLayout l = anyres_layout(cfg, h, w);
        std::cout << "  image " << w << "x" << h << ": " << l.tokens << " image tokens (base image + " << l.grid_rows
                  << "x" << l.grid_cols << " tiles, " << l.rows << "x" << l.cols << " features kept + newlines)\n";
      }
    }
  }
  std::cout << "  parameters: " << params;
  for (const auto& [c, n] : component_params) std::cout << "  " << c << " " << n;
  std::cout << "\n  dtypes:";
  for (const auto& [d, n] : dtype_params) std::cout << " " << d << " " << n;
  std::cout << "\n  tensors: " << ckpt.names().size() << " in " << ckpt.files().size() << " file(s), "
            << ckpt.total_bytes() << " bytes\n";
  if (cfg.quant.present)
    std::cout << "  quantization: " << cfg.quant.quant_method << " " << cfg.quant.bits << "-bit, group "
              << cfg.quant.group_size << ", " << (cfg.quant.sym ? "sym" : "asym") << ", format "
              << cfg.quant.checkpoint_format << "\n";
  else
    std::cout << "  quantization: none\n";
  return 0;
}

int cmd_convert(const Argv& argv) {
  CommandSpec spec{"convert", "eqat convert llama2c --checkpoint FILE --tokenizer FILE --out DIR",
                   "Converts a llama2.c checkpoint + tokenizer.bin into an HF-style Llama directory.",
                   {{"checkpoint", "FILE", "llama2.c model (.bin, legacy version-0 format)", ""},
                    {"tokenizer", "FILE", "llama2.c tokenizer (.bin)", ""},
                    {"out", "DIR", "output directory (written atomically)", ""},
                    {"overwrite", "", kOverwriteHelp, ""}},
                   1, 1};
  ParsedArgs a = parse_args(spec, argv);
  const std::string kind = a.positional()[0];
  EQAT_CHECK(kind == "llama2c", "convert: unknown source format '", kind, "' (supported: llama2c)");
  const std::string checkpoint = a.require("checkpoint"), tokenizer = a.require("tokenizer");
  const std::string out = check_replaced_dir(
      {a.require("out"), "--out", OutputKind::kModel, a.flag("overwrite"), {checkpoint, tokenizer}});
  convert_llama2c(checkpoint, tokenizer, out);
  std::cerr << "wrote " << out << std::endl;
  return 0;
}

}  // namespace eqat
