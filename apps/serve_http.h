// eqat serve, the HTTP side (cpp-httplib): OpenAI-compatible routes over one Engine per model, Prometheus
// metrics, the web page at "/". Used by `eqat serve` and, in process, by `eqat bench serve`.
//   POST /v1/chat/completions   OpenAI chat completions, streaming (SSE) or not
//   GET  /v1/models             the served models
//   GET  /health                {"status": "ok", ...}
//   GET  /metrics               Prometheus text: requests by status, tokens, queue, latency histograms
//   GET  /                      the page; /demo/index.json and /demo/NAME: its demo images
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "serve_engine.h"

namespace eqat {

struct ServeOptions {
  std::string host = "127.0.0.1";
  int port = 8080;                       // 0: any free port (the bound one is passed to on_listening)
  std::string api_key;                   // non-empty: /v1/* need "Authorization: Bearer KEY"
  int64_t max_body_bytes = 32 << 20;     // larger request bodies get 413
  std::string demo_dir;                  // images the page offers ("" = none)
};

class HttpServer {
 public:
  HttpServer(std::vector<std::unique_ptr<Engine>> engines, const ServeOptions& opts);
  ~HttpServer();
  // Binds and serves until stop(). `on_listening(port)` runs once the socket is bound. InputError when the address
  // cannot be bound.
  void run(const std::function<void(int port)>& on_listening);
  void stop();  // safe from another thread

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

extern const char* const kServePageHtml;  // apps/serve_page.html, embedded at build time

}  // namespace eqat
