// Token embedding gather and its backward scatter-add, fp32.
// CPU twin: src/backend/cpu/embedding.rs (embedding_fwd, embedding_bwd); same
// contract: out[t] = table[ids[t]] for a [vocab, dim] table; the backward
// accumulates dtable[ids[t]] += dout[t] in token order.
// embedding_fwd_bf16 gathers from a bf16 table (exact, like the f32 one).
#include "common.cuh"
#include "elem.cuh"

// Grid-stride over tokens * dim. An id outside the vocabulary (the CPU op
// reports an error for it) yields a NaN row here, never an out-of-bounds read.
template <typename T>
__device__ __forceinline__ void embedding_fwd(const unsigned int* __restrict__ ids,
                                              const T* __restrict__ table, T* __restrict__ out,
                                              int tokens, int dim, int vocab) {
    const size_t n = (size_t)tokens * dim;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (size_t)gridDim.x * blockDim.x) {
        const size_t t = idx / dim, i = idx % dim;
        const unsigned int id = ids[t];
        if (id < (unsigned int)vocab)
            out[idx] = table[(size_t)id * dim + i];
        else
            elem_st(out, idx, __int_as_float(0x7fc00000));
    }
}

extern "C" __global__ void embedding_fwd_f32(const unsigned int* ids, const float* table,
                                             float* out, int tokens, int dim, int vocab) {
    embedding_fwd<float>(ids, table, out, tokens, dim, vocab);
}

extern "C" __global__ void embedding_fwd_bf16(const unsigned int* ids, const bf16_t* table,
                                              bf16_t* out, int tokens, int dim, int vocab) {
    embedding_fwd<bf16_t>(ids, table, out, tokens, dim, vocab);
}

// Deterministic scatter-add without atomics: the launcher groups the tokens
// by id on the host (uniq_ids[u], and the tokens of id u are
// order[offsets[u] .. offsets[u + 1]] in increasing position), and block u
// adds them in that order, so the sums are bit-identical to the CPU's.
// grid (uniques), block over dim (strided).
extern "C" __global__ void embedding_bwd_f32(const unsigned int* __restrict__ uniq_ids,
                                             const int* __restrict__ offsets,
                                             const int* __restrict__ order,
                                             const float* __restrict__ dout,
                                             float* __restrict__ dtable, int dim) {
    const int u = blockIdx.x;
    const size_t row = (size_t)uniq_ids[u] * dim;
    const int first = offsets[u], last = offsets[u + 1];
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float acc = dtable[row + i];
        for (int k = first; k < last; ++k) acc += dout[(size_t)order[k] * dim + i];
        dtable[row + i] = acc;
    }
}
