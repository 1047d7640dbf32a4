// Minimal line plots rendered to PNG with OpenCV (loss curves of quantization and training runs).
#pragma once

#include <string>
#include <vector>

namespace eqat {

struct Series {
  std::string name;
  std::vector<double> y;  // x = 0, 1, 2, …
};

// One panel per entry of `panels` (each with its own y range, log scale when log_y), stacked vertically.
struct Panel {
  std::string title;
  std::vector<Series> series;
  bool log_y = true;
};

void plot_png(const std::string& path, const std::vector<Panel>& panels, int width = 900, int panel_height = 320);

}  // namespace eqat
