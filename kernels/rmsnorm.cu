// RMSNorm forward and backward, fp32.
// CPU twin: src/backend/cpu/rmsnorm.rs (rmsnorm_fwd, rmsnorm_bwd); same
// contract: rows of `dim` values, saves rstd = 1/sqrt(mean(x^2) + eps) per row.
#include "common.cuh"

// One block per row.
extern "C" __global__ void rmsnorm_fwd_f32(const float* __restrict__ x,
                                           const float* __restrict__ weight,
                                           float* __restrict__ y,
                                           float* __restrict__ rstd,
                                           int rows, int dim, float eps) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + (size_t)row * dim;
    float* yr = y + (size_t)row * dim;
    float sumsq = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) sumsq += xr[i] * xr[i];
    sumsq = block_sum(sumsq, scratch);
    const float r = 1.0f / sqrtf(sumsq / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = xr[i] * r * weight[i];
    if (threadIdx.x == 0) rstd[row] = r;
}

// dx = r * (u - xh * mean(u * xh)), u = dy * w, xh = x * r. Each block walks
// `rows_per_block` rows; its share of dw goes to dw_partial[blockIdx.x, :]
// (dynamic shared memory holds `dim` floats) and rmsnorm_dw_reduce sums the
// partials, so the result does not depend on scheduling (no float atomics).
extern "C" __global__ void rmsnorm_bwd_f32(const float* __restrict__ dy,
                                           const float* __restrict__ x,
                                           const float* __restrict__ weight,
                                           const float* __restrict__ rstd,
                                           float* __restrict__ dx,
                                           float* __restrict__ dw_partial,
                                           int rows, int dim, int rows_per_block) {
    extern __shared__ float dw_acc[];
    __shared__ float scratch[32];
    for (int i = threadIdx.x; i < dim; i += blockDim.x) dw_acc[i] = 0.0f;
    const int first = blockIdx.x * rows_per_block;
    const int last = min(rows, first + rows_per_block);
    for (int row = first; row < last; ++row) {
        const float* dyr = dy + (size_t)row * dim;
        const float* xr = x + (size_t)row * dim;
        const float r = rstd[row];
        float dot = 0.0f;
        for (int i = threadIdx.x; i < dim; i += blockDim.x) {
            const float xh = xr[i] * r;
            dot += dyr[i] * weight[i] * xh;
            dw_acc[i] += dyr[i] * xh;  // column i is always owned by this thread
        }
        const float mean = block_sum(dot, scratch) / (float)dim;
        float* dxr = dx + (size_t)row * dim;
        for (int i = threadIdx.x; i < dim; i += blockDim.x) {
            const float xh = xr[i] * r;
            dxr[i] = r * (dyr[i] * weight[i] - xh * mean);
        }
    }
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        dw_partial[(size_t)blockIdx.x * dim + i] = dw_acc[i];
}

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
