#include "quant/qat/calib.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <numeric>
#include <random>

#include "data/error.h"
#include "data/json_util.h"
#include "data/fs.h"
#include "llm/prompt.h"

namespace eqat {

namespace {
// Deterministic Fisher–Yates with an explicit generator (std::shuffle's algorithm is unspecified).
void seeded_shuffle(std::vector<size_t>& v, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[rng() % i]);
}

std::string dirname(const std::string& path) {
  const size_t s = path.find_last_of('/');
  return s == std::string::npos ? "." : path.substr(0, s);
}
}  // namespace

CalibSet load_instruction_data(const Model& m, const std::string& path, const std::string& images_dir,
                               const CalibOptions& opts) {
  EQAT_CHECK(m.multimodal(), path, ": instruction data with images needs a LLaVA model, ", m.dir, " is text-only");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw_input_error(str_cat(path, ": not valid JSON (", json_error_message(e), ")"));
  }
  EQAT_CHECK(j.is_array() && !j.empty(), path, ": expected a non-empty JSON list of LLaVA instruction records");
  const std::string root = images_dir.empty() ? dirname(path) : images_dir;
  std::vector<size_t> order(j.size());
  std::iota(order.begin(), order.end(), 0);
  seeded_shuffle(order, opts.seed);
  CalibSet set;
  set.source = path;
  // The model's own chat template: calibration and E2E-QP see the prompts `eqat ask` builds for it.
  const PromptTemplate tmpl = parse_template(model_template(m.dir, "llava-1.5"));
  const size_t want = static_cast<size_t>(opts.n_train + opts.n_val);
  for (size_t oi = 0; oi < order.size() && set.train.size() + set.val.size() < want; ++oi) {
    const auto& r = j[order[oi]];
    const std::string rec = str_cat(path, ": record ", order[oi]);
    EQAT_CHECK(r.is_object() && r.contains("conversations") && r["conversations"].is_array(), rec,
               " has no conversations list");
    std::vector<Turn> turns;
    const auto& conv = r["conversations"];
    for (size_t t = 0; t + 1 < conv.size(); t += 2) {
      EQAT_CHECK(conv[t].value("from", "") == "human" && conv[t + 1].value("from", "") == "gpt", rec,
                 ": turns must alternate human/gpt");
      turns.push_back({conv[t].value("value", ""), conv[t + 1].value("value", "")});
    }
    EQAT_CHECK(!turns.empty(), rec, ": no human/gpt exchange");
    CalibSample s;
    if (r.contains("image") && r["image"].is_string()) s.image = path_join(root, r["image"].get<std::string>());
    EQAT_CHECK(s.image.empty() || file_exists(s.image), rec, ": image ", s.image, " not found");
    // LLaVA-NeXT: the image's size decides its token count (decoded here for it, and again when embedded).
    const int64_t img_tokens = s.image.empty() ? 0
                               : m.cfg.anyres ? load_pixels(m, s.image).tokens
                                              : m.cfg.image_seq_length;
    TokenizedConversation tc = tokenize_conversation(*m.tok, tmpl, turns, !s.image.empty(), m.image_token_id(), img_tokens);
    if (static_cast<int64_t>(tc.ids.size()) > opts.seq_len) {
      // Truncation must not cut through the image positions (they are filled all at once).
      if (!s.image.empty() &&
          std::find(tc.ids.begin() + opts.seq_len, tc.ids.end(), m.image_token_id()) != tc.ids.end())
        continue;
      tc.ids.resize(opts.seq_len);
      tc.is_answer.resize(opts.seq_len);
    }
    s.ids = std::move(tc.ids);
    s.is_answer = std::move(tc.is_answer);
    (set.train.size() < static_cast<size_t>(opts.n_train) ? set.train : set.val).push_back(std::move(s));
  }
  EQAT_CHECK(!set.train.empty(), path, ": no usable samples");
  return set;
}

CalibSet load_text_data(const Model& m, const std::string& path, const CalibOptions& opts) {
  std::string text = read_file(path);
  if (path.size() > 6 && path.compare(path.size() - 6, 6, ".jsonl") == 0) {
    std::string joined;
    size_t start = 0, line_no = 0;
    while (start < text.size()) {
      size_t end = text.find('\n', start);
      if (end == std::string::npos) end = text.size();
      ++line_no;
      std::string line = text.substr(start, end - start);
      start = end + 1;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      try {
        auto j = nlohmann::json::parse(line);
        joined += j.at("text").get<std::string>() + "\n\n";
      } catch (const nlohmann::json::exception&) {
        throw_input_error(str_cat(path, ": line ", line_no, " is not a JSON object with a \"text\" string"));
      }
    }
    text = joined;
  }
  std::vector<int64_t> ids = m.tok->encode(text, /*add_bos=*/true);
  const int64_t L = opts.seq_len, n = static_cast<int64_t>(ids.size());
  EQAT_CHECK(n >= 2 * L + 2, path, ": ", n, " tokens are too few for windows of ", L, " (need at least ", 2 * L + 2, ")");
  const int64_t split = n * 9 / 10;
  std::mt19937_64 rng(opts.seed);
  auto window = [&](int64_t lo, int64_t hi) {  // start uniformly in [lo, hi - L]
    const int64_t span = std::max<int64_t>(1, hi - L - lo + 1);
    const int64_t st = lo + static_cast<int64_t>(rng() % static_cast<uint64_t>(span));
    CalibSample s;
    s.ids.assign(ids.begin() + st, ids.begin() + std::min(n, st + L));
    s.is_answer.assign(s.ids.size(), 1);
    return s;
  };
  CalibSet set;
  set.source = path;
  for (int64_t i = 0; i < opts.n_train; ++i) set.train.push_back(window(0, split));
  for (int64_t i = 0; i < opts.n_val; ++i) set.val.push_back(window(split, n));
  return set;
}

EmbeddedBatch embed_samples(Model& m, const std::vector<CalibSample>& samples) {
  c10::NoGradGuard g;
  size_t L = 0;
  for (const auto& s : samples) L = std::max(L, s.ids.size());
  const int64_t S = static_cast<int64_t>(samples.size()), C = m.cfg.text.hidden_size;
  EmbeddedBatch b;
  b.embeds = at::zeros({S, static_cast<int64_t>(L), C}, at::TensorOptions().dtype(m.dtype));
  b.valid = at::zeros({S, static_cast<int64_t>(L)}, at::kBool);
  b.answer = at::zeros({S, static_cast<int64_t>(L)}, at::kBool);
  b.ids = at::zeros({S, static_cast<int64_t>(L)}, at::kLong);
  for (int64_t i = 0; i < S; ++i) {
    const auto& s = samples[i];
    const int64_t T = static_cast<int64_t>(s.ids.size());
    if (s.embeds.defined()) {
      EQAT_ASSERT(s.embeds.dim() == 2 && s.embeds.size(0) == T && s.embeds.size(1) == C, "cached embeddings ",
                  s.embeds.sizes(), " for a sample of ", T, " tokens");
      b.embeds[i].narrow(0, 0, T).copy_(s.embeds);
    } else {
      at::Tensor e = embed_prompt(m, s.ids, s.image.empty() ? ImageInput() : load_pixels(m, s.image));  // [1, T, C]
      b.embeds[i].narrow(0, 0, T).copy_(e[0].cpu());
    }
    b.valid[i].narrow(0, 0, T).fill_(true);
    b.answer[i].narrow(0, 0, T).copy_(at::tensor(std::vector<int64_t>(s.is_answer.begin(), s.is_answer.end())).to(at::kBool));
    b.ids[i].narrow(0, 0, T).copy_(at::tensor(s.ids, at::kLong));
  }
  return b;
}

at::Tensor loss_positions(const EmbeddedBatch& b) {
  const int64_t L = b.ids.size(1);
  return b.answer.narrow(1, 1, L - 1).logical_and(b.valid.narrow(1, 1, L - 1));
}

bool same_sample(const CalibSample& a, const CalibSample& b) {
  return a.ids == b.ids && a.is_answer == b.is_answer && a.image == b.image;
}

int64_t token_count(const std::vector<CalibSample>& samples) {
  int64_t n = 0;
  for (const auto& s : samples) n += static_cast<int64_t>(s.ids.size());
  return n;
}

int64_t loss_position_count(const CalibSample& s) {
  int64_t n = 0;
  for (size_t t = 1; t < s.is_answer.size(); ++t) n += s.is_answer[t] != 0;
  return n;
}

}  // namespace eqat
