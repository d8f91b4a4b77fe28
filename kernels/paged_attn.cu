// Decode-time attention of one new query per sequence against a paged KV
// cache, fp32.
// CPU twin: src/backend/cpu/paged_attn.rs (paged_decode_attention); same
// contract: q[B, q_heads, D], caches [blocks, block_size, kv_heads, D], token
// i of sequence b lives in slot (table[b][i / block_size], i % block_size),
// query head h reads kv head h / (q_heads / kv_heads), all `len` cached tokens
// are visible; a sequence with no tokens gets o = 0.
// paged_decode_attention_bf16 reads q and the caches as bf16 and writes o as
// bf16 (f32 arithmetic; twin: the f32 op between cpu::cast conversions).
#include "common.cuh"
#include "elem.cuh"

#define PA_WARPS 4
#define PA_MAX_D 128
#define PA_PER_LANE (PA_MAX_D / VPPO_WARP)

// One block of PA_WARPS warps per (sequence, query head); warp w walks tokens
// w, w + PA_WARPS, ... with an online softmax, lane l owns dims l + 32 k;
// the warps' states merge through shared memory at the end.
// block_tables is [B, table_stride] (entries past the sequence unused).
template <typename T>
__device__ __forceinline__ void paged_decode(const T* __restrict__ q,
                                             const T* __restrict__ k_cache,
                                             const T* __restrict__ v_cache,
                                             const int* __restrict__ block_tables,
                                             const int* __restrict__ seq_lens,
                                             T* __restrict__ o, int q_heads, int kv_heads,
                                             int head_dim, int block_size, int table_stride,
                                             float scale) {
    __shared__ float warp_m[PA_WARPS], warp_l[PA_WARPS];
    __shared__ float warp_acc[PA_WARPS][PA_MAX_D];
    const int b = blockIdx.y, h = blockIdx.x;
    const int lane = threadIdx.x % VPPO_WARP, warp = threadIdx.x / VPPO_WARP;
    const int g = h / (q_heads / kv_heads);
    const int len = seq_lens[b];
    const int* table = block_tables + (size_t)b * table_stride;
    const size_t q_at = ((size_t)b * q_heads + h) * head_dim;

    float qr[PA_PER_LANE], acc[PA_PER_LANE];
#pragma unroll
    for (int x = 0; x < PA_PER_LANE; ++x) {
        const int d = lane + VPPO_WARP * x;
        qr[x] = d < head_dim ? elem_ld(q, q_at + d) : 0.0f;
        acc[x] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int i = warp; i < len; i += PA_WARPS) {
        const size_t slot = (size_t)table[i / block_size] * block_size + i % block_size;
        const size_t at = (slot * kv_heads + g) * head_dim;
        float dot = 0.0f;
#pragma unroll
        for (int x = 0; x < PA_PER_LANE; ++x) {
            const int d = lane + VPPO_WARP * x;
            if (d < head_dim) dot += qr[x] * elem_ld(k_cache, at + d);
        }
        const float s = warp_sum(dot) * scale;
        const float m_new = fmaxf(m, s);
        const float alpha = m == -INFINITY ? 0.0f : expf(m - m_new);
        const float p = expf(s - m_new);
        l = l * alpha + p;
        m = m_new;
#pragma unroll
        for (int x = 0; x < PA_PER_LANE; ++x) {
            const int d = lane + VPPO_WARP * x;
            acc[x] = acc[x] * alpha + (d < head_dim ? p * elem_ld(v_cache, at + d) : 0.0f);
        }
    }
    if (lane == 0) {
        warp_m[warp] = m;
        warp_l[warp] = l;
    }
#pragma unroll
    for (int x = 0; x < PA_PER_LANE; ++x) warp_acc[warp][lane + VPPO_WARP * x] = acc[x];
    __syncthreads();
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < PA_WARPS; ++w) mm = fmaxf(mm, warp_m[w]);
    float scale_w[PA_WARPS], total = 0.0f;
#pragma unroll
    for (int w = 0; w < PA_WARPS; ++w) {
        scale_w[w] = warp_m[w] == -INFINITY ? 0.0f : expf(warp_m[w] - mm);
        total += warp_l[w] * scale_w[w];
    }
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < PA_WARPS; ++w) sum += warp_acc[w][d] * scale_w[w];
        elem_st(o, q_at + d, sum * inv);
    }
}

#define PA_INSTANTIATE(T, SUF)                                                               \
    extern "C" __global__ void __launch_bounds__(PA_WARPS * VPPO_WARP)                       \
        paged_decode_attention_##SUF(const T* q, const T* k_cache, const T* v_cache,         \
                                     const int* block_tables, const int* seq_lens, T* o,     \
                                     int q_heads, int kv_heads, int head_dim,                \
                                     int block_size, int table_stride, float scale) {        \
        paged_decode<T>(q, k_cache, v_cache, block_tables, seq_lens, o, q_heads, kv_heads,   \
                        head_dim, block_size, table_stride, scale);                          \
    }

PA_INSTANTIATE(float, f32)
PA_INSTANTIATE(bf16_t, bf16)
