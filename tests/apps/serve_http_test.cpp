// eqat serve end to end: the real binary on a loopback port, driven over HTTP (cpp-httplib's client), by a
// headless browser (Debian's chromium, when installed) and by the official openai Python client (when the venv
// has it). The default model answers; `eqat ask` gives the reference answers.
#include <gtest/gtest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <regex>
#include <set>
#include <thread>

#include "cli_util.h"
#include "eval/report.h"  // base64_encode
#include "serve_api.h"

using namespace eqat_test;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

const std::string kModel = std::string(EQAT_TEST_DATA) + "/../../models/shapes-llava";

std::vector<std::string> demo_images() {
  std::vector<std::string> v;
  for (const auto& e : fs::directory_iterator(kModel + "/demo"))
    if (e.path().extension() == ".png") v.push_back(e.path().string());
  std::sort(v.begin(), v.end());
  return v;
}

std::string data_url(const std::string& png) { return "data:image/png;base64," + eqat::base64_encode(slurp(png)); }

json chat_body(const std::string& question, const std::string& image, int max_tokens = 48, bool stream = false) {
  json content = json::array();
  if (!image.empty()) content.push_back({{"type", "image_url"}, {"image_url", {{"url", data_url(image)}}}});
  content.push_back({{"type", "text"}, {"text", question}});
  return {{"messages", {{{"role", "user"}, {"content", content}}}},
          {"temperature", 0},
          {"max_tokens", max_tokens},
          {"stream", stream}};
}

// `eqat serve` as a child process on a free port; SIGTERM on destruction.
class Server {
 public:
  explicit Server(std::vector<std::string> args) {
    int fds[2];
    EXPECT_EQ(::pipe(fds), 0);
    err_path_ = dir_.str("stderr");
    pid_ = ::fork();
    if (pid_ == 0) {
      ::dup2(fds[1], 1);
      ::close(fds[0]);
      FILE* e = std::fopen(err_path_.c_str(), "w");
      if (e) ::dup2(fileno(e), 2);
      std::vector<std::string> all{EQAT_BIN, "serve", "--port", "0"};
      all.insert(all.end(), args.begin(), args.end());
      std::vector<char*> argv;
      for (auto& s : all) argv.push_back(s.data());
      argv.push_back(nullptr);
      ::execv(EQAT_BIN, argv.data());
      ::_exit(127);
    }
    ::close(fds[1]);
    // The first stdout line names the port: "eqat serve: listening on http://127.0.0.1:PORT/".
    std::string line;
    char c;
    while (::read(fds[0], &c, 1) == 1 && c != '\n') line += c;
    ::close(fds[0]);
    std::smatch m;
    if (std::regex_search(line, m, std::regex(":([0-9]+)/"))) port_ = std::stoi(m[1]);
    EXPECT_GT(port_, 0) << "no port in '" << line << "'; stderr: " << slurp(err_path_);
  }
  ~Server() {
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      int st = 0;
      ::waitpid(pid_, &st, 0);
    }
  }
  int port() const { return port_; }
  std::unique_ptr<httplib::Client> client() const {
    auto c = std::make_unique<httplib::Client>("127.0.0.1", port_);
    c->set_read_timeout(120, 0);
    return c;
  }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_) + "/"; }
  std::string stderr_text() const { return slurp(err_path_); }
  bool alive() const { return pid_ > 0 && ::waitpid(pid_, nullptr, WNOHANG) == 0; }

 private:
  TempDir dir_;
  std::string err_path_;
  pid_t pid_ = -1;
  int port_ = -1;
};

json post(const Server& s, const json& body, int* status = nullptr, const httplib::Headers& h = {}) {
  auto res = s.client()->Post("/v1/chat/completions", h, body.dump(), "application/json");
  EXPECT_TRUE(res) << "no response; server stderr: " << s.stderr_text();
  if (!res) return json();
  if (status) *status = res->status;
  return json::parse(res->body);
}

// A streamed completion: every "data:" payload in order. `stop_after` > 0 closes the connection after that many
// events (a client that goes away).
std::vector<std::string> stream(const Server& s, const json& body, int stop_after = 0) {
  std::vector<std::string> events;
  std::string buf;
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/chat/completions";
  req.body = body.dump();
  req.headers.emplace("Content-Type", "application/json");
  req.content_receiver = [&](const char* d, size_t n, uint64_t, uint64_t) {
    buf.append(d, n);
    for (size_t cut; (cut = buf.find("\n\n")) != std::string::npos;) {
      std::string ev = buf.substr(0, cut);
      buf.erase(0, cut + 2);
      if (ev.rfind("data: ", 0) == 0) events.push_back(ev.substr(6));
      if (stop_after > 0 && static_cast<int>(events.size()) >= stop_after) return false;
    }
    return true;
  };
  s.client()->send(req);
  return events;
}

std::string ask_cli(const std::string& image, const std::string& q) {
  RunResult r = run_eqat({"ask", "--image", image, "--max-new-tokens", "48", q});
  EXPECT_EQ(r.code, 0) << r.err;
  return strip(r.out);
}

}  // namespace

TEST(Serve, AnswersLikeAskInOpenAisSchemaStreamedOrNot) {
  Server s({});
  const std::string img = demo_images().at(0), q = "How many shapes are there?";
  const std::string want = ask_cli(img, q);
  ASSERT_FALSE(want.empty());
  int status = 0;
  json r = post(s, chat_body(q, img), &status);
  ASSERT_EQ(status, 200) << r.dump();
  EXPECT_EQ(r["object"], "chat.completion");
  EXPECT_EQ(r["model"], "shapes-llava");
  EXPECT_EQ(r["choices"][0]["message"]["content"], want);
  EXPECT_EQ(r["choices"][0]["finish_reason"], "stop");
  // Prompt tokens: the image's 9 positions are part of them; completion tokens: at least one per word.
  EXPECT_GT(r["usage"]["prompt_tokens"].get<int>(), 9);
  EXPECT_GE(r["usage"]["completion_tokens"].get<int>(), 1);
  EXPECT_EQ(r["usage"]["total_tokens"].get<int>(),
            r["usage"]["prompt_tokens"].get<int>() + r["usage"]["completion_tokens"].get<int>());

  std::vector<std::string> ev = stream(s, chat_body(q, img, 48, true));
  ASSERT_GE(ev.size(), 3u);
  EXPECT_EQ(ev.back(), "[DONE]");
  std::string text;
  json last;
  for (size_t i = 0; i + 1 < ev.size(); ++i) {
    json c = json::parse(ev[i]);
    EXPECT_EQ(c["object"], "chat.completion.chunk");
    if (i == 0) EXPECT_EQ(c["choices"][0]["delta"]["role"], "assistant");
    if (c["choices"][0]["delta"].contains("content")) text += c["choices"][0]["delta"]["content"].get<std::string>();
    last = c;
  }
  EXPECT_EQ(text, want);
  EXPECT_EQ(last["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(last["usage"], r["usage"]);
  // A seed makes sampling reproducible; a stop string cuts the answer before it (finish_reason "stop").
  json sampled = chat_body("Describe the image in one sentence.", img);
  sampled["temperature"] = 1.5;
  sampled["seed"] = 11;
  const std::string a1 = post(s, sampled)["choices"][0]["message"]["content"];
  EXPECT_EQ(post(s, sampled)["choices"][0]["message"]["content"], a1);
  json cut = chat_body("Describe the image in one sentence.", img);
  const std::string full = post(s, cut)["choices"][0]["message"]["content"];
  const size_t sp = full.find(' ');
  ASSERT_NE(sp, std::string::npos) << full;
  cut["stop"] = full.substr(sp, 3);  // e.g. " gr": the answer stops after its first word
  json r2 = post(s, cut);
  EXPECT_EQ(r2["choices"][0]["message"]["content"], full.substr(0, sp));
  EXPECT_EQ(r2["choices"][0]["finish_reason"], "stop");
  // The other routes.
  auto c = s.client();
  auto models = c->Get("/v1/models");
  ASSERT_TRUE(models);
  EXPECT_EQ(json::parse(models->body)["data"][0]["id"], "shapes-llava");
  auto health = c->Get("/health");
  ASSERT_TRUE(health);
  EXPECT_EQ(json::parse(health->body)["status"], "ok");
  auto metrics = c->Get("/metrics");
  ASSERT_TRUE(metrics);
  EXPECT_EQ(eqat::prometheus_value(metrics->body, "eqat_requests_total"), 6);
  EXPECT_GE(eqat::prometheus_value(metrics->body, "eqat_request_duration_seconds_count"), 6);
  auto page = c->Get("/");
  ASSERT_TRUE(page);
  EXPECT_NE(page->body.find("<title>eqat serve</title>"), std::string::npos);
}

// LLaVA-NeXT: requests whose images take different numbers of prompt positions (anyres tiles, unpadded per aspect)
// share decode steps and each gets `eqat ask`'s answer, in the checkpoint's own chat template (mistral).
TEST(Serve, LlavaNextImagesOfDifferentSizesGetAsksAnswers) {
  const std::string dir = fixture("tiny_llava_next_mistral");
  Server s({"--model", dir});
  const std::string q = "What is shown in this image?";
  std::vector<std::string> images{dir + "/wide.png", dir + "/tall.png", dir + "/mid.png"};
  std::vector<std::string> want;
  for (const auto& img : images) {
    RunResult r = run_eqat({"ask", "--model", dir, "--image", img, "--max-new-tokens", "10", q});
    ASSERT_EQ(r.code, 0) << r.err;
    want.push_back(strip(r.out));
  }
  std::vector<json> got(images.size());
  std::vector<std::thread> clients;
  for (size_t i = 0; i < images.size(); ++i)
    clients.emplace_back([&, i] { got[i] = post(s, chat_body(q, images[i], 10)); });
  for (auto& c : clients) c.join();
  std::set<int> prompt_tokens;
  for (size_t i = 0; i < images.size(); ++i) {
    EXPECT_EQ(strip(got[i]["choices"][0]["message"]["content"].get<std::string>()), want[i]) << images[i];
    prompt_tokens.insert(got[i]["usage"]["prompt_tokens"].get<int>());
  }
  EXPECT_EQ(prompt_tokens.size(), images.size());  // 42, 52 and 60 image positions
}

// Continuous batching must not change answers: 8 clients at once get what each gets alone (greedy), and the
// steps were shared (fewer decode steps than tokens).
TEST(Serve, EightConcurrentClientsGetTheirOneByOneAnswers) {
  Server s({"--max-batch", "8"});
  const auto imgs = demo_images();
  const std::vector<std::string> qs = {"Describe the image in one sentence.", "How many shapes are there?",
                                       "Is there a red square in the image?", "What colour is the largest shape?"};
  std::vector<json> bodies;
  for (size_t i = 0; i < 8; ++i) bodies.push_back(chat_body(qs[i % qs.size()], imgs[i % imgs.size()]));
  std::vector<std::string> alone(8), together(8);
  for (size_t i = 0; i < 8; ++i) alone[i] = post(s, bodies[i])["choices"][0]["message"]["content"];
  auto before = s.client()->Get("/metrics");
  ASSERT_TRUE(before);
  std::vector<std::thread> th;
  for (size_t i = 0; i < 8; ++i)
    th.emplace_back([&, i] { together[i] = post(s, bodies[i])["choices"][0]["message"]["content"]; });
  for (auto& t : th) t.join();
  for (size_t i = 0; i < 8; ++i) EXPECT_EQ(together[i], alone[i]) << "client " << i;
  auto after = s.client()->Get("/metrics");
  ASSERT_TRUE(after);
  const double tokens = eqat::prometheus_value(after->body, "eqat_generated_tokens_total") -
                        eqat::prometheus_value(before->body, "eqat_generated_tokens_total");
  const double steps = eqat::prometheus_value(after->body, "eqat_decode_steps_total") - eqat::prometheus_value(before->body, "eqat_decode_steps_total");
  EXPECT_GT(tokens, 0);
  EXPECT_LT(steps, tokens) << "the concurrent requests never shared a decode step";
}

TEST(Serve, BadRequestsGetOpenAiErrorsAndTheServerKeepsServing) {
  TempDir t;
  Server s({"--api-key", "k3y", "--max-image-pixels", "1000", "--ctx", "128", "--max-body-bytes", "200000"});
  const httplib::Headers auth{{"Authorization", "Bearer k3y"}};
  const std::string img = demo_images().at(0);
  auto expect_error = [&](const json& body, int want_status, const std::string& needle,
                          const httplib::Headers& h) {
    int status = 0;
    json r = post(s, body, &status, h);
    EXPECT_EQ(status, want_status) << r.dump();
    ASSERT_TRUE(r.contains("error")) << r.dump();
    EXPECT_NE(r["error"]["message"].get<std::string>().find(needle), std::string::npos) << r.dump();
  };
  expect_error(chat_body("hi", img), 401, "API key", {});
  expect_error(chat_body("hi", img), 401, "API key", {{"Authorization", "Bearer wrong"}});
  // The demo images are 96 x 96 = 9216 pixels, over this server's cap of 1000.
  expect_error(chat_body("hi", img), 400, "cap of 1000", auth);
  json b = chat_body("hi", "");
  b["model"] = "nope";
  expect_error(b, 404, "does not exist", auth);
  expect_error(chat_body(std::string(2000, 'x') + " y", ""), 400, "positions per request", auth);
  b = chat_body("hi", "");
  b["messages"][0]["content"] = json::array({{{"type", "image_url"}, {"image_url", {{"url", "https://x.org/a.png"}}}}});
  expect_error(b, 400, "does not fetch remote images", auth);
  b["messages"][0]["content"] = json::array({{{"type", "image_url"}, {"image_url", {{"url", "data:image/png;base64,AAAA"}}}}});
  expect_error(b, 400, "cannot decode", auth);
  {
    auto res = s.client()->Post("/v1/chat/completions", auth, "{\"messages\": [", "application/json");
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 400);
    EXPECT_NE(res->body.find("not valid JSON"), std::string::npos);
    res = s.client()->Post("/v1/chat/completions", auth, std::string(300000, ' '), "application/json");
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 413);
    EXPECT_TRUE(json::parse(res->body).contains("error"));
    res = s.client()->Get("/v1/nothing", auth);
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 404);
  }
  // Still serving.
  int status = 0;
  json ok = post(s, chat_body("How many shapes are there?", ""), &status, auth);
  EXPECT_EQ(status, 200) << ok.dump();
  EXPECT_TRUE(s.alive());
}

// One row and no queue: a second request is refused with 429 while the first runs; a client that leaves its stream
// gives the row back at once (its decode stops: far fewer tokens than it asked for).
TEST(Serve, ACancelledStreamFreesItsRowAndAFullQueueGets429) {
  Server s({"--max-batch", "1", "--queue-limit", "0"});
  json longest = chat_body("Describe the image in one sentence.", demo_images().at(0), 400, true);
  longest["ignore_eos"] = true;  // the tiny model's answers are short: this one runs until its budget
  longest["max_tokens"] = 400;
  std::thread busy([&] { stream(s, longest, 3); });  // reads the role chunk and two deltas, then hangs up
  busy.join();
  // The row frees within a few tokens of the hang-up.
  auto c = s.client();
  double running = 1;
  for (int i = 0; i < 100 && running != 0; ++i) {
    auto h = c->Get("/health");
    ASSERT_TRUE(h);
    running = json::parse(h->body)["models"][0]["running"].get<double>();
    if (running != 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(running, 0);
  auto m = c->Get("/metrics");
  ASSERT_TRUE(m);
  EXPECT_LT(eqat::prometheus_value(m->body, "eqat_generated_tokens_total"), 300) << m->body;
  EXPECT_EQ(eqat::prometheus_value(m->body, "eqat_requests_total"), 1);  // status 499
  EXPECT_NE(m->body.find("status=\"499\""), std::string::npos) << m->body.substr(m->body.find("eqat_requests_total{"), 300);
  // Busy row, no queue: 429; then the row is free again for the next.
  json slow = longest;
  slow["stream"] = false;
  std::thread hold([&] { post(s, slow); });
  for (int i = 0; i < 100; ++i) {
    auto h = c->Get("/health");
    if (h && json::parse(h->body)["models"][0]["running"].get<int>() == 1) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  int status = 0;
  json r = post(s, chat_body("hi", ""), &status);
  EXPECT_EQ(status, 429) << r.dump();
  hold.join();
  r = post(s, chat_body("How many shapes are there?", ""), &status);
  EXPECT_EQ(status, 200) << r.dump();
}

// The page in a real browser: headless Chromium, driven over the DevTools protocol by tests/apps/browser_check.py,
// clicks a demo image, types the question, clicks Ask and waits for the streamed answer in the DOM. Skips where
// chromium is not installed (make test's set-up installs it).
TEST(Serve, BrowserPageStreamsTheAnswer) {
  std::string chromium;
  for (const char* p : {"/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"})
    if (fs::exists(p)) chromium = p;
  if (chromium.empty()) GTEST_SKIP() << "no chromium on this machine (make test's set-up installs it)";
  Server s({});
  const std::string q = "How many shapes are there?";
  const std::string want = ask_cli(demo_images().at(0), q);  // the page's first demo image is the first by name
  TempDir t;
  const std::string script = std::string(EQAT_TEST_DATA) + "/../apps/browser_check.py";
  const std::string cmd = "python3 " + quote(script) + " " + quote(chromium) + " " + quote(s.url()) + " " + quote(q) +
                          " --screenshot " + t.str("page.png") + " >" + t.str("out") + " 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << slurp(t.str("out"));
  const std::string out = slurp(t.str("out"));
  EXPECT_NE(out.find("answer[0]: shapes-llava | " + want + " | "), std::string::npos) << "want " << want << "\n" << out;
  EXPECT_NE(out.find(" tok/s"), std::string::npos) << out;
  // The screenshot is a PNG of the page as rendered.
  EXPECT_EQ(slurp(t.str("page.png")).substr(0, 8), "\x89PNG\r\n\x1a\n");
}

// The official openai Python client against the server (tests/apps/openai_client_check.py). Skips where the venv
// lacks the openai package (make test's set-up installs it).
TEST(Serve, OfficialOpenAiPythonClientTalksToIt) {
  const std::string py = std::string(EQAT_TEST_DATA) + "/../../.venv/bin/python";
  if (!fs::exists(py) || std::system((quote(py) + " -c 'import openai' 2>/dev/null").c_str()) != 0)
    GTEST_SKIP() << "no openai package in .venv (make test's set-up installs it)";
  Server s({"--api-key", "sk-test"});
  const std::string img = demo_images().at(0), q = "How many shapes are there?";
  const std::string want = ask_cli(img, q);
  TempDir t;
  const std::string script = std::string(EQAT_TEST_DATA) + "/../apps/openai_client_check.py";
  const std::string cmd = quote(py) + " " + quote(script) + " " + quote(s.url() + "v1") + " sk-test " + quote(img) +
                          " " + quote(q) + " >" + t.str("out") + " 2>&1";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << slurp(t.str("out"));
  const std::string out = slurp(t.str("out"));
  EXPECT_NE(out.find("answer: " + want + "\n"), std::string::npos) << out;
  EXPECT_NE(out.find("streamed: " + want + "\n"), std::string::npos) << out;
}
