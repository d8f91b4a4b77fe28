// Vision patch embed: normalise + patchify straight from the resized uint8
// RGB image into the vision tower's GEMM operand pixel_values[N, 3*T*P*P],
// optionally writing a second, patch-blackened copy (VPPO's perturbed pass)
// from a per-sample seed; the mask is drawn per patch by a counter-based hash
// and never exists in memory.
// CPU twins: src/processor/image.rs (patchify, normalize_lut) and
// src/rl/perturb.rs (blacken_patches_hashed, patch_is_blackened); same
// layout: rows ordered (merged row, merged col, inner row, inner col),
// features ((c * T + t) * P + y) * P + x, the frame repeated over T; a
// blackened patch holds lut[c][0] (the normalised black). Bit-identical.
#include "common.cuh"

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
extern "C" __global__ void patch_embed_u8_f32(const unsigned char* __restrict__ img,
                                              int width, int height,
                                              const float* __restrict__ lut,
                                              float* __restrict__ out,
                                              float* __restrict__ out_masked, int patch,
                                              int merge, int temporal,
                                              unsigned long long seed, unsigned threshold) {
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
    float* row = out + (size_t)k * features;
    float* row_m = out_masked ? out_masked + (size_t)k * features : nullptr;
    for (int f = threadIdx.x; f < features; f += blockDim.x) {
        const int x = f % patch, y = (f / patch) % patch, c = f / (temporal * pp);
        const float v = lut[c * 256 + img[((size_t)(y0 + y) * width + x0 + x) * 3 + c]];
        row[f] = v;
        if (row_m) row_m[f] = dark ? lut[c * 256] : v;
    }
}
