// libFuzzer target for config.json parsing (src/data/config.cpp).
// eqat::InputError is the expected outcome for bad input; any other exception (e.g. a nlohmann exception leaking),
// a sanitizer report, or a broken round trip is a finding. Round trip: every config that parses must serialise
// with model_config_to_json, parse again, and serialise to the same text.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "data/config.h"
#include "data/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  eqat::ModelConfig cfg;
  try {
    cfg = eqat::parse_model_config(std::string(reinterpret_cast<const char*>(data), size), "fuzz/config.json");
  } catch (const eqat::InputError&) {
    return 0;
  }
  const std::string once = eqat::model_config_to_json(cfg);
  std::string twice;
  try {
    twice = eqat::model_config_to_json(eqat::parse_model_config(once, "fuzz/roundtrip.json"));
  } catch (const eqat::InputError&) {
    std::abort();  // we wrote a config we cannot read back
  }
  if (once != twice) std::abort();
  return 0;
}
