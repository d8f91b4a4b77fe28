// Token log-prob + entropy fused with a chunked lm_head: the logits of one
// vocabulary chunk at a time ([T, chunk_len], from the chunk's GEMM) fold into
// an online per-row state, so the full [T, V] logits never exist; a finishing
// kernel turns the state into logp, entropy and lse. The backward writes the
// gradient of one chunk's logits at a time from the saved lse and entropy.
// CPU twin: src/backend/cpu/logprob.rs (token_logprob_fwd, token_logprob_bwd):
//   logp[t] = z[t, y_t] - lse_t, entropy[t] = lse_t - sum_v p_v z_v,
//   dz = dlogp (onehot(y) - p) - dentropy p (log p + H).
// The _bf16 kernels read bf16 logits (and write bf16 dlogits) with all
// arithmetic and the state in f32: the twin widens the logits, runs the f32
// op and rounds dlogits (ops::cpu_bf16).
#include "common.cuh"
#include "elem.cuh"

// Per row: m = running max, s = sum exp(z - m), w = sum exp(z - m) z.
struct LpState {
    float m, s, w;
};

__device__ __forceinline__ float lp_rescale(float m_old, float m_new) {
    return m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
}

__device__ __forceinline__ void lp_push(LpState& st, float z) {
    if (z > st.m) {
        const float c = lp_rescale(st.m, z);
        st.s *= c;
        st.w *= c;
        st.m = z;
    }
    if (z != -INFINITY) {
        const float e = expf(z - st.m);
        st.s += e;
        if (e > 0.0f) st.w += e * z;
    }
}

__device__ __forceinline__ LpState lp_merge(LpState a, LpState b) {
    LpState r;
    r.m = fmaxf(a.m, b.m);
    const float ca = lp_rescale(a.m, r.m), cb = lp_rescale(b.m, r.m);
    r.s = a.s * ca + b.s * cb;
    r.w = a.w * ca + b.w * cb;
    return r;
}

// One block per row (blockDim a multiple of 32). state[T, 4] = (m, s, w,
// target logit); `first` starts a new pass (the state is overwritten), later
// chunks merge into it. The chunk covers vocabulary ids
// [vocab_offset, vocab_offset + chunk_len); row t of the chunk starts at
// logits + t * ld.
template <typename T>
__device__ __forceinline__ void logprob_chunk(const T* __restrict__ logits, int ld, int rows,
                                              int chunk_len, int vocab_offset,
                                              const unsigned int* __restrict__ targets,
                                              float* __restrict__ state, int first) {
    __shared__ LpState warp_states[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const T* z = logits + (size_t)row * ld;
    LpState st{-INFINITY, 0.0f, 0.0f};
    for (int v = threadIdx.x; v < chunk_len; v += blockDim.x) lp_push(st, elem_ld(z, v));
    for (int off = VPPO_WARP / 2; off > 0; off >>= 1) {
        LpState o;
        o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
        o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
        o.w = __shfl_xor_sync(0xffffffffu, st.w, off);
        st = lp_merge(st, o);
    }
    const int lane = threadIdx.x % VPPO_WARP, warp = threadIdx.x / VPPO_WARP;
    if (lane == 0) warp_states[warp] = st;
    __syncthreads();
    if (threadIdx.x == 0) {
        LpState t = warp_states[0];
        for (int w = 1; w < (int)(blockDim.x / VPPO_WARP); ++w) t = lp_merge(t, warp_states[w]);
        float* out = state + (size_t)row * 4;
        float zt = first ? __int_as_float(0x7fc00000) : out[3];
        if (!first) t = lp_merge(LpState{out[0], out[1], out[2]}, t);
        const long long local = (long long)targets[row] - vocab_offset;
        if (local >= 0 && local < chunk_len) zt = elem_ld(z, (size_t)local);
        out[0] = t.m;
        out[1] = t.s;
        out[2] = t.w;
        out[3] = zt;
    }
}

// logp = zt - lse, entropy = lse - w / s, lse = m + log s; one thread per row.
// A target outside the vocabulary never met its logit: logp is NaN.
extern "C" __global__ void logprob_finish_f32(const float* __restrict__ state,
                                              float* __restrict__ logp,
                                              float* __restrict__ entropy,
                                              float* __restrict__ lse, int rows) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    const float* st = state + (size_t)row * 4;
    const float l = st[0] + logf(st[1]);
    lse[row] = l;
    logp[row] = st[3] - l;
    entropy[row] = l - st[2] / st[1];
}

// dlogits of one chunk (same layout and ld as the logits), grid-stride.
template <typename T>
__device__ __forceinline__ void logprob_bwd_chunk(
    const T* __restrict__ logits, int ld, int rows, int chunk_len, int vocab_offset,
    const unsigned int* __restrict__ targets, const float* __restrict__ lse,
    const float* __restrict__ entropy, const float* __restrict__ dlogp,
    const float* __restrict__ dentropy, T* __restrict__ dlogits) {
    const size_t n = (size_t)rows * chunk_len;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (size_t)gridDim.x * blockDim.x) {
        const int t = (int)(idx / chunk_len), v = (int)(idx % chunk_len);
        const size_t at = (size_t)t * ld + v;
        const float logp_v = elem_ld(logits, at) - lse[t];
        const float p = expf(logp_v);
        const float onehot = (long long)targets[t] == (long long)vocab_offset + v ? 1.0f : 0.0f;
        const float d_ent = p > 0.0f ? -p * (logp_v + entropy[t]) : 0.0f;
        elem_st(dlogits, at, dlogp[t] * (onehot - p) + dentropy[t] * d_ent);
    }
}

#define LOGPROB_INSTANTIATE(T, SUF)                                                          \
    extern "C" __global__ void logprob_chunk_##SUF(const T* logits, int ld, int rows,        \
                                                   int chunk_len, int vocab_offset,          \
                                                   const unsigned int* targets, float* state, \
                                                   int first) {                              \
        logprob_chunk<T>(logits, ld, rows, chunk_len, vocab_offset, targets, state, first);  \
    }                                                                                        \
    extern "C" __global__ void logprob_bwd_chunk_##SUF(                                      \
        const T* logits, int ld, int rows, int chunk_len, int vocab_offset,                  \
        const unsigned int* targets, const float* lse, const float* entropy,                 \
        const float* dlogp, const float* dentropy, T* dlogits) {                             \
        logprob_bwd_chunk<T>(logits, ld, rows, chunk_len, vocab_offset, targets, lse,        \
                             entropy, dlogp, dentropy, dlogits);                             \
    }

LOGPROB_INSTANTIATE(float, f32)
LOGPROB_INSTANTIATE(bf16_t, bf16)
