// Tiny line plots as PNG (OpenCV), for training curves.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace eqat {

struct PlotSeries {
  std::string label;
  std::vector<std::pair<double, double>> xy;  // (x, y)
};

// A PNG of the series on one set of axes (y on a log10 scale when log_y and every y > 0), with a legend.
std::string plot_png(const std::vector<PlotSeries>& series, const std::string& title, const std::string& x_label,
                     bool log_y, int width = 800, int height = 450);

}  // namespace eqat
