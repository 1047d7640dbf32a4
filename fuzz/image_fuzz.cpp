// libFuzzer target for image decoding (src/data/image.cpp): the whole input is one image file, decoded by
// decode_image, the code load_image runs on the file's bytes (JPEG through OpenCV's imdecode / libjpeg-turbo after
// stb_image has vetted the header; PNG, GIF, BMP, PNM, TGA, PSD, HDR, PIC through stb_image).
//
// eqat::InputError is the expected outcome for bad bytes. Findings: any other exception, a sanitizer report, a
// hang or an allocation past -rss_limit_mb / -malloc_limit_mb (a small file must not make the decoder allocate
// for a huge declared size), or an accepted image that breaks what the preprocessing relies on (1..16384 pixels
// per side, rgb.size() == w*h*3). Small accepted images also go through the Pillow-exact resize, expand-to-square
// and centre crop (bounded output sizes, so the check stays fast).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "data/error.h"
#include "data/image.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  eqat::Image img;
  try {
    img = eqat::decode_image(bytes, "fuzz.img");
  } catch (const eqat::InputError& e) {
    fuzz::rejected(e);
    return 0;
  }
  if (img.width < 1 || img.height < 1 || img.width > 16384 || img.height > 16384) std::abort();
  if (img.rgb.size() != static_cast<size_t>(img.width) * img.height * 3) std::abort();
  if (static_cast<int64_t>(img.width) * img.height > 256 * 256) return 0;

  const eqat::Image sq = eqat::expand_to_square(img, {data[0], 127, 255});
  const int side = std::max(img.width, img.height);
  if (sq.width != side || sq.height != side || sq.rgb.size() != static_cast<size_t>(side) * side * 3) std::abort();
  const int ow = 1 + data[size - 1] % 37, oh = 1 + data[size / 2] % 29;
  const eqat::Image r = eqat::resize_bicubic_pil(img, ow, oh);
  if (r.width != ow || r.height != oh || r.rgb.size() != static_cast<size_t>(ow) * oh * 3) std::abort();
  const eqat::Image c = eqat::center_crop(img, 1 + size % 23, 1 + size % 19);
  if (c.rgb.size() != static_cast<size_t>(c.width) * c.height * 3) std::abort();
  return 0;
}
