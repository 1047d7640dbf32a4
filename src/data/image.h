// Image decoding (stb_image) and CLIP preprocessing bit-compatible with Pillow + HF CLIPImageProcessor
// (LLAVA.md §3): LLaVA-1.5 "pad" (expand to square with the mean colour), resize shortest edge with Pillow's
// fixed-point antialiased BICUBIC (horizontal pass first, uint8 intermediate), centre crop, rescale, normalise.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "data/config.h"

namespace eqat {

// 8-bit RGB, row-major HWC.
struct Image {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> rgb;  // [height][width][3]
  uint8_t at(int y, int x, int c) const { return rgb[(static_cast<size_t>(y) * width + x) * 3 + c]; }
};

// Decodes JPEG/PNG/BMP/GIF (first frame) only; gray and gray+alpha are replicated, alpha is dropped (PIL
// convert('RGB')). InputError naming the file for missing, truncated, corrupt, non-image or 0x0 input.
// Limits (hostile input): only regular files (not /dev/zero, a FIFO, a directory), at most 256 MiB; at most 16384
// pixels per side and 64 Mpx in all, checked from the header before decoding.
// A JPEG that libjpeg decodes with a warning ("Corrupt JPEG data: ...") gives one "warning:" line on stderr and is
// decoded anyway — or, with `strict` (the --strict flag of ask / preprocess / eval), is an InputError.
Image load_image(const std::string& path, bool strict = false);
// `max_pixels` > 0 lowers the pixel cap (a server's --max-image-pixels), checked from the header like the others.
Image decode_image(const std::string& bytes, const std::string& source, bool strict = false, int64_t max_pixels = 0);
// Which library decodes JPEG: "libjpeg-turbo" through OpenCV's imdecode (Pillow's decoder: bit-exact). Other
// formats use stb_image (lossless formats decode identically everywhere).
const char* jpeg_decoder();

// Pillow Image.resize(..., BICUBIC) exactly (22-bit fixed point, horizontal first, uint8 intermediate).
Image resize_bicubic_pil(const Image& img, int out_w, int out_h);
// LLaVA expand2square: centred (floor offsets) on a square canvas of colour `bg`.
Image expand_to_square(const Image& img, std::array<uint8_t, 3> bg);
// Centre crop with floor offsets; zero-pads when the image is smaller (as HF does).
Image center_crop(const Image& img, int crop_w, int crop_h);

// preprocessor_config.json (CLIPImageProcessor fields) + the LLaVA aspect mode.
struct ImageProcessorConfig {
  int64_t shortest_edge = 336;
  // size {"height", "width"}: resize to exactly this (ignoring the aspect ratio) instead; 0 = unused.
  int64_t resize_height = 0, resize_width = 0;
  int64_t crop_height = 336, crop_width = 336;
  bool do_resize = true, do_center_crop = true, do_rescale = true, do_normalize = true;
  double rescale_factor = 0.00392156862745098;
  std::array<double, 3> image_mean{0.48145466, 0.4578275, 0.40821073};
  std::array<double, 3> image_std{0.26862954, 0.26130258, 0.27577711};
  // "pad" (LLaVA-1.5, the default: all published scores) or "crop" (llava-hf processor default).
  std::string aspect_mode = "pad";
  // LLaVA-NeXT's LlavaNextImageProcessor: the anyres grid ((height, width) pairs); empty for CLIPImageProcessor.
  std::vector<GridPoint> image_grid_pinpoints;
};
// Reads `dir`/preprocessor_config.json when present (else defaults sized to `image_size`).
ImageProcessorConfig load_image_processor_config(const std::string& dir, int64_t image_size);
// The preprocessor_config.json text of LLaVA-1.5's CLIPImageProcessor at `image_size` (LLAVA.md §1.3); with
// `aspect_ratio` non-empty it also carries "image_aspect_ratio" (eqat's "pad" / "crop" switch).
std::string clip_preprocessor_json(int64_t image_size, const std::string& aspect_ratio = "");
// The same for LLaVA-NeXT's LlavaNextImageProcessor: CLIP's settings plus the anyres grid.
std::string llava_next_preprocessor_json(int64_t image_size, const std::vector<GridPoint>& pinpoints);

// The full pipeline: returns float32 [3, crop_h, crop_w] (CHW, RGB).
at::Tensor preprocess_image(const Image& img, const ImageProcessorConfig& cfg);

}  // namespace eqat
