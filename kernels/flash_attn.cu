// Flash attention over packed variable-length sequences (cu_seqlens), fp32:
// forward with online softmax and saved log-sum-exp, and the backward that
// recomputes probabilities tile by tile. No [L, L] matrix ever exists.
// CPU twin: src/backend/cpu/flash_attn.rs (attention_fwd, attention_bwd with
// VarlenAttention); same contract:
//   q[Tq, q_heads, D], k/v[Tk, kv_heads, D], o[Tq, q_heads, D], lse[Tq, q_heads];
//   query head h reads kv head h / (q_heads / kv_heads);
//   causal aligns the ends: query i of a sequence (Lq queries, Lk keys) sees
//   keys j <= i + Lk - Lq; a query that sees no key gets o = 0, lse = -inf.
// Head dims 80 (vision) and 128 (text), plus 16 and 64, are instantiated, each on f32 and on
// bf16 storage (q, k, v, o, dout, dq, dk, dv in bf16; lse, delta and all
// arithmetic in f32; the _bf16 twin is the f32 op between cpu::cast
// conversions).
//
// Layout of the work: a block of 128 threads owns a 32-row tile; thread t
// owns row t / 4 of the tile and the columns (t % 4) + 4 c of every product,
// so the 4 threads of a row reduce with two shuffles. Tiles live in shared
// memory with a +1 row pad (no bank conflicts on the column walks).
#include "common.cuh"
#include "elem.cuh"

#define FA_TILE 32
#define FA_THREADS 128

// Keys query i may see (see the header).
__device__ __forceinline__ int fa_visible(int i, int lq, int lk, int causal) {
    if (!causal) return lk;
    return max(0, min(i + 1 + lk - lq, lk));
}

// Rows [row0, row0 + valid) of head h of a [T, heads, D] tensor into
// tile[FA_TILE][D + 1]; rows past `valid` are zero.
template <int D, typename T>
__device__ __forceinline__ void fa_load_tile(float* __restrict__ tile,
                                             const T* __restrict__ src, int row0,
                                             int valid, int heads, int h) {
    constexpr int LD = D + 1;
    for (int idx = threadIdx.x; idx < FA_TILE * D; idx += FA_THREADS) {
        const int r = idx / D, d = idx - r * D;
        tile[r * LD + d] = r < valid ? elem_ld(src, ((size_t)(row0 + r) * heads + h) * D + d) : 0.0f;
    }
}

// Shared memory: q tile, k-then-v tile, probability tile.
template <int D>
constexpr int fa_fwd_smem_floats() {
    return 2 * FA_TILE * (D + 1) + FA_TILE * (FA_TILE + 1);
}

// grid (ceil(max_seqlen_q / 32), q_heads, seqs), block 128.
template <int D, typename T>
__device__ __forceinline__ void flash_fwd(const T* __restrict__ q,
                                          const T* __restrict__ k,
                                          const T* __restrict__ v,
                                          const int* __restrict__ cu_q,
                                          const int* __restrict__ cu_k,
                                          T* __restrict__ o, float* __restrict__ lse,
                                          int hq, int hkv, float scale, int causal) {
    static_assert(D % 4 == 0, "head_dim must be a multiple of 4");
    constexpr int LD = D + 1, DC = D / 4, PLD = FA_TILE + 1;
    extern __shared__ float smem[];
    float* q_t = smem;
    float* kv_t = q_t + FA_TILE * LD;
    float* p_t = kv_t + FA_TILE * LD;

    const int seq = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * FA_TILE;
    const int qs = cu_q[seq], lq = cu_q[seq + 1] - qs;
    const int ks = cu_k[seq], lk = cu_k[seq + 1] - ks;
    if (i0 >= lq) return;
    const int g = h / (hq / hkv);
    const int rows = min(FA_TILE, lq - i0);
    const int r = threadIdx.x >> 2, sub = threadIdx.x & 3;
    const int vis = r < rows ? fa_visible(i0 + r, lq, lk, causal) : 0;
    const int keys = fa_visible(i0 + rows - 1, lq, lk, causal);  // the block's widest row

    fa_load_tile<D>(q_t, q, qs + i0, rows, hq, h);
    float acc[DC];
#pragma unroll
    for (int j = 0; j < DC; ++j) acc[j] = 0.0f;
    float m = -INFINITY, l = 0.0f;

    for (int j0 = 0; j0 < keys; j0 += FA_TILE) {
        const int kn = min(FA_TILE, keys - j0);
        __syncthreads();  // the previous tile's V is no longer read
        fa_load_tile<D>(kv_t, k, ks + j0, kn, hkv, g);
        __syncthreads();
        float s[8];
#pragma unroll
        for (int c = 0; c < 8; ++c) s[c] = 0.0f;
#pragma unroll 4
        for (int d = 0; d < D; ++d) {
            const float qv = q_t[r * LD + d];
#pragma unroll
            for (int c = 0; c < 8; ++c) s[c] += qv * kv_t[(sub + 4 * c) * LD + d];
        }
        float mt = -INFINITY;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            s[c] = (j0 + sub + 4 * c < vis) ? s[c] * scale : -INFINITY;
            mt = fmaxf(mt, s[c]);
        }
        mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
        mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 2));
        const float m_new = fmaxf(m, mt);
        const float alpha = m_new == -INFINITY ? 1.0f : expf(m - m_new);
        float ps = 0.0f;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            s[c] = s[c] == -INFINITY ? 0.0f : expf(s[c] - m_new);
            ps += s[c];
        }
        ps += __shfl_xor_sync(0xffffffffu, ps, 1);
        ps += __shfl_xor_sync(0xffffffffu, ps, 2);
        l = l * alpha + ps;
        m = m_new;
#pragma unroll
        for (int j = 0; j < DC; ++j) acc[j] *= alpha;
#pragma unroll
        for (int c = 0; c < 8; ++c) p_t[r * PLD + sub + 4 * c] = s[c];
        __syncthreads();  // K reads done, P visible
        fa_load_tile<D>(kv_t, v, ks + j0, kn, hkv, g);
        __syncthreads();
        for (int c = 0; c < kn; ++c) {
            const float p = p_t[r * PLD + c];
#pragma unroll
            for (int j = 0; j < DC; ++j) acc[j] += p * kv_t[c * LD + sub + 4 * j];
        }
    }
    if (r < rows) {
        const size_t row = (size_t)(qs + i0 + r) * hq + h;
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
        for (int j = 0; j < DC; ++j) elem_st(o, row * D + sub + 4 * j, acc[j] * inv);
        if (sub == 0) lse[row] = l > 0.0f ? m + logf(l) : -INFINITY;
    }
}

// delta[row] = sum_d dout[row, d] * o[row, d] for rows = Tq * q_heads; one
// warp per row.
template <typename T>
__device__ __forceinline__ void flash_bwd_delta(const T* __restrict__ o,
                                                const T* __restrict__ dout,
                                                float* __restrict__ delta, int rows,
                                                int head_dim) {
    const int row = blockIdx.x * (blockDim.x / VPPO_WARP) + threadIdx.x / VPPO_WARP;
    const int lane = threadIdx.x % VPPO_WARP;
    if (row >= rows) return;
    const size_t at = (size_t)row * head_dim;
    float acc = 0.0f;
    for (int d = lane; d < head_dim; d += VPPO_WARP) acc += elem_ld(o, at + d) * elem_ld(dout, at + d);
    acc = warp_sum(acc);
    if (lane == 0) delta[row] = acc;
}

extern "C" __global__ void flash_attn_bwd_delta_f32(const float* o, const float* dout,
                                                    float* delta, int rows, int head_dim) {
    flash_bwd_delta<float>(o, dout, delta, rows, head_dim);
}

extern "C" __global__ void flash_attn_bwd_delta_bf16(const bf16_t* o, const bf16_t* dout,
                                                     float* delta, int rows, int head_dim) {
    flash_bwd_delta<bf16_t>(o, dout, delta, rows, head_dim);
}

template <int D>
constexpr int fa_dq_smem_floats() {
    return 4 * FA_TILE * (D + 1) + FA_TILE * (FA_TILE + 1);
}

// dq = scale * dS K with dS = P * (dP - delta), dP = dO V^T; one block per
// query tile (deterministic: no atomics). grid as the forward.
template <int D, typename T>
__device__ __forceinline__ void flash_bwd_dq(const T* __restrict__ q,
                                             const T* __restrict__ k,
                                             const T* __restrict__ v,
                                             const T* __restrict__ dout,
                                             const float* __restrict__ lse,
                                             const float* __restrict__ delta,
                                             const int* __restrict__ cu_q,
                                             const int* __restrict__ cu_k,
                                             T* __restrict__ dq, int hq, int hkv,
                                             float scale, int causal) {
    constexpr int LD = D + 1, DC = D / 4, PLD = FA_TILE + 1;
    extern __shared__ float smem[];
    float* q_t = smem;
    float* do_t = q_t + FA_TILE * LD;
    float* k_t = do_t + FA_TILE * LD;
    float* v_t = k_t + FA_TILE * LD;
    float* ds_t = v_t + FA_TILE * LD;

    const int seq = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * FA_TILE;
    const int qs = cu_q[seq], lq = cu_q[seq + 1] - qs;
    const int ks = cu_k[seq], lk = cu_k[seq + 1] - ks;
    if (i0 >= lq) return;
    const int g = h / (hq / hkv);
    const int rows = min(FA_TILE, lq - i0);
    const int r = threadIdx.x >> 2, sub = threadIdx.x & 3;
    const int vis = r < rows ? fa_visible(i0 + r, lq, lk, causal) : 0;
    const int keys = fa_visible(i0 + rows - 1, lq, lk, causal);
    const size_t row = (size_t)(qs + i0 + r) * hq + h;
    const float lse_r = r < rows ? lse[row] : -INFINITY;
    const float delta_r = r < rows ? delta[row] : 0.0f;
    const bool live = lse_r != -INFINITY && lse_r == lse_r && lse_r != INFINITY;

    fa_load_tile<D>(q_t, q, qs + i0, rows, hq, h);
    fa_load_tile<D>(do_t, dout, qs + i0, rows, hq, h);
    float acc[DC];
#pragma unroll
    for (int j = 0; j < DC; ++j) acc[j] = 0.0f;

    for (int j0 = 0; j0 < keys; j0 += FA_TILE) {
        const int kn = min(FA_TILE, keys - j0);
        __syncthreads();
        fa_load_tile<D>(k_t, k, ks + j0, kn, hkv, g);
        fa_load_tile<D>(v_t, v, ks + j0, kn, hkv, g);
        __syncthreads();
        float s[8], dp[8];
#pragma unroll
        for (int c = 0; c < 8; ++c) s[c] = dp[c] = 0.0f;
#pragma unroll 2
        for (int d = 0; d < D; ++d) {
            const float qv = q_t[r * LD + d], dov = do_t[r * LD + d];
#pragma unroll
            for (int c = 0; c < 8; ++c) {
                s[c] += qv * k_t[(sub + 4 * c) * LD + d];
                dp[c] += dov * v_t[(sub + 4 * c) * LD + d];
            }
        }
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            const bool on = live && j0 + sub + 4 * c < vis;
            const float p = on ? expf(s[c] * scale - lse_r) : 0.0f;
            ds_t[r * PLD + sub + 4 * c] = p * (dp[c] - delta_r);
        }
        __syncthreads();
        for (int c = 0; c < kn; ++c) {
            const float ds = ds_t[r * PLD + c];
#pragma unroll
            for (int j = 0; j < DC; ++j) acc[j] += ds * k_t[c * LD + sub + 4 * j];
        }
    }
    if (r < rows) {
#pragma unroll
        for (int j = 0; j < DC; ++j) elem_st(dq, row * D + sub + 4 * j, scale * acc[j]);
    }
}

template <int D>
constexpr int fa_dkdv_smem_floats() {
    return 4 * FA_TILE * (D + 1) + 2 * FA_TILE * (FA_TILE + 1) + 2 * FA_TILE;
}

// dV = sum over the query heads of the group of P^T dO, dK = scale dS^T Q;
// one block per key tile of one kv head (deterministic: no atomics).
// grid (ceil(max_seqlen_k / 32), kv_heads, seqs), block 128. Thread t owns
// key row t / 4 of the tile.
template <int D, typename T>
__device__ __forceinline__ void flash_bwd_dkdv(const T* __restrict__ q,
                                               const T* __restrict__ k,
                                               const T* __restrict__ v,
                                               const T* __restrict__ dout,
                                               const float* __restrict__ lse,
                                               const float* __restrict__ delta,
                                               const int* __restrict__ cu_q,
                                               const int* __restrict__ cu_k,
                                               T* __restrict__ dk, T* __restrict__ dv,
                                               int hq, int hkv, float scale, int causal) {
    constexpr int LD = D + 1, DC = D / 4, PLD = FA_TILE + 1;
    extern __shared__ float smem[];
    float* k_t = smem;
    float* v_t = k_t + FA_TILE * LD;
    float* q_t = v_t + FA_TILE * LD;
    float* do_t = q_t + FA_TILE * LD;
    float* p_t = do_t + FA_TILE * LD;
    float* ds_t = p_t + FA_TILE * PLD;
    float* lse_s = ds_t + FA_TILE * PLD;
    float* delta_s = lse_s + FA_TILE;

    const int seq = blockIdx.z, g = blockIdx.y, j0 = blockIdx.x * FA_TILE;
    const int qs = cu_q[seq], lq = cu_q[seq + 1] - qs;
    const int ks = cu_k[seq], lk = cu_k[seq + 1] - ks;
    if (j0 >= lk) return;
    const int group = hq / hkv;
    const int kn = min(FA_TILE, lk - j0);
    const int c = threadIdx.x >> 2, sub = threadIdx.x & 3;
    const int j = j0 + c;  // this thread's key, local to the sequence

    fa_load_tile<D>(k_t, k, ks + j0, kn, hkv, g);
    fa_load_tile<D>(v_t, v, ks + j0, kn, hkv, g);
    float dk_acc[DC], dv_acc[DC];
#pragma unroll
    for (int x = 0; x < DC; ++x) dk_acc[x] = dv_acc[x] = 0.0f;

    // The first query that sees key j0 (causal: i >= j0 - (lk - lq)).
    const int i_first = causal ? max(0, j0 - (lk - lq)) : 0;
    for (int h = g * group; h < (g + 1) * group; ++h) {
        for (int i0 = (i_first / FA_TILE) * FA_TILE; i0 < lq; i0 += FA_TILE) {
            const int rows = min(FA_TILE, lq - i0);
            __syncthreads();
            fa_load_tile<D>(q_t, q, qs + i0, rows, hq, h);
            fa_load_tile<D>(do_t, dout, qs + i0, rows, hq, h);
            if (threadIdx.x < FA_TILE) {
                const int rr = threadIdx.x;
                const size_t row = (size_t)(qs + i0 + rr) * hq + h;
                lse_s[rr] = rr < rows ? lse[row] : -INFINITY;
                delta_s[rr] = rr < rows ? delta[row] : 0.0f;
            }
            __syncthreads();
            float s[8], dp[8];
#pragma unroll
            for (int m = 0; m < 8; ++m) s[m] = dp[m] = 0.0f;
#pragma unroll 2
            for (int d = 0; d < D; ++d) {
                const float kv = k_t[c * LD + d], vv = v_t[c * LD + d];
#pragma unroll
                for (int m = 0; m < 8; ++m) {
                    s[m] += q_t[(sub + 4 * m) * LD + d] * kv;
                    dp[m] += do_t[(sub + 4 * m) * LD + d] * vv;
                }
            }
#pragma unroll
            for (int m = 0; m < 8; ++m) {
                const int ii = sub + 4 * m;
                const float l = lse_s[ii];
                const bool on = ii < rows && c < kn && l != -INFINITY && l == l &&
                                l != INFINITY && j < fa_visible(i0 + ii, lq, lk, causal);
                const float p = on ? expf(s[m] * scale - l) : 0.0f;
                p_t[ii * PLD + c] = p;
                ds_t[ii * PLD + c] = p * (dp[m] - delta_s[ii]);
            }
            __syncthreads();
            for (int ii = 0; ii < rows; ++ii) {
                const float p = p_t[ii * PLD + c], ds = ds_t[ii * PLD + c];
#pragma unroll
                for (int x = 0; x < DC; ++x) {
                    dv_acc[x] += p * do_t[ii * LD + sub + 4 * x];
                    dk_acc[x] += ds * q_t[ii * LD + sub + 4 * x];
                }
            }
        }
    }
    if (c < kn) {
        const size_t row = (size_t)(ks + j) * hkv + g;
#pragma unroll
        for (int x = 0; x < DC; ++x) {
            elem_st(dk, row * D + sub + 4 * x, scale * dk_acc[x]);
            elem_st(dv, row * D + sub + 4 * x, dv_acc[x]);
        }
    }
}

#define FA_INSTANTIATE(D, T, SUF)                                                              \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, 1)                                \
        flash_attn_fwd_d##D##_##SUF(const T* q, const T* k, const T* v, const int* cu_q,       \
                                    const int* cu_k, T* o, float* lse, int hq, int hkv,        \
                                    float scale, int causal) {                                 \
        flash_fwd<D, T>(q, k, v, cu_q, cu_k, o, lse, hq, hkv, scale, causal);                  \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, 1) flash_attn_bwd_dq_d##D##_##SUF( \
        const T* q, const T* k, const T* v, const T* dout, const float* lse,                   \
        const float* delta, const int* cu_q, const int* cu_k, T* dq, int hq, int hkv,          \
        float scale, int causal) {                                                             \
        flash_bwd_dq<D, T>(q, k, v, dout, lse, delta, cu_q, cu_k, dq, hq, hkv, scale, causal); \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, 1)                                \
        flash_attn_bwd_dkdv_d##D##_##SUF(const T* q, const T* k, const T* v, const T* dout,    \
                                         const float* lse, const float* delta,                 \
                                         const int* cu_q, const int* cu_k, T* dk, T* dv,       \
                                         int hq, int hkv, float scale, int causal) {           \
        flash_bwd_dkdv<D, T>(q, k, v, dout, lse, delta, cu_q, cu_k, dk, dv, hq, hkv, scale,    \
                             causal);                                                          \
    }

FA_INSTANTIATE(80, float, f32)
FA_INSTANTIATE(128, float, f32)
FA_INSTANTIATE(80, bf16_t, bf16)
FA_INSTANTIATE(128, bf16_t, bf16)
// Small head dims: test-size models (the committed fixtures use 16) and
// small production configs (64).
FA_INSTANTIATE(16, float, f32)
FA_INSTANTIATE(64, float, f32)
FA_INSTANTIATE(16, bf16_t, bf16)
FA_INSTANTIATE(64, bf16_t, bf16)
