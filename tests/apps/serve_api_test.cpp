// eqat serve's protocol layer (apps/serve_api.h) on plain strings: request checks, image URLs, stop strings,
// OpenAI response shapes, base64, the constant-time key check.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "model_test_util.h"
#include "eval/report.h"
#include "serve_api.h"

using namespace eqat;
using nlohmann::json;

namespace {

// The ApiError a body gets: its status and the param it names.
std::pair<int, std::string> refusal(const std::string& body) {
  try {
    parse_chat_request(body);
  } catch (const ApiError& e) {
    return {e.status, e.param};
  }
  return {0, ""};
}

}  // namespace

TEST(ServeApi, ParsesTextImagePartsAndSamplingFields) {
  ChatRequest r = parse_chat_request(R"({"model": "w2", "temperature": 0, "top_p": 0.5, "max_tokens": 7,
    "seed": 3, "stop": ["\n", "END"], "stream": true, "stream_options": {"include_usage": true},
    "messages": [{"role": "system", "content": "Be brief."},
                 {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                               {"type": "text", "text": "What is it?"}]}]})");
  EXPECT_EQ(r.model, "w2");
  EXPECT_EQ(r.temperature, 0);
  EXPECT_EQ(r.top_p, 0.5);
  EXPECT_EQ(r.max_tokens, 7);
  EXPECT_TRUE(r.has_seed);
  EXPECT_EQ(r.seed, 3);
  EXPECT_EQ(r.stop, (std::vector<std::string>{"\n", "END"}));
  EXPECT_TRUE(r.stream && r.include_usage);
  ASSERT_EQ(r.messages.size(), 2u);
  EXPECT_EQ(r.messages[1].text, "What is it?");
  EXPECT_TRUE(r.messages[1].has_image);
  EXPECT_EQ(r.image_url, "data:image/png;base64,AAAA");
  EXPECT_EQ(r.image_param, "messages[1].content[0].image_url");
  // OpenAI's defaults when fields are absent.
  ChatRequest d = parse_chat_request(R"({"messages": [{"role": "user", "content": "hi"}]})");
  EXPECT_EQ(d.temperature, 1.0);
  EXPECT_EQ(d.max_tokens, -1);
  EXPECT_FALSE(d.has_seed || d.stream);
}

TEST(ServeApi, RefusesMalformedRequestsNamingTheField) {
  EXPECT_EQ(refusal("{not json"), std::make_pair(400, std::string()));
  EXPECT_EQ(refusal("[]"), std::make_pair(400, std::string()));
  EXPECT_EQ(refusal(R"({"messages": []})").second, "messages");
  EXPECT_EQ(refusal(R"({"messages": [{"role": "robot", "content": "x"}]})").second, "messages[0].role");
  EXPECT_EQ(refusal(R"({"messages": [{"role": "user", "content": 5}]})").second, "messages[0].content");
  EXPECT_EQ(refusal(R"({"messages": [{"role": "user", "content": "x"}], "temperature": 3})").second, "temperature");
  EXPECT_EQ(refusal(R"({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0})").second, "max_tokens");
  EXPECT_EQ(refusal(R"({"messages": [{"role": "user", "content": "x"}], "n": 2})").second, "n");
  EXPECT_EQ(refusal(R"({"messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]})").second,
            "stop");
  EXPECT_EQ(refusal(R"({"messages": [{"role": "user", "content": "x"}], "stream": "yes"})").second, "stream");
  EXPECT_EQ(refusal(R"({"messages": [{"role": "user", "content": "x"}], "tools": [{}]})").second, "tools");
  EXPECT_EQ(refusal(R"({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})")
                .second,
            "messages");
  const std::string two_images = R"({"messages": [{"role": "user", "content": [
      {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
      {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]})";
  EXPECT_EQ(refusal(two_images).second, "messages[0].content[1].image_url");
  EXPECT_EQ(refusal(R"({"messages": [{"role": "user", "content": [{"type": "audio"}]}]})").second,
            "messages[0].content[0].type");
}

TEST(ServeApi, ImageUrlsAreInlineOrUnderTheAllowedDirectory) {
  EXPECT_EQ(fetch_image_bytes("data:image/png;base64,aGVsbG8=", "p", "", 100), "hello");
  auto status = [](const std::string& url, const std::string& dir, int64_t max = 1000) {
    try {
      fetch_image_bytes(url, "p", dir, max);
    } catch (const ApiError& e) {
      EXPECT_EQ(e.param, "p");
      return e.status;
    }
    return 0;
  };
  EXPECT_EQ(status("https://example.com/cat.png", ""), 400);  // never fetched
  EXPECT_EQ(status("data:image/png,rawbytes", ""), 400);       // not base64
  EXPECT_EQ(status("data:image/png;base64,a$b=", ""), 400);
  EXPECT_EQ(status("data:image/png;base64," + std::string(4000, 'A'), "", 1000), 413);
  eqat_test::TempDir t;
  std::filesystem::create_directories(t.path / "ok");
  std::ofstream(t.path / "ok" / "a.png") << "png!";
  std::ofstream(t.path / "secret.png") << "no";
  EXPECT_EQ(status((t.path / "ok" / "a.png").string(), ""), 400);  // local files need --allow-local-files
  EXPECT_EQ(fetch_image_bytes("file://" + (t.path / "ok" / "a.png").string(), "p", t.str("ok"), 100), "png!");
  EXPECT_EQ(status((t.path / "ok" / ".." / "secret.png").string(), t.str("ok")), 400);
  std::filesystem::create_symlink(t.path / "secret.png", t.path / "ok" / "link.png");
  EXPECT_EQ(status((t.path / "ok" / "link.png").string(), t.str("ok")), 400);  // a symlink out is still out
}

TEST(ServeApi, StopStringsCutTheTextAndHoldBackPartialMatches) {
  TextAssembler t({"END", "\n\n"});
  EXPECT_EQ(t.push("  \n"), "");  // leading whitespace of the answer is dropped
  EXPECT_EQ(t.push(" A red"), "A red");
  EXPECT_EQ(t.push(" circle E"), " circle ");  // "E" may begin "END": held back
  EXPECT_EQ(t.push("LK"), "ELK");               // it did not
  EXPECT_EQ(t.push(". EN"), ". ");  // "EN" held back
  EXPECT_FALSE(t.stopped());
  EXPECT_EQ(t.push("D more"), "");  // "END" completed: cut before it
  EXPECT_TRUE(t.stopped());
  EXPECT_EQ(t.push("ignored"), "");
  EXPECT_EQ(t.finish(), "");
  EXPECT_EQ(t.text(), "A red circle ELK. ");
  TextAssembler u({"XYZ"});
  EXPECT_EQ(u.push("abcX"), "abc");
  EXPECT_EQ(u.finish(), "X");  // the end of the answer releases what was held
}

TEST(ServeApi, ResponsesFollowOpenAisSchema) {
  json c = json::parse(completion_json("chatcmpl-1", 42, "m", "Hi", "stop", Usage{5, 2}));
  EXPECT_EQ(c["object"], "chat.completion");
  EXPECT_EQ(c["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(c["choices"][0]["message"]["content"], "Hi");
  EXPECT_EQ(c["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(c["usage"]["total_tokens"], 7);
  const std::string ev = chunk_event("id", 1, "m", "", true, "", nullptr);
  ASSERT_EQ(ev.rfind("data: ", 0), 0u);
  ASSERT_EQ(ev.substr(ev.size() - 2), "\n\n");
  json first = json::parse(ev.substr(6));
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  EXPECT_TRUE(first["choices"][0]["finish_reason"].is_null());
  Usage u{5, 3};
  json last = json::parse(chunk_event("id", 1, "m", "", false, "length", &u).substr(6));
  EXPECT_EQ(last["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(last["usage"]["completion_tokens"], 3);
  json only = json::parse(usage_only_event("id", 1, "m", u).substr(6));
  EXPECT_TRUE(only["choices"].empty());
  json err = json::parse(ApiError(429, "busy").json());
  EXPECT_EQ(err["error"]["type"], "rate_limit_error");
  EXPECT_EQ(err["error"]["message"], "busy");
  // Text that is not valid UTF-8 (a model can emit a partial byte sequence) still gives valid JSON.
  EXPECT_NO_THROW(json::parse(completion_json("i", 1, "m", "bad \xC3", "stop", Usage{})));
}

TEST(ServeApi, PrometheusValuesReadBack) {
  const std::string text = "# TYPE a_total counter\na_total{model=\"m\",status=\"200\"} 7\nab_total{model=\"m\"} 3\n"
                           "a_total_sum{model=\"m\"} 1.5\n";
  EXPECT_EQ(prometheus_value(text, "a_total"), 7);
  EXPECT_EQ(prometheus_value(text, "ab_total"), 3);
  EXPECT_EQ(prometheus_value(text, "a_total_sum"), 1.5);
  EXPECT_EQ(prometheus_value(text, "missing"), -1);
}

TEST(ServeApi, Base64AndBearerKeys) {
  EXPECT_EQ(base64_decode("TWFu"), "Man");
  EXPECT_EQ(base64_decode("TWE="), "Ma");
  EXPECT_EQ(base64_decode("TQ=="), "M");
  EXPECT_EQ(base64_decode("_-8="), "\xFF\xEF");  // URL-safe alphabet
  // Round trip with the encoder the HTML report already has (eval/report.h).
  for (const std::string& x : std::vector<std::string>{"", "M", "Ma", "Man", std::string("\x00\xff\x10 binary", 10)})
    EXPECT_EQ(base64_decode(base64_encode(x)), x);
  EXPECT_THROW(base64_decode("TQ=a"), ApiError);
  EXPECT_THROW(base64_decode("T"), ApiError);
  EXPECT_TRUE(bearer_matches("Bearer s3cret", "s3cret"));
  EXPECT_FALSE(bearer_matches("Bearer s3cre", "s3cret"));
  EXPECT_FALSE(bearer_matches("Bearer s3cret2", "s3cret"));
  EXPECT_FALSE(bearer_matches("", "s3cret"));
}
