// Shared device helpers for the kernels in this directory.
#pragma once
#include <cuda_runtime.h>
#include <math.h>

#define VPPO_WARP 32

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = VPPO_WARP / 2; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// Sum over the whole block; every thread gets the result. `scratch` needs
// blockDim.x / 32 floats. Ends with a barrier so scratch can be reused.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % VPPO_WARP;
    const int warp = threadIdx.x / VPPO_WARP;
    const int warps = (blockDim.x + VPPO_WARP - 1) / VPPO_WARP;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int i = 0; i < warps; ++i) total += scratch[i];
    __syncthreads();
    return total;
}
