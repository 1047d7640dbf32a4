// 3-bit instantiations of the fused dequant-GEMV (gptq_gemv.cuh): M buckets 1/2/4/8 × fp16/bf16/fp32 activations.
#include "gptq_gemv.cuh"

namespace eqat::kernels::detail {
template Status launch_gemv<3>(const GptqView&, const void*, DType, int64_t, float*, cudaStream_t);
}  // namespace eqat::kernels::detail
