// Warp-level tensor-core building blocks for sm_80 and sm_90 (inline PTX):
// asynchronous 16-byte copies into shared memory, ldmatrix fragment loads and
// the m16n8k16 bf16 MMA with f32 accumulation.
//
// Fragment layouts of mma.m16n8k16 (lane = 4 * group + quad, group = lane / 4,
// quad = lane % 4), which every kernel that includes this header relies on:
//   A (16 x 16, row major), 4 regs of 2 bf16: a0 = (row group,     cols 2 quad + {0,1}),
//     a1 = (row group + 8, same cols), a2 = (row group, cols 8 + 2 quad + {0,1}),
//     a3 = (row group + 8, cols 8 + 2 quad + {0,1}).
//   B (16 x 8, k x n), 2 regs: b0 = (k 2 quad + {0,1}, n group), b1 = (k 8 + 2 quad + {0,1}, n group).
//   C (16 x 8, f32), 4 floats: c0, c1 = (row group, cols 2 quad + {0,1}),
//     c2, c3 = (row group + 8, same cols).
// Two C tiles side by side (cols 0..7, 8..15) are exactly one A fragment of
// a 16 x 16 operand once packed to bf16 (pack_bf16(c[0], c[1]) = a0, ...):
// attention feeds its probabilities to the next MMA without shared memory.
//
// ldmatrix.x4: lane l gives the address of row (l % 8) of 8x8 matrix l / 8;
// every lane gets, per matrix i, register i = (row lane / 4, cols 2 (lane % 4) + {0,1});
// with .trans the same lane gets (rows 2 (lane % 4) + {0,1}, col lane / 4).
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16_t;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without passing through registers; when `valid`
// is false nothing is read and the 16 bytes are zero-filled (rows past a
// sequence end must be 0, not stale: 0 * NaN would poison a sum).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
                 "l"(gmem), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed groups are in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const bf16_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t r[4], const bf16_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// Only lanes 0..15 supply addresses (matrix l / 8, row l % 8).
__device__ __forceinline__ void ldsm_x2_trans(uint32_t r[2], const bf16_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr(p)));
}

// c += a * b on tensor cores (16 x 8 x 16, bf16 in, f32 accumulate).
__device__ __forceinline__ void mma_bf16_16816(float c[4], const uint32_t a[4], uint32_t b0,
                                               uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to nearest-even bf16, `lo` in the low half (the lower
// column of a fragment pair).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
