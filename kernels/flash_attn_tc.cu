// Flash attention on tensor cores (the FlashAttention-2 algorithm) for bf16
// q/k/v with f32 accumulation and f32 log-sum-exp; mma.sync m16n8k16 on
// sm_80 and sm_90. Same contract as kernels/flash_attn.cu (packed varlen via
// cu_seqlens, causal aligning the ends, GQA, a query that sees no key gets
// o = 0 and lse = -inf); CPU twin: src/backend/cpu/flash_attn.rs between
// bf16 casts. The fp32 kernels of flash_attn.cu stay the exact-parity path.
//
// Forward: a block of W warps owns BM = 16 W query rows of one head, warp w
// rows 16 w .. 16 w + 15. Its Q fragments stay in registers; K/V tiles of BN
// keys stream through shared memory with cp.async, double buffered (tile
// t + 1 is in flight while tile t is used). S = Q K^T and O += P V run on
// tensor cores; P goes from S's accumulators to the next MMA's A fragments
// in registers. Online softmax in base 2 (scale folded into log2 e).
//
// Shared rows hold D + 8 bf16: the 16-byte pad shifts consecutive rows by
// 4 banks, so the 8 row addresses of each ldmatrix phase hit distinct banks.
#include "mma_bf16.cuh"

#include <math.h>

#define FA_TC_LOG2E 1.4426950408889634f
#define FA_TC_LN2 0.6931471805599453f

// Keys query i may see (see flash_attn.cu).
__device__ __forceinline__ int fa_tc_visible(int i, int lq, int lk, int causal) {
    if (!causal) return lk;
    return max(0, min(i + 1 + lk - lq, lk));
}

// Rows [row0, row0 + valid) of head h of a [T, heads, D] bf16 tensor into
// dst[ROWS][D + 8] with cp.async (rows past `valid` zero-filled); every
// thread of the block takes part.
template <int ROWS, int D, int THREADS>
__device__ __forceinline__ void fa_tc_load_rows(bf16_t* dst, const bf16_t* __restrict__ src,
                                                int row0, int valid, int heads, int h) {
    constexpr int LDS = D + 8, CHUNKS = D / 8;
    for (int idx = threadIdx.x; idx < ROWS * CHUNKS; idx += THREADS) {
        const int r = idx / CHUNKS, c = idx - r * CHUNKS;
        const bool ok = r < valid;
        const bf16_t* g = ok ? src + ((size_t)(row0 + r) * heads + h) * D + c * 8 : src;
        cp_async16(dst + r * LDS + c * 8, g, ok);
    }
}

template <int D, int BM, int BN>
constexpr int fa_tc_fwd_smem_bytes() {
    return (BM + 4 * BN) * (D + 8) * 2;
}

// grid (ceil(max_seqlen_q / BM), q_heads, seqs), block 32 W.
template <int D, int W, int BN>
__device__ __forceinline__ void fa_tc_fwd(const bf16_t* __restrict__ q,
                                          const bf16_t* __restrict__ k,
                                          const bf16_t* __restrict__ v,
                                          const int* __restrict__ cu_q,
                                          const int* __restrict__ cu_k, bf16_t* __restrict__ o,
                                          float* __restrict__ lse, int hq, int hkv, float scale,
                                          int causal) {
    static_assert(D % 16 == 0 && BN % 16 == 0, "head_dim and the key tile are multiples of 16");
    constexpr int BM = 16 * W, THREADS = 32 * W, LDS = D + 8;
    constexpr int KD = D / 16;  // k-steps of Q K^T
    constexpr int NS = BN / 8;  // 8-key column tiles of S
    constexpr int NO = D / 8;   // 8-dim column tiles of O
    extern __shared__ __align__(16) unsigned char fa_tc_smem[];
    bf16_t* q_s = reinterpret_cast<bf16_t*>(fa_tc_smem);
    bf16_t* k_s = q_s + BM * LDS;     // [2][BN][LDS]
    bf16_t* v_s = k_s + 2 * BN * LDS;  // [2][BN][LDS]

    // Heaviest causal tiles (the last ones) start first.
    const int tile = gridDim.x - 1 - blockIdx.x;
    const int seq = blockIdx.z, h = blockIdx.y, i0 = tile * BM;
    const int qs = cu_q[seq], lq = cu_q[seq + 1] - qs;
    const int ks = cu_k[seq], lk = cu_k[seq + 1] - ks;
    if (i0 >= lq) return;
    const int g = h / (hq / hkv);
    const int rows = min(BM, lq - i0);
    const int keys = fa_tc_visible(i0 + rows - 1, lq, lk, causal);  // the widest row
    const int keys_all = fa_tc_visible(i0, lq, lk, causal);         // seen by every row
    const int n_tiles = (keys + BN - 1) / BN;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int group = lane / 4, quad = lane % 4;
    const int row_a = i0 + 16 * warp + group, row_b = row_a + 8;  // this thread's two rows
    const int vis_a = fa_tc_visible(row_a, lq, lk, causal);
    const int vis_b = fa_tc_visible(row_b, lq, lk, causal);

    fa_tc_load_rows<BM, D, THREADS>(q_s, q, qs + i0, rows, hq, h);
    cp_async_commit();
    if (n_tiles > 0) {
        fa_tc_load_rows<BN, D, THREADS>(k_s, k, ks, min(BN, keys), hkv, g);
        fa_tc_load_rows<BN, D, THREADS>(v_s, v, ks, min(BN, keys), hkv, g);
    }
    cp_async_commit();
    cp_async_wait<1>();  // Q has landed (groups complete in order)
    __syncthreads();
    uint32_t qf[KD][4];
#pragma unroll
    for (int kk = 0; kk < KD; ++kk)
        ldsm_x4(qf[kk], q_s + (16 * warp + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);

    float acc[NO][4];
#pragma unroll
    for (int n = 0; n < NO; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;  // l: this thread's share
    const float sl2 = scale * FA_TC_LOG2E;

    for (int t = 0; t < n_tiles; ++t) {
        const int j0 = t * BN;
        if (t + 1 < n_tiles) {
            const int nb = (t + 1) & 1, jn = j0 + BN;
            fa_tc_load_rows<BN, D, THREADS>(k_s + nb * BN * LDS, k, ks + jn, min(BN, keys - jn),
                                            hkv, g);
            fa_tc_load_rows<BN, D, THREADS>(v_s + nb * BN * LDS, v, ks + jn, min(BN, keys - jn),
                                            hkv, g);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // tile t is visible to every warp
        const bf16_t* kb = k_s + (t & 1) * BN * LDS;
        const bf16_t* vb = v_s + (t & 1) * BN * LDS;

        float s[NS][4];
#pragma unroll
        for (int n = 0; n < NS; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
            for (int np = 0; np < NS / 2; ++np) {
                // Matrices: keys 16np + {0..7, 0..7, 8..15, 8..15} x dims 16kk + {0, 8, 0, 8}.
                uint32_t b[4];
                ldsm_x4(b, kb + (16 * np + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk * 16 +
                               ((lane >> 3) & 1) * 8);
                mma_bf16_16816(s[2 * np], qf[kk], b[0], b[1]);
                mma_bf16_16816(s[2 * np + 1], qf[kk], b[2], b[3]);
            }
        }
        // Masks only where some row of the block stops seeing keys (the
        // diagonal for causal, the sequence end otherwise).
        if (j0 + BN > keys_all) {
#pragma unroll
            for (int n = 0; n < NS; ++n) {
                const int col = j0 + 8 * n + 2 * quad;
                if (col >= vis_a) s[n][0] = -INFINITY;
                if (col + 1 >= vis_a) s[n][1] = -INFINITY;
                if (col >= vis_b) s[n][2] = -INFINITY;
                if (col + 1 >= vis_b) s[n][3] = -INFINITY;
            }
        }
        float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
        for (int n = 0; n < NS; ++n) {
            mx_a = fmaxf(mx_a, fmaxf(s[n][0], s[n][1]));
            mx_b = fmaxf(mx_b, fmaxf(s[n][2], s[n][3]));
        }
        // The 4 lanes of a quad share a row.
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
        const float mn_a = fmaxf(m_a, mx_a * sl2), mn_b = fmaxf(m_b, mx_b * sl2);
        // A row that has seen no key yet keeps base 0: exp2(-inf - 0) = 0.
        const float base_a = mn_a == -INFINITY ? 0.0f : mn_a;
        const float base_b = mn_b == -INFINITY ? 0.0f : mn_b;
        const float alpha_a = exp2f(m_a - base_a), alpha_b = exp2f(m_b - base_b);
        m_a = mn_a;
        m_b = mn_b;
        float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
        for (int n = 0; n < NS; ++n) {
            s[n][0] = exp2f(fmaf(s[n][0], sl2, -base_a));
            s[n][1] = exp2f(fmaf(s[n][1], sl2, -base_a));
            s[n][2] = exp2f(fmaf(s[n][2], sl2, -base_b));
            s[n][3] = exp2f(fmaf(s[n][3], sl2, -base_b));
            sum_a += s[n][0] + s[n][1];
            sum_b += s[n][2] + s[n][3];
        }
        l_a = l_a * alpha_a + sum_a;
        l_b = l_b * alpha_b + sum_b;
#pragma unroll
        for (int n = 0; n < NO; ++n) {
            acc[n][0] *= alpha_a;
            acc[n][1] *= alpha_a;
            acc[n][2] *= alpha_b;
            acc[n][3] *= alpha_b;
        }
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            const uint32_t pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]),
                                    pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                    pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                    pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dp = 0; dp < NO / 2; ++dp) {
                // Matrices (transposed): keys 16kk + {0..7, 8..15, 0..7, 8..15} x dims 16dp + {0, 0, 8, 8}.
                uint32_t b[4];
                ldsm_x4_trans(b, vb + (16 * kk + (lane & 15)) * LDS + 16 * dp + (lane >> 4) * 8);
                mma_bf16_16816(acc[2 * dp], pa, b[0], b[1]);
                mma_bf16_16816(acc[2 * dp + 1], pa, b[2], b[3]);
            }
        }
        __syncthreads();  // every warp is done with buffer t & 1 before it is refilled
    }

    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
    const float inv_a = l_a > 0.0f ? 1.0f / l_a : 0.0f;
    const float inv_b = l_b > 0.0f ? 1.0f / l_b : 0.0f;
    // Stage this warp's 16 rows of O in its own rows of q_s (only this warp
    // ever read them), then store them with 16-byte writes.
    bf16_t* o_s = q_s + 16 * warp * LDS;
#pragma unroll
    for (int n = 0; n < NO; ++n) {
        *reinterpret_cast<uint32_t*>(o_s + group * LDS + 8 * n + 2 * quad) =
            pack_bf16(acc[n][0] * inv_a, acc[n][1] * inv_a);
        *reinterpret_cast<uint32_t*>(o_s + (group + 8) * LDS + 8 * n + 2 * quad) =
            pack_bf16(acc[n][2] * inv_b, acc[n][3] * inv_b);
    }
    __syncwarp();
    constexpr int CHUNKS = D / 8;
    for (int idx = lane; idx < 16 * CHUNKS; idx += 32) {
        const int r = idx / CHUNKS, c = idx - r * CHUNKS;
        const int i = i0 + 16 * warp + r;
        if (i < lq) {
            *reinterpret_cast<uint4*>(o + ((size_t)(qs + i) * hq + h) * D + c * 8) =
                *reinterpret_cast<const uint4*>(o_s + r * LDS + c * 8);
        }
    }
    if (quad == 0) {
        if (row_a < lq) lse[(size_t)(qs + row_a) * hq + h] = l_a > 0.0f ? (m_a + log2f(l_a)) * FA_TC_LN2 : -INFINITY;
        if (row_b < lq) lse[(size_t)(qs + row_b) * hq + h] = l_b > 0.0f ? (m_b + log2f(l_b)) * FA_TC_LN2 : -INFINITY;
    }
}

// Forward instances: flash_attn_tc_fwd_d{D}_m{BM} with BM = 16 W query rows
// per block and BN = 64 keys per tile. m128 (8 warps) for long sequences,
// m64 (4 warps) for short ones such as 64-token vision windows, where a
// 128-row tile would be half empty.
#define FA_TC_FWD(D, W, BM, BN)                                                                 \
    static_assert(BM == 16 * W, "BM names the block's rows");                                   \
    extern "C" __global__ void __launch_bounds__(32 * W, 1) flash_attn_tc_fwd_d##D##_m##BM(     \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const int* cu_q, const int* cu_k,    \
        bf16_t* o, float* lse, int hq, int hkv, float scale, int causal) {                      \
        fa_tc_fwd<D, W, BN>(q, k, v, cu_q, cu_k, o, lse, hq, hkv, scale, causal);               \
    }

FA_TC_FWD(128, 8, 128, 64)
FA_TC_FWD(128, 4, 64, 64)
FA_TC_FWD(80, 8, 128, 64)
FA_TC_FWD(80, 4, 64, 64)
// Small head dims (test-size models, small production configs).
FA_TC_FWD(64, 8, 128, 64)
FA_TC_FWD(64, 4, 64, 64)
FA_TC_FWD(16, 8, 128, 64)
FA_TC_FWD(16, 4, 64, 64)
