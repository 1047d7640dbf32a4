// eqat bench serve: the server under 1, 4, 16, ... concurrent clients (in process, on a loopback port, over real
// HTTP). Each client sends --requests streamed requests one after the other, each an image question generating
// exactly --max-tokens tokens (ignore_eos), so every level does the same work per request. Reported per level:
// total throughput (generated tokens / wall time), latency p50/p99, time to first token p50/p99, and the mean
// number of rows per decode step (what continuous batching achieved), with the throughput ratio against 1 client.
#include <httplib.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <thread>

#include "args.h"
#include "bench_args.h"
#include "commands.h"
#include "data/error.h"
#include "data/fs.h"
#include "eval/report.h"  // base64_encode
#include "serve_http.h"

namespace eqat {

std::string now_utc();

namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

double quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size() - 1) + 0.5));
  return v[i];
}

struct Sample {
  double latency = 0, ttft = 0;
  int64_t tokens = 0;
  bool ok = false;
};

// One streamed request; tokens from the final chunk's usage.
Sample one_request(int port, const std::string& body) {
  Sample s;
  httplib::Client cli("127.0.0.1", port);
  cli.set_read_timeout(600, 0);
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/chat/completions";
  req.body = body;
  req.headers.emplace("Content-Type", "application/json");
  std::string buf;
  const auto t0 = Clock::now();
  bool first = true;
  req.content_receiver = [&](const char* d, size_t n, uint64_t, uint64_t) {
    buf.append(d, n);
    for (size_t cut; (cut = buf.find("\n\n")) != std::string::npos;) {
      const std::string ev = buf.substr(0, cut);
      buf.erase(0, cut + 2);
      if (ev.rfind("data: {", 0) != 0) continue;
      json c = json::parse(ev.substr(6));
      if (first && !c["choices"].empty() && c["choices"][0]["delta"].contains("content") &&
          !c["choices"][0]["delta"]["content"].get<std::string>().empty()) {
        s.ttft = std::chrono::duration<double>(Clock::now() - t0).count();
        first = false;
      }
      if (c.contains("usage")) s.tokens = c["usage"]["completion_tokens"].get<int64_t>(), s.ok = true;
    }
    return true;
  };
  auto res = cli.send(req);
  s.latency = std::chrono::duration<double>(Clock::now() - t0).count();
  s.ok = s.ok && res && res->status == 200;
  return s;
}

}  // namespace

int bench_serve(const ParsedArgs& a) {
  const std::vector<int64_t> levels = bench_int_list("--clients", a.str("clients"), 1, 256);
  const int64_t per_client = a.i64("requests", 1, 10000);
  const int64_t max_tokens = a.i64("max-tokens", 1, 4096);
  const std::string dir = resolve_model_dir(a.str("model"), "bench serve");
  EngineOptions eo;
  eo.max_batch = *std::max_element(levels.begin(), levels.end());
  eo.queue_limit = eo.max_batch;
  eo.device = a.str("device");
  std::vector<std::unique_ptr<Engine>> engines;
  engines.push_back(std::make_unique<Engine>("bench", dir, eo));
  set_serve_threads(0, engines);  // as eqat serve --threads 0
  Engine* engine = engines.front().get();
  const bool mm = engine->multimodal();

  // Request bodies: the model's demo images (if any) with rotating questions.
  std::vector<std::string> images;
  if (mm && is_directory(path_join(dir, "demo")))
    for (const auto& e : std::filesystem::directory_iterator(path_join(dir, "demo")))
      if (e.path().extension() == ".png") images.push_back("data:image/png;base64," + base64_encode(read_file(e.path().string())));
  std::sort(images.begin(), images.end());
  const std::vector<std::string> qs = {"Describe the image in one sentence.", "How many shapes are there?",
                                       "Is there a red square in the image?"};
  auto body = [&](size_t i) {
    json content = json::array();
    if (!images.empty()) content.push_back({{"type", "image_url"}, {"image_url", {{"url", images[i % images.size()]}}}});
    content.push_back({{"type", "text"}, {"text", mm ? qs[i % qs.size()] : "Once upon a time"}});
    return json{{"messages", {{{"role", "user"}, {"content", content}}}}, {"temperature", 0},
                {"max_tokens", max_tokens}, {"ignore_eos", true}, {"stream", true},
                {"model", "bench"}}.dump();
  };

  ServeOptions so;
  so.port = 0;
  HttpServer server(std::move(engines), so);
  int port = 0;
  std::mutex mu;
  std::condition_variable cv;
  std::thread srv([&] {
    server.run([&](int p) {
      std::lock_guard<std::mutex> lock(mu);
      port = p;
      cv.notify_all();
    });
  });
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return port != 0; });
  }
  one_request(port, body(0));  // warm-up: first-touch of the weights and allocator

  json out = {{"bench", "serve"}, {"date", now_utc()}, {"model", dir}, {"device", eo.device},
              {"max_tokens", max_tokens}, {"requests_per_client", per_client}, {"max_batch", eo.max_batch},
              {"levels", json::array()}};
  double base_tps = 0;
  const bool as_json = a.flag("json");
  if (!as_json)
    std::cout << std::left << std::setw(8) << "clients" << std::setw(12) << "tok/s" << std::setw(12) << "x first"
              << std::setw(12) << "p50 lat s" << std::setw(12) << "p99 lat s" << std::setw(12) << "p50 ttft s"
              << std::setw(12) << "p99 ttft s" << std::setw(11) << "rows/step" << std::setw(9) << "ms/step"
              << "engine busy\n";
  bool all_ok = true;
  for (int64_t n : levels) {
    const std::string before = engine->metrics_text();
    std::vector<std::vector<Sample>> per(static_cast<size_t>(n));
    const auto t0 = Clock::now();
    std::vector<std::thread> th;
    for (int64_t c = 0; c < n; ++c)
      th.emplace_back([&, c] {
        for (int64_t r = 0; r < per_client; ++r) per[c].push_back(one_request(port, body(c * per_client + r)));
      });
    for (auto& t : th) t.join();
    const double wall = std::chrono::duration<double>(Clock::now() - t0).count();
    const std::string after = engine->metrics_text();
    std::vector<double> lat, ttft;
    int64_t tokens = 0, failed = 0;
    for (const auto& v : per)
      for (const auto& s : v) {
        if (!s.ok) ++failed;
        lat.push_back(s.latency);
        ttft.push_back(s.ttft);
        tokens += s.tokens;
      }
    const double steps = prometheus_value(after, "eqat_decode_steps_total") - prometheus_value(before, "eqat_decode_steps_total");
    const double gen = prometheus_value(after, "eqat_generated_tokens_total") - prometheus_value(before, "eqat_generated_tokens_total");
    const double tps = static_cast<double>(tokens) / wall;
    const double dsec = prometheus_value(after, "eqat_decode_seconds_total") - prometheus_value(before, "eqat_decode_seconds_total");
    const double psec = prometheus_value(after, "eqat_prefill_seconds_total") - prometheus_value(before, "eqat_prefill_seconds_total");
    if (n == levels.front()) base_tps = tps;
    // Each request's first token comes from its prefill, the rest from shared decode steps.
    const double rows_per_step = steps > 0 ? (gen - static_cast<double>(n * per_client)) / steps : 0;
    all_ok = all_ok && failed == 0;
    out["levels"].push_back({{"clients", n}, {"requests", n * per_client}, {"failed", failed}, {"wall_s", wall},
                             {"tokens", tokens}, {"tokens_per_s", tps}, {"ratio_vs_first_level", tps / base_tps},
                             {"latency_p50_s", quantile(lat, 0.5)}, {"latency_p99_s", quantile(lat, 0.99)},
                             {"ttft_p50_s", quantile(ttft, 0.5)}, {"ttft_p99_s", quantile(ttft, 0.99)},
                             {"decode_steps", steps}, {"rows_per_decode_step", rows_per_step},
                             {"ms_per_decode_step", steps > 0 ? 1000 * dsec / steps : 0},
                             {"engine_busy_fraction", (dsec + psec) / wall}, {"prefill_share_of_engine", psec / (dsec + psec)}});
    if (!as_json)
      std::cout << std::fixed << std::setprecision(3) << std::left << std::setw(8) << n << std::setw(12)
                << std::setprecision(1) << tps << std::setw(12) << std::setprecision(2) << tps / base_tps
                << std::setprecision(3) << std::setw(12) << quantile(lat, 0.5) << std::setw(12) << quantile(lat, 0.99)
                << std::setw(12) << quantile(ttft, 0.5) << std::setw(12) << quantile(ttft, 0.99)
                << std::setprecision(2) << std::setw(11) << rows_per_step << std::setw(9) << (steps > 0 ? 1000 * dsec / steps : 0)
                << (dsec + psec) / wall << (failed ? "  (" + std::to_string(failed) + " failed)" : "")
                << std::endl;
  }
  server.stop();
  srv.join();
  if (as_json) std::cout << out.dump(2) << std::endl;
  return all_ok ? 0 : 1;
}

}  // namespace eqat
