// Flash attention forward for Hopper (sm_90a) in the FlashAttention-3
// structure: TMA loads, warp specialisation, warpgroup MMA (wgmma).
// vppo: needs sm_90a
//
// Same contract as flash_attn_tc.cu's forward (bf16 q/k/v/o in the packed
// varlen layout [T, heads, D] with cu_seqlens, causal aligning the ends, GQA,
// f32 natural-log lse, o = 0 and lse = -inf for a query that sees no key);
// CPU twin: src/backend/cpu/flash_attn.rs between bf16 casts. The launcher
// (src/backend/cuda/flash_attn_wgmma.rs) builds the tensor maps.
//
// Block: 3 warpgroups (384 threads) per (128 query rows, q head, sequence).
//  - warpgroup 0 is the producer: one thread issues the TMA loads of Q (once)
//    and of K and V tiles of BN = 128 keys into a 2-stage shared-memory ring.
//    full_k/full_v barriers say "stage landed" (TMA's complete_tx), empty
//    says "both consumers are done with the stage" (256 arrivals).
//  - warpgroups 1 and 2 are consumers of 64 query rows each: S = Q K^T with
//    wgmma (A = Q and B = K from shared memory), online softmax in base 2 on
//    the f32 accumulators in registers, then O += P V with P as wgmma's
//    register A operand and V from shared memory (MN-major: transposed B).
//  setmaxnreg moves registers from the producer (40) to the consumers (232).
//
// Shared-memory layout (what TMA writes and the wgmma descriptors read):
// every tile is stored as panels of PW head-dim columns, each panel a
// [rows][PW] bf16 array whose rows are exactly one swizzle span (RB = 2 PW
// bytes) wide, with the matching TMA/wgmma swizzle (the 16-byte chunk of a
// row XORed with address bits 7.. : Swizzle<3,4,3> for 128 bytes,
// Swizzle<1,4,3> for 32), every panel 1024-byte aligned so TMA and wgmma see
// the same swizzle phase. One TMA box is one panel: (PW columns, 1 head,
// rows) of a 3-D tensor map (D, heads, T).
//  - D = 128 and 64: PW = 64, 128-byte swizzle (2 or 1 panels).
//  - D = 80: PW = 16, 32-byte swizzle, 5 panels. 160-byte rows cannot be
//    tiled by 128-byte (64-column) or 64-byte (32-column) swizzle atoms, but
//    80 = 5 x 16 exactly: every panel is full (no zero padding in shared
//    memory), a k16 step of Q K^T is one whole panel, and the N = 80 of the
//    P V wgmma spans exactly 5 MN-major swizzle atoms (the canonical layout,
//    the atom count a whole number), at the price of the narrower swizzle.
// Rows past the tensor's end are zero-filled by TMA; rows past a sequence's
// end (the next sequence's rows) are masked to -inf in S (keys) and never
// stored (queries). scripts/check_wgmma_fragments.py emulates this layout,
// the descriptors and the fragment maps on the host.
#include "mma_bf16.cuh"

#include <math.h>
#include <stdint.h>

// build.rs compiles this file for sm_90a alone (its marker line), and the
// backend loads it on compute capability 9.0 only; the guard keeps a stray
// compile for another arch from emitting wgmma where it does not exist.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#include "wgmma_sm90.cuh"

constexpr int FA_WG_BM = 128;  // query rows per block (2 consumer warpgroups x 64)
constexpr int FA_WG_BN = 128;  // keys per K/V tile
constexpr int FA_WG_STAGES = 2;
constexpr int FA_WG_THREADS = 384;
constexpr int FA_WG_CONSUMER_THREADS = 256;

template <int D>
struct FaWgLayout {
    static_assert(D == 64 || D == 80 || D == 128, "head dims with a shared-memory layout");
    static constexpr int PW = D % 64 == 0 ? 64 : 16;  // columns per panel
    static constexpr int RB = 2 * PW;                 // bytes per panel row = swizzle span
    static constexpr int PANELS = D / PW;
    static constexpr int SBO = 8 * RB;                 // bytes between 8-row groups
    // Descriptor layout type: 1 = 128-byte, 3 = 32-byte swizzle.
    static constexpr uint64_t SWIZZLE = RB == 128 ? 1 : 3;
    static constexpr int Q_BYTES = PANELS * FA_WG_BM * RB;
    static constexpr int KV_BYTES = PANELS * FA_WG_BN * RB;
    static constexpr int Q_OFF = 0;
    static constexpr int K_OFF = Q_BYTES;
    static constexpr int V_OFF = K_OFF + FA_WG_STAGES * KV_BYTES;
    static constexpr int BAR_OFF = V_OFF + FA_WG_STAGES * KV_BYTES;
    // 7 barriers (q_full, full_k[2], full_v[2], empty[2]) in 64 bytes, plus
    // 1024 bytes to round the dynamic window up to the swizzle period.
    static constexpr int SMEM_BYTES = BAR_OFF + 64 + 1024;
};

// Keys query i may see (see flash_attn.cu).
__device__ __forceinline__ int fa_wg_visible(int i, int lq, int lk, int causal) {
    if (!causal) return lk;
    return max(0, min(i + 1 + lk - lq, lk));
}

// grid (ceil(max_seqlen_q / 128), q_heads, seqs), block 384.
template <int D>
__device__ __forceinline__ void fa_wg_fwd(const FaTmap* tm_q, const FaTmap* tm_k,
                                          const FaTmap* tm_v, const int* __restrict__ cu_q,
                                          const int* __restrict__ cu_k, bf16_t* __restrict__ o,
                                          float* __restrict__ lse, int hq, int hkv, float scale,
                                          int causal) {
    using L = FaWgLayout<D>;
    constexpr int BM = FA_WG_BM, BN = FA_WG_BN;
    constexpr int KD = D / 16;        // k-steps of Q K^T
    constexpr int NS = BN / 8;        // 8-key column blocks of S
    constexpr int NO = D / 8;         // 8-dim column blocks of O
    constexpr int KP = BN / 16;       // k-steps of P V
    extern __shared__ __align__(1024) unsigned char fa_wg_smem[];
    // Round up to the swizzle period: the swizzle is a function of the
    // shared-memory address bits 4-9, for TMA and wgmma alike.
    const uint32_t raw = smem_addr(fa_wg_smem);
    const uint32_t base = (raw + 1023u) & ~1023u;
    unsigned char* const gbase = fa_wg_smem + (base - raw);
    const uint32_t q_s = base + L::Q_OFF, k_s = base + L::K_OFF, v_s = base + L::V_OFF;
    const uint32_t bar = base + L::BAR_OFF;
    const uint32_t q_full = bar;
    auto full_k = [&](int s) { return bar + 8 + 8 * s; };
    auto full_v = [&](int s) { return bar + 8 + 8 * FA_WG_STAGES + 8 * s; };
    auto empty = [&](int s) { return bar + 8 + 16 * FA_WG_STAGES + 8 * s; };

    // Heaviest causal tiles (the last ones) start first.
    const int tile = gridDim.x - 1 - blockIdx.x;
    const int seq = blockIdx.z, h = blockIdx.y, i0 = tile * BM;
    const int qs = cu_q[seq], lq = cu_q[seq + 1] - qs;
    const int ks = cu_k[seq], lk = cu_k[seq + 1] - ks;
    if (i0 >= lq) return;  // uniform over the block, before any barrier
    const int g = h / (hq / hkv);
    const int rows = min(BM, lq - i0);
    const int keys = fa_wg_visible(i0 + rows - 1, lq, lk, causal);  // the widest row's
    const int n_tiles = (keys + BN - 1) / BN;

    if (threadIdx.x == 0) {
        mbar_init(q_full, 1);
        for (int s = 0; s < FA_WG_STAGES; ++s) {
            mbar_init(full_k(s), 1);
            mbar_init(full_v(s), 1);
            mbar_init(empty(s), FA_WG_CONSUMER_THREADS);
        }
        // Make the initialised barriers visible to the async proxy (TMA).
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    }
    __syncthreads();  // the last block-wide barrier: the roles split here

    const int wg = threadIdx.x / 128;
    if (wg == 0) {
        // Producer: one thread issues every copy; the others leave.
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        if (threadIdx.x == 0 && n_tiles > 0) {
            tma_prefetch_map(tm_k);
            tma_prefetch_map(tm_v);
            mbar_expect_tx(q_full, L::Q_BYTES);
            for (int p = 0; p < L::PANELS; ++p)
                tma_load_3d(q_s + p * BM * L::RB, tm_q, L::PW * p, h, qs + i0, q_full);
            for (int t = 0; t < n_tiles; ++t) {
                const int s = t % FA_WG_STAGES;
                const uint32_t ph = (t / FA_WG_STAGES) & 1;
                mbar_wait(empty(s), ph ^ 1);  // both consumers released the stage's last use
                const int j = ks + t * BN;
                mbar_expect_tx(full_k(s), L::KV_BYTES);
                for (int p = 0; p < L::PANELS; ++p)
                    tma_load_3d(k_s + s * L::KV_BYTES + p * BN * L::RB, tm_k, L::PW * p, g, j,
                                full_k(s));
                mbar_expect_tx(full_v(s), L::KV_BYTES);
                for (int p = 0; p < L::PANELS; ++p)
                    tma_load_3d(v_s + s * L::KV_BYTES + p * BN * L::RB, tm_v, L::PW * p, g, j,
                                full_v(s));
            }
        }
        return;
    }

    // Consumers: warpgroup c owns query rows i0 + 64 c .. + 63; warp w of it
    // rows 16 w .. 16 w + 15 (the accumulator layout of wgmma m64nNk16).
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    const int c = wg - 1;
    const int tid = threadIdx.x - 128 * wg;
    const int warp = tid / 32, lane = tid % 32;
    const int group = lane / 4, quad = lane % 4;
    const int wrow0 = i0 + 64 * c;
    const int row_a = wrow0 + 16 * warp + group, row_b = row_a + 8;  // this thread's two rows
    const int vis_a = fa_wg_visible(row_a, lq, lk, causal);
    const int vis_b = fa_wg_visible(row_b, lq, lk, causal);
    // Keys the warpgroup's widest row sees (0: no row of it is a query) and
    // keys every row of it sees (no mask below that).
    const int wg_keys = wrow0 < lq ? fa_wg_visible(min(wrow0 + 63, lq - 1), lq, lk, causal) : 0;
    const int wg_keys_all = wrow0 < lq ? fa_wg_visible(wrow0, lq, lk, causal) : 0;

    float acc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc[i] = 0.0f;
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;  // l: this thread's share
    const float sl2 = scale * FA_WG_LOG2E;
    // Q (its TMA is in flight whenever any tile is) before the first use and
    // before the epilogue reuses Q's rows.
    if (n_tiles > 0) mbar_wait(q_full, 0);

    for (int t = 0; t < n_tiles; ++t) {
        const int s = t % FA_WG_STAGES;
        const uint32_t ph = (t / FA_WG_STAGES) & 1;
        const int j0 = t * BN;
        // Uniform over the warpgroup (wgmma is warpgroup-collective).
        const bool active = j0 < wg_keys;
        uint32_t pa[KP][4];
        mbar_wait(full_k(s), ph);
        if (active) {
            float sc[BN / 2];
            const uint32_t kb = k_s + s * L::KV_BYTES;
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
                // Panel and byte offset inside the panel row of k-step kk.
                const int p = 16 * kk / L::PW, kin = (16 * kk % L::PW) * 2;
                const uint64_t da = wg_desc(q_s + p * BM * L::RB + 64 * c * L::RB + kin, 16,
                                            L::SBO, L::SWIZZLE);
                const uint64_t db = wg_desc(kb + p * BN * L::RB + kin, 16, L::SBO, L::SWIZZLE);
                if (kk == 0)
                    wgmma_ss_n128_first(sc, da, db);
                else
                    wgmma_ss_n128(sc, da, db);
            }
            wg_commit();
            wg_wait<0>();
            wg_pin(sc);

            // sc[4 n + e]: row (e < 2 ? a : b), key j0 + 8 n + 2 quad + (e & 1).
            // Masks only where some row of the warpgroup stops seeing keys
            // (the diagonal for causal, the sequence end otherwise).
            if (j0 + BN > wg_keys_all) {
#pragma unroll
                for (int n = 0; n < NS; ++n) {
                    const int col = j0 + 8 * n + 2 * quad;
                    if (col >= vis_a) sc[4 * n + 0] = -INFINITY;
                    if (col + 1 >= vis_a) sc[4 * n + 1] = -INFINITY;
                    if (col >= vis_b) sc[4 * n + 2] = -INFINITY;
                    if (col + 1 >= vis_b) sc[4 * n + 3] = -INFINITY;
                }
            }
            float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
            for (int n = 0; n < NS; ++n) {
                mx_a = fmaxf(mx_a, fmaxf(sc[4 * n], sc[4 * n + 1]));
                mx_b = fmaxf(mx_b, fmaxf(sc[4 * n + 2], sc[4 * n + 3]));
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
                sc[4 * n + 0] = exp2f(fmaf(sc[4 * n + 0], sl2, -base_a));
                sc[4 * n + 1] = exp2f(fmaf(sc[4 * n + 1], sl2, -base_a));
                sc[4 * n + 2] = exp2f(fmaf(sc[4 * n + 2], sl2, -base_b));
                sc[4 * n + 3] = exp2f(fmaf(sc[4 * n + 3], sl2, -base_b));
                sum_a += sc[4 * n + 0] + sc[4 * n + 1];
                sum_b += sc[4 * n + 2] + sc[4 * n + 3];
            }
            l_a = l_a * alpha_a + sum_a;
            l_b = l_b * alpha_b + sum_b;
#pragma unroll
            for (int n = 0; n < NO; ++n) {
                acc[4 * n + 0] *= alpha_a;
                acc[4 * n + 1] *= alpha_a;
                acc[4 * n + 2] *= alpha_b;
                acc[4 * n + 3] *= alpha_b;
            }
            // Two 8-key accumulator blocks are one k16 A fragment of P.
#pragma unroll
            for (int kk = 0; kk < KP; ++kk) {
                pa[kk][0] = pack_bf16(sc[8 * kk + 0], sc[8 * kk + 1]);
                pa[kk][1] = pack_bf16(sc[8 * kk + 2], sc[8 * kk + 3]);
                pa[kk][2] = pack_bf16(sc[8 * kk + 4], sc[8 * kk + 5]);
                pa[kk][3] = pack_bf16(sc[8 * kk + 6], sc[8 * kk + 7]);
            }
        }
        mbar_wait(full_v(s), ph);
        if (active) {
            const uint32_t vb = v_s + s * L::KV_BYTES;
            wg_pin(acc);
            wg_fence();  // the rescaled acc and the P registers precede the MMAs
#pragma unroll
            for (int kk = 0; kk < KP; ++kk)
                wgmma_rs(acc, pa[kk],
                         wg_desc(vb + kk * 16 * L::RB, BN * L::RB, L::SBO, L::SWIZZLE));
            wg_commit();
            wg_wait<0>();
            wg_pin(acc);
        }
        mbar_arrive(empty(s));  // this thread is done with the stage
    }

    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
    const float inv_a = l_a > 0.0f ? 1.0f / l_a : 0.0f;
    const float inv_b = l_b > 0.0f ? 1.0f / l_b : 0.0f;

    // Stage this warp's 16 rows of O in its own rows of the Q tile (no one
    // reads them any more: this warpgroup's last wgmma has completed, and Q's
    // TMA landed), in Q's swizzled layout, so the 4-byte writes of 8 rows and
    // the 16-byte reads of one row are free of bank conflicts; then 16-byte
    // coalesced stores of the rows that are queries.
    const int lr_a = 64 * c + 16 * warp + group;  // row in the Q tile
#pragma unroll
    for (int n = 0; n < NO; ++n) {
        const int col = 8 * n + 2 * quad;
        *reinterpret_cast<uint32_t*>(gbase + L::Q_OFF + fa_wg_swz<L::PW>(lr_a, col, BM)) =
            pack_bf16(acc[4 * n + 0] * inv_a, acc[4 * n + 1] * inv_a);
        *reinterpret_cast<uint32_t*>(gbase + L::Q_OFF + fa_wg_swz<L::PW>(lr_a + 8, col, BM)) =
            pack_bf16(acc[4 * n + 2] * inv_b, acc[4 * n + 3] * inv_b);
    }
    __syncwarp();
    constexpr int CHUNKS = D / 8;
    for (int idx = lane; idx < 16 * CHUNKS; idx += 32) {
        const int r = idx / CHUNKS, ch = idx - r * CHUNKS;
        const int i = wrow0 + 16 * warp + r;
        if (i < lq) {
            *reinterpret_cast<uint4*>(o + ((size_t)(qs + i) * hq + h) * D + ch * 8) =
                *reinterpret_cast<const uint4*>(
                    gbase + L::Q_OFF + fa_wg_swz<L::PW>(64 * c + 16 * warp + r, ch * 8, BM));
        }
    }
    if (quad == 0) {
        if (row_a < lq)
            lse[(size_t)(qs + row_a) * hq + h] =
                l_a > 0.0f ? (m_a + log2f(l_a)) * FA_WG_LN2 : -INFINITY;
        if (row_b < lq)
            lse[(size_t)(qs + row_b) * hq + h] =
                l_b > 0.0f ? (m_b + log2f(l_b)) * FA_WG_LN2 : -INFINITY;
    }
}

// flash_attn_wgmma_fwd_d{D}: 384 threads, dynamic shared memory
// FaWgLayout<D>::SMEM_BYTES (the launcher mirrors it).
#define FA_WG_FWD(D)                                                                           \
    static_assert(FaWgLayout<D>::SMEM_BYTES <= 227 * 1024, "fits sm_90's shared memory");     \
    extern "C" __global__ void __launch_bounds__(FA_WG_THREADS, 1) flash_attn_wgmma_fwd_d##D(  \
        const __grid_constant__ FaTmap tm_q, const __grid_constant__ FaTmap tm_k,              \
        const __grid_constant__ FaTmap tm_v, const int* cu_q, const int* cu_k, bf16_t* o,      \
        float* lse, int hq, int hkv, float scale, int causal) {                                \
        fa_wg_fwd<D>(&tm_q, &tm_k, &tm_v, cu_q, cu_k, o, lse, hq, hkv, scale, causal);         \
    }

FA_WG_FWD(128)
FA_WG_FWD(80)
FA_WG_FWD(64)

#endif  // sm_90a
