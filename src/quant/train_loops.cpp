// The portable variant of the training loops (train_loops.h) and the choice among the three.
#include "quant/train_loops.h"

#include <ATen/Parallel.h>

#include "quant/cpu_qgemv.h"

namespace eqat {
namespace train_loops_scalar {
#include "quant/train_loops-inl.h"
}  // namespace train_loops_scalar

void parallel_over_parts(const std::vector<int64_t>& sizes, int64_t grain,
                         const std::function<void(size_t j, int64_t b, int64_t e)>& fn) {
  int64_t total = 0;
  for (int64_t n : sizes) total += n;
  at::parallel_for(0, total, grain, [&](int64_t i0, int64_t i1) {
    int64_t at0 = 0;  // where part j starts in the flat range
    for (size_t j = 0; j < sizes.size(); at0 += sizes[j++]) {
      const int64_t b = std::max(i0, at0), e = std::min(i1, at0 + sizes[j]);
      if (b < e) fn(j, b - at0, e - at0);
    }
  });
}

const TrainLoops& scalar_train_loops() {
  static const TrainLoops loops = train_loops_scalar::make_train_loops<train_loops_scalar::Scalar>("scalar");
  return loops;
}

const TrainLoops& best_train_loops() {
  static const TrainLoops& best = []() -> const TrainLoops& {
    const CpuKernelCap cap = cpu_kernel_cap();
    if (cap == CpuKernelCap::kScalar) return scalar_train_loops();
    if (const TrainLoops* wide = cap == CpuKernelCap::kAvx2 ? nullptr : avx512_train_loops()) return *wide;
    if (const TrainLoops* wide = avx2_train_loops()) return *wide;
    return scalar_train_loops();
  }();
  return best;
}

}  // namespace eqat
