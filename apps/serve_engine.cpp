#include "serve_engine.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <iostream>
#include <random>
#include <sstream>

#include "data/cpu.h"
#include "data/error.h"
#include "data/image.h"
#include "data/tokenizer.h"
#include "llm/batch_decoder.h"
#include "llm/prompt.h"
#include "vision/llava.h"

namespace eqat {

namespace {
double seconds(std::chrono::steady_clock::duration d) { return std::chrono::duration<double>(d).count(); }
}  // namespace

// ---------------------------------------------------------------------------------------------------------------
struct Job::Impl {
  std::vector<int64_t> ids;
  ImageInput image;  // undefined for a text-only request
  SequenceOptions seq;
  std::unique_ptr<TokenStreamer> streamer;
  int64_t row = -1;
};

JobUpdate Job::wait(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, timeout, [&] { return !text_.empty() || done_; });
  JobUpdate u;
  u.text = std::move(text_);
  text_.clear();
  u.tokens = tokens_;
  u.done = done_;
  u.finish_reason = finish_;
  u.error = error_;
  return u;
}

// ---------------------------------------------------------------------------------------------------------------
void Histogram::observe(double s) {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < kBounds.size(); ++i)
    if (s <= kBounds[i]) counts_[i]++;
  count_++;
  sum_ += s;
}

std::string Histogram::text(const std::string& name, const std::string& labels) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::ostringstream o;
  for (size_t i = 0; i < kBounds.size(); ++i)
    o << name << "_bucket{" << labels << ",le=\"" << kBounds[i] << "\"} " << counts_[i] << "\n";
  o << name << "_bucket{" << labels << ",le=\"+Inf\"} " << count_ << "\n";
  o << name << "_sum{" << labels << "} " << sum_ << "\n";
  o << name << "_count{" << labels << "} " << count_ << "\n";
  return o.str();
}

// ---------------------------------------------------------------------------------------------------------------
struct Engine::State {
  Model model;
  std::unique_ptr<BatchDecoder> decoder;
  std::vector<std::shared_ptr<Job>> rows;  // the job in each decoder row (null when free)
};

Engine::Engine(const std::string& name, const std::string& dir, const EngineOptions& opts)
    : s_(std::make_unique<State>()), name_(name), dir_(dir), opts_(opts) {
  LoadOptions lo;
  lo.device = opts.device;
  lo.dtype = opts.dtype;
  lo.fuse_projections = true;
  lo.weights_as_stored = true;
  s_->model = load_model(dir, lo);
  const Model& m = s_->model;
  const int64_t ctx = m.cfg.text.max_position_embeddings;
  EQAT_CHECK(opts.context >= 0 && opts.context <= ctx, "--ctx ", opts.context, " for model '", name,
             "': must be at most its context of ", ctx, " positions (0 = all of it)");
  context_ = opts.context > 0 ? opts.context : ctx;
  // An unknown name in config.json fails here, at start-up.
  template_ = parse_template(!opts.template_name.empty() ? opts.template_name
                                                         : model_template(dir, m.multimodal() ? "llava-1.5" : "none"));
  s_->decoder = std::make_unique<BatchDecoder>(m.lm, opts.max_batch, context_, m.dtype, m.device);
  s_->rows.resize(static_cast<size_t>(opts.max_batch));
  thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  for (auto& j : queue_) finish(j, "", "the server is shutting down");
  for (auto& j : s_->rows)
    if (j) finish(j, "", "the server is shutting down");
}

bool Engine::multimodal() const { return s_->model.multimodal(); }
int64_t Engine::hidden_size() const { return s_->model.cfg.text.hidden_size; }
bool Engine::on_cpu() const { return s_->model.device.is_cpu(); }

int64_t Engine::waiting() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(queue_.size());
}

std::shared_ptr<Job> Engine::submit(const ChatRequest& req) {
  const Model& m = s_->model;  // read-only here: config, tokenizer, image settings
  auto job = std::make_shared<Job>();
  job->impl_ = std::make_shared<Job::Impl>();
  Job::Impl& in = *job->impl_;
  const bool with_image = !req.image_url.empty();
  if (with_image && !m.multimodal())
    throw ApiError(400, "model '" + name_ + "' is text-only and cannot take an image", req.image_param);

  // The conversation in the model's template (llm/prompt.h); the tokenizer maps a vicuna/mistral turn's "</s>" to EOS.
  std::string prompt;
  try {
    prompt = render_chat(template_, req.messages);
  } catch (const InputError& e) {
    throw ApiError(400, std::string("messages: ") + e.what(), "messages");
  }
  const size_t markers = count_image_markers(prompt);
  if (markers != (with_image ? 1u : 0u))
    throw ApiError(400, with_image ? "messages: the prompt must contain exactly one <image> marker"
                                   : "messages: the prompt contains <image> but the request has no image_url part",
                   "messages");
  // The image first: a LLaVA-NeXT image's token count depends on its size.
  if (with_image) {
    const std::string bytes = fetch_image_bytes(req.image_url, req.image_param, opts_.local_files_dir,
                                                opts_.max_image_bytes);
    try {
      in.image = prepare_image(m, decode_image(bytes, req.image_param, /*strict=*/false, opts_.max_image_pixels));
    } catch (const InputError& e) {
      throw ApiError(400, e.what(), req.image_param);
    }
  }
  in.ids = tokenize_prompt(*m.tok, prompt, template_, m.image_token_id(), prompt_image_tokens(m, in.image));
  const int64_t n_prompt = static_cast<int64_t>(in.ids.size());
  if (n_prompt + 1 > context_)
    throw ApiError(400,
                   "the prompt takes " + std::to_string(n_prompt) + " tokens (image positions included); this model "
                   "serves " + std::to_string(context_) + " positions per request, so no room is left for an answer",
                   "messages", "context_length_exceeded");

  // Sampling: OpenAI's temperature/top_p; a request without a seed gets a fresh one.
  in.seq.max_new_tokens = std::min<int64_t>(req.max_tokens > 0 ? req.max_tokens : INT64_MAX, context_ - n_prompt);
  in.seq.sampling.temperature = req.temperature;
  in.seq.sampling.top_p = req.top_p;
  static std::atomic<uint64_t> counter{std::random_device{}()};
  in.seq.sampling.seed = req.has_seed ? static_cast<uint64_t>(req.seed) : counter.fetch_add(0x9E3779B97F4A7C15ull);
  if (!req.ignore_eos) {
    in.seq.stop_ids = {m.tok->eos_id()};
    if (m.cfg.text.eos_token_id >= 0 && m.cfg.text.eos_token_id != m.tok->eos_id())
      in.seq.stop_ids.push_back(m.cfg.text.eos_token_id);
  }
  in.streamer = std::make_unique<TokenStreamer>(*m.tok);
  job->prompt_tokens_ = n_prompt;
  job->submitted_ = std::chrono::steady_clock::now();
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Every row busy and queue_limit more waiting: refuse rather than queue without bound.
    if (in_flight_ >= opts_.max_batch + opts_.queue_limit)
      throw ApiError(429, "model '" + name_ + "' is busy: " + std::to_string(opts_.max_batch) + " requests running and " +
                              std::to_string(opts_.queue_limit) + " waiting; retry later");
    ++in_flight_;
    queue_.push_back(job);
  }
  cv_.notify_all();
  return job;
}

void Engine::finish(const std::shared_ptr<Job>& job, const std::string& reason, const std::string& error) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    --in_flight_;
  }
  {
    std::lock_guard<std::mutex> lock(job->mu_);
    job->done_ = true;
    job->finish_ = reason;
    job->error_ = error;
  }
  job->cv_.notify_all();
}

void Engine::loop() {
  c10::NoGradGuard no_grad;
  BatchDecoder& dec = *s_->decoder;
  auto deliver = [&](const SequenceToken& t) {
    std::shared_ptr<Job> job = s_->rows[t.row];
    Job::Impl& in = *job->impl_;
    std::string text = t.token >= 0 ? in.streamer->push(t.token) : "";
    if (t.finish != FinishReason::kNone) text += in.streamer->finish();
    {
      std::lock_guard<std::mutex> lock(job->mu_);
      if (t.token >= 0) {
        if (job->tokens_ == 0) {
          job->first_token_ = std::chrono::steady_clock::now();
          ttft_.observe(seconds(job->first_token_ - job->submitted_));
        }
        job->tokens_++;
        generated_tokens_total_++;
      }
      job->text_ += text;
    }
    job->cv_.notify_all();
    if (t.finish != FinishReason::kNone) {
      finish(job, t.finish == FinishReason::kStop ? "stop" : "length", "");
      s_->rows[t.row].reset();
      running_--;
    }
  };
  auto fail_all = [&](const std::string& what) {
    for (int64_t r = 0; r < dec.max_batch(); ++r)
      if (s_->rows[r]) {
        dec.release(r);
        finish(s_->rows[r], "", what);
        s_->rows[r].reset();
        running_--;
      }
  };
  for (;;) {
    std::vector<std::shared_ptr<Job>> admit;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty() || dec.active() > 0; });
      if (stop_) break;
      while (!queue_.empty() && static_cast<int64_t>(admit.size()) < dec.max_batch() - dec.active()) {
        admit.push_back(queue_.front());
        queue_.pop_front();
      }
    }
    // Cancelled requests (client gone, stop string matched) give their rows back first.
    for (int64_t r = 0; r < dec.max_batch(); ++r)
      if (s_->rows[r] && s_->rows[r]->cancelled()) {
        dec.release(r);
        finish(s_->rows[r], "stop", "");
        s_->rows[r].reset();
        running_--;
      }
    const auto t_admit = std::chrono::steady_clock::now();
    for (auto& job : admit) {
      if (job->cancelled()) {
        finish(job, "stop", "");
        continue;
      }
      Job::Impl& in = *job->impl_;
      try {
        at::Tensor embeds = embed_prompt(s_->model, in.ids, in.image);
        in.image = ImageInput();
        // The row is known only once admitted: admit() picks the lowest free row, the one found here.
        int64_t row = 0;
        while (s_->rows[row]) ++row;
        s_->rows[row] = job;
        running_++;
        prompt_tokens_total_ += static_cast<uint64_t>(in.ids.size());
        SequenceToken t = dec.admit(embeds, in.seq);
        EQAT_ASSERT(t.row == row, "the decoder admitted into row ", t.row, ", expected ", row);
        deliver(t);
      } catch (const std::exception& e) {
        for (auto& r : s_->rows)
          if (r == job) r.reset(), running_--;
        finish(job, "", e.what());
      }
    }
    if (!admit.empty()) prefill_seconds_ = prefill_seconds_ + seconds(std::chrono::steady_clock::now() - t_admit);
    if (dec.active() == 0) continue;
    try {
      const auto t_step = std::chrono::steady_clock::now();
      for (const SequenceToken& t : dec.step()) deliver(t);
      decode_steps_total_++;
      decode_seconds_ = decode_seconds_ + seconds(std::chrono::steady_clock::now() - t_step);
    } catch (const std::exception& e) {
      std::cerr << "serve: model '" << name_ << "': decode step failed: " << e.what() << std::endl;
      fail_all(std::string("decode step failed: ") + e.what());
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
void Engine::record_request(int status, double secs) {
  latency_.observe(secs);
  std::lock_guard<std::mutex> lock(metrics_mu_);
  for (auto& [s, n] : requests_by_status_)
    if (s == status) {
      ++n;
      return;
    }
  requests_by_status_.emplace_back(status, 1);
}

std::string Engine::metrics_text() const {
  const std::string l = "model=\"" + name_ + "\"";
  std::ostringstream o;
  {
    std::lock_guard<std::mutex> lock(metrics_mu_);
    for (const auto& [s, n] : requests_by_status_)
      o << "eqat_requests_total{" << l << ",status=\"" << s << "\"} " << n << "\n";
  }
  o << "eqat_prompt_tokens_total{" << l << "} " << prompt_tokens_total_ << "\n";
  o << "eqat_generated_tokens_total{" << l << "} " << generated_tokens_total_ << "\n";
  o << "eqat_decode_steps_total{" << l << "} " << decode_steps_total_ << "\n";
  o << "eqat_decode_seconds_total{" << l << "} " << decode_seconds_ << "\n";
  o << "eqat_prefill_seconds_total{" << l << "} " << prefill_seconds_ << "\n";
  o << "eqat_requests_running{" << l << "} " << running_ << "\n";
  o << "eqat_requests_waiting{" << l << "} " << waiting() << "\n";
  o << "eqat_batch_capacity{" << l << "} " << opts_.max_batch << "\n";
  o << latency_.text("eqat_request_duration_seconds", l);
  o << ttft_.text("eqat_time_to_first_token_seconds", l);
  return o.str();
}

void set_serve_threads(int requested, const std::vector<std::unique_ptr<Engine>>& engines) {
  if (requested > 0) {
    set_compute_threads(requested);
    return;
  }
  bool tiny_cpu = true;
  for (const auto& e : engines) tiny_cpu = tiny_cpu && e->on_cpu() && e->hidden_size() < 1024;
  set_compute_threads(0, tiny_cpu ? 1 : 0);
}

}  // namespace eqat
