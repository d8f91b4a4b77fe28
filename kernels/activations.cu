// Elementwise activations with their derivatives: SwiGLU (the Qwen2 and
// vision MLPs) and exact erf GELU (the patch merger), on f32 or bf16 storage
// (f32 compute).
// CPU twin: src/backend/cpu/activations.rs (swiglu_fwd, swiglu_bwd, gelu_fwd,
// gelu_bwd); same formulas. The _bf16 kernels' twin widens with
// cpu::cast::bf16_to_f32, runs the f32 op and rounds with f32_to_bf16.
// All kernels are grid-stride loops over n.
#include "common.cuh"
#include "elem.cuh"

#define GRID_STRIDE(i, n)                                                          \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)(n); \
         i += (size_t)gridDim.x * blockDim.x)

__device__ __forceinline__ float sigmoidf(float a) { return 1.0f / (1.0f + expf(-a)); }

#define INV_SQRT2 0.70710678118654752440f
#define INV_SQRT_2PI 0.39894228040143267794f

// h = silu(gate) * up
template <typename T>
__device__ __forceinline__ void swiglu_fwd(const T* __restrict__ gate, const T* __restrict__ up,
                                           T* __restrict__ h, long long n) {
    GRID_STRIDE(i, n) {
        const float a = elem_ld(gate, i);
        elem_st(h, i, a * sigmoidf(a) * elem_ld(up, i));
    }
}

// dgate = dh * up * s * (1 + gate * (1 - s)), dup = dh * silu(gate)
template <typename T>
__device__ __forceinline__ void swiglu_bwd(const T* __restrict__ dh, const T* __restrict__ gate,
                                           const T* __restrict__ up, T* __restrict__ dgate,
                                           T* __restrict__ dup, long long n) {
    GRID_STRIDE(i, n) {
        const float a = elem_ld(gate, i), b = elem_ld(up, i), g = elem_ld(dh, i);
        const float s = sigmoidf(a);
        elem_st(dgate, i, g * b * s * (1.0f + a * (1.0f - s)));
        elem_st(dup, i, g * a * s);
    }
}

// y = 0.5 x (1 + erf(x / sqrt 2))
template <typename T>
__device__ __forceinline__ void gelu_fwd(const T* __restrict__ x, T* __restrict__ y, long long n) {
    GRID_STRIDE(i, n) {
        const float v = elem_ld(x, i);
        elem_st(y, i, 0.5f * v * (1.0f + erff(v * INV_SQRT2)));
    }
}

// dx = dy * (Phi(x) + x phi(x))
template <typename T>
__device__ __forceinline__ void gelu_bwd(const T* __restrict__ dy, const T* __restrict__ x,
                                         T* __restrict__ dx, long long n) {
    GRID_STRIDE(i, n) {
        const float v = elem_ld(x, i);
        const float cdf = 0.5f * (1.0f + erff(v * INV_SQRT2));
        const float pdf = INV_SQRT_2PI * expf(-0.5f * v * v);
        elem_st(dx, i, elem_ld(dy, i) * (cdf + v * pdf));
    }
}

#define ACT_INSTANTIATE(T, SUF)                                                              \
    extern "C" __global__ void swiglu_fwd_##SUF(const T* gate, const T* up, T* h,            \
                                                long long n) {                               \
        swiglu_fwd<T>(gate, up, h, n);                                                       \
    }                                                                                        \
    extern "C" __global__ void swiglu_bwd_##SUF(const T* dh, const T* gate, const T* up,     \
                                                T* dgate, T* dup, long long n) {             \
        swiglu_bwd<T>(dh, gate, up, dgate, dup, n);                                          \
    }                                                                                        \
    extern "C" __global__ void gelu_fwd_##SUF(const T* x, T* y, long long n) {               \
        gelu_fwd<T>(x, y, n);                                                                \
    }                                                                                        \
    extern "C" __global__ void gelu_bwd_##SUF(const T* dy, const T* x, T* dx, long long n) { \
        gelu_bwd<T>(dy, x, dx, n);                                                           \
    }

ACT_INSTANTIATE(float, f32)
ACT_INSTANTIATE(bf16_t, bf16)
