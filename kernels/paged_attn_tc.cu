// Decode-time attention against the paged KV cache on tensor cores
// (flash-decoding), bf16 q and caches, f32 arithmetic. Same contract as
// kernels/paged_attn.cu: q[B, q_heads, D], caches [blocks, block_size,
// kv_heads, D], token i of sequence b in slot (table[b][i / block_size],
// i % block_size), query head h reads kv head h / (q_heads / kv_heads), all
// `len` cached tokens visible, a sequence with no tokens gets o = 0. CPU twin:
// src/backend/cpu/paged_attn.rs between bf16 casts.
//
// paged_attn_tc_split_d{D}: grid (splits, kv_heads, B), 4 warps. A block
// takes the G = q_heads / kv_heads query heads of one kv head together (the
// 16 rows of one MMA tile, rows past G zero) and the tokens
// [split * split_tokens, min(len, (split + 1) * split_tokens)) of its
// sequence, walked in chunks of 64 tokens read straight from the paged
// blocks with cp.async (double buffered). Warp w scores tokens 16 w .. 16 w
// + 15 of each chunk (S = Q K^T, O += P V on tensor cores) with its own
// online softmax; the 4 warps merge in shared memory, and the split writes
// its normalised partial output, row max (log2 units) and row sum.
// paged_attn_tc_combine_bf16: one block per (head, sequence) merges the
// splits (the log-sum-exp weighted mean) into o.
#include "mma_bf16.cuh"

#include <math.h>

#define PA_TC_LOG2E 1.4426950408889634f
#define PA_TC_CHUNK 64
#define PA_TC_WARPS 4

// Chunk tokens [t0, t0 + 64) of one kv head, rows of D + 8 bf16; tokens at or
// past `end` are zero-filled.
template <int D>
__device__ __forceinline__ void pa_tc_load_chunk(bf16_t* dst, const bf16_t* __restrict__ cache,
                                                 const int* __restrict__ table, int t0, int end,
                                                 int block_size, int kv_heads, int g) {
    constexpr int LDS = D + 8, CHUNKS = D / 8;
    for (int idx = threadIdx.x; idx < PA_TC_CHUNK * CHUNKS; idx += 32 * PA_TC_WARPS) {
        const int r = idx / CHUNKS, c = idx - r * CHUNKS;
        const int i = t0 + r;
        const bool ok = i < end;
        const bf16_t* src = cache;
        if (ok) {
            const size_t slot = (size_t)table[i / block_size] * block_size + i % block_size;
            src = cache + (slot * kv_heads + g) * D + c * 8;
        }
        cp_async16(dst + r * LDS + c * 8, src, ok);
    }
}

template <int D>
constexpr int pa_tc_smem_bytes() {
    return (16 + 4 * PA_TC_CHUNK) * (D + 8) * 2;
}

template <int D>
__device__ __forceinline__ void pa_tc_split(const bf16_t* __restrict__ q,
                                            const bf16_t* __restrict__ k_cache,
                                            const bf16_t* __restrict__ v_cache,
                                            const int* __restrict__ block_tables,
                                            const int* __restrict__ seq_lens,
                                            float* __restrict__ o_part,
                                            float* __restrict__ ml_part, int q_heads,
                                            int kv_heads, int block_size, int table_stride,
                                            int split_tokens, float scale) {
    constexpr int LDS = D + 8, KD = D / 16, NO = D / 8;
    static_assert(D % 16 == 0, "head_dim is a multiple of 16");
    extern __shared__ __align__(16) unsigned char pa_tc_smem[];
    bf16_t* q_s = reinterpret_cast<bf16_t*>(pa_tc_smem);  // [16][LDS]
    bf16_t* k_s = q_s + 16 * LDS;                          // [2][64][LDS]
    bf16_t* v_s = k_s + 2 * PA_TC_CHUNK * LDS;             // [2][64][LDS]

    const int split = blockIdx.x, g = blockIdx.y, b = blockIdx.z, splits = gridDim.x;
    const int group_size = q_heads / kv_heads;  // <= 16 (the launcher checks)
    const int len = seq_lens[b];
    const int begin = split * split_tokens, end = min(len, begin + split_tokens);
    const int n_chunks = end > begin ? (end - begin + PA_TC_CHUNK - 1) / PA_TC_CHUNK : 0;
    const int* table = block_tables + (size_t)b * table_stride;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int group = lane / 4, quad = lane % 4;

    // Q rows: the group's heads, zero past G.
    for (int idx = threadIdx.x; idx < 16 * (D / 8); idx += 32 * PA_TC_WARPS) {
        const int r = idx / (D / 8), c = idx - r * (D / 8);
        const bool ok = r < group_size;
        const bf16_t* src = ok ? q + ((size_t)b * q_heads + g * group_size + r) * D + c * 8 : q;
        cp_async16(q_s + r * LDS + c * 8, src, ok);
    }
    cp_async_commit();
    if (n_chunks > 0) {
        pa_tc_load_chunk<D>(k_s, k_cache, table, begin, end, block_size, kv_heads, g);
        pa_tc_load_chunk<D>(v_s, v_cache, table, begin, end, block_size, kv_heads, g);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    uint32_t qf[KD][4];
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) ldsm_x4(qf[kk], q_s + (lane & 15) * LDS + kk * 16 + (lane >> 4) * 8);

    float acc[NO][4];
#pragma unroll
    for (int n = 0; n < NO; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;  // rows group, group + 8
    const float sl2 = scale * PA_TC_LOG2E;

    for (int c = 0; c < n_chunks; ++c) {
        const int t0 = begin + c * PA_TC_CHUNK;
        if (c + 1 < n_chunks) {
            const int nb = (c + 1) & 1;
            pa_tc_load_chunk<D>(k_s + nb * PA_TC_CHUNK * LDS, k_cache, table, t0 + PA_TC_CHUNK,
                                end, block_size, kv_heads, g);
            pa_tc_load_chunk<D>(v_s + nb * PA_TC_CHUNK * LDS, v_cache, table, t0 + PA_TC_CHUNK,
                                end, block_size, kv_heads, g);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        // This warp's 16 tokens of the chunk.
        const bf16_t* kb = k_s + ((c & 1) * PA_TC_CHUNK + 16 * warp) * LDS;
        const bf16_t* vb = v_s + ((c & 1) * PA_TC_CHUNK + 16 * warp) * LDS;
        const int w0 = t0 + 16 * warp;
        if (w0 < end) {  // warp-uniform: a warp past the end has nothing to add
            float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
                // Tokens {0..7, 0..7, 8..15, 8..15} x dims 16kk + {0, 8, 0, 8}.
                uint32_t kf[4];
                ldsm_x4(kf, kb + ((lane & 7) + ((lane >> 4) << 3)) * LDS + kk * 16 +
                                ((lane >> 3) & 1) * 8);
                mma_bf16_16816(s[0], qf[kk], kf[0], kf[1]);
                mma_bf16_16816(s[1], qf[kk], kf[2], kf[3]);
            }
#pragma unroll
            for (int n = 0; n < 2; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int tok = w0 + 8 * n + 2 * quad + (e & 1);
                    s[n][e] = tok < end ? s[n][e] * sl2 : -INFINITY;
                }
            }
            float mx_a = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
            float mx_b = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
            mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
            mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
            mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
            mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
            // Token w0 < end is always visible, so the new max is finite.
            const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
            const float alpha_a = exp2f(m_a - mn_a), alpha_b = exp2f(m_b - mn_b);
            m_a = mn_a;
            m_b = mn_b;
            float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
            for (int n = 0; n < 2; ++n) {
                s[n][0] = exp2f(s[n][0] - mn_a);
                s[n][1] = exp2f(s[n][1] - mn_a);
                s[n][2] = exp2f(s[n][2] - mn_b);
                s[n][3] = exp2f(s[n][3] - mn_b);
                sum_a += s[n][0] + s[n][1];
                sum_b += s[n][2] + s[n][3];
            }
            l_a = l_a * alpha_a + sum_a;
            l_b = l_b * alpha_b + sum_b;
            const uint32_t pa[4] = {pack_bf16(s[0][0], s[0][1]), pack_bf16(s[0][2], s[0][3]),
                                    pack_bf16(s[1][0], s[1][1]), pack_bf16(s[1][2], s[1][3])};
#pragma unroll
            for (int dp = 0; dp < NO / 2; ++dp) {
                acc[2 * dp][0] *= alpha_a;
                acc[2 * dp][1] *= alpha_a;
                acc[2 * dp][2] *= alpha_b;
                acc[2 * dp][3] *= alpha_b;
                acc[2 * dp + 1][0] *= alpha_a;
                acc[2 * dp + 1][1] *= alpha_a;
                acc[2 * dp + 1][2] *= alpha_b;
                acc[2 * dp + 1][3] *= alpha_b;
                // Transposed: tokens {0..7, 8..15, 0..7, 8..15} x dims 16dp + {0, 0, 8, 8}.
                uint32_t vf[4];
                ldsm_x4_trans(vf, vb + (lane & 15) * LDS + 16 * dp + (lane >> 4) * 8);
                mma_bf16_16816(acc[2 * dp], pa, vf[0], vf[1]);
                mma_bf16_16816(acc[2 * dp + 1], pa, vf[2], vf[3]);
            }
        }
        __syncthreads();  // buffer c & 1 is free for chunk c + 2
    }
    if (n_chunks == 0) cp_async_wait<0>();

    // Merge the warps: per warp its rows' max, sum and unnormalised output
    // (f32) in the K/V area (free after the last barrier).
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
    float* acc_s = reinterpret_cast<float*>(k_s);  // [4][16][D]
    float* m_s = acc_s + PA_TC_WARPS * 16 * D;     // [4][16]
    float* l_s = m_s + PA_TC_WARPS * 16;           // [4][16]
    __syncthreads();
#pragma unroll
    for (int n = 0; n < NO; ++n) {
        float* row = acc_s + (warp * 16 + group) * D + 8 * n + 2 * quad;
        row[0] = acc[n][0];
        row[1] = acc[n][1];
        row[8 * D] = acc[n][2];
        row[8 * D + 1] = acc[n][3];
    }
    if (quad == 0) {
        m_s[warp * 16 + group] = m_a;
        m_s[warp * 16 + group + 8] = m_b;
        l_s[warp * 16 + group] = l_a;
        l_s[warp * 16 + group + 8] = l_b;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < group_size * D; idx += 32 * PA_TC_WARPS) {
        const int r = idx / D, d = idx - r * D;
        float m = -INFINITY;
#pragma unroll
        for (int w = 0; w < PA_TC_WARPS; ++w) m = fmaxf(m, m_s[w * 16 + r]);
        float l = 0.0f, o = 0.0f;
#pragma unroll
        for (int w = 0; w < PA_TC_WARPS; ++w) {
            const float wm = m_s[w * 16 + r];
            const float f = wm == -INFINITY ? 0.0f : exp2f(wm - m);
            l += f * l_s[w * 16 + r];
            o += f * acc_s[(w * 16 + r) * D + d];
        }
        const size_t row = ((size_t)b * q_heads + g * group_size + r) * splits + split;
        o_part[row * D + d] = l > 0.0f ? o / l : 0.0f;
        if (d == 0) {
            ml_part[2 * row] = m;
            ml_part[2 * row + 1] = l;
        }
    }
}

#define PA_TC_SPLIT(D)                                                                          \
    extern "C" __global__ void __launch_bounds__(32 * PA_TC_WARPS) paged_attn_tc_split_d##D(    \
        const bf16_t* q, const bf16_t* k_cache, const bf16_t* v_cache, const int* block_tables, \
        const int* seq_lens, float* o_part, float* ml_part, int q_heads, int kv_heads,          \
        int block_size, int table_stride, int split_tokens, float scale) {                      \
        pa_tc_split<D>(q, k_cache, v_cache, block_tables, seq_lens, o_part, ml_part, q_heads,   \
                       kv_heads, block_size, table_stride, split_tokens, scale);                \
    }

PA_TC_SPLIT(128)
PA_TC_SPLIT(80)
PA_TC_SPLIT(64)
PA_TC_SPLIT(16)

// o[b, h] = sum_s w_s o_s / sum_s w_s l_s-weighted: w_s = exp2(m_s - max m) l_s.
// grid (q_heads, B), block 128; splits without tokens have l = 0.
extern "C" __global__ void paged_attn_tc_combine_bf16(const float* __restrict__ o_part,
                                                      const float* __restrict__ ml_part,
                                                      bf16_t* __restrict__ o, int q_heads,
                                                      int head_dim, int splits) {
    const int h = blockIdx.x, b = blockIdx.y;
    const size_t row0 = ((size_t)b * q_heads + h) * splits;
    float m = -INFINITY;
    for (int s = 0; s < splits; ++s)
        if (ml_part[2 * (row0 + s) + 1] > 0.0f) m = fmaxf(m, ml_part[2 * (row0 + s)]);
    float total = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const float l = ml_part[2 * (row0 + s) + 1];
        if (l > 0.0f) total += exp2f(ml_part[2 * (row0 + s)] - m) * l;
    }
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float l = ml_part[2 * (row0 + s) + 1];
            if (l > 0.0f) acc += exp2f(ml_part[2 * (row0 + s)] - m) * l * o_part[(row0 + s) * head_dim + d];
        }
        o[((size_t)b * q_heads + h) * head_dim + d] = __float2bfloat16_rn(acc * inv);
    }
}
