// Next-token sampling from a row of logits with a given uniform draw per
// row: greedy (temperature <= 0: first maximum), or temperature, then top-k,
// then top-p over the candidates in descending-logit order (ties by index),
// then the first candidate whose cumulative probability exceeds u times the
// kept mass. Also returns the token's temperature-1 log-prob.
// CPU twin: src/rollout/sampling.rs (sample_token_with_uniform /
// pick_with_uniform). The order is f32::total_cmp's (keys below), the
// cumulative sums are formed in a different (parallel, deterministic) order,
// so a draw within rounding of a boundary may pick the neighbour.
//
// No sort: the k-th candidate, the top-p cut and the sampled token are each
// found by a radix select over the 32-bit order keys (8 passes of 4 bits with
// 16-bin histograms of counts or probability mass), then a scan in index
// order among the candidates sharing the selected key.
#include "common.cuh"

#define SP_THREADS 1024
#define SP_WARPS (SP_THREADS / VPPO_WARP)

// Monotone map of f32::total_cmp to unsigned order.
__device__ __forceinline__ unsigned sp_key(float z) {
    const unsigned b = __float_as_uint(z);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The candidate set: at or before (k_key, k_idx) and before-or-at
// (p_key, p_idx) in descending order.
struct SpSet {
    bool has_k, has_p;
    unsigned k_key, p_key;
    int k_idx, p_idx;
};

__device__ __forceinline__ bool sp_at_or_before(unsigned key, int i, unsigned tkey, int tidx) {
    return key > tkey || (key == tkey && i <= tidx);
}

__device__ __forceinline__ bool sp_in(const SpSet& s, unsigned key, int i) {
    return (!s.has_k || sp_at_or_before(key, i, s.k_key, s.k_idx)) &&
           (!s.has_p || sp_at_or_before(key, i, s.p_key, s.p_idx));
}

struct SpCtx {
    const float* z;
    int vocab;
    float inv_t, m;  // weight = exp(z * inv_t - m) in mass mode
    bool mass;
};

__device__ __forceinline__ float sp_weight(const SpCtx& c, float z) {
    return c.mass ? expf(z * c.inv_t - c.m) : 1.0f;
}

__device__ __forceinline__ bool sp_cross(float cum, float target, bool strict) {
    return strict ? cum > target : cum >= target;
}

struct SpShared {
    float hist[SP_WARPS][16];
    float tot[16];
    float scratch[SP_WARPS];
    int iscratch[SP_WARPS];
};

__device__ __forceinline__ float sp_block_max(float v, float* scratch) {
    for (int off = VPPO_WARP / 2; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    const int lane = threadIdx.x % VPPO_WARP, warp = threadIdx.x / VPPO_WARP;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = -INFINITY;
    for (int w = 0; w < SP_WARPS; ++w) r = fmaxf(r, scratch[w]);
    __syncthreads();
    return r;
}

__device__ __forceinline__ int sp_block_min_int(int v, int* scratch) {
    for (int off = VPPO_WARP / 2; off > 0; off >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, off));
    const int lane = threadIdx.x % VPPO_WARP, warp = threadIdx.x / VPPO_WARP;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int r = 0x7fffffff;
    for (int w = 0; w < SP_WARPS; ++w) r = min(r, scratch[w]);
    __syncthreads();
    return r;
}

// Inclusive scan over the block in thread order; `total` gets the block sum.
__device__ __forceinline__ float sp_block_scan(float v, float* scratch, float& total) {
    const int lane = threadIdx.x % VPPO_WARP, warp = threadIdx.x / VPPO_WARP;
    for (int off = 1; off < VPPO_WARP; off <<= 1) {
        const float o = __shfl_up_sync(0xffffffffu, v, off);
        if (lane >= off) v += o;
    }
    if (lane == VPPO_WARP - 1) scratch[warp] = v;
    __syncthreads();
    float before = 0.0f, all = 0.0f;
    for (int w = 0; w < SP_WARPS; ++w) {
        if (w < warp) before += scratch[w];
        all += scratch[w];
    }
    __syncthreads();
    total = all;
    return before + v;
}

// Sum of weights over the set, fixed order.
__device__ float sp_set_sum(const SpCtx& c, const SpSet& s, SpShared& sh) {
    float acc = 0.0f;
    for (int i = threadIdx.x; i < c.vocab; i += SP_THREADS) {
        const float z = c.z[i];
        if (sp_in(s, sp_key(z), i)) acc += sp_weight(c, z);
    }
    return block_sum(acc, sh.scratch);
}

// The first element of the set, in descending (key, then index) order, whose
// cumulative weight crosses `target`; false when none does.
__device__ bool sp_select(const SpCtx& c, const SpSet& s, float target, bool strict,
                          SpShared& sh, unsigned& out_key, int& out_idx) {
    const int lane = threadIdx.x % VPPO_WARP, warp = threadIdx.x / VPPO_WARP;
    unsigned prefix = 0, mask = 0;
    float above = 0.0f;
    for (int shift = 28; shift >= 0; shift -= 4) {
        float bins[16];
#pragma unroll
        for (int b = 0; b < 16; ++b) bins[b] = 0.0f;
        for (int i = threadIdx.x; i < c.vocab; i += SP_THREADS) {
            const float z = c.z[i];
            const unsigned key = sp_key(z);
            if ((key & mask) == prefix && sp_in(s, key, i)) {
                const float w = sp_weight(c, z);
                const unsigned digit = (key >> shift) & 15u;
#pragma unroll
                for (int b = 0; b < 16; ++b) bins[b] += digit == (unsigned)b ? w : 0.0f;
            }
        }
#pragma unroll
        for (int b = 0; b < 16; ++b) {
            const float v = warp_sum(bins[b]);
            if (lane == 0) sh.hist[warp][b] = v;
        }
        __syncthreads();
        if (threadIdx.x < 16) {
            float t = 0.0f;
            for (int w = 0; w < SP_WARPS; ++w) t += sh.hist[w][threadIdx.x];
            sh.tot[threadIdx.x] = t;
        }
        __syncthreads();
        int chosen = -1, lowest = -1;
        float above_lowest = above;
        for (int d = 15; d >= 0; --d) {
            if (sh.tot[d] > 0.0f) {
                lowest = d;
                above_lowest = above;
            }
            if (sp_cross(above + sh.tot[d], target, strict)) {
                chosen = d;
                break;
            }
            above += sh.tot[d];
        }
        if (chosen < 0) {
            // Block-uniform: everyone read the same totals. After the first
            // pass the crossing is known to lie in this bucket; when the
            // bins, summed in another order, round just short of the target,
            // it is the bucket's last non-empty digit, not "past the end".
            if (shift == 28 || lowest < 0) return false;
            chosen = lowest;
            above = above_lowest;
        }
        prefix |= (unsigned)chosen << shift;
        mask |= 15u << shift;
    }
    // Among the set's elements with key == prefix, in index order.
    float carry = above;
    for (int t0 = 0; t0 < c.vocab; t0 += SP_THREADS) {
        const int i = t0 + threadIdx.x;
        float w = 0.0f;
        bool cand = false;
        if (i < c.vocab) {
            const float z = c.z[i];
            cand = sp_key(z) == prefix && sp_in(s, prefix, i);
            if (cand) w = sp_weight(c, z);
        }
        float total;
        const float incl = sp_block_scan(w, sh.scratch, total);
        const bool hit = cand && sp_cross(carry + incl, target, strict);
        const int first = sp_block_min_int(hit ? i : 0x7fffffff, sh.iscratch);
        if (first != 0x7fffffff) {
            out_key = prefix;
            out_idx = first;
            return true;
        }
        carry += total;
    }
    // Rounding between the passes and the scan: take the last tied element.
    int last = -1;
    for (int i = threadIdx.x; i < c.vocab; i += SP_THREADS)
        if (sp_key(c.z[i]) == prefix && sp_in(s, prefix, i)) last = max(last, i);
    last = -sp_block_min_int(-last, sh.iscratch);
    out_key = prefix;
    out_idx = last;
    return last >= 0;
}

// One block of 1024 threads per row. token[row] and logprob[row] (the
// temperature-1 log-prob of the token) are written.
extern "C" __global__ void __launch_bounds__(SP_THREADS)
    sample_f32(const float* __restrict__ logits, const float* __restrict__ uniforms,
               int* __restrict__ token, float* __restrict__ logprob, int rows, int vocab,
               float temperature, float top_p, int top_k) {
    __shared__ SpShared sh;
    const int row = blockIdx.x;
    if (row >= rows) return;
    const float* z = logits + (size_t)row * vocab;

    float mx = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += SP_THREADS) mx = fmaxf(mx, z[i]);
    mx = sp_block_max(mx, sh.scratch);
    float se = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += SP_THREADS) se += expf(z[i] - mx);
    const float lse = mx + logf(block_sum(se, sh.scratch));

    int tok;
    if (temperature <= 0.0f) {
        int first = 0x7fffffff;
        for (int i = threadIdx.x; i < vocab; i += SP_THREADS)
            if (z[i] == mx) first = min(first, i);
        tok = sp_block_min_int(first, sh.iscratch);
        if (tok == 0x7fffffff) tok = 0;
    } else {
        const float inv_t = 1.0f / temperature;
        SpCtx c{z, vocab, inv_t, mx * inv_t, true};
        SpSet s{false, false, 0u, 0u, 0, 0};
        const float u = uniforms[row];
        if (top_k <= 0 && top_p >= 1.0f) {
            // Index order, no candidate sort.
            const float total = sp_set_sum(c, s, sh);
            const float target = u * total;
            float carry = 0.0f;
            tok = vocab - 1;
            for (int t0 = 0; t0 < vocab; t0 += SP_THREADS) {
                const int i = t0 + threadIdx.x;
                const float w = i < vocab ? sp_weight(c, z[i]) : 0.0f;
                float tile;
                const float incl = sp_block_scan(w, sh.scratch, tile);
                const bool hit = i < vocab && carry + incl > target;
                const int first = sp_block_min_int(hit ? i : 0x7fffffff, sh.iscratch);
                if (first != 0x7fffffff) {
                    tok = first;
                    break;
                }
                carry += tile;
            }
        } else {
            if (top_k > 0 && top_k < vocab) {
                c.mass = false;
                s.has_k = sp_select(c, s, (float)top_k, false, sh, s.k_key, s.k_idx);
                c.mass = true;
            }
            if (top_p < 1.0f) {
                const float total = sp_set_sum(c, s, sh);
                SpSet t = s;
                t.has_p = sp_select(c, s, top_p * total, false, sh, t.p_key, t.p_idx);
                s = t;
            }
            const float kept = sp_set_sum(c, s, sh);
            unsigned key;
            if (!sp_select(c, s, u * kept, true, sh, key, tok)) {
                // Past the end by rounding: the last candidate (count select).
                c.mass = false;
                const float n = sp_set_sum(c, s, sh);
                if (!sp_select(c, s, n, false, sh, key, tok)) tok = 0;
            }
        }
    }
    if (threadIdx.x == 0) {
        token[row] = tok;
        logprob[row] = z[tok] - lse;
    }
}
