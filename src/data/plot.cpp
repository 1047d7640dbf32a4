#include "data/plot.h"

#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

#include "data/error.h"

namespace eqat {

std::string plot_png(const std::vector<PlotSeries>& series, const std::string& title, const std::string& x_label,
                     bool log_y, int width, int height) {
  cv::Mat m(height, width, CV_8UC3, cv::Scalar(255, 255, 255));
  double x0 = std::numeric_limits<double>::max(), x1 = -x0, y0 = x0, y1 = -x0;
  for (const auto& s : series)
    for (auto [x, y] : s.xy) {
      if (log_y && y <= 0) log_y = false;
      x0 = std::min(x0, x), x1 = std::max(x1, x), y0 = std::min(y0, y), y1 = std::max(y1, y);
    }
  const int L = 70, R = 20, T = 35, B = 45;
  cv::rectangle(m, {L, T}, {width - R, height - B}, cv::Scalar(0, 0, 0), 1);
  cv::putText(m, title, {L, 22}, cv::FONT_HERSHEY_SIMPLEX, 0.55, cv::Scalar(0, 0, 0), 1, cv::LINE_AA);
  cv::putText(m, x_label, {width / 2 - 20, height - 10}, cv::FONT_HERSHEY_SIMPLEX, 0.5, cv::Scalar(0, 0, 0), 1,
              cv::LINE_AA);
  if (x0 > x1) return std::string();
  auto fy = [&](double y) { return log_y ? std::log10(y) : y; };
  double ly0 = fy(y0), ly1 = fy(y1);
  if (ly1 - ly0 < 1e-9) ly1 = ly0 + 1;
  if (x1 - x0 < 1e-9) x1 = x0 + 1;
  auto px = [&](double x, double y) {
    return cv::Point(L + static_cast<int>((x - x0) / (x1 - x0) * (width - L - R)),
                     height - B - static_cast<int>((fy(y) - ly0) / (ly1 - ly0) * (height - T - B)));
  };
  for (int i = 0; i <= 4; ++i) {  // y ticks
    const double ly = ly0 + (ly1 - ly0) * i / 4.0;
    const double y = log_y ? std::pow(10.0, ly) : ly;
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.3g", y);
    const int py = height - B - static_cast<int>((ly - ly0) / (ly1 - ly0) * (height - T - B));
    cv::putText(m, buf, {5, py + 4}, cv::FONT_HERSHEY_SIMPLEX, 0.4, cv::Scalar(0, 0, 0), 1, cv::LINE_AA);
    cv::line(m, {L, py}, {width - R, py}, cv::Scalar(225, 225, 225), 1);
  }
  for (int i = 0; i <= 4; ++i) {  // x ticks
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.0f", x0 + (x1 - x0) * i / 4.0);
    cv::putText(m, buf, {L + (width - L - R) * i / 4 - 10, height - B + 15}, cv::FONT_HERSHEY_SIMPLEX, 0.4,
                cv::Scalar(0, 0, 0), 1, cv::LINE_AA);
  }
  const cv::Scalar colours[] = {{200, 60, 30}, {30, 120, 220}, {40, 160, 40}, {160, 40, 160}};
  for (size_t k = 0; k < series.size(); ++k) {
    std::vector<cv::Point> pts;
    for (auto [x, y] : series[k].xy) pts.push_back(px(x, y));
    const cv::Scalar c = colours[k % 4];
    if (pts.size() > 1) cv::polylines(m, pts, false, c, 1, cv::LINE_AA);
    cv::putText(m, series[k].label, {width - R - 200, T + 18 + 18 * static_cast<int>(k)}, cv::FONT_HERSHEY_SIMPLEX,
                0.45, c, 1, cv::LINE_AA);
  }
  std::vector<uint8_t> buf;
  EQAT_ASSERT(cv::imencode(".png", m, buf), "PNG encoding failed");
  return std::string(buf.begin(), buf.end());
}

}  // namespace eqat
