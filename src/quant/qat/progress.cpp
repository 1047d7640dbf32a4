#include "quant/qat/progress.h"

#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>

namespace eqat {

Progress::Progress(std::string label, int64_t total, bool enabled)
    : label_(std::move(label)), total_(total), enabled_(enabled && ::isatty(2)),
      start_(std::chrono::steady_clock::now()), last_draw_(start_ - std::chrono::seconds(1)) {}

double Progress::elapsed() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void Progress::update(int64_t done, const std::string& metrics) {
  if (!enabled_) return;
  auto now = std::chrono::steady_clock::now();
  if (done < total_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  const double t = elapsed();
  const double rate = done > 0 ? done / t : 0.0;
  const double eta = rate > 0 ? (total_ - done) / rate : 0.0;
  const int width = 24;
  const int fill = total_ > 0 ? static_cast<int>(width * done / total_) : 0;
  std::string bar(fill, '#');
  bar.resize(width, '.');
  std::fprintf(stderr, "\r%s [%s] %lld/%lld %.1f it/s ETA %.0fs %s\033[K", label_.c_str(), bar.c_str(),
               static_cast<long long>(done), static_cast<long long>(total_), rate, eta, metrics.c_str());
  std::fflush(stderr);
}

void Progress::finish(const std::string& metrics) {
  if (enabled_) std::fprintf(stderr, "\r\033[K");
  std::fprintf(stderr, "%s done in %.1fs %s\n", label_.c_str(), elapsed(), metrics.c_str());
}

double peak_rss_mib() {
  struct rusage ru;
  ::getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss / 1024.0;  // Linux: KiB
}

}  // namespace eqat
