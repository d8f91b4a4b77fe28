// RMSNorm forward and backward on f32 or bf16 storage (x, weight, y, dy, dx
// in the storage type; rstd, the sums and dw always f32).
// CPU twin: src/backend/cpu/rmsnorm.rs (rmsnorm_fwd, rmsnorm_bwd); same
// contract: rows of `dim` values, saves rstd = 1/sqrt(mean(x^2) + eps) per row.
// The _bf16 kernels' twin is the f32 op on the bf16 values widened, its y/dx
// rounded to nearest-even (ops::cpu_bf16).
#include "common.cuh"
#include "elem.cuh"

// One block per row.
template <typename T>
__device__ __forceinline__ void rmsnorm_fwd(const T* __restrict__ x,
                                            const T* __restrict__ weight,
                                            T* __restrict__ y, float* __restrict__ rstd,
                                            int rows, int dim, float eps) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const size_t base = (size_t)row * dim;
    float sumsq = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = elem_ld(x, base + i);
        sumsq += v * v;
    }
    sumsq = block_sum(sumsq, scratch);
    const float r = 1.0f / sqrtf(sumsq / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        elem_st(y, base + i, elem_ld(x, base + i) * r * elem_ld(weight, i));
    if (threadIdx.x == 0) rstd[row] = r;
}

// dx = r * (u - xh * mean(u * xh)), u = dy * w, xh = x * r. Each block walks
// `rows_per_block` rows; its share of dw goes to dw_partial[blockIdx.x, :]
// (dynamic shared memory holds `dim` floats) and rmsnorm_dw_reduce sums the
// partials, so the result does not depend on scheduling (no float atomics).
template <typename T>
__device__ __forceinline__ void rmsnorm_bwd(const T* __restrict__ dy, const T* __restrict__ x,
                                            const T* __restrict__ weight,
                                            const float* __restrict__ rstd, T* __restrict__ dx,
                                            float* __restrict__ dw_partial, int rows, int dim,
                                            int rows_per_block) {
    extern __shared__ float dw_acc[];
    __shared__ float scratch[32];
    for (int i = threadIdx.x; i < dim; i += blockDim.x) dw_acc[i] = 0.0f;
    const int first = blockIdx.x * rows_per_block;
    const int last = min(rows, first + rows_per_block);
    for (int row = first; row < last; ++row) {
        const size_t base = (size_t)row * dim;
        const float r = rstd[row];
        float dot = 0.0f;
        for (int i = threadIdx.x; i < dim; i += blockDim.x) {
            const float xh = elem_ld(x, base + i) * r;
            const float g = elem_ld(dy, base + i);
            dot += g * elem_ld(weight, i) * xh;
            dw_acc[i] += g * xh;  // column i is always owned by this thread
        }
        const float mean = block_sum(dot, scratch) / (float)dim;
        for (int i = threadIdx.x; i < dim; i += blockDim.x) {
            const float xh = elem_ld(x, base + i) * r;
            elem_st(dx, base + i, r * (elem_ld(dy, base + i) * elem_ld(weight, i) - xh * mean));
        }
    }
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        dw_partial[(size_t)blockIdx.x * dim + i] = dw_acc[i];
}

#define RMSNORM_INSTANTIATE(T, SUF)                                                          \
    extern "C" __global__ void rmsnorm_fwd_##SUF(const T* x, const T* weight, T* y,          \
                                                 float* rstd, int rows, int dim, float eps) { \
        rmsnorm_fwd<T>(x, weight, y, rstd, rows, dim, eps);                                  \
    }                                                                                        \
    extern "C" __global__ void rmsnorm_bwd_##SUF(const T* dy, const T* x, const T* weight,   \
                                                 const float* rstd, T* dx, float* dw_partial, \
                                                 int rows, int dim, int rows_per_block) {    \
        rmsnorm_bwd<T>(dy, x, weight, rstd, dx, dw_partial, rows, dim, rows_per_block);      \
    }

RMSNORM_INSTANTIATE(float, f32)
RMSNORM_INSTANTIATE(bf16_t, bf16)

// dw[i] += sum over partial rows. Accumulates, like the CPU twin.
extern "C" __global__ void rmsnorm_dw_reduce_f32(const float* __restrict__ dw_partial,
                                                 float* __restrict__ dw,
                                                 int partial_rows, int dim) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= dim) return;
    float acc = 0.0f;
    for (int b = 0; b < partial_rows; ++b) acc += dw_partial[(size_t)b * dim + i];
    dw[i] += acc;
}
