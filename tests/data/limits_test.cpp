// Limits against careless and hostile input (issue 16) at the data layer: memory estimates refused in one line,
// saturating size arithmetic, and JSON errors without nlohmann's "[json.exception...]" prefix or raw bytes.
#include <gtest/gtest.h>

#include <cstdlib>
#include <limits>
#include <string>

#include "data/error.h"
#include "data/json_util.h"
#include "data/memory.h"

namespace eqat {
namespace limits_test {

TEST(Memory, SaturatingArithmetic) {
  const int64_t max = std::numeric_limits<int64_t>::max();
  EXPECT_EQ(mul_sat(1 << 20, 1 << 20), int64_t{1} << 40);
  EXPECT_EQ(mul_sat(int64_t{1} << 40, int64_t{1} << 40), max);  // 2^80 overflows
  EXPECT_EQ(mul_sat(-1, 5), max);                                 // a negative size is never "small"
  EXPECT_EQ(add_sat(max, 1), max);
}

TEST(Memory, RefusesWhatDoesNotFitInOneLine) {
  ::setenv("EQAT_MEMORY_LIMIT_MB", "64", 1);
  EXPECT_EQ(available_memory_bytes(), int64_t{64} << 20);
  EXPECT_NO_THROW(check_memory_fits(int64_t{64} << 20, "exactly the limit"));
  try {
    check_memory_fits(int64_t{3} << 30, "the KV cache", "lower --max-new-tokens");
    ADD_FAILURE() << "accepted 3 GiB under a 64 MiB limit";
  } catch (const InputError& e) {
    EXPECT_EQ(std::string(e.what()),
              "the KV cache needs about 3.0 GiB of memory, but only 64.0 MiB is available; lower --max-new-tokens");
  }
  EXPECT_THROW(check_memory_fits(std::numeric_limits<int64_t>::max(), "an overflowed estimate"), InputError);
  ::unsetenv("EQAT_MEMORY_LIMIT_MB");
  EXPECT_GT(available_memory_bytes(), int64_t{1} << 20);  // the machine's own figure (MemAvailable)
}

TEST(JsonUtil, ErrorsNameTheFileWithoutTheLibraryPrefix) {
  for (const std::string& text : {std::string("{\"a\": "), std::string("[1, 2"), std::string("\xff\xfe{"),
                                  std::string("1e99999")}) {
    try {
      parse_json_text(text, "dir/answers.json");
      ADD_FAILURE() << "parsed " << text;
    } catch (const InputError& e) {
      const std::string msg = e.what();
      EXPECT_EQ(msg.rfind("dir/answers.json: not valid JSON (", 0), 0u) << msg;
      EXPECT_EQ(msg.find("[json.exception"), std::string::npos) << msg;
      for (unsigned char c : msg) EXPECT_TRUE(c >= 0x20 && c < 0x7f) << msg;  // raw bytes escaped
    }
  }
  EXPECT_EQ(parse_json_text("{\"k\": [1]}", "x.json")["k"][0].get<int>(), 1);
}

}  // namespace limits_test
}  // namespace eqat
