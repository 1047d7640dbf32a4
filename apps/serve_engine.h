// eqat serve, the model side: one Engine per served model. HTTP threads submit() requests (prompt rendered and
// tokenized, image decoded and preprocessed on the caller's thread); the engine's own thread owns the model and a
// BatchDecoder (llm/batch_decoder.h): it admits queued requests into free rows and runs one decode step for all
// of them at a time (continuous batching). Each request reads its text back through its Job.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "serve_api.h"

namespace eqat {

struct EngineOptions {
  int64_t max_batch = 8;            // rows decoded together
  int64_t queue_limit = 32;         // requests waiting for a row; beyond it submit() refuses with 429
  int64_t context = 0;              // positions per sequence; 0: the model's max_position_embeddings
  int64_t max_image_pixels = 16 << 20;
  int64_t max_image_bytes = 20 << 20;
  std::string local_files_dir;      // --allow-local-files ("" = none)
  std::string device = "cpu";
  std::string dtype = "auto";
  std::string template_name;        // --template ("" = the model's own, llm/prompt.h model_template)
};

// What a Job has produced since the last wait().
struct JobUpdate {
  std::string text;            // newly decoded text (UTF-8 complete)
  int64_t tokens = 0;          // tokens generated so far
  bool done = false;
  std::string finish_reason;   // stop | length (when done without error)
  std::string error;           // non-empty: the request failed (HTTP 500)
};

class Job {
 public:
  // Blocks until something new arrives or `timeout` passes.
  JobUpdate wait(std::chrono::milliseconds timeout);
  void cancel() { cancelled_ = true; }
  bool cancelled() const { return cancelled_; }
  int64_t prompt_tokens() const { return prompt_tokens_; }

 private:
  friend class Engine;
  struct Impl;
  std::shared_ptr<Impl> impl_;  // the prompt and the decoding state, owned with the engine thread
  std::mutex mu_;
  std::condition_variable cv_;
  std::string text_;
  int64_t tokens_ = 0;
  bool done_ = false;
  std::string finish_, error_;
  std::atomic<bool> cancelled_{false};
  int64_t prompt_tokens_ = 0;
  std::chrono::steady_clock::time_point submitted_, first_token_;
};

// Prometheus-style latency histogram (cumulative buckets), thread-safe.
class Histogram {
 public:
  static constexpr std::array<double, 12> kBounds{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
  void observe(double seconds);
  std::string text(const std::string& name, const std::string& labels) const;

 private:
  mutable std::mutex mu_;
  std::array<uint64_t, kBounds.size()> counts_{};
  uint64_t count_ = 0;
  double sum_ = 0;
};

class Engine {
 public:
  // Loads the model directory and starts the engine thread. InputError for a bad directory or options.
  Engine(const std::string& name, const std::string& dir, const EngineOptions& opts);
  ~Engine();  // stops the thread; requests still running end with an error
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Renders, tokenizes and queues a request. ApiError: 400 (bad image, prompt beyond the context, image to a
  // text-only model), 413 (image bytes), 429 (queue full).
  std::shared_ptr<Job> submit(const ChatRequest& req);

  const std::string& name() const { return name_; }
  const std::string& dir() const { return dir_; }
  int64_t context() const { return context_; }
  bool multimodal() const;
  int64_t hidden_size() const;  // the decoder's width (tiny models serve best on one thread)
  bool on_cpu() const;
  int64_t running() const { return running_; }
  int64_t waiting() const;
  int64_t max_batch() const { return opts_.max_batch; }
  int64_t queue_limit() const { return opts_.queue_limit; }

  // Called by the HTTP layer when a request ends (any status).
  void record_request(int status, double seconds);
  std::string metrics_text() const;  // this model's series, Prometheus text format

 private:
  void loop();
  void finish(const std::shared_ptr<Job>& job, const std::string& reason, const std::string& error);

  struct State;
  std::unique_ptr<State> s_;  // the model and the decoder: the engine thread's alone after construction
  std::string name_, dir_;
  EngineOptions opts_;
  int64_t context_ = 0;
  PromptTemplate template_ = PromptTemplate::kLlava15;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  int64_t in_flight_ = 0;  // submitted and not finished (queued + running), under mu_
  bool stop_ = false;
  std::atomic<int64_t> running_{0};
  std::thread thread_;

  // Metrics.
  mutable std::mutex metrics_mu_;
  std::vector<std::pair<int, uint64_t>> requests_by_status_;
  std::atomic<uint64_t> prompt_tokens_total_{0}, generated_tokens_total_{0}, decode_steps_total_{0};
  std::atomic<double> decode_seconds_{0}, prefill_seconds_{0};  // engine-thread time in steps and admissions
  Histogram latency_, ttft_;
};

// Compute threads for serving: `requested` > 0 as given; 0 (auto) as eqat ask does it, one thread when every model
// is tiny on the CPU (hidden < 1024: OpenMP's fork/join costs more than it gains, and the HTTP threads need the
// other cores), else LibTorch's default over the idle cores.
void set_serve_threads(int requested, const std::vector<std::unique_ptr<Engine>>& engines);

}  // namespace eqat
