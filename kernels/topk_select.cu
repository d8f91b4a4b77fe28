// Per-response top-k token selection by ratio (VPPO token-level gradient
// filtering): keep the k = ceil(len * ratio) tokens with the largest score.
// CPU twin: src/backend/cpu/topk.rs (topk_select_mask); same tie rule: equal
// scores rank by position (earlier first), NaN ranks as -inf.
#include "common.cuh"

#define TOPK_TILE 1024

__device__ __forceinline__ float topk_key(float s) { return isnan(s) ? -INFINITY : s; }

// One block per response; cu_seqlens[rows + 1] delimits the packed rows.
// mask[i] = 1.0 for selected tokens, 0.0 otherwise.
extern "C" __global__ void topk_select_mask_f32(const float* __restrict__ scores,
                                                const int* __restrict__ cu_seqlens,
                                                float* __restrict__ mask,
                                                int rows, float ratio) {
    __shared__ float tile[TOPK_TILE];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const int start = cu_seqlens[row];
    const int len = cu_seqlens[row + 1] - start;
    const int k = (int)ceilf((float)len * ratio);
    // Each thread ranks its own elements against every element of the row,
    // one shared-memory tile at a time. rank(i) = #{j : key_j > key_i or
    // (key_j == key_i and j < i)}; selected iff rank < k.
    for (int base = 0; base < len; base += blockDim.x) {
        const int i = base + threadIdx.x;
        const float key_i = i < len ? topk_key(scores[start + i]) : 0.0f;
        int rank = 0;
        for (int t0 = 0; t0 < len; t0 += TOPK_TILE) {
            const int tile_len = min(TOPK_TILE, len - t0);
            __syncthreads();
            for (int j = threadIdx.x; j < tile_len; j += blockDim.x)
                tile[j] = topk_key(scores[start + t0 + j]);
            __syncthreads();
            if (i < len) {
                for (int j = 0; j < tile_len; ++j) {
                    const float key_j = tile[j];
                    rank += (key_j > key_i) || (key_j == key_i && t0 + j < i);
                }
            }
        }
        if (i < len) mask[start + i] = rank < k ? 1.0f : 0.0f;
    }
}
