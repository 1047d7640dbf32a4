// LLaVA-NeXT's "anyres" image preprocessing, exactly as HF's LlavaNextImageProcessor (PIL path) does it:
//   1. select_best_resolution: among the grid pinpoints (height, width), the one that keeps the most of the image's
//      pixels once it is scaled to fit, the least wasted area breaking ties (first listed wins a full tie);
//   2. the image resized into it keeping its aspect (the fitted side exact, the other ceil(side · scale)), Pillow
//      bicubic, then zero-padded to the pinpoint, centred (floor before, the rest after);
//   3. cut into patch × patch tiles, row by row; the whole image resized to base_h × base_w (ignoring its aspect)
//      goes first.
// Each tile then takes the usual CLIP path (preprocess_image: resize, crop and normalise, no-ops on a square tile of
// the crop size).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "data/image.h"

namespace eqat {

struct GridPoint {
  int64_t height = 0, width = 0;
};

GridPoint select_best_resolution(int64_t height, int64_t width, const std::vector<GridPoint>& pinpoints);
// Tiles in HF's order: [0] the whole image at base_h x base_w, then the grid row by row.
std::vector<Image> anyres_tiles(const Image& img, const std::vector<GridPoint>& pinpoints, int64_t patch,
                                int64_t base_h, int64_t base_w);
// [1 + rows·cols, 3, crop_h, crop_w] float32: every tile through preprocess_image with `cfg`; the tile size is
// cfg's crop height, the base image cfg's resize size (or shortest_edge square), as HF's processor chooses them.
at::Tensor preprocess_anyres(const Image& img, const ImageProcessorConfig& cfg, const std::vector<GridPoint>& pinpoints);

}  // namespace eqat
