// The portable variant of the training loops (train_loops.h) and the choice among the three.
#include "quant/train_loops.h"

#include "quant/cpu_qgemv.h"

namespace eqat {
namespace train_loops_scalar {
#include "quant/train_loops-inl.h"
}  // namespace train_loops_scalar

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
