// Rotary position embedding on [tokens, heads, 2 * half] tensors, forward and
// backward (the backward is the rotation by -angle: sin_sign = -1), with the
// cos/sin computed on the fly from integer positions: frequency j of token t
// has angle positions[stream[j], t] * inv_freq[j]. One kernel serves the
// three layouts of Qwen2.5-VL: 1D (one stream), M-RoPE (t/h/w streams by
// frequency section) and the vision tower's 2D (row | col streams).
// CPU twin: src/backend/cpu/rope.rs (RopeFreqs::table + rope_fwd / rope_bwd,
// which is RopeTable::{text_1d, mrope, vision_2d}); HF's rotate_half
// convention: y[j] = x[j] c - x[j+half] s, y[j+half] = x[j+half] c + x[j] s.
// rope_bf16 is the same on bf16 storage (f32 compute); its twin widens and
// rounds with src/backend/cpu/cast.rs.
#include "common.cuh"
#include "elem.cuh"

// Grid-stride over (token, frequency); each thread rotates that pair in
// every head (one sincos per token and frequency).
template <typename T>
__device__ __forceinline__ void rope(const T* __restrict__ x, T* __restrict__ y,
                                     const int* __restrict__ positions,
                                     const float* __restrict__ inv_freq,
                                     const int* __restrict__ stream, int tokens, int heads,
                                     int half, float sin_sign) {
    const size_t n = (size_t)tokens * half;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (size_t)gridDim.x * blockDim.x) {
        const int t = (int)(idx / half), j = (int)(idx % half);
        const float angle = (float)positions[(size_t)stream[j] * tokens + t] * inv_freq[j];
        float s, c;
        sincosf(angle, &s, &c);
        s *= sin_sign;
        for (int h = 0; h < heads; ++h) {
            const size_t base = ((size_t)t * heads + h) * 2 * half;
            const float x1 = elem_ld(x, base + j), x2 = elem_ld(x, base + j + half);
            elem_st(y, base + j, x1 * c - x2 * s);
            elem_st(y, base + j + half, x2 * c + x1 * s);
        }
    }
}

#define ROPE_INSTANTIATE(T, SUF)                                                             \
    extern "C" __global__ void rope_##SUF(const T* x, T* y, const int* positions,            \
                                          const float* inv_freq, const int* stream,          \
                                          int tokens, int heads, int half, float sin_sign) { \
        rope<T>(x, y, positions, inv_freq, stream, tokens, heads, half, sin_sign);           \
    }

ROPE_INSTANTIATE(float, f32)
ROPE_INSTANTIATE(bf16_t, bf16)
