// A one-line progress bar on stderr (step/total, rate, ETA, free-form metrics) and peak-RSS readout.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace eqat {

class Progress {
 public:
  Progress(std::string label, int64_t total, bool enabled = true);
  // Redraws at most ~10 times a second (and always on the last step).
  void update(int64_t done, const std::string& metrics = "");
  void finish(const std::string& metrics = "");
  double elapsed() const;

 private:
  std::string label_;
  int64_t total_;
  bool enabled_;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

// Peak resident set size of this process so far, in MiB.
double peak_rss_mib();

}  // namespace eqat
