#include "data/anyres.h"

#include <ATen/ops/stack.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>

#include "data/error.h"

namespace eqat {

GridPoint select_best_resolution(int64_t height, int64_t width, const std::vector<GridPoint>& pinpoints) {
  EQAT_CHECK(!pinpoints.empty(), "image_grid_pinpoints is empty");
  EQAT_CHECK(height > 0 && width > 0, "cannot tile an image of ", width, "x", height);
  GridPoint best;
  int64_t max_effective = 0;
  double min_wasted = std::numeric_limits<double>::infinity();
  for (const GridPoint& p : pinpoints) {
    EQAT_CHECK(p.height > 0 && p.width > 0, "image_grid_pinpoints holds a non-positive size");
    // Python: scale = min(w / ow, h / oh); int(ow * scale) (truncation) for the downscaled sides.
    const double scale = std::min(static_cast<double>(p.width) / static_cast<double>(width),
                                  static_cast<double>(p.height) / static_cast<double>(height));
    const int64_t dw = static_cast<int64_t>(static_cast<double>(width) * scale);
    const int64_t dh = static_cast<int64_t>(static_cast<double>(height) * scale);
    const int64_t effective = std::min(dw * dh, width * height);
    const double wasted = static_cast<double>(p.width * p.height - effective);
    if (effective > max_effective || (effective == max_effective && wasted < min_wasted)) {
      max_effective = effective;
      min_wasted = wasted;
      best = p;
    }
  }
  return best;
}

namespace {
// HF get_patch_output_size: the side that fits exactly, the other ceil(side * scale) capped at the target.
std::pair<int64_t, int64_t> fitted_size(int64_t h, int64_t w, const GridPoint& t) {
  const double sw = static_cast<double>(t.width) / static_cast<double>(w);
  const double sh = static_cast<double>(t.height) / static_cast<double>(h);
  if (sw < sh) return {std::min<int64_t>(static_cast<int64_t>(std::ceil(static_cast<double>(h) * sw)), t.height), t.width};
  return {t.height, std::min<int64_t>(static_cast<int64_t>(std::ceil(static_cast<double>(w) * sh)), t.width)};
}
}  // namespace

std::vector<Image> anyres_tiles(const Image& img, const std::vector<GridPoint>& pinpoints, int64_t patch,
                                int64_t base_h, int64_t base_w) {
  EQAT_CHECK(patch > 0 && base_h > 0 && base_w > 0, "anyres: tile and base sizes must be positive");
  const GridPoint best = select_best_resolution(img.height, img.width, pinpoints);
  EQAT_CHECK(best.height % patch == 0 && best.width % patch == 0, "anyres: grid pinpoint ", best.height, "x",
             best.width, " is not a multiple of the ", patch, "-pixel tile");
  const auto [nh, nw] = fitted_size(img.height, img.width, best);
  const Image resized = resize_bicubic_pil(img, static_cast<int>(nw), static_cast<int>(nh));
  // Zero padding, centred: floor((target - new) / 2) before, the rest after.
  const int64_t top = (best.height - nh) / 2, left = (best.width - nw) / 2;
  Image canvas;
  canvas.width = static_cast<int>(best.width);
  canvas.height = static_cast<int>(best.height);
  canvas.rgb.assign(static_cast<size_t>(best.width * best.height * 3), 0);
  for (int64_t y = 0; y < nh; ++y)
    std::copy_n(resized.rgb.data() + static_cast<size_t>(y * nw * 3), static_cast<size_t>(nw * 3),
                canvas.rgb.data() + static_cast<size_t>(((y + top) * best.width + left) * 3));
  std::vector<Image> tiles;
  tiles.push_back(resize_bicubic_pil(img, static_cast<int>(base_w), static_cast<int>(base_h)));
  for (int64_t ty = 0; ty < best.height; ty += patch)
    for (int64_t tx = 0; tx < best.width; tx += patch) {
      Image t;
      t.width = t.height = static_cast<int>(patch);
      t.rgb.resize(static_cast<size_t>(patch * patch * 3));
      for (int64_t y = 0; y < patch; ++y)
        std::copy_n(canvas.rgb.data() + static_cast<size_t>(((ty + y) * best.width + tx) * 3),
                    static_cast<size_t>(patch * 3), t.rgb.data() + static_cast<size_t>(y * patch * 3));
      tiles.push_back(std::move(t));
    }
  return tiles;
}

namespace {
// Python's int(round(v, 7)) for v >= 0: round to 7 decimals exactly (printf rounds the exact binary value, ties to
// even, as CPython's round does), then truncate.
int64_t int_round7(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.7f", v);
  return static_cast<int64_t>(std::strtod(buf, nullptr));
}
}  // namespace

AnyresLayout anyres_layout(const ModelConfig& cfg, int64_t height, int64_t width) {
  EQAT_CHECK(cfg.anyres, "anyres_layout: not a LLaVA-NeXT model");
  const int64_t tile = cfg.vision.image_size;
  AnyresLayout l;
  const GridPoint best = select_best_resolution(height, width, cfg.image_grid_pinpoints);
  l.grid_rows = best.height / tile;
  l.grid_cols = best.width / tile;
  l.side = tile / cfg.vision.patch_size;
  const int64_t cur_h = l.grid_rows * l.side, cur_w = l.grid_cols * l.side;
  l.rows = cur_h;
  l.cols = cur_w;
  // HF unpad_image, in its floating-point order.
  const double original_aspect = static_cast<double>(width) / static_cast<double>(height);
  const double current_aspect = static_cast<double>(cur_w) / static_cast<double>(cur_h);
  if (original_aspect > current_aspect) {
    const double scale = static_cast<double>(cur_w) / static_cast<double>(width);
    const int64_t new_h = int_round7(static_cast<double>(height) * scale);
    l.row0 = (cur_h - new_h) / 2;  // Python //: new_h <= cur_h here, so the floor is C++'s division
    l.rows = cur_h - 2 * l.row0;
  } else {
    const double scale = static_cast<double>(cur_h) / static_cast<double>(height);
    const int64_t new_w = int_round7(static_cast<double>(width) * scale);
    l.col0 = (cur_w - new_w) / 2;
    l.cols = cur_w - 2 * l.col0;
  }
  l.tokens = l.side * l.side + l.rows * (l.cols + 1);
  return l;
}

at::Tensor preprocess_anyres(const Image& img, const ImageProcessorConfig& cfg, const std::vector<GridPoint>& pinpoints) {
  const int64_t base_h = cfg.resize_height > 0 ? cfg.resize_height : cfg.shortest_edge;
  const int64_t base_w = cfg.resize_width > 0 ? cfg.resize_width : cfg.shortest_edge;
  const int64_t patch = cfg.crop_height > 0 ? cfg.crop_height : base_h;
  std::vector<at::Tensor> out;
  for (const Image& t : anyres_tiles(img, pinpoints, patch, base_h, base_w)) out.push_back(preprocess_image(t, cfg));
  return at::stack(out);
}

}  // namespace eqat
