// f32 <-> bf16 conversion of whole buffers (bf16 storage at the edges of f32
// compute).
// CPU twin: src/backend/cpu/cast.rs (bf16_to_f32: exact; f32_to_bf16:
// nearest, ties to even, as half::bf16 rounds). Grid-stride loops.
#include "common.cuh"
#include "elem.cuh"

extern "C" __global__ void cast_f32_to_bf16(const float* __restrict__ src,
                                            bf16_t* __restrict__ dst, long long n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __float2bfloat16_rn(src[i]);
}

extern "C" __global__ void cast_bf16_to_f32(const bf16_t* __restrict__ src,
                                            float* __restrict__ dst, long long n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __bfloat162float(src[i]);
}
