// Row movement and small adds of the model graph on the CUDA backend, on f32
// or bf16 storage (f32 compute):
//   add_inplace:   x[i] += y[i]                 (residual adds)
//   add_bias_rows: y[r, c] += bias[c]           (Linear bias when the GEMM
//                                                 does not fuse it)
//   gather_rows:   dst[i, :] = src[idx[i], :]   (window permutation of the
//                                                 patches, response rows)
//   scatter_rows:  dst[idx[i], :] = src[i, :]   (undoing the merged-token
//                                                 permutation, image scatter)
// CPU twins: src/backend/cpu/rows.rs (add_inplace, gather_rows,
// scatter_rows) and src/backend/cpu/linear.rs (the bias loop of
// linear_fwd). All kernels are grid-stride loops; indices are not checked on
// the device (the launchers' callers build them from the host layouts).
#include "common.cuh"
#include "elem.cuh"

#define GRID_STRIDE(i, n)                                                          \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)(n); \
         i += (size_t)gridDim.x * blockDim.x)

template <typename T>
__device__ __forceinline__ void add_inplace(T* __restrict__ x, const T* __restrict__ y,
                                            long long n) {
    GRID_STRIDE(i, n) { elem_st(x, i, elem_ld(x, i) + elem_ld(y, i)); }
}

template <typename T>
__device__ __forceinline__ void add_bias_rows(T* __restrict__ y, const T* __restrict__ bias,
                                              int rows, int cols) {
    GRID_STRIDE(i, (size_t)rows * cols) {
        elem_st(y, i, elem_ld(y, i) + elem_ld(bias, i % (size_t)cols));
    }
}

template <typename T>
__device__ __forceinline__ void gather_rows(const T* __restrict__ src, const int* __restrict__ idx,
                                            T* __restrict__ dst, int rows, int dim) {
    GRID_STRIDE(i, (size_t)rows * dim) {
        const size_t r = i / dim, c = i % dim;
        dst[i] = src[(size_t)idx[r] * dim + c];
    }
}

template <typename T>
__device__ __forceinline__ void scatter_rows(const T* __restrict__ src,
                                             const int* __restrict__ idx, T* __restrict__ dst,
                                             int rows, int dim) {
    GRID_STRIDE(i, (size_t)rows * dim) {
        const size_t r = i / dim, c = i % dim;
        dst[(size_t)idx[r] * dim + c] = src[i];
    }
}

#define ROWS_INSTANTIATE(T, SUF)                                                              \
    extern "C" __global__ void add_inplace_##SUF(T* x, const T* y, long long n) {            \
        add_inplace<T>(x, y, n);                                                              \
    }                                                                                         \
    extern "C" __global__ void add_bias_rows_##SUF(T* y, const T* bias, int rows, int cols) { \
        add_bias_rows<T>(y, bias, rows, cols);                                                \
    }                                                                                         \
    extern "C" __global__ void gather_rows_##SUF(const T* src, const int* idx, T* dst,       \
                                                 int rows, int dim) {                         \
        gather_rows<T>(src, idx, dst, rows, dim);                                             \
    }                                                                                         \
    extern "C" __global__ void scatter_rows_##SUF(const T* src, const int* idx, T* dst,      \
                                                  int rows, int dim) {                        \
        scatter_rows<T>(src, idx, dst, rows, dim);                                            \
    }

ROWS_INSTANTIATE(float, f32)
ROWS_INSTANTIATE(bf16_t, bf16)
