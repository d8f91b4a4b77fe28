// Vision patch embed: normalise + patchify straight from the resized uint8
// RGB image into the vision tower's GEMM operand pixel_values[N, 3*T*P*P],
// optionally writing a second, patch-blackened copy (VPPO's perturbed pass)
// from a per-sample seed; the mask is drawn per patch by a counter-based hash
// and never exists in memory.
// CPU twins: src/processor/image.rs (patchify, normalize_lut) and
// src/rl/perturb.rs (blacken_patches, patch_is_blackened); same
// layout: rows ordered (merged row, merged col, inner row, inner col),
// features ((c * T + t) * P + y) * P + x, the frame repeated over T; a
// blackened patch holds lut[c][0] (the normalised black). Bit-identical.
// patch_embed_u8_bf16 writes the bf16 GEMM operand (the f32 values rounded
// to nearest-even: twin patchify + cpu::cast::f32_to_bf16).
#include "common.cuh"
#include "elem.cuh"

__device__ __forceinline__ bool patch_blackened(unsigned long long seed, unsigned long long k,
                                                unsigned threshold) {
    unsigned long long z = seed + (k + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (unsigned)(z >> 40) < threshold;
}

// One block per patch, threads over its 3*T*P*P features. img is [H, W, 3]
// bytes; lut is [3][256]; out_masked may be null (then seed/threshold unused).
template <typename T>
__device__ __forceinline__ void patch_embed(const unsigned char* __restrict__ img, int width,
                                            const float* __restrict__ lut, T* __restrict__ out,
                                            T* __restrict__ out_masked, int patch, int merge,
                                            int temporal, unsigned long long seed,
                                            unsigned threshold) {
    const int k = blockIdx.x;
    const int gw = width / patch;
    const int per_block = merge * merge;
    const int blk = k / per_block, inner = k % per_block;
    const int blocks_per_row = gw / merge;
    const int hb = blk / blocks_per_row, wb = blk % blocks_per_row;
    const int y0 = (hb * merge + inner / merge) * patch;
    const int x0 = (wb * merge + inner % merge) * patch;
    const int pp = patch * patch;
    const int features = 3 * temporal * pp;
    const bool dark = out_masked != nullptr && patch_blackened(seed, (unsigned long long)k, threshold);
    T* row = out + (size_t)k * features;
    T* row_m = out_masked ? out_masked + (size_t)k * features : nullptr;
    for (int f = threadIdx.x; f < features; f += blockDim.x) {
        const int x = f % patch, y = (f / patch) % patch, c = f / (temporal * pp);
        const float v = lut[c * 256 + img[((size_t)(y0 + y) * width + x0 + x) * 3 + c]];
        elem_st(row, f, v);
        if (row_m) elem_st(row_m, f, dark ? lut[c * 256] : v);
    }
}

#define PATCH_INSTANTIATE(T, SUF)                                                            \
    extern "C" __global__ void patch_embed_u8_##SUF(                                         \
        const unsigned char* img, int width, int height, const float* lut, T* out,           \
        T* out_masked, int patch, int merge, int temporal, unsigned long long seed,          \
        unsigned threshold) {                                                                \
        (void)height;                                                                        \
        patch_embed<T>(img, width, lut, out, out_masked, patch, merge, temporal, seed,       \
                       threshold);                                                           \
    }

PATCH_INSTANTIATE(float, f32)
PATCH_INSTANTIATE(bf16_t, bf16)
