#include "serve_http.h"

#include <httplib.h>
#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <ctime>
#include <filesystem>
#include <iostream>
#include <random>

#include <sys/socket.h>

#include "data/error.h"
#include "data/fs.h"

namespace eqat {

using nlohmann::json;

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string completion_id() {
  static std::atomic<uint64_t> n{0};
  static const uint64_t salt = [] {
    std::random_device rd;
    return (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }();
  char buf[40];
  std::snprintf(buf, sizeof buf, "chatcmpl-%016llx%04llx", static_cast<unsigned long long>(salt),
                static_cast<unsigned long long>(n++ & 0xFFFF));
  return buf;
}

void send_error(httplib::Response& res, const ApiError& e) {
  res.status = e.status;
  res.set_content(e.json(), "application/json");
}

// A demo image name: a plain file name, no path.
bool safe_name(const std::string& s) {
  if (s.empty() || s[0] == '.') return false;
  for (char c : s)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-')) return false;
  return true;
}

std::vector<std::string> demo_images(const std::string& dir) {
  std::vector<std::string> out;
  if (dir.empty() || !is_directory(dir)) return out;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string n = e.path().filename().string();
    const std::string ext = e.path().extension().string();
    if (e.is_regular_file() && safe_name(n) && (ext == ".png" || ext == ".jpg" || ext == ".jpeg")) out.push_back(n);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// The streaming state of one request, shared by httplib's content provider and its releaser.
struct Stream {
  std::shared_ptr<Job> job;
  Engine* engine = nullptr;
  TextAssembler text;
  std::string id, model;
  int64_t created = 0;
  bool include_usage = false;
  bool sent_role = false, finished = false;
  int status = 200;  // recorded when the stream ends: 200, 500 (generation failed) or 499 (client left)
  Clock::time_point t0, last_write;
  explicit Stream(std::vector<std::string> stop) : text(std::move(stop)) {}
};

}  // namespace

struct HttpServer::Impl {
  std::vector<std::unique_ptr<Engine>> engines;
  ServeOptions opts;
  httplib::Server svr;
  std::vector<std::string> demos;
  int listen_fd = -1;

  Engine* find(const std::string& model) {
    if (model.empty()) return engines.front().get();
    for (auto& e : engines)
      if (e->name() == model) return e.get();
    std::string names;
    for (auto& e : engines) names += (names.empty() ? "" : ", ") + e->name();
    throw ApiError(404, "the model '" + model + "' does not exist (this server has: " + names + ")", "model",
                   "model_not_found");
  }

  bool authorized(const httplib::Request& req, httplib::Response& res) {
    if (opts.api_key.empty() || bearer_matches(req.get_header_value("Authorization"), opts.api_key)) return true;
    send_error(res, ApiError(401, "invalid or missing API key (send \"Authorization: Bearer KEY\")", "", "invalid_api_key"));
    return false;
  }

  void chat(const httplib::Request& req, httplib::Response& res) {
    const auto t0 = Clock::now();
    Engine* engine = nullptr;
    try {
      ChatRequest cr = parse_chat_request(req.body);
      engine = find(cr.model);
      std::shared_ptr<Job> job = engine->submit(cr);
      const std::string id = completion_id();
      const int64_t created = static_cast<int64_t>(std::time(nullptr));
      if (!cr.stream) {
        TextAssembler text(cr.stop);
        std::string content, finish;
        int64_t tokens = 0;
        for (;;) {
          JobUpdate u = job->wait(std::chrono::milliseconds(1000));
          content += text.push(u.text);
          tokens = u.tokens;
          if (text.stopped()) {
            job->cancel();
            finish = "stop";
            break;
          }
          if (u.done) {
            if (!u.error.empty()) throw ApiError(500, "generation failed: " + u.error);
            content += text.finish();
            finish = u.finish_reason;
            break;
          }
        }
        res.set_content(completion_json(id, created, engine->name(), content, finish,
                                         Usage{job->prompt_tokens(), tokens}),
                        "application/json");
        engine->record_request(200, since(t0));
        return;
      }
      auto st = std::make_shared<Stream>(cr.stop);
      st->job = job;
      st->engine = engine;
      st->id = id;
      st->model = engine->name();
      st->created = created;
      st->include_usage = cr.include_usage;
      st->t0 = st->last_write = t0;
      res.set_header("Cache-Control", "no-cache");
      res.set_header("X-Accel-Buffering", "no");
      res.set_chunked_content_provider(
          "text/event-stream",
          [st](size_t, httplib::DataSink& sink) { return stream_step(*st, sink); },
          [st](bool success) {
            st->engine->record_request(success && st->finished ? st->status : 499, since(st->t0));
            if (!success) st->job->cancel();  // the client went away: free its row
          });
    } catch (const ApiError& e) {
      send_error(res, e);
      if (engine) engine->record_request(e.status, since(t0));
    }
  }

  // One call of httplib's content provider: waits for new text (up to half a second), sends what it has. Returns
  // false when the client is gone (httplib then calls the releaser with success = false).
  static bool stream_step(Stream& st, httplib::DataSink& sink) {
    auto write = [&](const std::string& s) {
      st.last_write = Clock::now();
      return sink.write(s.data(), s.size());
    };
    if (!st.sent_role) {
      st.sent_role = true;
      return write(chunk_event(st.id, st.created, st.model, "", /*role=*/true, "", nullptr));
    }
    JobUpdate u = st.job->wait(std::chrono::milliseconds(500));
    std::string delta = st.text.push(u.text);
    std::string finish;
    if (st.text.stopped()) {
      st.job->cancel();
      finish = "stop";
    } else if (u.done) {
      if (!u.error.empty()) {
        write("data: " + api_error_json(500, "generation failed: " + u.error) + "\n\n");
        st.status = 500;
        st.finished = true;
        sink.done();
        return true;
      }
      delta += st.text.finish();
      finish = u.finish_reason;
    }
    if (!delta.empty() && !write(chunk_event(st.id, st.created, st.model, delta, false, "", nullptr))) return false;
    if (!finish.empty()) {
      const Usage usage{st.job->prompt_tokens(), u.tokens};
      if (!write(chunk_event(st.id, st.created, st.model, "", false, finish, &usage))) return false;
      if (st.include_usage && !write(usage_only_event(st.id, st.created, st.model, usage))) return false;
      if (!write("data: [DONE]\n\n")) return false;
      st.finished = true;
      sink.done();
      return true;
    }
    // Waiting (queued, or a slow step): an SSE comment now and then finds a client that left.
    if (since(st.last_write) > 1.0 && !write(": keep-alive\n\n")) return false;
    return true;
  }

  void routes() {
    svr.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
      if (authorized(req, res)) chat(req, res);
    });
    svr.Get("/v1/models", [this](const httplib::Request& req, httplib::Response& res) {
      if (!authorized(req, res)) return;
      json data = json::array();
      for (auto& e : engines)
        data.push_back({{"id", e->name()},
                        {"object", "model"},
                        {"created", 0},
                        {"owned_by", "eqat"},
                        {"context_length", e->context()},
                        {"multimodal", e->multimodal()}});
      res.set_content(json{{"object", "list"}, {"data", data}}.dump(), "application/json");
    });
    svr.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
      json models = json::array();
      for (auto& e : engines)
        models.push_back({{"id", e->name()}, {"running", e->running()}, {"waiting", e->waiting()},
                          {"max_batch", e->max_batch()}, {"multimodal", e->multimodal()}});
      res.set_content(json{{"status", "ok"}, {"auth", !opts.api_key.empty()}, {"models", models}}.dump(),
                      "application/json");
    });
    svr.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      std::string out =
          "# HELP eqat_requests_total Chat completion requests by HTTP status (499: the client left).\n"
          "# TYPE eqat_requests_total counter\n"
          "# TYPE eqat_prompt_tokens_total counter\n# TYPE eqat_generated_tokens_total counter\n"
          "# TYPE eqat_decode_steps_total counter\n# TYPE eqat_requests_running gauge\n"
          "# HELP eqat_decode_seconds_total Engine time in batched decode steps (token delivery included).\n"
          "# TYPE eqat_decode_seconds_total counter\n"
          "# HELP eqat_prefill_seconds_total Engine time admitting requests (vision tower and prefill).\n"
          "# TYPE eqat_prefill_seconds_total counter\n"
          "# TYPE eqat_requests_waiting gauge\n# TYPE eqat_batch_capacity gauge\n"
          "# HELP eqat_request_duration_seconds Time from the request to its last byte.\n"
          "# TYPE eqat_request_duration_seconds histogram\n"
          "# HELP eqat_time_to_first_token_seconds Time from the request to its first generated token.\n"
          "# TYPE eqat_time_to_first_token_seconds histogram\n";
      for (auto& e : engines) out += e->metrics_text();
      res.set_content(out, "text/plain; version=0.0.4");
    });
    svr.Get("/", [](const httplib::Request&, httplib::Response& res) {
      res.set_content(kServePageHtml, "text/html; charset=utf-8");
    });
    svr.Get("/demo/index.json", [this](const httplib::Request&, httplib::Response& res) {
      res.set_content(json(demos).dump(), "application/json");
    });
    svr.Get(R"(/demo/([A-Za-z0-9_.-]+))", [this](const httplib::Request& req, httplib::Response& res) {
      const std::string name = req.matches[1];
      if (std::find(demos.begin(), demos.end(), name) == demos.end()) {
        send_error(res, ApiError(404, "no demo image '" + name + "'"));
        return;
      }
      const std::string ext = std::filesystem::path(name).extension().string();
      res.set_content(read_file(path_join(opts.demo_dir, name)), ext == ".png" ? "image/png" : "image/jpeg");
    });
    // httplib's own refusals (unknown route, body over the limit, ...) in OpenAI's error shape.
    svr.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
      if (!res.body.empty()) return;
      std::string msg = res.status == 404   ? "no route " + req.method + " " + req.path
                        : res.status == 413 ? "request body too large"
                                            : "request refused (HTTP " + std::to_string(res.status) + ")";
      res.set_content(api_error_json(res.status, msg), "application/json");
    });
    svr.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
      std::string msg = "internal error";
      try {
        std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        msg = e.what();
      } catch (...) {
      }
      res.status = 500;
      res.set_content(api_error_json(500, msg), "application/json");
    });
  }
};

HttpServer::HttpServer(std::vector<std::unique_ptr<Engine>> engines, const ServeOptions& opts)
    : impl_(std::make_unique<Impl>()) {
  EQAT_CHECK(!engines.empty(), "no model to serve");
  impl_->engines = std::move(engines);
  impl_->opts = opts;
  impl_->demos = demo_images(opts.demo_dir);
  // Every streaming request holds a worker thread for its whole answer: enough for all rows and queues, plus a
  // few for /health, /metrics and refusals.
  size_t workers = 4;
  for (auto& e : impl_->engines) workers += static_cast<size_t>(e->max_batch() + e->queue_limit());
  impl_->svr.new_task_queue = [workers] { return new httplib::ThreadPool(workers); };
  // The listening socket: SO_REUSEADDR as httplib's default (no SO_REUSEPORT: a second server on the same port must
  // fail), and its fd remembered so run() can raise the accept backlog.
  impl_->svr.set_socket_options([this](int sock) {
    int yes = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
    impl_->listen_fd = sock;
  });
  impl_->svr.set_payload_max_length(static_cast<size_t>(opts.max_body_bytes));
  impl_->svr.set_read_timeout(30, 0);
  impl_->svr.set_write_timeout(30, 0);
  impl_->routes();
}

HttpServer::~HttpServer() = default;

void HttpServer::run(const std::function<void(int)>& on_listening) {
  httplib::Server& s = impl_->svr;
  int port = impl_->opts.port;
  if (port == 0) {
    port = s.bind_to_any_port(impl_->opts.host);
    EQAT_CHECK(port > 0, "--host ", impl_->opts.host, ": cannot bind a port on this address");
  } else {
    EQAT_CHECK(s.bind_to_port(impl_->opts.host, port), "--port ", port, ": cannot listen on ", impl_->opts.host, ":",
               port, " (in use, or not an address of this machine)");
  }
  // httplib 0.11 listens with a backlog of 5: a burst of new connections (16 clients at once) overflows it and the
  // dropped SYNs come back after TCP's 1-s retransmit. Listening again on the bound socket raises it.
  if (impl_->listen_fd >= 0) ::listen(impl_->listen_fd, 1024);
  if (on_listening) on_listening(port);
  s.listen_after_bind();
}

void HttpServer::stop() { impl_->svr.stop(); }

}  // namespace eqat
