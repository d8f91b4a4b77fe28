// Multi-tensor AdamW on fp32 master weights (torch.optim.AdamW semantics:
// decoupled weight decay, bias correction), with an optional bf16 copy of
// the updated weights for the model, and the global gradient norm (sum of
// squares in f64, deterministic two-stage reduce).
// CPU twin: src/backend/cpu/adamw.rs (adamw_step, global_grad_norm,
// clip_grad_norm); the update uses the same f32 operations in the same order
// without contraction (__fmul_rn/__fadd_rn), so it is bit-identical; the
// scalars are formed on the host in f64 exactly as the CPU forms them.
#include "common.cuh"
#include <cuda_bf16.h>

// A tensor list is desc[n_tensors][6] = {param, grad, exp_avg, exp_avg_sq,
// bf16 model copy (0 = none), element count}. Block b works on chunk
// block_chunk[b] (of `chunk` elements) of tensor block_tensor[b].
#define AW_DESC 6

extern "C" __global__ void adamw_multi_f32(const unsigned long long* __restrict__ desc,
                                           const int* __restrict__ block_tensor,
                                           const int* __restrict__ block_chunk, int chunk,
                                           float decay, float one_minus_b1, float b2,
                                           float one_minus_b2, float step_size,
                                           float bias2_sqrt, float eps, float grad_scale) {
    const unsigned long long* d = desc + (size_t)block_tensor[blockIdx.x] * AW_DESC;
    float* __restrict__ p = (float*)d[0];
    const float* __restrict__ g = (const float*)d[1];
    float* __restrict__ m = (float*)d[2];
    float* __restrict__ v = (float*)d[3];
    __nv_bfloat16* __restrict__ model = (__nv_bfloat16*)d[4];
    const long long n = (long long)d[5];
    const long long c0 = (long long)block_chunk[blockIdx.x] * chunk;
    const long long c1 = min(n, c0 + chunk);
    for (long long i = c0 + threadIdx.x; i < c1; i += blockDim.x) {
        float gi = g[i];
        if (grad_scale != 1.0f) gi = __fmul_rn(gi, grad_scale);
        const float pi = __fmul_rn(p[i], decay);
        const float mi = __fadd_rn(m[i], __fmul_rn(__fsub_rn(gi, m[i]), one_minus_b1));
        const float vi = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(one_minus_b2, gi), gi));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bias2_sqrt), eps);
        const float pn = __fsub_rn(pi, __fmul_rn(step_size, __fdiv_rn(mi, denom)));
        p[i] = pn;
        m[i] = mi;
        v[i] = vi;
        if (model) model[i] = __float2bfloat16_rn(pn);
    }
}

// partial[b] = sum of squares (f64) of the gradient chunk of block b, with
// the same desc / block maps as adamw_multi_f32. blockDim 256.
extern "C" __global__ void grad_sumsq_multi_f32(const unsigned long long* __restrict__ desc,
                                                const int* __restrict__ block_tensor,
                                                const int* __restrict__ block_chunk,
                                                int chunk, double* __restrict__ partial) {
    __shared__ double scratch[32];
    const unsigned long long* d = desc + (size_t)block_tensor[blockIdx.x] * AW_DESC;
    const float* __restrict__ g = (const float*)d[1];
    const long long n = (long long)d[5];
    const long long c0 = (long long)block_chunk[blockIdx.x] * chunk;
    const long long c1 = min(n, c0 + chunk);
    double acc = 0.0;
    for (long long i = c0 + threadIdx.x; i < c1; i += blockDim.x) {
        const double x = (double)g[i];
        acc += x * x;
    }
    for (int off = VPPO_WARP / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    const int lane = threadIdx.x % VPPO_WARP, warp = threadIdx.x / VPPO_WARP;
    if (lane == 0) scratch[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int w = 0; w < (int)(blockDim.x / VPPO_WARP); ++w) t += scratch[w];
        partial[blockIdx.x] = t;
    }
}

// out[0] = sum of partial[0..n) in a fixed order; one block.
extern "C" __global__ void sum_f64(const double* __restrict__ partial, int n,
                                   double* __restrict__ out) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
    for (int off = VPPO_WARP / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    const int lane = threadIdx.x % VPPO_WARP, warp = threadIdx.x / VPPO_WARP;
    if (lane == 0) scratch[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int w = 0; w < (int)(blockDim.x / VPPO_WARP); ++w) t += scratch[w];
        out[0] = t;
    }
}
