// Image decoding with stb_image and the LLaVA/CLIP preprocessing chain, arithmetic copied from the Python
// references so PNG inputs reproduce Pillow + CLIPImageProcessor bit for bit (LLAVA.md §3.2, §3.3, §3.5).
#include "data/image.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <limits>
#include <cmath>
#include <nlohmann/json.hpp>

#include "data/error.h"
#include "data/fs.h"

// JPEG goes through OpenCV's imdecode, i.e. the system libjpeg-turbo with its defaults (islow IDCT, fancy
// upsampling) — Pillow's decoder: bit-identical on the shared photos, while stb_image differs by up to 3 levels on
// ~4 % of values (different IDCT / colour-conversion rounding).
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

// libjpeg directly, only to hear its warnings (jpeg_warning).
#include <csetjmp>
#include <cstdio>
#include <jpeglib.h>

#include <sys/stat.h>

#include <cerrno>
#include <cstring>

// stb_image is compiled into this translation unit only. No stdio: every read goes through read_file so the
// errors name the file consistently.
#define STB_IMAGE_IMPLEMENTATION
#define STBI_NO_STDIO
#define STBI_FAILURE_USERMSG
// Only the formats eqat reads. Debian's stb snapshot (2022-09) has known memory bugs in the others, e.g. a 16-bit
// PGM (maxval > 255) overflowed the heap in stbi__convert_16_to_8 (found by fuzz/image_fuzz; stb 2.28 fixed it).
#define STBI_ONLY_JPEG
#define STBI_ONLY_PNG
#define STBI_ONLY_BMP
#define STBI_ONLY_GIF
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#endif
#include <stb_image.h>
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

namespace eqat {
namespace {

// Larger sides are not photographs a VLM would see; refusing them before decoding bounds memory for hostile or
// corrupt headers. The pixel cap bounds the area: 64 Mpx (8192², a 64-megapixel camera) = 192 MiB as RGB, where
// the side cap alone would allow 16384² × 3 = 768 MiB plus the decoder's own buffers.
constexpr int kMaxImageSide = 16384;
constexpr int64_t kMaxImagePixels = int64_t{1} << 26;
// Image files larger than this are refused before reading (and only regular files are read at all, so /dev/zero,
// a FIFO or a directory fails at once instead of hanging or filling memory). 256 MiB is far above any photograph
// (a 64-Mpx PNG is ~100-200 MiB).
constexpr int64_t kMaxImageFileBytes = int64_t{256} << 20;

void check_dimensions(const std::string& name, int64_t w, int64_t h, int64_t max_pixels) {
  EQAT_CHECK(w > 0 && h > 0, name, ": image has no pixels (", w, "x", h, ")");
  EQAT_CHECK(w <= kMaxImageSide && h <= kMaxImageSide, name, ": image is ", w, "x", h, ", larger than the ",
             kMaxImageSide, " pixels per side this tool accepts");
  EQAT_CHECK(w * h <= kMaxImagePixels, name, ": image is ", w, "x", h, " = ", w * h, " pixels, more than the ",
             kMaxImagePixels, " (64 Mpx) this tool decodes");
  EQAT_CHECK(max_pixels <= 0 || w * h <= max_pixels, name, ": image is ", w, "x", h, " = ", w * h,
             " pixels, more than the cap of ", max_pixels);
}

// libjpeg (the same libjpeg-turbo OpenCV decodes with) run over the entropy-coded data only to collect what it
// would merely warn about — "Corrupt JPEG data: premature end of data segment", extraneous bytes, a premature end
// of file — which OpenCV decodes anyway (grey-filled or garbled), printing libjpeg's own line at best. Scaled to
// 1/8 with the fast IDCT, so the pass costs little beyond Huffman decoding. Returns the first warning, "" when
// clean or when libjpeg fails outright (the decoders below then report their own error).
struct JpegCheck {
  jpeg_error_mgr pub;
  jmp_buf jump;
  int warnings = 0;
  char first[JMSG_LENGTH_MAX] = {0};
};

void jpeg_check_error_exit(j_common_ptr c) { longjmp(reinterpret_cast<JpegCheck*>(c->err)->jump, 1); }

void jpeg_check_message(j_common_ptr c, int level) {
  if (level >= 0) return;  // trace messages
  auto* e = reinterpret_cast<JpegCheck*>(c->err);
  if (e->warnings++ == 0) c->err->format_message(c, e->first);
}

// Routes libjpeg's errors (longjmp to the caller's setjmp on err->jump) and warnings (counted) into `err`.
void install_jpeg_check(jpeg_decompress_struct* cinfo, JpegCheck* err) {
  cinfo->err = jpeg_std_error(&err->pub);
  err->pub.error_exit = jpeg_check_error_exit;
  err->pub.emit_message = jpeg_check_message;
}

std::string jpeg_warning(const std::string& bytes) {
  jpeg_decompress_struct cinfo;
  JpegCheck err;
  install_jpeg_check(&cinfo, &err);
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return "";
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, reinterpret_cast<const unsigned char*>(bytes.data()), static_cast<unsigned long>(bytes.size()));
  jpeg_read_header(&cinfo, TRUE);
  cinfo.scale_num = 1;
  cinfo.scale_denom = 8;
  cinfo.dct_method = JDCT_IFAST;
  cinfo.do_fancy_upsampling = FALSE;
  jpeg_start_decompress(&cinfo);
  // The row comes from libjpeg's own pool (freed by jpeg_destroy_decompress): an error longjmps out of
  // jpeg_read_scanlines, past any C++ destructor (a std::vector here leaked on every corrupt JPEG: fuzz/image_fuzz).
  JSAMPARRAY rows = (*cinfo.mem->alloc_sarray)(reinterpret_cast<j_common_ptr>(&cinfo), JPOOL_IMAGE,
                                               cinfo.output_width * cinfo.output_components, 1);
  while (cinfo.output_scanline < cinfo.output_height) jpeg_read_scanlines(&cinfo, rows, 1);
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return err.warnings > 0 ? std::string(err.first) : std::string();
}

// Pillow's fixed point (libImaging/Resample.c): 32 bits minus 8 for the pixel minus 2 of headroom.
constexpr int kPrecisionBits = 22;

// Keys cubic with a = -0.5 in Pillow's nested evaluation order (the order matters for bit-exact weights).
double bicubic_filter(double x) {
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// Fixed-point taps of one axis: output o reads inputs [first[o], first[o] + count[o]) with weights
// k[o * ksize + t]. Mirrors Pillow's precompute_coeffs + normalize_coeffs_8bpc.
struct AxisCoeffs {
  int ksize = 0;
  std::vector<int> first, count;
  std::vector<int32_t> k;
};

AxisCoeffs precompute_coeffs(int in_size, int out_size) {
  constexpr double kSupport = 2.0;  // bicubic
  const double scale = static_cast<double>(in_size) / out_size;
  // Downscaling widens the kernel by the scale: that is Pillow's antialiasing.
  const double filterscale = std::max(scale, 1.0);
  const double support = kSupport * filterscale;
  AxisCoeffs c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.first.resize(out_size);
  c.count.resize(out_size);
  c.k.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> w(c.ksize);
  const double ss = 1.0 / filterscale;  // Pillow multiplies by the reciprocal; dividing could change an ulp
  for (int o = 0; o < out_size; ++o) {
    const double center = (o + 0.5) * scale;
    // (int) truncates toward zero, as in C; the clamps make the sign irrelevant.
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int t = 0; t < xmax; ++t) {
      w[t] = bicubic_filter((t + xmin - center + 0.5) * ss);
      ww += w[t];
    }
    for (int t = 0; t < xmax; ++t) {
      if (ww != 0.0) w[t] /= ww;
      // Round half away from zero, then truncate to int, exactly as normalize_coeffs_8bpc.
      const double scaled = w[t] * (1 << kPrecisionBits);
      c.k[static_cast<size_t>(o) * c.ksize + t] = static_cast<int32_t>(w[t] < 0 ? -0.5 + scaled : 0.5 + scaled);
    }
    c.first[o] = xmin;
    c.count[o] = xmax;
  }
  return c;
}

inline uint8_t clip8(int64_t acc) {
  // acc carries the 2^(P-1) rounding bias; >> floors like Pillow's arithmetic shift.
  if (acc >= (int64_t{1} << kPrecisionBits << 8)) return 255;
  if (acc <= 0) return 0;
  return static_cast<uint8_t>(acc >> kPrecisionBits);
}

std::string image_context(const std::string& source) { return source.empty() ? "<image bytes>" : source; }

// True when the JPEG stream ends properly: an EOI marker (FF D9) after the last start-of-scan (FF DA). Inside
// entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so an FF D9 there is a real EOI; EXIF
// thumbnails (with their own EOI) sit before the first SOS. libjpeg would only warn on a truncated stream and
// fill the rest with grey; Pillow reports "image file is truncated" — so do we.
bool jpeg_is_complete(const std::string& bytes) {
  const size_t sos = bytes.rfind("\xFF\xDA");
  return sos != std::string::npos && bytes.find("\xFF\xD9", sos) != std::string::npos;
}

// stb_image (Debian's 2022-09 snapshot) trusts the 16 code counts of a DHT table: more than 256 codes overflow its
// fixed Huffman arrays (found by fuzz/image_fuzz; stb 2.28 checks it). Walks every marker segment (and skips the
// entropy-coded data after each SOS) and checks each table the way stb reads it: tables follow one another while
// stb's remaining-length counter is positive, bytes past the end reading as 0.
bool jpeg_huffman_tables_ok(const std::string& b) {
  const auto at = [&](size_t i) { return i < b.size() ? static_cast<uint8_t>(b[i]) : uint8_t{0}; };
  // stb takes any run of 0xFF fill bytes before the SOI's D8, so "FF FF D8 ..." is a JPEG to it as well.
  size_t i = 0;
  while (i < b.size() && at(i) == 0xFF) ++i;
  if (i == 0 || at(i) != 0xD8) return true;  // not a JPEG: stb will not run its JPEG code on it
  ++i;  // the first byte after SOI
  while (i + 1 < b.size()) {
    const uint8_t m = at(i + 1);
    // Not a marker, a fill byte, a stuffed 0xFF00, RSTn, TEM, SOI: no length field (entropy-coded data included).
    if (at(i) != 0xFF || m == 0xFF || m == 0x00 || m == 0x01 || (m >= 0xD0 && m <= 0xD8)) {
      ++i;
      continue;
    }
    if (m == 0xD9) break;  // EOI
    const size_t seg_end = i + 2 + (static_cast<size_t>(at(i + 2)) << 8 | at(i + 3));
    if (m == 0xC4) {
      for (size_t p = i + 4; p < seg_end;) {
        size_t n = 0;
        for (size_t k = 1; k <= 16; ++k) n += at(p + k);
        if (n > 256) return false;
        p += 17 + n;
      }
    }
    i = std::max(seg_end, i + 2);
  }
  return true;
}

// stb_image copies an IDAT chunk into its data buffer even when the chunk is empty and no buffer exists yet:
// memcpy(nullptr, p, 0), which is undefined (UBSan stops on it; found by fuzz/image_fuzz). Empty IDAT chunks carry
// no data, so a PNG that has any is copied into `out` without them (returns true); corrupt chunk lengths end the
// walk and leave the rest as it is, for stb to report.
bool drop_empty_png_idat(const std::string& b, std::string* out) {
  const auto be32 = [&](size_t i) {
    uint32_t v = 0;
    for (size_t k = 0; k < 4; ++k) v = v << 8 | static_cast<uint8_t>(b[i + k]);
    return v;
  };
  if (b.size() < 8 || b.compare(0, 8, "\x89PNG\r\n\x1a\n", 8) != 0) return false;
  for (int pass = 0; pass < 2; ++pass) {  // 0: look for one, 1: copy without them (rare: only then a copy)
    bool found = false;
    if (pass == 1) out->assign(b, 0, 8);
    size_t i = 8;
    while (i + 12 <= b.size()) {  // length, type, data, CRC
      const uint32_t len = be32(i);
      if (len > b.size() - i - 12) break;
      const bool empty_idat = len == 0 && b.compare(i + 4, 4, "IDAT") == 0;
      found = found || empty_idat;
      if (pass == 1 && !empty_idat) out->append(b, i, 12 + len);
      i += 12 + len;
    }
    if (pass == 0 && !found) return false;
    if (pass == 1) out->append(b, i, std::string::npos);
  }
  return true;
}

// Returns false for streams OpenCV cannot decode as 8-bit colour (left to stb_image for its error message).
bool decode_jpeg_opencv(const std::string& bytes, const std::string& name, Image* img) {
  cv::Mat buf(1, static_cast<int>(bytes.size()), CV_8UC1, const_cast<char*>(bytes.data()));
  // IGNORE_ORIENTATION: PIL/LLaVA/transformers never apply EXIF rotation (LLAVA.md §3.1).
  cv::Mat bgr;
  try {
    bgr = cv::imdecode(buf, cv::IMREAD_COLOR | cv::IMREAD_IGNORE_ORIENTATION);
  } catch (const cv::Exception& e) {  // OpenCV's assertions on malformed streams: bad input, not a bug of ours
    throw_input_error(str_cat(name, ": cannot decode JPEG (OpenCV: ", e.msg, ")"));
  }
  if (bgr.empty() || bgr.type() != CV_8UC3) return false;
  check_dimensions(name, bgr.cols, bgr.rows, 0);
  cv::Mat rgb;
  cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
  img->width = rgb.cols;
  img->height = rgb.rows;
  img->rgb.resize(static_cast<size_t>(img->width) * img->height * 3);
  for (int y = 0; y < rgb.rows; ++y)
    std::copy(rgb.ptr<uint8_t>(y), rgb.ptr<uint8_t>(y) + rgb.cols * 3, img->rgb.data() + static_cast<size_t>(y) * rgb.cols * 3);
  return true;
}

// A CMYK (or YCCK) JPEG the way Pillow decodes it: libjpeg's CMYK output read as "CMYK;I" (every channel inverted:
// Adobe's convention, which Pillow assumes for all CMYK JPEGs), then Pillow's cmyk2rgb, v = nk - c·nk/255 with
// nk = 255 - k and its MULDIV255 rounding. False (nothing decoded) for other JPEGs or when libjpeg fails (the OpenCV
// path then reports the error).
bool decode_jpeg_cmyk(const std::string& bytes, Image* img) {
  jpeg_decompress_struct cinfo;
  JpegCheck err;
  install_jpeg_check(&cinfo, &err);
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return false;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, reinterpret_cast<const unsigned char*>(bytes.data()), static_cast<unsigned long>(bytes.size()));
  jpeg_read_header(&cinfo, TRUE);
  if (cinfo.jpeg_color_space != JCS_CMYK && cinfo.jpeg_color_space != JCS_YCCK) {
    jpeg_destroy_decompress(&cinfo);
    return false;
  }
  cinfo.out_color_space = JCS_CMYK;
  jpeg_start_decompress(&cinfo);
  const int w = static_cast<int>(cinfo.output_width), h = static_cast<int>(cinfo.output_height);
  img->width = w;
  img->height = h;
  img->rgb.resize(static_cast<size_t>(w) * h * 3);  // img belongs to the caller: nothing here for longjmp to skip
  JSAMPARRAY rows = (*cinfo.mem->alloc_sarray)(reinterpret_cast<j_common_ptr>(&cinfo), JPOOL_IMAGE,
                                               cinfo.output_width * 4, 1);
  const auto muldiv255 = [](int a, int b) {
    const int t = a * b + 128;
    return ((t >> 8) + t) >> 8;
  };
  while (cinfo.output_scanline < cinfo.output_height) {
    const int y = static_cast<int>(cinfo.output_scanline);
    jpeg_read_scanlines(&cinfo, rows, 1);
    uint8_t* out = img->rgb.data() + static_cast<size_t>(y) * w * 3;
    for (int x = 0; x < w; ++x) {
      const JSAMPLE* px = rows[0] + 4 * x;
      const int nk = px[3];  // 255 - k, where Pillow's k is the inverted sample 255 - px[3]
      for (int c = 0; c < 3; ++c)
        out[3 * x + c] = static_cast<uint8_t>(std::clamp(nk - muldiv255(255 - px[c], nk), 0, 255));
    }
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return true;
}

// A copy of a GIF with the transparency flag of every Graphic Control Extension before the first image cleared
// (walking the block structure, never pattern-matching image data). False (no copy) for non-GIFs, GIFs without
// transparency, and malformed ones (stb then reports them as it would).
bool gif_without_transparency(const std::string& b, std::string* out) {
  if (b.size() < 13 || (b.compare(0, 6, "GIF87a") != 0 && b.compare(0, 6, "GIF89a") != 0)) return false;
  const auto u8 = [&b](size_t i) { return static_cast<uint8_t>(b[i]); };
  size_t p = 13;
  if (u8(10) & 0x80) p += 3 * (size_t{1} << ((u8(10) & 7) + 1));  // global colour table
  std::vector<size_t> flags;  // offsets of the GCE flag bytes to clear
  while (p < b.size()) {
    const uint8_t block = u8(p);
    if (block != 0x21) break;  // an image descriptor (0x2C), the trailer or junk: stop
    if (p + 2 > b.size()) return false;
    const uint8_t label = u8(p + 1);
    size_t q = p + 2;
    if (label == 0xF9 && q + 1 < b.size() && u8(q) == 4 && (u8(q + 1) & 1)) flags.push_back(q + 1);
    while (q < b.size() && u8(q) != 0) q += 1 + u8(q);  // sub-blocks up to the terminator
    if (q >= b.size()) return false;
    p = q + 1;
  }
  if (flags.empty()) return false;
  *out = b;
  for (size_t f : flags) (*out)[f] = static_cast<char>(u8(f) & ~1);
  return true;
}

}  // namespace

const char* jpeg_decoder() { return "libjpeg-turbo"; }  // through OpenCV's imdecode

Image decode_image(const std::string& bytes, const std::string& source, bool strict, int64_t max_pixels) {
  const std::string name = image_context(source);
  EQAT_CHECK(!bytes.empty(), name, ": empty file, not an image");
  EQAT_CHECK(bytes.size() <= static_cast<size_t>(INT32_MAX), name, ": file too large (", bytes.size(), " bytes)");
  EQAT_CHECK(jpeg_huffman_tables_ok(bytes), name, ": corrupt JPEG (a Huffman table defines more than 256 codes)");
  if (bytes.size() >= 3 && bytes.compare(0, 3, "\xFF\xD8\xFF") == 0) {  // JPEG SOI + first marker
    int w = 0, h = 0, comp = 0;
    // Header first (stb), so absurd sizes are refused before anything allocates for them.
    EQAT_CHECK(stbi_info_from_memory(reinterpret_cast<const stbi_uc*>(bytes.data()), static_cast<int>(bytes.size()),
                                     &w, &h, &comp),
               name, ": cannot decode JPEG (", stbi_failure_reason(), ")");
    check_dimensions(name, w, h, max_pixels);
    EQAT_CHECK(jpeg_is_complete(bytes), name, ": JPEG file is truncated (no end-of-image marker after the last scan)");
    const std::string warning = jpeg_warning(bytes);
    if (!warning.empty()) {
      EQAT_CHECK(!strict, name, ": corrupt JPEG data (libjpeg: ", warning, "); refused under --strict");
      std::fprintf(stderr, "warning: %s: corrupt JPEG data (libjpeg: %s); decoded anyway, --strict refuses it\n",
                   name.c_str(), warning.c_str());
    }
    Image img;
    if (decode_jpeg_cmyk(bytes, &img)) return img;
    if (decode_jpeg_opencv(bytes, name, &img)) return img;
  }
  std::string png_copy;
  const std::string* stb_src = drop_empty_png_idat(bytes, &png_copy) ? &png_copy : &bytes;
  // GIF: Pillow's convert("RGB") gives a transparent index its palette colour; stb would leave those pixels black,
  // so the first frame's transparency flag is cleared before stb reads it.
  std::string gif_copy;
  if (gif_without_transparency(*stb_src, &gif_copy)) stb_src = &gif_copy;
  const std::string& stb_bytes = *stb_src;
  const auto* data = reinterpret_cast<const stbi_uc*>(stb_bytes.data());
  const int len = static_cast<int>(stb_bytes.size());
  int w = 0, h = 0, comp = 0;
  // Header first: refuse absurd sizes before stb allocates for them.
  EQAT_CHECK(stbi_info_from_memory(data, len, &w, &h, &comp), name, ": cannot decode image (",
             stbi_failure_reason(), ")");
  check_dimensions(name, w, h, max_pixels);
  // 16-bit grayscale PNG (colour type 0): Pillow opens it as I;16, and convert("RGB") clips each value to 255 where
  // stb would keep the high byte.
  if (stb_bytes.size() > 25 && stb_bytes.compare(1, 3, "PNG") == 0 && static_cast<uint8_t>(stb_bytes[24]) == 16 &&
      stb_bytes[25] == 0) {
    int c16 = 0;
    stbi_us* px = stbi_load_16_from_memory(data, len, &w, &h, &c16, 1);
    EQAT_CHECK(px != nullptr, name, ": cannot decode image (", stbi_failure_reason(), ")");
    Image img;
    img.width = w;
    img.height = h;
    img.rgb.resize(static_cast<size_t>(w) * h * 3);
    for (size_t i = 0; i < static_cast<size_t>(w) * h; ++i)
      img.rgb[i * 3] = img.rgb[i * 3 + 1] = img.rgb[i * 3 + 2] = static_cast<uint8_t>(std::min<int>(px[i], 255));
    stbi_image_free(px);
    return img;
  }
  // 3 requested channels = PIL convert('RGB') for the modes that matter: gray replicated, alpha dropped (not
  // composited), palette expanded. GIF: the first frame.
  stbi_uc* pixels = stbi_load_from_memory(data, len, &w, &h, &comp, 3);
  EQAT_CHECK(pixels != nullptr, name, ": cannot decode image (", stbi_failure_reason(), ")");
  Image img;
  img.width = w;
  img.height = h;
  img.rgb.assign(pixels, pixels + static_cast<size_t>(w) * h * 3);
  stbi_image_free(pixels);
  return img;
}

Image load_image(const std::string& path, bool strict) {
  return decode_image(read_file(path, kMaxImageFileBytes), path, strict);  // regular files only, size-capped
}

namespace {
// One horizontal pass over rows [row_first, row_first + rows) of `src` into a uint8 image out_w wide.
Image horizontal_pass(const Image& src, int row_first, int rows, int out_w, const AxisCoeffs& hc) {
  Image tmp;
  tmp.width = out_w;
  tmp.height = rows;
  tmp.rgb.resize(static_cast<size_t>(out_w) * rows * 3);
  for (int y = 0; y < rows; ++y) {
    const uint8_t* in = &src.rgb[static_cast<size_t>(y + row_first) * src.width * 3];
    uint8_t* dst = &tmp.rgb[static_cast<size_t>(y) * out_w * 3];
    for (int x = 0; x < out_w; ++x) {
      const int32_t* k = &hc.k[static_cast<size_t>(x) * hc.ksize];
      const uint8_t* s = in + static_cast<size_t>(hc.first[x]) * 3;
      for (int ch = 0; ch < 3; ++ch) {
        int64_t acc = int64_t{1} << (kPrecisionBits - 1);
        for (int t = 0; t < hc.count[x]; ++t) acc += static_cast<int64_t>(s[t * 3 + ch]) * k[t];
        dst[x * 3 + ch] = clip8(acc);
      }
    }
  }
  return tmp;
}

// One vertical pass to out_h rows; `src` row r holds source row r + row_offset.
Image vertical_pass(const Image& src, int out_h, int row_offset, const AxisCoeffs& vc) {
  Image out;
  out.width = src.width;
  out.height = out_h;
  out.rgb.resize(static_cast<size_t>(src.width) * out_h * 3);
  const size_t stride = static_cast<size_t>(src.width) * 3;
  for (int y = 0; y < out_h; ++y) {
    const int32_t* k = &vc.k[static_cast<size_t>(y) * vc.ksize];
    const uint8_t* in = &src.rgb[static_cast<size_t>(vc.first[y] - row_offset) * stride];
    uint8_t* dst = &out.rgb[y * stride];
    for (size_t i = 0; i < stride; ++i) {
      int64_t acc = int64_t{1} << (kPrecisionBits - 1);
      for (int t = 0; t < vc.count[y]; ++t) acc += static_cast<int64_t>(in[t * stride + i]) * k[t];
      dst[i] = clip8(acc);
    }
  }
  return out;
}
}  // namespace

Image resize_bicubic_pil(const Image& img, int out_w, int out_h) {
  EQAT_CHECK(out_w > 0 && out_h > 0, "cannot resize an image to ", out_w, "x", out_h);
  EQAT_ASSERT(img.width > 0 && img.height > 0 && img.rgb.size() == static_cast<size_t>(img.width) * img.height * 3);
  // Pillow returns a plain copy when the size does not change (no filtering at all).
  if (out_w == img.width && out_h == img.height) return img;
  const bool need_h = out_w != img.width;
  const bool need_v = out_h != img.height;
  const AxisCoeffs hc = precompute_coeffs(img.width, out_w);
  const AxisCoeffs vc = precompute_coeffs(img.height, out_h);
  // The rounding to uint8 between the passes is part of Pillow's result (LLAVA.md §3.5), so their order matters.
  // Pillow 13 runs the vertical pass first when the height loses more than twice the pixels the width loses
  // (Resample.c, ImagingResampleInner), else the horizontal pass first, over only the rows the vertical pass reads.
  const int dh = img.height - out_h, dw = img.width - out_w;
  const bool vertical_first = dh > 0 && dh > dw * 2;
  if (vertical_first) {
    Image tmp = vertical_pass(img, out_h, 0, vc);
    return need_h ? horizontal_pass(tmp, 0, out_h, out_w, hc) : tmp;
  }
  if (!need_h) return vertical_pass(img, out_h, 0, vc);
  const int row_first = vc.first[0];
  const int row_last = vc.first[out_h - 1] + vc.count[out_h - 1];
  Image tmp = horizontal_pass(img, need_v ? row_first : 0, need_v ? row_last - row_first : img.height, out_w, hc);
  return need_v ? vertical_pass(tmp, out_h, row_first, vc) : tmp;
}

Image expand_to_square(const Image& img, std::array<uint8_t, 3> bg) {
  if (img.width == img.height) return img;
  const int side = std::max(img.width, img.height);
  // Floor offsets: an odd surplus row/column goes to the bottom/right, as LLaVA's (W - H) // 2.
  const int x0 = (side - img.width) / 2;
  const int y0 = (side - img.height) / 2;
  Image out;
  out.width = out.height = side;
  out.rgb.resize(static_cast<size_t>(side) * side * 3);
  for (size_t i = 0; i < out.rgb.size(); i += 3) std::copy(bg.begin(), bg.end(), out.rgb.begin() + i);
  for (int y = 0; y < img.height; ++y)
    std::copy_n(&img.rgb[static_cast<size_t>(y) * img.width * 3], static_cast<size_t>(img.width) * 3,
                &out.rgb[(static_cast<size_t>(y + y0) * side + x0) * 3]);
  return out;
}

Image center_crop(const Image& img, int crop_w, int crop_h) {
  EQAT_CHECK(crop_w > 0 && crop_h > 0, "cannot crop an image to ", crop_w, "x", crop_h);
  if (crop_w == img.width && crop_h == img.height) return img;
  // HF center_crop: a larger axis starts at (orig - crop) // 2; a smaller one is zero-padded with the image at
  // ceil((crop - orig) / 2). Both reduce to one signed source offset per axis.
  const auto offset = [](int orig, int crop) { return orig >= crop ? (orig - crop) / 2 : -((crop - orig + 1) / 2); };
  const int ox = offset(img.width, crop_w);
  const int oy = offset(img.height, crop_h);
  Image out;
  out.width = crop_w;
  out.height = crop_h;
  out.rgb.assign(static_cast<size_t>(crop_w) * crop_h * 3, 0);
  for (int y = 0; y < crop_h; ++y) {
    const int sy = y + oy;
    if (sy < 0 || sy >= img.height) continue;
    const int x_begin = std::max(0, -ox), x_end = std::min(crop_w, img.width - ox);
    if (x_begin >= x_end) continue;
    std::copy_n(&img.rgb[(static_cast<size_t>(sy) * img.width + x_begin + ox) * 3],
                static_cast<size_t>(x_end - x_begin) * 3, &out.rgb[(static_cast<size_t>(y) * crop_w + x_begin) * 3]);
  }
  return out;
}

namespace {

using json = nlohmann::json;

int64_t positive_int(const json& v, const std::string& source, const std::string& key) {
  EQAT_CHECK(v.is_number_integer() && v.get<int64_t>() > 0 && v.get<int64_t>() <= kMaxImageSide, source, ": \"",
             key, "\" must be a positive integer up to ", kMaxImageSide);
  return v.get<int64_t>();
}

bool bool_field(const json& j, const char* key, bool fallback, const std::string& source) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  EQAT_CHECK(it->is_boolean(), source, ": \"", key, "\" must be true or false");
  return it->get<bool>();
}

std::array<double, 3> triple(const json& j, const char* key, std::array<double, 3> fallback,
                             const std::string& source) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  // A scalar means the same value for all channels (HF accepts both).
  if (it->is_number()) return {it->get<double>(), it->get<double>(), it->get<double>()};
  EQAT_CHECK(it->is_array() && it->size() == 3, source, ": \"", key, "\" must be a number or a list of 3 numbers");
  std::array<double, 3> out{};
  for (int c = 0; c < 3; ++c) {
    EQAT_CHECK((*it)[c].is_number(), source, ": \"", key, "\" must contain numbers");
    out[c] = (*it)[c].get<double>();
  }
  return out;
}

}  // namespace

std::string clip_preprocessor_json(int64_t image_size, const std::string& aspect_ratio) {
  nlohmann::ordered_json p{{"crop_size", {{"height", image_size}, {"width", image_size}}},
                           {"do_center_crop", true},
                           {"do_convert_rgb", true},
                           {"do_normalize", true},
                           {"do_rescale", true},
                           {"do_resize", true}};
  if (!aspect_ratio.empty()) p["image_aspect_ratio"] = aspect_ratio;
  p["image_mean"] = {0.48145466, 0.4578275, 0.40821073};
  p["image_processor_type"] = "CLIPImageProcessor";
  p["image_std"] = {0.26862954, 0.26130258, 0.27577711};
  p["processor_class"] = "LlavaProcessor";
  p["resample"] = 3;
  p["rescale_factor"] = 0.00392156862745098;
  p["size"] = {{"shortest_edge", image_size}};
  return p.dump(2) + "\n";
}

std::string llava_next_preprocessor_json(int64_t image_size, const std::vector<GridPoint>& pinpoints) {
  nlohmann::ordered_json j = nlohmann::ordered_json::parse(clip_preprocessor_json(image_size));
  nlohmann::ordered_json pins = nlohmann::ordered_json::array();
  for (const GridPoint& g : pinpoints) pins.push_back({g.height, g.width});
  j["image_grid_pinpoints"] = std::move(pins);
  j["image_processor_type"] = "LlavaNextImageProcessor";
  j["processor_class"] = "LlavaNextProcessor";
  return j.dump(2) + "\n";
}

ImageProcessorConfig load_image_processor_config(const std::string& dir, int64_t image_size) {
  EQAT_CHECK(image_size > 0, "image size must be positive, got ", image_size);
  ImageProcessorConfig cfg;
  cfg.shortest_edge = cfg.crop_height = cfg.crop_width = image_size;
  const std::string path = path_join(dir, "preprocessor_config.json");
  if (!file_exists(path)) return cfg;

  const json j = json::parse(read_file(path), nullptr, /*allow_exceptions=*/false);
  EQAT_CHECK(!j.is_discarded() && j.is_object(), path, ": not a JSON object");
  if (j.contains("crop_size") && !j["crop_size"].is_null()) {
    const json& c = j["crop_size"];
    if (c.is_object()) {
      EQAT_CHECK(c.contains("height") && c.contains("width"), path, ": \"crop_size\" needs \"height\" and \"width\"");
      cfg.crop_height = positive_int(c["height"], path, "crop_size.height");
      cfg.crop_width = positive_int(c["width"], path, "crop_size.width");
    } else {
      cfg.crop_height = cfg.crop_width = positive_int(c, path, "crop_size");
    }
  }
  if (j.contains("size") && !j["size"].is_null()) {
    const json& s = j["size"];
    if (s.is_object() && s.contains("shortest_edge")) {
      cfg.shortest_edge = positive_int(s["shortest_edge"], path, "size.shortest_edge");
    } else if (s.is_object()) {
      EQAT_CHECK(s.contains("height") && s.contains("width"), path,
                 ": \"size\" needs \"shortest_edge\" or \"height\" and \"width\"");
      cfg.resize_height = positive_int(s["height"], path, "size.height");
      cfg.resize_width = positive_int(s["width"], path, "size.width");
    } else {
      // CLIPImageProcessor reads a bare int as {"shortest_edge": n} (default_to_square=False).
      cfg.shortest_edge = positive_int(s, path, "size");
    }
  }
  cfg.do_resize = bool_field(j, "do_resize", cfg.do_resize, path);
  cfg.do_center_crop = bool_field(j, "do_center_crop", cfg.do_center_crop, path);
  cfg.do_rescale = bool_field(j, "do_rescale", cfg.do_rescale, path);
  cfg.do_normalize = bool_field(j, "do_normalize", cfg.do_normalize, path);
  if (j.contains("rescale_factor") && !j["rescale_factor"].is_null()) {
    EQAT_CHECK(j["rescale_factor"].is_number(), path, ": \"rescale_factor\" must be a number");
    cfg.rescale_factor = j["rescale_factor"].get<double>();
  }
  cfg.image_mean = triple(j, "image_mean", cfg.image_mean, path);
  cfg.image_std = triple(j, "image_std", cfg.image_std, path);
  for (double s : cfg.image_std) EQAT_CHECK(s > 0, path, ": \"image_std\" values must be positive");
  for (double m : cfg.image_mean) EQAT_CHECK(m >= 0 && m <= 1, path, ": \"image_mean\" values must lie in [0, 1]");

  if (j.contains("image_grid_pinpoints") && !j["image_grid_pinpoints"].is_null()) {
    const json& g = j["image_grid_pinpoints"];
    EQAT_CHECK(g.is_array() && !g.empty() && g.size() <= 1024, path,
               ": \"image_grid_pinpoints\" must be a non-empty list of [height, width] pairs");
    for (const json& p : g) {
      EQAT_CHECK(p.is_array() && p.size() == 2, path, ": \"image_grid_pinpoints\" entries must be [height, width]");
      cfg.image_grid_pinpoints.push_back(
          {positive_int(p[0], path, "image_grid_pinpoints"), positive_int(p[1], path, "image_grid_pinpoints")});
    }
  }
  // The aspect mode is not a CLIPImageProcessor field: LLaVA keeps it in the model config
  // (image_aspect_ratio), llava-hf's LlavaImageProcessor spells it do_pad.
  if (j.contains("do_pad") && !j["do_pad"].is_null())
    cfg.aspect_mode = bool_field(j, "do_pad", true, path) ? "pad" : "crop";
  if (j.contains("image_aspect_ratio") && !j["image_aspect_ratio"].is_null()) {
    EQAT_CHECK(j["image_aspect_ratio"].is_string(), path, ": \"image_aspect_ratio\" must be a string");
    const std::string mode = j["image_aspect_ratio"].get<std::string>();
    // LLaVA treats every value except "pad" (and "anyres", a LLaVA-NeXT mode) as the processor's crop path.
    EQAT_CHECK(mode == "pad" || mode == "crop" || mode == "square", path, ": \"image_aspect_ratio\" \"", mode,
               "\" is not supported (use \"pad\" or \"crop\")");
    cfg.aspect_mode = mode == "pad" ? "pad" : "crop";
  }
  return cfg;
}

at::Tensor preprocess_image(const Image& img, const ImageProcessorConfig& cfg) {
  EQAT_CHECK(cfg.aspect_mode == "pad" || cfg.aspect_mode == "crop", "unknown image aspect mode \"", cfg.aspect_mode,
             "\" (use \"pad\" or \"crop\")");
  EQAT_ASSERT(img.width > 0 && img.height > 0 && img.rgb.size() == static_cast<size_t>(img.width) * img.height * 3);
  Image cur;
  const Image* src = &img;
  if (cfg.aspect_mode == "pad") {
    // LLaVA's background: tuple(int(x * 255) for x in image_mean), i.e. truncation -> (122, 116, 104).
    std::array<uint8_t, 3> bg{};
    for (int c = 0; c < 3; ++c) bg[c] = static_cast<uint8_t>(std::clamp(cfg.image_mean[c] * 255, 0.0, 255.0));
    cur = expand_to_square(*src, bg);
    src = &cur;
  }
  if (cfg.do_resize) {
    int out_w, out_h;
    if (cfg.resize_height > 0) {
      out_w = static_cast<int>(cfg.resize_width);
      out_h = static_cast<int>(cfg.resize_height);
    } else {
      // HF get_resize_output_image_size: new_long = int(size * long / short) — an integer product, a true
      // division in double, truncation.
      const int64_t shorter = std::min(src->width, src->height), longer = std::max(src->width, src->height);
      const int64_t new_long =
          static_cast<int64_t>(static_cast<double>(cfg.shortest_edge * longer) / static_cast<double>(shorter));
      // The resized image is bounded by area, not by side: a 3000 x 40 panorama resizes to 25200 x 336 on the
      // crop path (8.5 Mpx) before its centre crop, which Pillow and HF's processor handle.
      EQAT_CHECK(new_long <= std::numeric_limits<int>::max() / 4 && new_long * cfg.shortest_edge <= kMaxImagePixels,
                 "image ", src->width, "x", src->height, " would resize to ", new_long, " x ", cfg.shortest_edge,
                 " pixels, more than the ", kMaxImagePixels, " (64 Mpx) this tool allocates");
      out_w = static_cast<int>(src->width <= src->height ? cfg.shortest_edge : new_long);
      out_h = static_cast<int>(src->width <= src->height ? new_long : cfg.shortest_edge);
    }
    cur = resize_bicubic_pil(*src, out_w, out_h);
    src = &cur;
  }
  if (cfg.do_center_crop) {
    cur = center_crop(*src, static_cast<int>(cfg.crop_width), static_cast<int>(cfg.crop_height));
    src = &cur;
  }

  // Rescale and normalise with numpy's dtypes: float32(float64(u8) * factor), then float32 (x - mean) / std.
  // A 256-entry table per channel gives the same values as computing them per pixel.
  const int h = src->height, w = src->width;
  at::Tensor out = at::empty({3, h, w}, at::kFloat);
  float* dst = out.data_ptr<float>();
  for (int c = 0; c < 3; ++c) {
    float lut[256];
    const float mean = static_cast<float>(cfg.image_mean[c]);
    const float std = static_cast<float>(cfg.image_std[c]);
    for (int v = 0; v < 256; ++v) {
      float x = cfg.do_rescale ? static_cast<float>(static_cast<double>(v) * cfg.rescale_factor)
                               : static_cast<float>(v);
      if (cfg.do_normalize) x = (x - mean) / std;
      lut[v] = x;
    }
    float* plane = dst + static_cast<size_t>(c) * h * w;
    for (size_t i = 0; i < static_cast<size_t>(h) * w; ++i) plane[i] = lut[src->rgb[i * 3 + c]];
  }
  return out;
}

}  // namespace eqat
