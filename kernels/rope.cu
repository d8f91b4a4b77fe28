// Rotary position embedding on [tokens, heads, 2 * half] tensors, forward and
// backward (the backward is the rotation by -angle: sin_sign = -1), with the
// cos/sin computed on the fly from integer positions: frequency j of token t
// has angle positions[stream[j], t] * inv_freq[j]. One kernel serves the
// three layouts of Qwen2.5-VL: 1D (one stream), M-RoPE (t/h/w streams by
// frequency section) and the vision tower's 2D (row | col streams).
// CPU twin: src/backend/cpu/rope.rs (RopeFreqs::table + rope_fwd / rope_bwd,
// which is RopeTable::{text_1d, mrope, vision_2d}); HF's rotate_half
// convention: y[j] = x[j] c - x[j+half] s, y[j+half] = x[j+half] c + x[j] s.
#include "common.cuh"

// Grid-stride over (token, frequency); each thread rotates that pair in
// every head (one sincos per token and frequency).
extern "C" __global__ void rope_f32(const float* __restrict__ x, float* __restrict__ y,
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
            const float x1 = x[base + j], x2 = x[base + j + half];
            y[base + j] = x1 * c - x2 * s;
            y[base + j + half] = x2 * c + x1 * s;
        }
    }
}
