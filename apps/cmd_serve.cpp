// eqat serve: flags and signals only; serve_http.h serves, serve_engine.h runs the models.
#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdlib>
#include <iostream>

#include "args.h"
#include "commands.h"
#include "data/cpu.h"
#include "data/error.h"
#include "data/fs.h"
#include "llm/prompt.h"
#include "serve_http.h"

namespace eqat {

namespace {

std::atomic<HttpServer*> g_server{nullptr};
extern "C" void on_signal(int) {
  if (HttpServer* s = g_server.load()) s->stop();
}

}  // namespace

int cmd_serve(const Argv& argv);
const bool kServeRegistered =
    register_command("serve", cmd_serve, "OpenAI-compatible HTTP server (chat completions with images) and web page");

int cmd_serve(const Argv& argv) {
  CommandSpec spec{"serve", "eqat serve [--model DIR | --model NAME=DIR ...] [--host H] [--port P] [options]",
                   "Serves models over an OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models, /health, "
                   "/metrics) and a web page at /. Requests are batched: the decode steps of up to --max-batch "
                   "requests per model run together.",
                   {}, 0, 0};
  spec.flags = {
      {"model", "[NAME=]DIR",
       "a model to serve, repeatable; NAME is its id in the API (default: the directory's name). The first is the "
       "default model (default: the embedded default model)", ""},
      {"host", "ADDR", "address to listen on (anything but loopback exposes the server to the network)", "127.0.0.1"},
      {"port", "N", "TCP port (0 = any free port; the bound one is printed)", "8080"},
      {"api-key", "KEY", "require \"Authorization: Bearer KEY\" on /v1/* (or set EQAT_API_KEY)", ""},
      {"max-batch", "N", "requests decoded together per model", "8"},
      {"queue-limit", "N", "requests waiting per model beyond the batch; more get HTTP 429", "32"},
      {"ctx", "N", "positions per request (prompt + answer; 0 = the model's context); sizes the KV cache", "0"},
      {"max-image-pixels", "N", "largest image accepted (width x height)", "16777216"},
      {"max-body-bytes", "N", "largest request body accepted", "33554432"},
      {"allow-local-files", "DIR", "let image_url name files under DIR (file:// URLs or paths)", ""},
      {"demo-images", "DIR", "images the web page offers (default: the first model's demo/ directory)", ""},
      {"template", "NAME",
       "prompt template for every model: llava-1.5 | hf | mistral | chatml | llama3 | none (default: each model's own)",
       ""},
      {"device", "DEV", "cpu | cuda[:N]", "cpu"},
      {"dtype", "T",
       "auto (the stored dtype; fp16 computes in float32 on the CPU, its weights kept fp16) | float32 | bfloat16 | "
       "float16",
       "auto"},
      {"threads", "N", "CPU threads (0 = LibTorch's default)", "0"},
  };
  ParsedArgs a = parse_args(spec, argv);
  if (a.threads() > 0) set_compute_threads(a.threads());

  EngineOptions eo;
  eo.max_batch = a.i64("max-batch", 1, 256);
  eo.queue_limit = a.i64("queue-limit", 0, 4096);
  eo.context = a.i64("ctx", 0, int64_t{1} << 24);
  eo.max_image_pixels = a.i64("max-image-pixels", 1, int64_t{1} << 26);
  eo.device = a.str("device");
  if (a.has("template")) eo.template_name = template_name(parse_template(a.str("template")));
  eo.dtype = a.str("dtype");
  if (a.has("allow-local-files")) {
    eo.local_files_dir = a.str("allow-local-files");
    EQAT_CHECK(is_directory(eo.local_files_dir), "--allow-local-files ", eo.local_files_dir, ": not a directory");
  }
  ServeOptions so;
  so.host = a.str("host");
  so.port = a.i32("port", 0, 65535);
  so.max_body_bytes = a.i64("max-body-bytes", 1024, int64_t{1} << 30);
  eo.max_image_bytes = so.max_body_bytes;
  so.api_key = a.str("api-key");
  if (so.api_key.empty())
    if (const char* k = std::getenv("EQAT_API_KEY")) so.api_key = k;

  std::vector<std::string> specs = a.all("model");
  if (specs.empty()) specs.push_back(resolve_model_dir("", "serve"));
  std::vector<std::unique_ptr<Engine>> engines;
  for (const std::string& m : specs) {
    // NAME=DIR, unless the whole value is an existing directory (a path may contain '=').
    std::string name, dir = m;
    const size_t eq = m.find('=');
    if (eq != std::string::npos && !is_directory(m)) name = m.substr(0, eq), dir = m.substr(eq + 1);
    while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
    if (name.empty()) name = dir.substr(dir.find_last_of('/') + 1);
    EQAT_CHECK(!name.empty(), "--model ", m, ": cannot name this model; use --model NAME=DIR");
    for (const auto& e : engines) EQAT_CHECK(e->name() != name, "--model: two models named '", name, "'");
    engines.push_back(std::make_unique<Engine>(name, dir, eo));
    std::cerr << "serve: model '" << name << "' from " << dir << " (" << engines.back()->context()
              << " positions per request, " << eo.max_batch << " decoded together)" << std::endl;
  }
  set_serve_threads(a.threads(), engines);
  so.demo_dir = a.has("demo-images") ? a.str("demo-images") : path_join(engines.front()->dir(), "demo");
  EQAT_CHECK(!a.has("demo-images") || is_directory(so.demo_dir), "--demo-images ", so.demo_dir, ": not a directory");
  if (so.host != "127.0.0.1" && so.host != "localhost" && so.host != "::1" && so.api_key.empty())
    std::cerr << "warning: listening on " << so.host << " without --api-key: anyone who can reach it can use it"
              << std::endl;

  HttpServer server(std::move(engines), so);
  g_server = &server;
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  std::signal(SIGPIPE, SIG_IGN);
  server.run([&](int port) {
    std::cout << "eqat serve: listening on http://" << so.host << ":" << port << "/" << std::endl;
  });
  g_server = nullptr;
  std::cerr << "serve: stopped" << std::endl;
  return 0;
}

}  // namespace eqat
