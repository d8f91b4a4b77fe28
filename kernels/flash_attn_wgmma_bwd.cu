// Flash attention backward for Hopper (sm_90a) in the FlashAttention-3
// structure: TMA loads, warp specialisation, warpgroup MMA (wgmma).
// vppo: needs sm_90a
//
// Same contract as flash_attn_tc.cu's backward (bf16 q/k/v/o/dO in the
// packed varlen layout [T, heads, D] with cu_seqlens, f32 natural-log lse,
// causal aligning the ends or bidirectional, GQA; dk/dv summed over the query
// heads of a kv head's group; a query row that sees no key contributes
// nothing). delta = rowsum(dO * O) comes from flash_attn_bwd_delta_bf16 and
// the f32 dq accumulator goes to bf16 through flash_attn_tc_dq_convert, as
// for the FA2 backward. Launcher: src/backend/cuda/flash_attn_wgmma_bwd.rs.
//
// Block: 3 warpgroups (384 threads) per (BN = 128 keys, kv head, sequence).
//  - warpgroup 0 is the producer. Thread 0 loads the K and V tiles once
//    (kv_full) and streams the (query head, 64-row query tile) walk's Q and
//    dO tiles through a 2-stage ring with TMA; warp 1 copies the tile's lse
//    (in log2 units, +inf where P must be 0) and delta rows into the same
//    stage with plain loads. full[s] completes on TMA's bytes plus warp 1's
//    32 arrivals; empty[s] on the 256 consumer threads' arrivals.
//  - warpgroups 1 and 2 are consumers of 64 keys each. Per query tile, with
//    the transposed products so that keys are wgmma's M (their rows) and the
//    per-key dK, dV accumulators stay in registers over the whole walk (no
//    atomics on dK, dV: every query head of the group is visited here):
//      S^T = K Q^T, dP^T = V dO^T        (SS: A = K / V, B = Q / dO, K-major)
//      P^T = exp2(S^T scale log2 e - lse log2 e), masked;  dS^T = P^T (dP^T - delta)
//      dV += P^T dO, dK += dS^T Q         (RS: A = the packed accumulators,
//                                          B = dO / Q MN-major)
//      dQ_part = dS K                     (SS: A = dS^T staged in shared memory
//                                          read MN-major, B = K MN-major)
//    and dQ_part * scale is added into the f32 dq accumulator with vector
//    reductions (red.global.add.v2.f32; the other warpgroup and the other
//    key blocks add into the same rows).
//  setmaxnreg moves registers from the producer (24) to the consumers (240).
//
// Shared memory: K, V, Q and dO tiles in the forward's panel layout (panels
// of PW head-dim columns whose rows are one swizzle span; see
// flash_attn_wgmma.cu), one panel per TMA box. dS^T of a warpgroup is a
// [64 keys][64 queries] bf16 tile with 128-byte rows and the 128-byte
// swizzle for every head dim, so that read as the A of dS K it is a
// single MN-major swizzle atom along M. scripts/check_wgmma_bwd.py emulates
// the layouts, descriptors, fragments and the block's algorithm on the host.
#include "mma_bf16.cuh"

#include <math.h>
#include <stdint.h>

// build.rs compiles this file for sm_90a alone (its marker line), and the
// backend loads it on compute capability 9.0 only.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#include "wgmma_sm90.cuh"

constexpr int FA_WB_BN = 128;  // keys per block (2 consumer warpgroups x 64)
constexpr int FA_WB_QT = 64;   // query rows per tile (wgmma N of S^T, M of dQ)
constexpr int FA_WB_STAGES = 2;
constexpr int FA_WB_THREADS = 384;
constexpr int FA_WB_CONSUMER_THREADS = 256;
constexpr int FA_WB_DS_BYTES = 64 * FA_WB_QT * 2;  // one warpgroup's dS^T tile

template <int D>
struct FaWbLayout {
    static_assert(D == 64 || D == 80 || D == 128, "head dims with a shared-memory layout");
    static constexpr int PW = D % 64 == 0 ? 64 : 16;  // columns per panel
    static constexpr int RB = 2 * PW;                 // bytes per panel row = swizzle span
    static constexpr int PANELS = D / PW;
    static constexpr int SBO = 8 * RB;  // bytes between 8-row groups
    static constexpr uint64_t SWIZZLE = RB == 128 ? 1 : 3;
    static constexpr int KV_BYTES = PANELS * FA_WB_BN * RB;
    static constexpr int QT_BYTES = PANELS * FA_WB_QT * RB;
    static constexpr int K_OFF = 0;
    static constexpr int V_OFF = KV_BYTES;
    static constexpr int Q_OFF = 2 * KV_BYTES;
    static constexpr int DO_OFF = Q_OFF + FA_WB_STAGES * QT_BYTES;
    static constexpr int DS_OFF = DO_OFF + FA_WB_STAGES * QT_BYTES;
    // Per stage: QT lse values (log2 units), then QT delta values (f32).
    static constexpr int LSE_OFF = DS_OFF + 2 * FA_WB_DS_BYTES;
    static constexpr int BAR_OFF = LSE_OFF + FA_WB_STAGES * 2 * FA_WB_QT * 4;
    // 5 barriers (kv_full, full[2], empty[2]) in 64 bytes, plus 1024 bytes to
    // round the dynamic window up to the swizzle period.
    static constexpr int SMEM_BYTES = BAR_OFF + 64 + 1024;
};

// S^T or dP^T (64 keys x 64 queries, f32) = or += K Q^T for one k16 step;
// A and B from shared memory, both K-major.
template <int ACC>
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], uint64_t a, uint64_t b) {
    if constexpr (ACC == 0) {
        asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " FA_WG_ACC32
                     ", %32, %33, 0, 1, 1, 0, 0;\n"
                     : FA_WG_F32(FA_WG_WO, d, 0)
                     : "l"(a), "l"(b));
    } else {
        asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " FA_WG_ACC32
                     ", %32, %33, 1, 1, 1, 0, 0;\n"
                     : FA_WG_F32(FA_WG_RW, d, 0)
                     : "l"(a), "l"(b));
    }
}

// dQ part (64 queries x D, f32) = or += dS K for one k16 step over keys:
// A = dS from the dS^T tile (MN-major: imm-trans-a = 1), B = K (MN-major:
// imm-trans-b = 1), both from shared memory.
template <int ACC>
__device__ __forceinline__ void wgmma_ss_tt(float (&d)[64], uint64_t a, uint64_t b) {
    if constexpr (ACC == 0) {
        asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " FA_WG_ACC64
                     ", %64, %65, 0, 1, 1, 1, 1;\n"
                     : FA_WG_F32(FA_WG_WO, d, 0), FA_WG_F32(FA_WG_WO, d, 32)
                     : "l"(a), "l"(b));
    } else {
        asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " FA_WG_ACC64
                     ", %64, %65, 1, 1, 1, 1, 1;\n"
                     : FA_WG_F32(FA_WG_RW, d, 0), FA_WG_F32(FA_WG_RW, d, 32)
                     : "l"(a), "l"(b));
    }
}
template <int ACC>
__device__ __forceinline__ void wgmma_ss_tt(float (&d)[40], uint64_t a, uint64_t b) {
    if constexpr (ACC == 0) {
        asm volatile("wgmma.mma_async.sync.aligned.m64n80k16.f32.bf16.bf16 " FA_WG_ACC40
                     ", %40, %41, 0, 1, 1, 1, 1;\n"
                     : FA_WG_F32(FA_WG_WO, d, 0), FA_WG_F8(FA_WG_WO, d, 32)
                     : "l"(a), "l"(b));
    } else {
        asm volatile("wgmma.mma_async.sync.aligned.m64n80k16.f32.bf16.bf16 " FA_WG_ACC40
                     ", %40, %41, 1, 1, 1, 1, 1;\n"
                     : FA_WG_F32(FA_WG_RW, d, 0), FA_WG_F8(FA_WG_RW, d, 32)
                     : "l"(a), "l"(b));
    }
}
template <int ACC>
__device__ __forceinline__ void wgmma_ss_tt(float (&d)[32], uint64_t a, uint64_t b) {
    if constexpr (ACC == 0) {
        asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " FA_WG_ACC32
                     ", %32, %33, 0, 1, 1, 1, 1;\n"
                     : FA_WG_F32(FA_WG_WO, d, 0)
                     : "l"(a), "l"(b));
    } else {
        asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " FA_WG_ACC32
                     ", %32, %33, 1, 1, 1, 1, 1;\n"
                     : FA_WG_F32(FA_WG_RW, d, 0)
                     : "l"(a), "l"(b));
    }
}

// Two adjacent f32 added into global memory by one reduction (sm_90's
// vector red; the address is 8-byte aligned: an even column of a row of D
// floats, D even).
__device__ __forceinline__ void red_add_v2(float* at, float a, float b) {
    asm volatile("red.relaxed.gpu.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(at), "f"(a), "f"(b)
                 : "memory");
}

// Synchronises the 128 threads of consumer warpgroup c (named barrier 1 + c;
// 0 is __syncthreads').
__device__ __forceinline__ void wg_bar_sync(int c) {
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + c) : "memory");
}

// lse of a query row in log2 units for the exp2 of P, +inf where P must be
// 0: rows past the sequence and rows that saw no key (lse = -inf or NaN).
__device__ __forceinline__ float fa_wb_lse_log2(const float* __restrict__ lse, size_t at,
                                                bool valid) {
    if (!valid) return INFINITY;
    const float l = lse[at];
    return (l > -INFINITY && l < INFINITY) ? l * FA_WG_LOG2E : INFINITY;
}

// grid (ceil(max_seqlen_k / 128), kv_heads, seqs), block 384.
template <int D>
__device__ __forceinline__ void fa_wg_bwd(const FaTmap* tm_q, const FaTmap* tm_k,
                                          const FaTmap* tm_v, const FaTmap* tm_do,
                                          const float* __restrict__ lse,
                                          const float* __restrict__ delta,
                                          const int* __restrict__ cu_q,
                                          const int* __restrict__ cu_k,
                                          float* __restrict__ dq_acc, bf16_t* __restrict__ dk,
                                          bf16_t* __restrict__ dv, int hq, int hkv, float scale,
                                          int causal) {
    using L = FaWbLayout<D>;
    constexpr int BN = FA_WB_BN, QT = FA_WB_QT;
    constexpr int KD = D / 16;   // k-steps of S^T, dP^T (over the head dim)
    constexpr int NQ = QT / 8;   // 8-query column blocks of S^T
    constexpr int KQ = QT / 16;  // k-steps of dV, dK (over queries)
    constexpr int KK = 64 / 16;  // k-steps of dQ (over the warpgroup's keys)
    constexpr int NO = D / 8;    // 8-dim column blocks of dK, dV, dQ
    extern __shared__ __align__(1024) unsigned char fa_wb_smem[];
    // Round up to the swizzle period (TMA and wgmma swizzle on address bits).
    const uint32_t raw = smem_addr(fa_wb_smem);
    const uint32_t base = (raw + 1023u) & ~1023u;
    unsigned char* const gbase = fa_wb_smem + (base - raw);
    const uint32_t k_s = base + L::K_OFF, v_s = base + L::V_OFF;
    const uint32_t q_s = base + L::Q_OFF, do_s = base + L::DO_OFF;
    const uint32_t bar = base + L::BAR_OFF;
    const uint32_t kv_full = bar;
    auto full = [&](int s) { return bar + 8 + 8 * s; };
    auto empty = [&](int s) { return bar + 8 + 8 * FA_WB_STAGES + 8 * s; };
    auto lse_row = [&](int s) {
        return reinterpret_cast<float*>(gbase + L::LSE_OFF + s * 2 * QT * 4);
    };

    const int seq = blockIdx.z, g = blockIdx.y, j0 = blockIdx.x * BN;
    const int qs = cu_q[seq], lq = cu_q[seq + 1] - qs;
    const int ks = cu_k[seq], lk = cu_k[seq + 1] - ks;
    if (j0 >= lk) return;  // uniform over the block, before any barrier
    const int group_size = hq / hkv;
    const int shift = lk - lq;  // causal: query i sees key j iff j <= i + shift
    // The first query tile with a query that sees key j0, and the tile count.
    const int qt_first = causal ? max(0, j0 - shift) / QT : 0;
    const int n_qt = max(0, (lq + QT - 1) / QT - qt_first);
    const int total = group_size * n_qt;

    if (threadIdx.x == 0) {
        mbar_init(kv_full, 1);
        for (int s = 0; s < FA_WB_STAGES; ++s) {
            mbar_init(full(s), 1 + 32);  // TMA's expect_tx arrival + warp 1's lanes
            mbar_init(empty(s), FA_WB_CONSUMER_THREADS);
        }
        // Make the initialised barriers visible to the async proxy (TMA).
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    }
    __syncthreads();  // the last block-wide barrier: the roles split here

    const int wg = threadIdx.x / 128;
    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        if (warp == 0 && lane == 0) {
            tma_prefetch_map(tm_q);
            tma_prefetch_map(tm_do);
            // K and V once, whatever the walk: the consumers stage dK and dV
            // in their rows, so the copies must have landed even for none.
            mbar_expect_tx(kv_full, 2 * L::KV_BYTES);
            for (int p = 0; p < L::PANELS; ++p) {
                tma_load_3d(k_s + p * BN * L::RB, tm_k, L::PW * p, g, ks + j0, kv_full);
                tma_load_3d(v_s + p * BN * L::RB, tm_v, L::PW * p, g, ks + j0, kv_full);
            }
            for (int t = 0; t < total; ++t) {
                const int s = t % FA_WB_STAGES;
                const uint32_t ph = (t / FA_WB_STAGES) & 1;
                const int h = g * group_size + t / n_qt;
                const int i0 = (qt_first + t % n_qt) * QT;
                mbar_wait(empty(s), ph ^ 1);  // both consumers released the stage's last use
                mbar_expect_tx(full(s), 2 * L::QT_BYTES);
                for (int p = 0; p < L::PANELS; ++p) {
                    tma_load_3d(q_s + s * L::QT_BYTES + p * QT * L::RB, tm_q, L::PW * p, h,
                                qs + i0, full(s));
                    tma_load_3d(do_s + s * L::QT_BYTES + p * QT * L::RB, tm_do, L::PW * p, h,
                                qs + i0, full(s));
                }
            }
        } else if (warp == 1) {
            for (int t = 0; t < total; ++t) {
                const int s = t % FA_WB_STAGES;
                const uint32_t ph = (t / FA_WB_STAGES) & 1;
                const int h = g * group_size + t / n_qt;
                const int i0 = (qt_first + t % n_qt) * QT;
                mbar_wait(empty(s), ph ^ 1);
                float* const row = lse_row(s);
                for (int r = lane; r < QT; r += 32) {
                    const size_t at = (size_t)(qs + i0 + r) * hq + h;
                    const bool valid = i0 + r < lq;
                    row[r] = fa_wb_lse_log2(lse, at, valid);
                    row[QT + r] = valid ? delta[at] : 0.0f;
                }
                mbar_arrive(full(s));  // release: the rows are visible to the waiters
            }
        }
        return;
    }

    // Consumers: warpgroup c owns keys j0 + 64 c .. + 63 (wgmma's M); warp w
    // of it keys 16 w .. 16 w + 15 (the m64nNk16 accumulator layout).
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    const int c = wg - 1;
    const int tid = threadIdx.x - 128 * wg;
    const int warp = tid / 32, lane = tid % 32;
    const int group = lane / 4, quad = lane % 4;
    const int wk0 = j0 + 64 * c;                     // the warpgroup's first key
    const int key_a = wk0 + 16 * warp + group, key_b = key_a + 8;  // this thread's two keys
    const uint32_t ds_s = base + L::DS_OFF + c * FA_WB_DS_BYTES;
    unsigned char* const ds_g = gbase + L::DS_OFF + c * FA_WB_DS_BYTES;

    float dk_acc[D / 2], dv_acc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dk_acc[i] = dv_acc[i] = 0.0f;
    const float sl2 = scale * FA_WG_LOG2E;
    mbar_wait(kv_full, 0);

    for (int t = 0; t < total; ++t) {
        const int s = t % FA_WB_STAGES;
        const uint32_t ph = (t / FA_WB_STAGES) & 1;
        const int h = g * group_size + t / n_qt;
        const int i0 = (qt_first + t % n_qt) * QT;
        const int last_q = min(i0 + QT, lq) - 1;
        // Uniform over the warpgroup (wgmma is warpgroup-collective): some
        // key of it exists and some query of the tile sees it.
        const bool active = wk0 < lk && (!causal || wk0 <= last_q + shift);
        // Masks only where some (key, query) pair of the tile is not seen.
        const bool need_mask = wk0 + 64 > lk || (causal && wk0 + 63 > i0 + shift);
        float dq[D / 2];
        mbar_wait(full(s), ph);
        if (active) {
            const uint32_t qb = q_s + s * L::QT_BYTES, dob = do_s + s * L::QT_BYTES;
            const float* const lse_b = lse_row(s);
            const float* const delta_b = lse_b + QT;
            float st[QT / 2], dpt[QT / 2];
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
                const int p = 16 * kk / L::PW, kin = (16 * kk % L::PW) * 2;
                const uint32_t a_off = p * BN * L::RB + 64 * c * L::RB + kin;
                const uint32_t b_off = p * QT * L::RB + kin;
                const uint64_t da = wg_desc(k_s + a_off, 16, L::SBO, L::SWIZZLE);
                const uint64_t db = wg_desc(qb + b_off, 16, L::SBO, L::SWIZZLE);
                if (kk == 0)
                    wgmma_ss_n64<0>(st, da, db);
                else
                    wgmma_ss_n64<1>(st, da, db);
            }
            wg_commit();
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
                const int p = 16 * kk / L::PW, kin = (16 * kk % L::PW) * 2;
                const uint32_t a_off = p * BN * L::RB + 64 * c * L::RB + kin;
                const uint32_t b_off = p * QT * L::RB + kin;
                const uint64_t da = wg_desc(v_s + a_off, 16, L::SBO, L::SWIZZLE);
                const uint64_t db = wg_desc(dob + b_off, 16, L::SBO, L::SWIZZLE);
                if (kk == 0)
                    wgmma_ss_n64<0>(dpt, da, db);
                else
                    wgmma_ss_n64<1>(dpt, da, db);
            }
            wg_commit();
            wg_wait<1>();  // S^T landed; dP^T may still be in flight
            wg_pin(st);

            // st[4 n + e]: key (e < 2 ? a : b), query i0 + 8 n + 2 quad + (e & 1).
#pragma unroll
            for (int n = 0; n < NQ; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = 8 * n + 2 * quad + (e & 1);
                    const int key = e < 2 ? key_a : key_b;
                    float p = exp2f(fmaf(st[4 * n + e], sl2, -lse_b[col]));
                    if (need_mask && (key >= lk || (causal && key > i0 + col + shift))) p = 0.0f;
                    st[4 * n + e] = p;
                }
            }
            wg_wait<0>();
            wg_pin(dpt);
            // dS^T = P^T (dP^T - delta) in f32, then both as k16 A fragments
            // (two 8-query accumulator blocks each).
            uint32_t pa[KQ][4], dsa[KQ][4];
#pragma unroll
            for (int kq = 0; kq < KQ; ++kq) {
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const int i = 8 * kq + 2 * r, col = 16 * kq + 8 * (r / 2) + 2 * quad;
                    pa[kq][r] = pack_bf16(st[i], st[i + 1]);
                    dsa[kq][r] = pack_bf16(st[i] * (dpt[i] - delta_b[col]),
                                           st[i + 1] * (dpt[i + 1] - delta_b[col + 1]));
                }
            }
            // Every warp of the warpgroup is past its last tile's dQ wgmma
            // (which read dS^T) before anyone overwrites dS^T.
            wg_bar_sync(c);
            // dS^T rows of this thread's keys (local 16 w + group, + 8) in
            // the 128-byte-swizzled [64 keys][64 queries] tile.
            const int lr = 16 * warp + group;
#pragma unroll
            for (int kq = 0; kq < KQ; ++kq) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int col = 16 * kq + 8 * half + 2 * quad;
                    *reinterpret_cast<uint32_t*>(ds_g + fa_wg_swz<64>(lr, col, 64)) =
                        dsa[kq][2 * half];
                    *reinterpret_cast<uint32_t*>(ds_g + fa_wg_swz<64>(lr + 8, col, 64)) =
                        dsa[kq][2 * half + 1];
                }
            }
            // The generic-proxy writes of dS^T before the async proxy (wgmma)
            // reads them, for every thread of the warpgroup.
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
            wg_pin(dk_acc);
            wg_pin(dv_acc);
            wg_fence();  // the fragments and accumulators precede the MMAs
#pragma unroll
            for (int kq = 0; kq < KQ; ++kq) {
                const uint32_t at = kq * 16 * L::RB;
                wgmma_rs(dv_acc, pa[kq], wg_desc(dob + at, QT * L::RB, L::SBO, L::SWIZZLE));
                wgmma_rs(dk_acc, dsa[kq], wg_desc(qb + at, QT * L::RB, L::SBO, L::SWIZZLE));
            }
            wg_commit();
            wg_bar_sync(c);  // dS^T complete
            // dV and dK done before dQ's accumulators are born: the P^T and
            // dS^T fragments (operands in flight until then) die here, which
            // keeps d = 128 within the 240 registers without serialising.
            wg_wait<0>();
            wg_pin(dk_acc);
            wg_pin(dv_acc);
            wg_fence();  // dq's registers were last read by the previous tile's reductions
#pragma unroll
            for (int kk = 0; kk < KK; ++kk) {
                // A: dS^T keys 16 kk .. + 15 (128-byte rows, 8-key groups
                // 1024 bytes apart; M = 64 queries is one swizzle atom, so
                // LBO is unused). B: K rows of the same keys, MN-major.
                const uint64_t da = wg_desc(ds_s + kk * 16 * 128, 16, 1024, 1);
                const uint64_t db = wg_desc(k_s + (64 * c + 16 * kk) * L::RB, BN * L::RB, L::SBO,
                                            L::SWIZZLE);
                if (kk == 0)
                    wgmma_ss_tt<0>(dq, da, db);
                else
                    wgmma_ss_tt<1>(dq, da, db);
            }
            wg_commit();
            wg_wait<0>();
            wg_pin(dk_acc);
            wg_pin(dv_acc);
            wg_pin(dq);
        }
        mbar_arrive(empty(s));  // this thread is done with the stage's Q, dO, lse, delta
        if (active) {
            // dq[4 n + e]: query i0 + 16 w + group (+ 8 for e >= 2), dim 8 n + 2 quad + (e & 1).
            const int qa = i0 + 16 * warp + group, qb2 = qa + 8;
            float* const row_a = dq_acc + ((size_t)(qs + qa) * hq + h) * D + 2 * quad;
            float* const row_b = dq_acc + ((size_t)(qs + qb2) * hq + h) * D + 2 * quad;
#pragma unroll
            for (int n = 0; n < NO; ++n) {
                if (qa < lq) red_add_v2(row_a + 8 * n, scale * dq[4 * n], scale * dq[4 * n + 1]);
                if (qb2 < lq)
                    red_add_v2(row_b + 8 * n, scale * dq[4 * n + 2], scale * dq[4 * n + 3]);
            }
        }
    }

    // Stage this warp's 16 rows of dK (times scale) and dV in its own rows of
    // the K and V tiles (only this warpgroup's wgmmas read those rows;
    // kv_full made the TMA writes land), in their swizzled layout; then
    // 16-byte coalesced stores of the keys. PTX promises a wgmma complete
    // only to the thread that waited on it, so the whole warpgroup passes
    // its last wait before any warp overwrites K rows the dQ wgmma read.
    wg_bar_sync(c);
    const int lr_k = 64 * c + 16 * warp + group;  // row in the K/V tile
#pragma unroll
    for (int n = 0; n < NO; ++n) {
        const int col = 8 * n + 2 * quad;
        *reinterpret_cast<uint32_t*>(gbase + L::K_OFF + fa_wg_swz<L::PW>(lr_k, col, BN)) =
            pack_bf16(scale * dk_acc[4 * n + 0], scale * dk_acc[4 * n + 1]);
        *reinterpret_cast<uint32_t*>(gbase + L::K_OFF + fa_wg_swz<L::PW>(lr_k + 8, col, BN)) =
            pack_bf16(scale * dk_acc[4 * n + 2], scale * dk_acc[4 * n + 3]);
        *reinterpret_cast<uint32_t*>(gbase + L::V_OFF + fa_wg_swz<L::PW>(lr_k, col, BN)) =
            pack_bf16(dv_acc[4 * n + 0], dv_acc[4 * n + 1]);
        *reinterpret_cast<uint32_t*>(gbase + L::V_OFF + fa_wg_swz<L::PW>(lr_k + 8, col, BN)) =
            pack_bf16(dv_acc[4 * n + 2], dv_acc[4 * n + 3]);
    }
    __syncwarp();
    constexpr int CHUNKS = D / 8;
    for (int idx = lane; idx < 16 * CHUNKS; idx += 32) {
        const int r = idx / CHUNKS, ch = idx - r * CHUNKS;
        const int j = wk0 + 16 * warp + r;
        if (j < lk) {
            const size_t at = ((size_t)(ks + j) * hkv + g) * D + ch * 8;
            const int lr = 64 * c + 16 * warp + r;
            *reinterpret_cast<uint4*>(dk + at) = *reinterpret_cast<const uint4*>(
                gbase + L::K_OFF + fa_wg_swz<L::PW>(lr, ch * 8, BN));
            *reinterpret_cast<uint4*>(dv + at) = *reinterpret_cast<const uint4*>(
                gbase + L::V_OFF + fa_wg_swz<L::PW>(lr, ch * 8, BN));
        }
    }
}

// flash_attn_wgmma_bwd_d{D}: 384 threads, dynamic shared memory
// FaWbLayout<D>::SMEM_BYTES (the launcher mirrors it).
#define FA_WG_BWD(D)                                                                            \
    static_assert(FaWbLayout<D>::SMEM_BYTES <= 227 * 1024, "fits sm_90's shared memory");      \
    extern "C" __global__ void __launch_bounds__(FA_WB_THREADS, 1) flash_attn_wgmma_bwd_d##D(   \
        const __grid_constant__ FaTmap tm_q, const __grid_constant__ FaTmap tm_k,               \
        const __grid_constant__ FaTmap tm_v, const __grid_constant__ FaTmap tm_do,              \
        const float* lse, const float* delta, const int* cu_q, const int* cu_k, float* dq_acc,  \
        bf16_t* dk, bf16_t* dv, int hq, int hkv, float scale, int causal) {                     \
        fa_wg_bwd<D>(&tm_q, &tm_k, &tm_v, &tm_do, lse, delta, cu_q, cu_k, dq_acc, dk, dv, hq,   \
                     hkv, scale, causal);                                                       \
    }

FA_WG_BWD(128)
FA_WG_BWD(80)
FA_WG_BWD(64)

#endif  // sm_90a
