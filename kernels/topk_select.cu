// Per-response top-k token selection by ratio (VPPO token-level gradient
// filtering): keep the k = ceil(len * ratio) tokens with the largest score.
// CPU twin: src/backend/cpu/topk_select.rs (topk_select_mask); same tie rule: equal
// scores rank by position (earlier first), NaN ranks as -inf.
//
// One block per response, O(len) per row: a 4-pass 8-bit radix select finds
// the k-th largest key T and how many of the keys equal to T are kept
// (`take`); then one ordered pass keeps every key > T and the first `take`
// keys == T, counted in position order by a block-wide scan.
#include "common.cuh"

#define TOPK_MAX_WARPS 32

// Order-preserving map of a score to an unsigned key: larger score, larger
// key. NaN counts as -inf, and -0.0 as +0.0 (they compare equal on the CPU).
__device__ __forceinline__ unsigned topk_key(float s) {
    const float f = isnan(s) ? -INFINITY : s + 0.0f;
    const unsigned bits = __float_as_uint(f);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// mask[i] = 1.0 for selected tokens, 0.0 otherwise; cu_seqlens[rows + 1]
// delimits the packed rows. blockDim.x: a multiple of 32, at most 1024.
extern "C" __global__ void topk_select_mask_f32(const float* __restrict__ scores,
                                                const int* __restrict__ cu_seqlens,
                                                float* __restrict__ mask, int rows,
                                                float ratio) {
    __shared__ int hist[256];
    __shared__ unsigned s_prefix;
    __shared__ int s_remaining;
    __shared__ int warp_counts[TOPK_MAX_WARPS];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const int start = cu_seqlens[row];
    const int len = cu_seqlens[row + 1] - start;
    const int k = min(len, (int)ceilf((float)len * ratio));
    const float* s = scores + start;
    float* m = mask + start;
    if (k <= 0 || k >= len) {
        const float v = k <= 0 ? 0.0f : 1.0f;
        for (int i = threadIdx.x; i < len; i += blockDim.x) m[i] = v;
        return;
    }
    // Radix select, most significant byte first: after the pass on bits
    // [shift, shift + 8) the prefix holds the k-th largest key's top bits,
    // and `remaining` how many keys with that prefix are still to take.
    if (threadIdx.x == 0) {
        s_prefix = 0u;
        s_remaining = k;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        const unsigned prefix = s_prefix;
        const unsigned high_mask = shift == 24 ? 0u : (0xFFFFFFFFu << (shift + 8));
        for (int i = threadIdx.x; i < len; i += blockDim.x) {
            const unsigned key = topk_key(s[i]);
            if ((key & high_mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xFFu], 1);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int remaining = s_remaining;
            int b = 255;
            for (; b > 0; --b) {
                if (hist[b] >= remaining) break;
                remaining -= hist[b];
            }
            s_prefix = prefix | ((unsigned)b << shift);
            s_remaining = remaining;
        }
        __syncthreads();
    }
    const unsigned threshold = s_prefix;
    const int take = s_remaining;  // keys == threshold to keep, earliest first
    const int lane = threadIdx.x % VPPO_WARP;
    const int warp = threadIdx.x / VPPO_WARP;
    const int warps = blockDim.x / VPPO_WARP;
    int taken_before = 0;  // equal keys in earlier tiles
    for (int base = 0; base < len; base += blockDim.x) {
        const int i = base + threadIdx.x;
        const unsigned key = i < len ? topk_key(s[i]) : 0u;
        const bool equal = i < len && key == threshold;
        const unsigned ballot = __ballot_sync(0xFFFFFFFFu, equal);
        if (lane == 0) warp_counts[warp] = __popc(ballot);
        __syncthreads();
        int before = taken_before + __popc(ballot & ((1u << lane) - 1u));
        int tile_total = 0;
        for (int w = 0; w < warps; ++w) {
            if (w < warp) before += warp_counts[w];
            tile_total += warp_counts[w];
        }
        if (i < len) m[i] = (key > threshold || (equal && before < take)) ? 1.0f : 0.0f;
        taken_before += tile_total;
        __syncthreads();
    }
}
