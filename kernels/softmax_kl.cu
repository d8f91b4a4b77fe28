// Per-row KL(softmax(p) || softmax(q)) over the full vocabulary in one pass,
// and the k3 visual-dependency estimator from two gathered log-probs.
// CPU twin: src/backend/cpu/softmax_kl.rs (softmax_kl_fwd, dependency_k3).
#include "common.cuh"

// Online state over a slice of the vocabulary:
//   mp, sp: running max and sum of exp(zp - mp)   (same for q)
//   acc:    sum of exp(zp - mp) * (zp - zq)
struct KlState {
    float mp, sp, mq, sq, acc;
};

__device__ __forceinline__ KlState kl_empty() {
    return KlState{-INFINITY, 0.0f, -INFINITY, 0.0f, 0.0f};
}

__device__ __forceinline__ float rescale(float m_old, float m_new) {
    return m_old == -INFINITY ? 0.0f : __expf(m_old - m_new);
}

__device__ __forceinline__ void kl_push(KlState& s, float zp, float zq) {
    if (zp > s.mp) {
        const float c = rescale(s.mp, zp);
        s.sp *= c;
        s.acc *= c;
        s.mp = zp;
    }
    if (zq > s.mq) {
        s.sq *= rescale(s.mq, zq);
        s.mq = zq;
    }
    if (zp != -INFINITY) {
        const float e = expf(zp - s.mp);
        s.sp += e;
        s.acc += e * (zp - zq);
    }
    if (zq != -INFINITY) s.sq += expf(zq - s.mq);
}

__device__ __forceinline__ KlState kl_merge(KlState a, KlState b) {
    KlState r;
    r.mp = fmaxf(a.mp, b.mp);
    r.mq = fmaxf(a.mq, b.mq);
    const float ca = rescale(a.mp, r.mp), cb = rescale(b.mp, r.mp);
    r.sp = a.sp * ca + b.sp * cb;
    r.acc = a.acc * ca + b.acc * cb;
    r.sq = a.sq * rescale(a.mq, r.mq) + b.sq * rescale(b.mq, r.mq);
    return r;
}

__device__ __forceinline__ KlState kl_shfl(KlState s, int offset) {
    KlState o;
    o.mp = __shfl_xor_sync(0xffffffffu, s.mp, offset);
    o.sp = __shfl_xor_sync(0xffffffffu, s.sp, offset);
    o.mq = __shfl_xor_sync(0xffffffffu, s.mq, offset);
    o.sq = __shfl_xor_sync(0xffffffffu, s.sq, offset);
    o.acc = __shfl_xor_sync(0xffffffffu, s.acc, offset);
    return o;
}

// One block per row; blockDim.x a multiple of 32, at most 1024.
// kl[row] = sum_v p_v (log p_v - log q_v); lse_p/lse_q are saved for a backward.
extern "C" __global__ void softmax_kl_fwd_f32(const float* __restrict__ logits_p,
                                              const float* __restrict__ logits_q,
                                              float* __restrict__ kl,
                                              float* __restrict__ lse_p,
                                              float* __restrict__ lse_q,
                                              int rows, int vocab) {
    __shared__ KlState warp_states[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const float* zp = logits_p + (size_t)row * vocab;
    const float* zq = logits_q + (size_t)row * vocab;
    KlState s = kl_empty();
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) kl_push(s, zp[v], zq[v]);
    for (int offset = VPPO_WARP / 2; offset > 0; offset >>= 1) s = kl_merge(s, kl_shfl(s, offset));
    const int lane = threadIdx.x % VPPO_WARP, warp = threadIdx.x / VPPO_WARP;
    if (lane == 0) warp_states[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        KlState t = warp_states[0];
        for (int w = 1; w < (int)(blockDim.x / VPPO_WARP); ++w) t = kl_merge(t, warp_states[w]);
        const float lp = t.mp + logf(t.sp);
        const float lq = t.mq + logf(t.sq);
        // sum p (zp - zq) - lse_p + lse_q
        kl[row] = t.acc / t.sp - lp + lq;
        lse_p[row] = lp;
        lse_q[row] = lq;
    }
}

// S = clamp(exp(d) - d - 1, 0, 10) with d = clamp(lp_mask - lp_orig, -20, 20).
extern "C" __global__ void dependency_k3_f32(const float* __restrict__ lp_orig,
                                             const float* __restrict__ lp_mask,
                                             float* __restrict__ score, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float d = fminf(fmaxf(lp_mask[i] - lp_orig[i], -20.0f), 20.0f);
    score[i] = fminf(fmaxf(expf(d) - d - 1.0f, 0.0f), 10.0f);
}
