// Elementwise activations with their derivatives, fp32: SwiGLU (the Qwen2
// and vision MLPs) and exact erf GELU (the patch merger).
// CPU twin: src/backend/cpu/activations.rs (swiglu_fwd, swiglu_bwd, gelu_fwd,
// gelu_bwd); same formulas. All kernels are grid-stride loops over n.
#include "common.cuh"

#define GRID_STRIDE(i, n)                                                          \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)(n); \
         i += (size_t)gridDim.x * blockDim.x)

__device__ __forceinline__ float sigmoidf(float a) { return 1.0f / (1.0f + expf(-a)); }

// h = silu(gate) * up
extern "C" __global__ void swiglu_fwd_f32(const float* __restrict__ gate,
                                          const float* __restrict__ up,
                                          float* __restrict__ h, long long n) {
    GRID_STRIDE(i, n) {
        const float a = gate[i];
        h[i] = a * sigmoidf(a) * up[i];
    }
}

// dgate = dh * up * s * (1 + gate * (1 - s)), dup = dh * silu(gate)
extern "C" __global__ void swiglu_bwd_f32(const float* __restrict__ dh,
                                          const float* __restrict__ gate,
                                          const float* __restrict__ up,
                                          float* __restrict__ dgate, float* __restrict__ dup,
                                          long long n) {
    GRID_STRIDE(i, n) {
        const float a = gate[i], b = up[i], g = dh[i];
        const float s = sigmoidf(a);
        dgate[i] = g * b * s * (1.0f + a * (1.0f - s));
        dup[i] = g * a * s;
    }
}

#define INV_SQRT2 0.70710678118654752440f
#define INV_SQRT_2PI 0.39894228040143267794f

// y = 0.5 x (1 + erf(x / sqrt 2))
extern "C" __global__ void gelu_fwd_f32(const float* __restrict__ x, float* __restrict__ y,
                                        long long n) {
    GRID_STRIDE(i, n) {
        const float v = x[i];
        y[i] = 0.5f * v * (1.0f + erff(v * INV_SQRT2));
    }
}

// dx = dy * (Phi(x) + x phi(x))
extern "C" __global__ void gelu_bwd_f32(const float* __restrict__ dy,
                                        const float* __restrict__ x, float* __restrict__ dx,
                                        long long n) {
    GRID_STRIDE(i, n) {
        const float v = x[i];
        const float cdf = 0.5f * (1.0f + erff(v * INV_SQRT2));
        const float pdf = INV_SQRT_2PI * expf(-0.5f * v * v);
        dx[i] = dy[i] * (cdf + v * pdf);
    }
}
