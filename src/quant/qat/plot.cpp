#include "quant/qat/plot.h"

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "data/error.h"
#include "data/fs.h"

namespace eqat {

void plot_png(const std::string& path, const std::vector<Panel>& panels, int width, int panel_height) {
  const int H = panel_height * static_cast<int>(std::max<size_t>(1, panels.size()));
  cv::Mat img(H, width, CV_8UC3, cv::Scalar(255, 255, 255));
  const cv::Scalar colors[] = {{200, 80, 30}, {40, 40, 220}, {40, 160, 40}, {160, 40, 160}};
  for (size_t p = 0; p < panels.size(); ++p) {
    const Panel& pn = panels[p];
    const int top = static_cast<int>(p) * panel_height, left = 70, right = width - 20, bottom = top + panel_height - 40;
    double lo = INFINITY, hi = -INFINITY;
    size_t n = 1;
    auto tr = [&](double v) { return pn.log_y ? std::log10(std::max(v, 1e-12)) : v; };
    for (const auto& s : pn.series)
      for (double v : s.y)
        if (std::isfinite(v)) {
          lo = std::min(lo, tr(v));
          hi = std::max(hi, tr(v));
        }
    for (const auto& s : pn.series) n = std::max(n, s.y.size());
    if (!(hi > lo)) {
      lo -= 1;
      hi += 1;
    }
    cv::rectangle(img, {left, top + 30}, {right, bottom}, cv::Scalar(0, 0, 0), 1);
    cv::putText(img, pn.title, {left, top + 22}, cv::FONT_HERSHEY_SIMPLEX, 0.55, cv::Scalar(0, 0, 0), 1, cv::LINE_AA);
    for (int k = 0; k <= 4; ++k) {
      const double v = lo + (hi - lo) * k / 4.0;
      const int y = bottom - static_cast<int>((bottom - top - 30) * k / 4.0);
      char lab[32];
      std::snprintf(lab, sizeof(lab), "%.3g", pn.log_y ? std::pow(10.0, v) : v);
      cv::putText(img, lab, {4, y + 4}, cv::FONT_HERSHEY_SIMPLEX, 0.4, cv::Scalar(60, 60, 60), 1, cv::LINE_AA);
    }
    for (size_t si = 0; si < pn.series.size(); ++si) {
      const auto& s = pn.series[si];
      std::vector<cv::Point> pts;
      for (size_t i = 0; i < s.y.size(); ++i) {
        if (!std::isfinite(s.y[i])) continue;
        const int x = left + static_cast<int>((right - left) * (n > 1 ? static_cast<double>(i) / (n - 1) : 0.5));
        const int y = bottom - static_cast<int>((bottom - top - 30) * (tr(s.y[i]) - lo) / (hi - lo));
        pts.emplace_back(x, y);
      }
      const cv::Scalar c = colors[si % 4];
      if (pts.size() > 1) cv::polylines(img, pts, false, c, 2, cv::LINE_AA);
      for (const auto& pt : pts) cv::circle(img, pt, 2, c, -1, cv::LINE_AA);
      cv::putText(img, s.name, {right - 160, top + 50 + 18 * static_cast<int>(si)}, cv::FONT_HERSHEY_SIMPLEX, 0.5, c, 1,
                  cv::LINE_AA);
    }
  }
  std::vector<uchar> png;
  EQAT_CHECK(cv::imencode(".png", img, png), path, ": PNG encoding failed");
  write_file_atomic(path, std::string(png.begin(), png.end()));
}

}  // namespace eqat
