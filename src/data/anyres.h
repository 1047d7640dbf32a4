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

#include "data/config.h"
#include "data/image.h"

namespace eqat {

GridPoint select_best_resolution(int64_t height, int64_t width, const std::vector<GridPoint>& pinpoints);
// Tiles in HF's order: [0] the whole image at base_h x base_w, then the grid row by row.
std::vector<Image> anyres_tiles(const Image& img, const std::vector<GridPoint>& pinpoints, int64_t patch,
                                int64_t base_h, int64_t base_w);
// LLaVA-NeXT's feature layout for an image of height x width (HF modeling_llava_next: get_anyres_image_grid_shape,
// unpad_image, pack_image_features; the processor's _get_number_of_features gives the same count). The best
// pinpoint is cut into grid_rows x grid_cols tiles of the vision tower's image size, each side x side patch
// features (side = image_size / patch_size); as one map of (grid_rows·side) x (grid_cols·side) features it is
// unpadded to the image's aspect: rows [row0, row0 + rows) and columns [col0, col0 + cols) are kept (HF:
// int(round(side · scale, 7)) of the scaled side, the padding split evenly). Each kept row gains the newline
// feature. tokens = side² (the base image) + rows · (cols + 1).
struct AnyresLayout {
  int64_t grid_rows = 0, grid_cols = 0, side = 0;
  int64_t row0 = 0, rows = 0, col0 = 0, cols = 0;
  int64_t tokens = 0;
};
AnyresLayout anyres_layout(const ModelConfig& cfg, int64_t height, int64_t width);

// [1 + rows·cols, 3, crop_h, crop_w] float32: every tile through preprocess_image with `cfg`; the tile size is
// cfg's crop height, the base image cfg's resize size (or shortest_edge square), as HF's processor chooses them.
at::Tensor preprocess_anyres(const Image& img, const ImageProcessorConfig& cfg, const std::vector<GridPoint>& pinpoints);

}  // namespace eqat
