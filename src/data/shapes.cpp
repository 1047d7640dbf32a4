#include "data/shapes.h"

#include <nlohmann/json.hpp>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <set>
#include <tuple>
#include <utility>
#include <sys/stat.h>

#include "data/error.h"
#include "data/fs.h"

namespace eqat {

namespace {

const char* const kKinds[kShapesKinds] = {"circle", "square", "triangle", "star", "cross", "ellipse"};
const char* const kKindPlural[kShapesKinds] = {"circles", "squares", "triangles", "stars", "crosses", "ellipses"};
const char* const kColours[kShapesColours] = {"red", "orange", "yellow", "green", "blue", "purple", "brown", "black"};
const int kRgb[kShapesColours][3] = {{215, 35, 35},  {245, 135, 10}, {225, 195, 0},  {40, 160, 50},
                                     {35, 75, 215},  {135, 45, 180}, {125, 80, 35},  {25, 25, 25}};
const char* const kFamilies[] = {"colour", "shape", "count", "exists", "position", "choice", "describe"};
const std::string kShortSuffix = std::string("\n") + kLlavaShortAnswerPrompt;
const std::string kChoiceSuffix = std::string("\n") + kLlavaOptionAnswerPrompt;
constexpr int kCell = kShapesImageSize / kShapesGrid;  // 32 px

// splitmix64: mixes (seed, index, family) into one mt19937_64 seed.
uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Portable draws: mt19937_64 output is fixed by the standard; the maps to ranges are ours.
struct Rng {
  std::mt19937_64 gen;
  explicit Rng(uint64_t s) : gen(s) {}
  int below(int n) { return static_cast<int>(gen() % static_cast<uint64_t>(n)); }
  int range(int lo, int hi) { return lo + below(hi - lo + 1); }  // inclusive
  bool coin() { return (gen() >> 63) != 0; }
  double unit() { return static_cast<double>(gen() >> 11) * 0x1.0p-53; }  // [0, 1)
  template <class T>
  void shuffle(std::vector<T>& v) {  // Fisher-Yates
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[static_cast<size_t>(below(static_cast<int>(i)))]);
  }
};

struct Scene {
  std::vector<ShapesObject> obj;  // reading order
  int count_kind(int k) const {
    return static_cast<int>(std::count_if(obj.begin(), obj.end(), [&](const ShapesObject& o) { return o.kind == k; }));
  }
  int count_colour(int c) const {
    return static_cast<int>(
        std::count_if(obj.begin(), obj.end(), [&](const ShapesObject& o) { return o.colour == c; }));
  }
  bool has(int k, int c) const {
    return std::any_of(obj.begin(), obj.end(), [&](const ShapesObject& o) { return o.kind == k && o.colour == c; });
  }
  int count_pair(int k, int c) const {
    return static_cast<int>(
        std::count_if(obj.begin(), obj.end(), [&](const ShapesObject& o) { return o.kind == k && o.colour == c; }));
  }
};

Scene make_scene(Rng& r) {
  Scene s;
  const int n = r.range(1, 4);
  std::vector<int> cells{0, 1, 2, 3, 4, 5, 6, 7, 8};
  r.shuffle(cells);
  cells.resize(static_cast<size_t>(n));
  std::sort(cells.begin(), cells.end());
  for (int cell : cells) {
    ShapesObject o;
    o.kind = r.below(kShapesKinds);
    o.colour = r.below(kShapesColours);
    o.size = r.below(2);
    o.cell = cell;
    const int radius16 = (o.size ? 12 : 8) * 16;
    const int jitter16 = (kCell / 2 - 1) * 16 - radius16;  // keeps the shape inside its cell
    o.x16 = ((cell % kShapesGrid) * kCell + kCell / 2) * 16 + r.range(-jitter16, jitter16);
    o.y16 = ((cell / kShapesGrid) * kCell + kCell / 2) * 16 + r.range(-jitter16, jitter16);
    s.obj.push_back(o);
  }
  return s;
}

// Polygon of a shape in 1/16 px (cv::fillPoly with shift 4).
std::vector<cv::Point> polygon(const ShapesObject& o) {
  const double R = (o.size ? 12.0 : 8.0) * 16.0;
  const double cx = o.x16, cy = o.y16;
  std::vector<cv::Point> p;
  auto add = [&](double x, double y) { p.emplace_back(static_cast<int>(std::lround(x)), static_cast<int>(std::lround(y))); };
  const double pi = 3.14159265358979323846;
  switch (o.kind) {
    case 1: {  // square
      const double h = 0.82 * R;
      add(cx - h, cy - h), add(cx + h, cy - h), add(cx + h, cy + h), add(cx - h, cy + h);
      break;
    }
    case 2:  // triangle, apex up, centroid at the centre
      for (int i = 0; i < 3; ++i) add(cx + R * std::cos(-pi / 2 + i * 2 * pi / 3), cy + 0.12 * R + R * std::sin(-pi / 2 + i * 2 * pi / 3));
      break;
    case 3:  // five-pointed star
      for (int i = 0; i < 10; ++i) {
        const double rad = (i % 2 ? 0.45 : 1.0) * R, a = -pi / 2 + i * pi / 5;
        add(cx + rad * std::cos(a), cy + rad * std::sin(a));
      }
      break;
    case 4: {  // cross (plus sign)
      const double w = 0.34 * R;
      const double xs[12] = {-w, w, w, R, R, w, w, -w, -w, -R, -R, -w};
      const double ys[12] = {-R, -R, -w, -w, w, w, R, R, w, w, -w, -w};
      for (int i = 0; i < 12; ++i) add(cx + xs[i], cy + ys[i]);
      break;
    }
    default:
      break;
  }
  return p;
}

Image render(const Scene& s, Rng& r) {
  // Light background: a vertical gradient between two light tints.
  int top[3], bottom[3];
  for (int c = 0; c < 3; ++c) top[c] = r.range(205, 255), bottom[c] = r.range(205, 255);
  cv::Mat m(kShapesImageSize, kShapesImageSize, CV_8UC3);
  for (int y = 0; y < kShapesImageSize; ++y)
    for (int x = 0; x < kShapesImageSize; ++x)
      for (int c = 0; c < 3; ++c)
        m.at<cv::Vec3b>(y, x)[c] =
            static_cast<uint8_t>((top[c] * (kShapesImageSize - 1 - y) + bottom[c] * y) / (kShapesImageSize - 1));
  for (const auto& o : s.obj) {
    cv::Scalar col;
    for (int c = 0; c < 3; ++c) col[c] = std::clamp(kRgb[o.colour][c] + r.range(-12, 12), 0, 255);
    const int R16 = (o.size ? 12 : 8) * 16;
    if (o.kind == 0) {
      cv::circle(m, {o.x16, o.y16}, R16, col, cv::FILLED, cv::LINE_AA, 4);
    } else if (o.kind == 5) {
      cv::ellipse(m, cv::Point(o.x16, o.y16), cv::Size(R16, R16 / 2), 0, 0, 360, col, cv::FILLED, cv::LINE_AA, 4);
    } else {
      std::vector<std::vector<cv::Point>> polys{polygon(o)};
      cv::fillPoly(m, polys, col, cv::LINE_AA, 4);
    }
  }
  Image img;
  img.width = img.height = kShapesImageSize;
  img.rgb.assign(m.data, m.data + static_cast<size_t>(kShapesImageSize) * kShapesImageSize * 3);  // RGB order
  return img;
}

std::string cap(std::string s) {
  if (!s.empty()) s[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(s[0])));
  return s;
}

std::string noun(const ShapesObject& o) { return std::string(kColours[o.colour]) + " " + kKinds[o.kind]; }

// Indices of objects whose kind (by_kind) or colour is unique in the scene.
std::vector<int> unique_by(const Scene& s, bool by_kind) {
  std::vector<int> out;
  for (size_t i = 0; i < s.obj.size(); ++i) {
    const auto& o = s.obj[i];
    if ((by_kind ? s.count_kind(o.kind) : s.count_colour(o.colour)) == 1) out.push_back(static_cast<int>(i));
  }
  return out;
}

// Ordered pairs (a, b) of objects with unique colour+kind that share a row or a column.
std::vector<std::pair<int, int>> position_pairs(const Scene& s) {
  std::vector<std::pair<int, int>> out;
  for (size_t a = 0; a < s.obj.size(); ++a)
    for (size_t b = 0; b < s.obj.size(); ++b) {
      if (a == b) continue;
      const auto &A = s.obj[a], &B = s.obj[b];
      if (s.count_pair(A.kind, A.colour) != 1 || s.count_pair(B.kind, B.colour) != 1) continue;
      if (A.cell / 3 == B.cell / 3 || A.cell % 3 == B.cell % 3) out.emplace_back(static_cast<int>(a), static_cast<int>(b));
    }
  return out;
}

// The position question about A relative to B (a pair from position_pairs) and its answer, without the format line.
std::pair<std::string, std::string> position_question(const ShapesObject& A, const ShapesObject& B) {
  std::string a;
  if (A.cell / 3 == B.cell / 3) a = A.cell % 3 < B.cell % 3 ? "left" : "right";
  else a = A.cell / 3 < B.cell / 3 ? "above" : "below";
  return {"Where is the " + noun(A) + " relative to the " + noun(B) + "?", a};
}

bool answerable(const Scene& s, ShapesFamily f) {
  switch (f) {
    case ShapesFamily::kColour: return !unique_by(s, true).empty();
    case ShapesFamily::kShape: return !unique_by(s, false).empty();
    case ShapesFamily::kPosition: return !position_pairs(s).empty();
    case ShapesFamily::kChoice: return !unique_by(s, true).empty() && !unique_by(s, false).empty();
    default: return true;
  }
}

// `hard` (a separate stream, so r draws the same either way) decides, with probability hard_choice, whether a
// multiple-choice question's distractors are first the colours (shapes) of the scene's other objects.
ShapesQA ask(const Scene& s, ShapesFamily f, Rng& r, double hard_choice, Rng& hard) {
  ShapesQA qa;
  qa.family = f;
  std::string q, a;
  bool choice = false;
  switch (f) {
    case ShapesFamily::kColour: {
      auto u = unique_by(s, true);
      const auto& o = s.obj[static_cast<size_t>(u[static_cast<size_t>(r.below(static_cast<int>(u.size())))])];
      q = std::string("What color is the ") + kKinds[o.kind] + "?";
      a = kColours[o.colour];
      break;
    }
    case ShapesFamily::kShape: {
      auto u = unique_by(s, false);
      const auto& o = s.obj[static_cast<size_t>(u[static_cast<size_t>(r.below(static_cast<int>(u.size())))])];
      q = std::string("What shape is the ") + kColours[o.colour] + " object?";
      a = kKinds[o.kind];
      break;
    }
    case ShapesFamily::kCount: {
      const int sub = r.below(3);
      const auto& pick = s.obj[static_cast<size_t>(r.below(static_cast<int>(s.obj.size())))];
      const bool present = r.below(4) != 0;  // 3/4 ask about something in the scene
      if (sub == 0) {
        q = "How many shapes are there?";
        a = std::to_string(s.obj.size());
      } else if (sub == 1) {
        const int c = present ? pick.colour : r.below(kShapesColours);
        q = std::string("How many ") + kColours[c] + " shapes are there?";
        a = std::to_string(s.count_colour(c));
      } else {
        const int k = present ? pick.kind : r.below(kShapesKinds);
        q = std::string("How many ") + kKindPlural[k] + " are there?";
        a = std::to_string(s.count_kind(k));
      }
      break;
    }
    case ShapesFamily::kExists: {
      int k, c;
      if (r.coin()) {  // yes
        const auto& o = s.obj[static_cast<size_t>(r.below(static_cast<int>(s.obj.size())))];
        k = o.kind, c = o.colour;
      } else {
        const bool adversarial = r.below(3) != 0;
        const auto& o = s.obj[static_cast<size_t>(r.below(static_cast<int>(s.obj.size())))];
        const bool swap_colour = r.coin();
        do {
          if (!adversarial) {
            k = r.below(kShapesKinds), c = r.below(kShapesColours);
          } else if (swap_colour) {  // the shape is there, in another colour
            k = o.kind, c = r.below(kShapesColours);
          } else {  // the colour is there, on another shape
            k = r.below(kShapesKinds), c = o.colour;
          }
        } while (s.has(k, c));
      }
      q = std::string(c == 1 ? "Is there an " : "Is there a ") + kColours[c] + " " + kKinds[k] + " in the image?";
      a = s.has(k, c) ? "yes" : "no";
      break;
    }
    case ShapesFamily::kPosition: {
      auto pairs = position_pairs(s);
      auto [ia, ib] = pairs[static_cast<size_t>(r.below(static_cast<int>(pairs.size())))];
      std::tie(q, a) = position_question(s.obj[static_cast<size_t>(ia)], s.obj[static_cast<size_t>(ib)]);
      break;
    }
    case ShapesFamily::kChoice: {
      choice = true;
      const bool hard_options = hard_choice > 0 && hard.unit() < hard_choice;
      std::vector<std::string> opts;
      auto add = [&](const char* name) {
        if (opts.size() < 4 && std::find(opts.begin(), opts.end(), name) == opts.end()) opts.emplace_back(name);
      };
      std::string correct;
      if (r.coin()) {
        auto u = unique_by(s, true);
        const auto& o = s.obj[static_cast<size_t>(u[static_cast<size_t>(r.below(static_cast<int>(u.size())))])];
        q = std::string("What color is the ") + kKinds[o.kind] + "?";
        std::vector<int> all{0, 1, 2, 3, 4, 5, 6, 7};
        r.shuffle(all);
        add(kColours[o.colour]);
        if (hard_options)
          for (const auto& x : s.obj) add(kColours[x.colour]);
        for (int c : all) add(kColours[c]);
        correct = kColours[o.colour];
      } else {
        auto u = unique_by(s, false);
        const auto& o = s.obj[static_cast<size_t>(u[static_cast<size_t>(r.below(static_cast<int>(u.size())))])];
        q = std::string("What shape is the ") + kColours[o.colour] + " object?";
        std::vector<int> all{0, 1, 2, 3, 4, 5};
        r.shuffle(all);
        add(kKinds[o.kind]);
        if (hard_options)
          for (const auto& x : s.obj) add(kKinds[x.kind]);
        for (int k : all) add(kKinds[k]);
        correct = kKinds[o.kind];
      }
      r.shuffle(opts);
      for (size_t i = 0; i < opts.size(); ++i) {
        q += std::string("\n") + static_cast<char>('A' + i) + ". " + opts[i];
        if (opts[i] == correct) a = std::string(1, static_cast<char>('A' + i));
      }
      break;
    }
    case ShapesFamily::kDescribe: {
      q = "Describe the image in one sentence.";
      for (size_t i = 0; i < s.obj.size(); ++i) {
        if (i) a += (i + 1 == s.obj.size()) ? " and " : ", ";
        a += (s.obj[i].colour == 1 ? "an " : "a ") + noun(s.obj[i]);  // orange is the only vowel
      }
      a = cap(a) + ".";
      qa.question = q;
      qa.answer = a;
      return qa;
    }
    case ShapesFamily::kNum: break;
  }
  qa.question = q + (choice ? kChoiceSuffix : kShortSuffix);
  qa.answer = a;
  return qa;
}

// A multiple-choice question taken apart: the question line, the options' texts in letter order, the trailing
// answer-format line ("" when dropped) and the right option's index.
struct ChoiceParts {
  std::string stem, suffix;
  std::vector<std::string> options;
  size_t right = 0;
};

std::string join_options(const std::vector<std::string>& options) {
  std::string out;
  for (size_t i = 0; i < options.size(); ++i) out += std::string("\n") + static_cast<char>('A' + i) + ". " + options[i];
  return out;
}

ChoiceParts split_choice(const ShapesQA& qa) {
  ChoiceParts c;
  const std::string bare = shapes_without_format_line(qa.question);
  c.suffix = qa.question.substr(bare.size());
  c.stem = bare.substr(0, bare.find('\n'));
  c.options = shapes_choice_options(qa.question);
  EQAT_CHECK(c.stem.size() + join_options(c.options).size() == bare.size(), "shapes: not a multiple-choice question: ",
             qa.question);
  for (size_t i = 0; i < c.options.size(); ++i)
    if (qa.answer.size() == 1 && qa.answer[0] == static_cast<char>('A' + i)) {
      c.right = i;
      return c;
    }
  EQAT_CHECK(false, "shapes: choice answer '", qa.answer, "' names no option of: ", qa.question);
  return c;
}

}  // namespace

std::vector<std::string> shapes_choice_options(const std::string& question) {
  std::vector<std::string> out;
  const std::string bare = shapes_without_format_line(question);
  for (size_t p = bare.find('\n'); p != std::string::npos; p = bare.find('\n', p + 1)) {
    if (bare.size() < p + 4 || bare[p + 1] != static_cast<char>('A' + out.size()) || bare.compare(p + 2, 2, ". ") != 0)
      break;
    const size_t e = bare.find('\n', p + 1);
    out.push_back(bare.substr(p + 4, e == std::string::npos ? std::string::npos : e - p - 4));
  }
  return out;
}

ShapesQA shapes_choice_by_word(const ShapesQA& qa) {
  if (qa.family != ShapesFamily::kChoice) return qa;
  const ChoiceParts c = split_choice(qa);
  ShapesQA out = qa;
  out.question = c.stem + join_options(c.options) + kShortSuffix;
  out.answer = c.options[c.right];
  return out;
}

ShapesQA shapes_choice_fewer_options(const ShapesQA& qa, int keep, uint64_t draw) {
  if (qa.family != ShapesFamily::kChoice) return qa;
  ChoiceParts c = split_choice(qa);
  EQAT_CHECK(keep >= 2, "shapes: a choice question keeps at least 2 options, got ", keep);
  std::vector<size_t> wrong;
  for (size_t i = 0; i < c.options.size(); ++i)
    if (i != c.right) wrong.push_back(i);
  std::mt19937_64 g(draw);
  std::vector<bool> drop(c.options.size(), false);
  for (size_t left = c.options.size(); left > static_cast<size_t>(keep); --left) {
    const size_t k = static_cast<size_t>(g() % wrong.size());
    drop[wrong[k]] = true;
    wrong.erase(wrong.begin() + static_cast<std::ptrdiff_t>(k));
  }
  std::vector<std::string> kept;
  ShapesQA out = qa;
  for (size_t i = 0; i < c.options.size(); ++i) {
    if (drop[i]) continue;
    if (i == c.right) out.answer = std::string(1, static_cast<char>('A' + kept.size()));
    kept.push_back(c.options[i]);
  }
  out.question = c.stem + join_options(kept) + c.suffix;
  return out;
}

ShapesQA shapes_in_the_image(const ShapesQA& qa) {
  if (qa.family != ShapesFamily::kColour && qa.family != ShapesFamily::kShape && qa.family != ShapesFamily::kChoice)
    return qa;
  ShapesQA out = qa;
  const size_t q = out.question.find('?');
  EQAT_CHECK(q != std::string::npos, "shapes: no '?' in: ", qa.question);
  out.question.insert(q, " in the image");
  return out;
}

// The first n of `v` after a shuffle drawn from `draw` (training-only question picks).
template <class T>
std::vector<T> shuffled_first(std::vector<T> v, int n, uint64_t draw) {
  Rng r(draw);
  r.shuffle(v);
  if (v.size() > static_cast<size_t>(n)) v.resize(static_cast<size_t>(n));
  return v;
}

std::vector<ShapesQA> shapes_locate_questions(const std::vector<ShapesObject>& objects, int n, uint64_t draw) {
  EQAT_CHECK(n >= 0 && n <= 8, "shapes: locate questions per image must lie in [0, 8], got ", n);
  const Scene s{objects};
  std::vector<int> asks;  // 2 * object + (0 row, 1 column)
  for (size_t i = 0; i < objects.size(); ++i)
    if (s.count_pair(objects[i].kind, objects[i].colour) == 1) asks.insert(asks.end(), {2 * static_cast<int>(i), 2 * static_cast<int>(i) + 1});
  std::vector<ShapesQA> out;
  for (int ask : shuffled_first(std::move(asks), n, draw)) {
    const ShapesObject& o = objects[static_cast<size_t>(ask / 2)];
    const bool row = ask % 2 == 0;
    ShapesQA qa;
    qa.family = ShapesFamily::kPosition;
    qa.question = std::string("Which ") + (row ? "row" : "column") + " is the " + noun(o) + " in?" + kShortSuffix;
    qa.answer = std::to_string(1 + (row ? o.cell / kShapesGrid : o.cell % kShapesGrid));
    out.push_back(std::move(qa));
  }
  return out;
}

std::vector<ShapesQA> shapes_confusable_position_questions(const std::vector<ShapesObject>& objects, int n, uint64_t draw) {
  EQAT_CHECK(n >= 0 && n <= 8, "shapes: confusable position questions per image must lie in [0, 8], got ", n);
  const Scene s{objects};
  std::vector<std::pair<int, int>> pairs;
  for (const auto& [a, b] : position_pairs(s)) {
    const ShapesObject &A = objects[static_cast<size_t>(a)], &B = objects[static_cast<size_t>(b)];
    if (A.colour == B.colour || A.kind == B.kind) pairs.emplace_back(a, b);
  }
  std::vector<ShapesQA> out;
  for (const auto& [a, b] : shuffled_first(std::move(pairs), n, draw)) {
    ShapesQA qa;
    qa.family = ShapesFamily::kPosition;
    std::tie(qa.question, qa.answer) = position_question(objects[static_cast<size_t>(a)], objects[static_cast<size_t>(b)]);
    qa.question += kShortSuffix;
    out.push_back(std::move(qa));
  }
  return out;
}

std::string shapes_without_format_line(const std::string& question) {
  for (const std::string* suffix : {&kShortSuffix, &kChoiceSuffix})
    if (question.size() > suffix->size() &&
        question.compare(question.size() - suffix->size(), suffix->size(), *suffix) == 0)
      return question.substr(0, question.size() - suffix->size());
  return question;
}

const char* shapes_family_name(ShapesFamily f) { return kFamilies[static_cast<int>(f)]; }
const char* shapes_kind_name(int kind) { return kKinds[kind]; }
const char* shapes_colour_name(int colour) { return kColours[colour]; }

ShapesSample shapes_sample(uint64_t seed, int64_t index, int family, int per_family, double hard_choice) {
  EQAT_CHECK(family < static_cast<int>(ShapesFamily::kNum), "shapes: unknown question family ", family);
  EQAT_CHECK(per_family >= 1, "shapes: per_family must be >= 1, got ", per_family);
  EQAT_CHECK(hard_choice >= 0 && hard_choice <= 1, "shapes: hard_choice must lie in [0, 1], got ", hard_choice);
  Rng r(mix(mix(mix(seed) ^ static_cast<uint64_t>(index)) + static_cast<uint64_t>(family + 1)));
  Rng hard(mix(mix(mix(seed) ^ static_cast<uint64_t>(index)) + 0x68617264ull + static_cast<uint64_t>(family + 1)));
  const int nf = static_cast<int>(ShapesFamily::kNum);
  const auto required = static_cast<ShapesFamily>(family >= 0 ? family : static_cast<int>(index % nf));
  Scene s = make_scene(r);
  while (!answerable(s, required)) s = make_scene(r);
  ShapesSample out;
  out.image = render(s, r);
  if (family >= 0) {
    out.qa.push_back(ask(s, required, r, hard_choice, hard));
  } else {
    for (int f = 0; f < nf; ++f)
      if (answerable(s, static_cast<ShapesFamily>(f))) out.qa.push_back(ask(s, static_cast<ShapesFamily>(f), r, hard_choice, hard));
    // Further rounds (after the first, so per_family 1 draws exactly as before); a repeated question is dropped.
    for (int k = 1; k < per_family; ++k)
      for (int f = 0; f < nf; ++f) {
        if (!answerable(s, static_cast<ShapesFamily>(f))) continue;
        ShapesQA q = ask(s, static_cast<ShapesFamily>(f), r, hard_choice, hard);
        if (std::none_of(out.qa.begin(), out.qa.end(), [&](const ShapesQA& x) { return x.question == q.question; }))
          out.qa.push_back(std::move(q));
      }
    r.shuffle(out.qa);
  }
  out.objects = s.obj;
  return out;
}

std::string shapes_png(const Image& img) {
  cv::Mat rgb(img.height, img.width, CV_8UC3, const_cast<uint8_t*>(img.rgb.data())), bgr;
  cv::cvtColor(rgb, bgr, cv::COLOR_RGB2BGR);
  std::vector<uint8_t> buf;
  EQAT_ASSERT(cv::imencode(".png", bgr, buf), "PNG encoding failed");
  return std::string(buf.begin(), buf.end());
}

std::vector<ShapesEvalItem> shapes_test_split(uint64_t seed, int64_t n, double hard_choice) {
  std::vector<ShapesEvalItem> items;
  const int nf = static_cast<int>(ShapesFamily::kNum);
  for (int64_t i = 0; i < n; ++i) {
    ShapesSample s = shapes_sample(seed, i, static_cast<int>(i % nf), 1, hard_choice);
    ShapesEvalItem it;
    it.question_id = i;
    char name[32];
    std::snprintf(name, sizeof name, "test_%06lld.png", static_cast<long long>(i));
    it.image = name;
    it.text = s.qa[0].question;
    it.category = shapes_family_name(s.qa[0].family);
    it.answer = s.qa[0].answer;
    it.pixels = std::move(s.image);
    items.push_back(std::move(it));
  }
  return items;
}

std::vector<ShapesEvalItem> shapes_standard_test_split() {
  return shapes_test_split(kShapesStandardTestSeed, kShapesStandardTestSize);
}

std::string shapes_normalize_answer(const std::string& s) {
  const char* ws = " \t\n\r\f\v";
  size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  std::string t = s.substr(b, s.find_last_not_of(ws) - b + 1);
  for (char& c : t) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (!t.empty() && t.back() == '.') t.pop_back();
  return t;
}

bool shapes_answer_matches(const std::string& prediction, const std::string& answer) {
  return shapes_normalize_answer(prediction) == shapes_normalize_answer(answer);
}

std::vector<std::string> shapes_corpus(uint64_t seed, int64_t n) {
  std::vector<std::string> lines;
  for (int i = 0; i < kShapesKinds; ++i) lines.push_back(kKinds[i]), lines.push_back(kKindPlural[i]);
  for (int i = 0; i < kShapesColours; ++i) lines.push_back(kColours[i]);
  for (int64_t i = 0; i < n; ++i)
    for (const auto& qa : shapes_sample(seed, i).qa) lines.push_back(qa.question), lines.push_back(qa.answer);
  return lines;
}

void write_shapes_dataset(const std::string& dir, int64_t train_n, int64_t test_n, uint64_t seed, double hard_choice,
                          bool choice_by_word) {
  EQAT_CHECK(train_n >= 0 && test_n >= 0, "shapes: negative sample count");
  write_dir_atomic(dir, OutputKind::kDataset, [&](const std::string& tmp) {
    const std::string images = path_join(tmp, "images");
    EQAT_CHECK(::mkdir(images.c_str(), 0755) == 0, images, ": cannot create directory");
    nlohmann::json train = nlohmann::json::array();
    for (int64_t i = 0; i < train_n; ++i) {
      ShapesSample s = shapes_sample(seed, i, -1, 1, hard_choice);
      char name[32];
      std::snprintf(name, sizeof name, "train_%06lld.png", static_cast<long long>(i));
      write_file_in_temp_dir(path_join(images, name), shapes_png(s.image));
      // Single-turn, like the default model's training and every evaluation prompt (a later turn of a multi-turn
      // conversation could be answered from the earlier answers, which the model never learned to do).
      const auto family = static_cast<ShapesFamily>(i % static_cast<int64_t>(ShapesFamily::kNum));
      const auto qa = std::find_if(s.qa.begin(), s.qa.end(), [&](const ShapesQA& x) { return x.family == family; });
      EQAT_ASSERT(qa != s.qa.end(), "shapes: training sample ", i, " lacks its guaranteed family");
      nlohmann::json conv = nlohmann::json::array({{{"from", "human"}, {"value", "<image>\n" + qa->question}},
                                                   {{"from", "gpt"}, {"value", qa->answer}}});
      train.push_back({{"id", str_cat("shapes_train_", i)}, {"image", name}, {"conversations", conv}});
    }
    write_file_atomic(path_join(tmp, "train.json"), train.dump(1) + "\n");
    // The test questions come from a stream disjoint from training (family >= 0 and seed + 1).
    std::string questions, answers;
    for (auto& it : shapes_test_split(seed + 1, test_n, hard_choice)) {
      if (choice_by_word && it.category == shapes_family_name(ShapesFamily::kChoice)) {
        const ShapesQA w = shapes_choice_by_word({ShapesFamily::kChoice, it.text, it.answer});
        it.text = w.question, it.answer = w.answer;
      }
      write_file_in_temp_dir(path_join(images, it.image), shapes_png(it.pixels));
      questions += nlohmann::json{{"question_id", it.question_id}, {"image", it.image}, {"text", it.text},
                                  {"category", it.category}}.dump() + "\n";
      answers += nlohmann::json{{"question_id", it.question_id}, {"text", it.answer}}.dump() + "\n";
    }
    write_file_atomic(path_join(tmp, "test.jsonl"), questions);
    write_file_atomic(path_join(tmp, "test_answers.jsonl"), answers);
  });
}

}  // namespace eqat
