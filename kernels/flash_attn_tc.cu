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

// ---------------------------------------------------------------------------
// Backward (FlashAttention-2): one block of W warps per key tile of BN = 16 W
// keys of one kv head; warp w owns keys 16 w .. 16 w + 15 and accumulates
// their dK and dV rows in registers over every query tile (QT rows) of every
// query head of the group, so dK/dV need no atomics. Per query tile:
//   S^T = K Q^T, dP^T = V dO^T                       (tensor cores)
//   P^T = exp2(S^T scale log2 e - lse log2 e),  dS^T = P^T (dP^T - delta)
//   dV += P^T dO, dK += dS^T Q                        (P^T, dS^T straight from registers)
//   dQ += dS K: dS^T goes through shared memory, the block's warps split the
//   QT x D product, and add it (times scale) into an f32 dq accumulator with
//   atomics (key tiles of other blocks add into the same rows).
// Q/dO tiles are double buffered with cp.async, K/V stay resident.
// delta = rowsum(dO * O) comes from flash_attn_bwd_delta_bf16 (flash_attn.cu).

template <int D, int W, int QT>
constexpr int fa_tc_bwd_smem_bytes() {
    // K, V; two Q and two dO tiles; dS^T [BN][QT + 8]; two lse and two delta rows (f32).
    return (2 * 16 * W + 4 * QT) * (D + 8) * 2 + 16 * W * (QT + 8) * 2 + 4 * QT * 4;
}

// lse of query row `i` (local) for the exp2 of P, +inf where P must be 0:
// rows past the sequence and rows that saw no key (lse = -inf or NaN).
__device__ __forceinline__ float fa_tc_lse_log2(const float* __restrict__ lse, size_t at,
                                                bool valid) {
    if (!valid) return INFINITY;
    const float l = lse[at];
    return (l > -INFINITY && l < INFINITY) ? l * FA_TC_LOG2E : INFINITY;
}

// grid (ceil(max_seqlen_k / (16 W)), kv_heads, seqs), block 32 W.
template <int D, int W, int QT>
__device__ __forceinline__ void fa_tc_bwd(const bf16_t* __restrict__ q,
                                          const bf16_t* __restrict__ k,
                                          const bf16_t* __restrict__ v,
                                          const bf16_t* __restrict__ dout,
                                          const float* __restrict__ lse,
                                          const float* __restrict__ delta,
                                          const int* __restrict__ cu_q,
                                          const int* __restrict__ cu_k,
                                          float* __restrict__ dq_acc, bf16_t* __restrict__ dk,
                                          bf16_t* __restrict__ dv, int hq, int hkv, float scale,
                                          int causal) {
    constexpr int BN = 16 * W, THREADS = 32 * W, LDS = D + 8, LDP = QT + 8;
    constexpr int KD = D / 16;  // k-steps over the head dim
    constexpr int NQ = QT / 8;  // 8-query column tiles of S^T
    constexpr int NO = D / 8;   // 8-dim column tiles of dK, dV
    // dQ split: QT / 16 row tiles, WPR warps per row tile, NDQ dim tiles per warp.
    constexpr int RT = QT / 16, WPR = W / RT, NDQ = NO / WPR;
    static_assert(D % 16 == 0 && QT % 16 == 0, "head_dim and the query tile are multiples of 16");
    static_assert(W % RT == 0 && NO % WPR == 0, "the dQ product splits evenly over the warps");
    extern __shared__ __align__(16) unsigned char fa_tc_smem[];
    bf16_t* k_s = reinterpret_cast<bf16_t*>(fa_tc_smem);
    bf16_t* v_s = k_s + BN * LDS;
    bf16_t* q_s = v_s + BN * LDS;    // [2][QT][LDS]
    bf16_t* do_s = q_s + 2 * QT * LDS;  // [2][QT][LDS]
    bf16_t* ds_s = do_s + 2 * QT * LDS;  // [BN][LDP], dS^T
    float* lse_s = reinterpret_cast<float*>(ds_s + BN * LDP);  // [2][QT], log2 units
    float* delta_s = lse_s + 2 * QT;                          // [2][QT]

    const int seq = blockIdx.z, g = blockIdx.y, j0 = blockIdx.x * BN;
    const int qs = cu_q[seq], lq = cu_q[seq + 1] - qs;
    const int ks = cu_k[seq], lk = cu_k[seq + 1] - ks;
    if (j0 >= lk) return;
    const int group_size = hq / hkv;
    const int kn = min(BN, lk - j0);
    const int shift = lk - lq;  // causal: query i sees key j iff j <= i + shift
    // The first query tile with a query that sees key j0, and the number of tiles.
    const int qt_first = causal ? max(0, j0 - shift) / QT : 0;
    const int n_qt = max(0, (lq + QT - 1) / QT - qt_first);
    const int total = group_size * n_qt;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int group = lane / 4, quad = lane % 4;
    const int key_a = j0 + 16 * warp + group, key_b = key_a + 8;  // this thread's two keys

    // Query tile `t` of the flattened (head, tile) walk into buffer `buf`.
    auto load_q_tile = [&](int t, int buf) {
        const int h = g * group_size + t / n_qt;
        const int i0 = (qt_first + t % n_qt) * QT;
        const int rows = min(QT, lq - i0);
        fa_tc_load_rows<QT, D, THREADS>(q_s + buf * QT * LDS, q, qs + i0, rows, hq, h);
        fa_tc_load_rows<QT, D, THREADS>(do_s + buf * QT * LDS, dout, qs + i0, rows, hq, h);
        for (int r = threadIdx.x; r < QT; r += THREADS) {
            const size_t at = (size_t)(qs + i0 + r) * hq + h;
            lse_s[buf * QT + r] = fa_tc_lse_log2(lse, at, r < rows);
            delta_s[buf * QT + r] = r < rows ? delta[at] : 0.0f;
        }
    };

    fa_tc_load_rows<BN, D, THREADS>(k_s, k, ks + j0, kn, hkv, g);
    fa_tc_load_rows<BN, D, THREADS>(v_s, v, ks + j0, kn, hkv, g);
    if (total > 0) load_q_tile(0, 0);
    cp_async_commit();

    float dk_acc[NO][4], dv_acc[NO][4];
#pragma unroll
    for (int n = 0; n < NO; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dk_acc[n][e] = dv_acc[n][e] = 0.0f;
    }
    const float sl2 = scale * FA_TC_LOG2E;

    for (int t = 0; t < total; ++t) {
        const int h = g * group_size + t / n_qt;
        const int i0 = (qt_first + t % n_qt) * QT;
        if (t + 1 < total) {
            load_q_tile(t + 1, (t + 1) & 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // tile t (and K, V) visible to every warp
        const bf16_t* qb = q_s + (t & 1) * QT * LDS;
        const bf16_t* dob = do_s + (t & 1) * QT * LDS;
        const float* lse_b = lse_s + (t & 1) * QT;
        const float* delta_b = delta_s + (t & 1) * QT;

        // S^T and dP^T for this warp's 16 keys x QT queries.
        float s[NQ][4], dp[NQ][4];
#pragma unroll
        for (int n = 0; n < NQ; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.0f;
        }
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
            uint32_t ka[4], va[4];
            const int a_at = (16 * warp + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8;
            ldsm_x4(ka, k_s + a_at);
            ldsm_x4(va, v_s + a_at);
#pragma unroll
            for (int np = 0; np < NQ / 2; ++np) {
                // Queries 16np + {0..7, 0..7, 8..15, 8..15} x dims 16kk + {0, 8, 0, 8}.
                const int b_at = (16 * np + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk * 16 +
                                 ((lane >> 3) & 1) * 8;
                uint32_t b[4];
                ldsm_x4(b, qb + b_at);
                mma_bf16_16816(s[2 * np], ka, b[0], b[1]);
                mma_bf16_16816(s[2 * np + 1], ka, b[2], b[3]);
                ldsm_x4(b, dob + b_at);
                mma_bf16_16816(dp[2 * np], va, b[0], b[1]);
                mma_bf16_16816(dp[2 * np + 1], va, b[2], b[3]);
            }
        }
        // P^T into s, dS^T into dp. Masks only on the causal diagonal and
        // the last key tile; rows past the query end have lse = +inf.
        const bool masked = j0 + BN > lk || (causal && j0 + BN - 1 > i0 + shift);
#pragma unroll
        for (int n = 0; n < NQ; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int il = 8 * n + 2 * quad + (e & 1);  // query, local to the tile
                const int key = e < 2 ? key_a : key_b;
                float p = exp2f(fmaf(s[n][e], sl2, -lse_b[il]));
                if (masked && (key >= lk || (causal && key > i0 + il + shift))) p = 0.0f;
                s[n][e] = p;
                dp[n][e] = p * (dp[n][e] - delta_b[il]);
            }
        }
        // dV += P^T dO and dK += dS^T Q, k-steps of 16 queries.
#pragma unroll
        for (int kq = 0; kq < QT / 16; ++kq) {
            const uint32_t pa[4] = {pack_bf16(s[2 * kq][0], s[2 * kq][1]),
                                    pack_bf16(s[2 * kq][2], s[2 * kq][3]),
                                    pack_bf16(s[2 * kq + 1][0], s[2 * kq + 1][1]),
                                    pack_bf16(s[2 * kq + 1][2], s[2 * kq + 1][3])};
            const uint32_t dsa[4] = {pack_bf16(dp[2 * kq][0], dp[2 * kq][1]),
                                     pack_bf16(dp[2 * kq][2], dp[2 * kq][3]),
                                     pack_bf16(dp[2 * kq + 1][0], dp[2 * kq + 1][1]),
                                     pack_bf16(dp[2 * kq + 1][2], dp[2 * kq + 1][3])};
#pragma unroll
            for (int dpair = 0; dpair < NO / 2; ++dpair) {
                // Transposed: queries 16kq + {0..7, 8..15, 0..7, 8..15} x dims 16dpair + {0, 0, 8, 8}.
                const int b_at = (16 * kq + (lane & 15)) * LDS + 16 * dpair + (lane >> 4) * 8;
                uint32_t b[4];
                ldsm_x4_trans(b, dob + b_at);
                mma_bf16_16816(dv_acc[2 * dpair], pa, b[0], b[1]);
                mma_bf16_16816(dv_acc[2 * dpair + 1], pa, b[2], b[3]);
                ldsm_x4_trans(b, qb + b_at);
                mma_bf16_16816(dk_acc[2 * dpair], dsa, b[0], b[1]);
                mma_bf16_16816(dk_acc[2 * dpair + 1], dsa, b[2], b[3]);
            }
            // dS^T rows of this warp's keys, for the dQ product.
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int n = 2 * kq + half;
                *reinterpret_cast<uint32_t*>(ds_s + (16 * warp + group) * LDP + 8 * n + 2 * quad) =
                    dsa[2 * half];
                *reinterpret_cast<uint32_t*>(ds_s + (16 * warp + group + 8) * LDP + 8 * n +
                                             2 * quad) = dsa[2 * half + 1];
            }
        }
        __syncthreads();  // dS^T complete

        // dQ[QT x D] += dS K: warp -> query rows 16 rt, dims [8 NDQ part, 8 NDQ (part + 1)).
        {
            const int rt = warp / WPR, part = warp % WPR;
            float dq[NDQ][4];
#pragma unroll
            for (int n = 0; n < NDQ; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                // A = dS (queries x keys) from dS^T, transposed: stored keys
                // 16kk + {0..7, 0..7, 8..15, 8..15} x queries 16rt + {0, 8, 0, 8}.
                uint32_t a[4];
                ldsm_x4_trans(a, ds_s + (16 * kk + (lane & 7) + ((lane >> 4) << 3)) * LDP +
                                     16 * rt + ((lane >> 3) & 1) * 8);
#pragma unroll
                for (int n = 0; n < NDQ; ++n) {
                    // B = K (keys x dims), transposed: keys 16kk + {0..7, 8..15} x dims 8 (part NDQ + n).
                    uint32_t b[2];
                    ldsm_x2_trans(b, k_s + (16 * kk + (lane & 15)) * LDS + 8 * (part * NDQ + n));
                    mma_bf16_16816(dq[n], a, b[0], b[1]);
                }
            }
            const int iq_a = i0 + 16 * rt + group, iq_b = iq_a + 8;
#pragma unroll
            for (int n = 0; n < NDQ; ++n) {
                const int col = 8 * (part * NDQ + n) + 2 * quad;
                if (iq_a < lq) {
                    float* at = dq_acc + ((size_t)(qs + iq_a) * hq + h) * D + col;
                    atomicAdd(at, scale * dq[n][0]);
                    atomicAdd(at + 1, scale * dq[n][1]);
                }
                if (iq_b < lq) {
                    float* at = dq_acc + ((size_t)(qs + iq_b) * hq + h) * D + col;
                    atomicAdd(at, scale * dq[n][2]);
                    atomicAdd(at + 1, scale * dq[n][3]);
                }
            }
        }
        __syncthreads();  // buffers t & 1 and dS^T are free again
    }
    if (total == 0) cp_async_wait<0>();  // K/V copies must land before k_s is reused

    // Stage this warp's dK (times scale) and dV rows in its own rows of k_s
    // and v_s (no warp reads K or V any more), then 16-byte stores.
    __syncthreads();
#pragma unroll
    for (int n = 0; n < NO; ++n) {
        const int r = 16 * warp + group, c = 8 * n + 2 * quad;
        *reinterpret_cast<uint32_t*>(k_s + r * LDS + c) =
            pack_bf16(scale * dk_acc[n][0], scale * dk_acc[n][1]);
        *reinterpret_cast<uint32_t*>(k_s + (r + 8) * LDS + c) =
            pack_bf16(scale * dk_acc[n][2], scale * dk_acc[n][3]);
        *reinterpret_cast<uint32_t*>(v_s + r * LDS + c) = pack_bf16(dv_acc[n][0], dv_acc[n][1]);
        *reinterpret_cast<uint32_t*>(v_s + (r + 8) * LDS + c) =
            pack_bf16(dv_acc[n][2], dv_acc[n][3]);
    }
    __syncwarp();
    constexpr int CHUNKS = D / 8;
    for (int idx = lane; idx < 16 * CHUNKS; idx += 32) {
        const int r = idx / CHUNKS, c = idx - r * CHUNKS;
        const int j = j0 + 16 * warp + r;
        if (j < lk) {
            const size_t at = ((size_t)(ks + j) * hkv + g) * D + c * 8;
            *reinterpret_cast<uint4*>(dk + at) =
                *reinterpret_cast<const uint4*>(k_s + (16 * warp + r) * LDS + c * 8);
            *reinterpret_cast<uint4*>(dv + at) =
                *reinterpret_cast<const uint4*>(v_s + (16 * warp + r) * LDS + c * 8);
        }
    }
}

// Backward instances: flash_attn_tc_bwd_d{D}: 4 warps (64 keys per block),
// query tiles of 32 rows at d = 128 (the dK/dV accumulators take 128
// registers; 64-row tiles would spill) and of 64 rows below.
#define FA_TC_BWD(D, W, QT)                                                                    \
    extern "C" __global__ void __launch_bounds__(32 * W, 1) flash_attn_tc_bwd_d##D(             \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout, const float* lse, \
        const float* delta, const int* cu_q, const int* cu_k, float* dq_acc, bf16_t* dk,        \
        bf16_t* dv, int hq, int hkv, float scale, int causal) {                                 \
        fa_tc_bwd<D, W, QT>(q, k, v, dout, lse, delta, cu_q, cu_k, dq_acc, dk, dv, hq, hkv,     \
                            scale, causal);                                                     \
    }

FA_TC_BWD(128, 4, 32)
FA_TC_BWD(80, 4, 64)
FA_TC_BWD(64, 4, 64)
FA_TC_BWD(16, 4, 64)

// dq = bf16(dq_acc) (the accumulator already carries the scale).
extern "C" __global__ void flash_attn_tc_dq_convert(const float* __restrict__ dq_acc,
                                                    bf16_t* __restrict__ dq, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dq[i] = __float2bfloat16_rn(dq_acc[i]);
}
