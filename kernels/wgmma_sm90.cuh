// sm_90a building blocks shared by the Hopper flash-attention forward
// (flash_attn_wgmma.cu) and backward (flash_attn_wgmma_bwd.cu): the tensor
// map parameter, mbarriers, TMA tile loads, wgmma descriptors and the
// warpgroup MMAs, and the panel/swizzle byte offset of a staged tile.
// Include it inside the files' sm_90a guard only (wgmma, TMA and setmaxnreg
// exist nowhere else). scripts/check_wgmma_fragments.py and
// scripts/check_wgmma_bwd.py model these formulas on the host.
#pragma once
#include "mma_bf16.cuh"

#include <math.h>
#include <stdint.h>

#define FA_WG_LOG2E 1.4426950408889634f
#define FA_WG_LN2 0.6931471805599453f

// The driver's CUtensorMap (cuda.h): 128 opaque bytes, passed by value as a
// __grid_constant__ kernel parameter; TMA reads it through its address.
struct __align__(128) FaTmap {
    unsigned long long opaque[16];
};


// ---- mbarrier -------------------------------------------------------------

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Arrives once and adds `bytes` to the transaction count the phase waits for.
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar),
                 "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Waits until the phase with parity `parity` has completed (a fresh barrier
// is in phase 0, so waiting on parity 1 returns at once: the producer's
// first pass over the ring finds every stage empty).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    uint32_t done;
    do {
        asm volatile(
            "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            " selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}

// ---- TMA -----------------------------------------------------------------

// One box of a 3-D tensor map (dim 0 = head dim, 1 = head, 2 = token) into
// shared memory; completion is counted in bytes on `bar`.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const FaTmap* map, int c0, int c1,
                                            int c2, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}

__device__ __forceinline__ void tma_prefetch_map(const FaTmap* map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// ---- wgmma ---------------------------------------------------------------

// Shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format"):
// bits 0-13 start address >> 4, 16-29 leading-dimension byte offset >> 4,
// 32-45 stride-dimension byte offset >> 4, 49-51 base offset (0: every
// operand starts on a swizzle period, or a 32-byte k-step inside the first
// row of one), 62-63 layout type (1 = 128-byte, 2 = 64-byte, 3 = 32-byte
// swizzle). With rows of RB bytes (the swizzle span):
//  K-major (Q, K): 8-row groups SBO = 8 RB bytes apart; LBO unused (16)
//    because a k16 step (32 bytes) stays inside one panel row.
//  MN-major (V as the B of P V): panels of PW columns LBO bytes apart along
//    N, keys RB bytes apart, 8-key groups SBO = 8 RB bytes apart along K.
__device__ __forceinline__ uint64_t wg_desc(uint32_t addr, uint32_t lbo, uint32_t sbo,
                                            uint64_t swizzle) {
    return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) |
           (static_cast<uint64_t>(lbo >> 4) << 16) | (static_cast<uint64_t>(sbo >> 4) << 32) |
           (swizzle << 62);
}

__device__ __forceinline__ void wg_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wg_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// The accumulators are written asynchronously between mma_async and
// wait_group; these empty asm statements pin every use of them to its side
// of the wait (the compiler may not move a read or copy of a register across
// a volatile asm that "modifies" it).
template <int N>
__device__ __forceinline__ void wg_pin(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

#define FA_WG_R8_0 "%0, %1, %2, %3, %4, %5, %6, %7"
#define FA_WG_R8_1 "%8, %9, %10, %11, %12, %13, %14, %15"
#define FA_WG_R8_2 "%16, %17, %18, %19, %20, %21, %22, %23"
#define FA_WG_R8_3 "%24, %25, %26, %27, %28, %29, %30, %31"
#define FA_WG_R8_4 "%32, %33, %34, %35, %36, %37, %38, %39"
#define FA_WG_R8_5 "%40, %41, %42, %43, %44, %45, %46, %47"
#define FA_WG_R8_6 "%48, %49, %50, %51, %52, %53, %54, %55"
#define FA_WG_R8_7 "%56, %57, %58, %59, %60, %61, %62, %63"
#define FA_WG_ACC32 \
    "{" FA_WG_R8_0 ", " FA_WG_R8_1 ", " FA_WG_R8_2 ", " FA_WG_R8_3 "}"
#define FA_WG_ACC40 \
    "{" FA_WG_R8_0 ", " FA_WG_R8_1 ", " FA_WG_R8_2 ", " FA_WG_R8_3 ", " FA_WG_R8_4 "}"
#define FA_WG_ACC64                                                                             \
    "{" FA_WG_R8_0 ", " FA_WG_R8_1 ", " FA_WG_R8_2 ", " FA_WG_R8_3 ", " FA_WG_R8_4 ", " FA_WG_R8_5 \
    ", " FA_WG_R8_6 ", " FA_WG_R8_7 "}"
#define FA_WG_F4(c, a, i) c(a[i]), c(a[i + 1]), c(a[i + 2]), c(a[i + 3])
#define FA_WG_F8(c, a, i) FA_WG_F4(c, a, i), FA_WG_F4(c, a, i + 4)
#define FA_WG_F32(c, a, i) \
    FA_WG_F8(c, a, i), FA_WG_F8(c, a, i + 8), FA_WG_F8(c, a, i + 16), FA_WG_F8(c, a, i + 24)
#define FA_WG_RW(x) "+f"(x)
#define FA_WG_WO(x) "=f"(x)

// S (64 x 128, f32) = or += Q K^T for one k16 step; A and B from shared
// memory, both K-major (imm-trans-a = imm-trans-b = 0).
__device__ __forceinline__ void wgmma_ss_n128_first(float (&d)[64], uint64_t a, uint64_t b) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " FA_WG_ACC64
                 ", %64, %65, 0, 1, 1, 0, 0;\n"
                 : FA_WG_F32(FA_WG_WO, d, 0), FA_WG_F32(FA_WG_WO, d, 32)
                 : "l"(a), "l"(b));
}
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], uint64_t a, uint64_t b) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " FA_WG_ACC64
                 ", %64, %65, 1, 1, 1, 0, 0;\n"
                 : FA_WG_F32(FA_WG_RW, d, 0), FA_WG_F32(FA_WG_RW, d, 32)
                 : "l"(a), "l"(b));
}

// O (64 x D, f32) += P V for one k16 step: A = P from registers (4 x 2 bf16
// per thread, the mma.m16n8k16 A layout per warp), B = V from shared memory,
// MN-major (imm-trans-b = 1).
__device__ __forceinline__ void wgmma_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " FA_WG_ACC64
                 ", {%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"
                 : FA_WG_F32(FA_WG_RW, d, 0), FA_WG_F32(FA_WG_RW, d, 32)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}
__device__ __forceinline__ void wgmma_rs(float (&d)[40], const uint32_t (&a)[4], uint64_t b) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n80k16.f32.bf16.bf16 " FA_WG_ACC40
                 ", {%40, %41, %42, %43}, %44, 1, 1, 1, 1;\n"
                 : FA_WG_F32(FA_WG_RW, d, 0), FA_WG_F8(FA_WG_RW, d, 32)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}
__device__ __forceinline__ void wgmma_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " FA_WG_ACC32
                 ", {%32, %33, %34, %35}, %36, 1, 1, 1, 1;\n"
                 : FA_WG_F32(FA_WG_RW, d, 0)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

// Byte offset of element (row, col) of a tile stored as panels of PW
// columns with the RB-byte swizzle (what TMA writes; the staging of O reuses
// it): inside a panel, address bits 4.. (the 16-byte chunk) are XORed with
// bits 7.. (the row within the 8-row swizzle period, one bit for 32 bytes,
// three for 128). Panels are multiples of 1024 bytes, so the offset's bits
// are the address's.
template <int PW>
__device__ __forceinline__ uint32_t fa_wg_swz(int row, int col, int rows_per_panel) {
    constexpr uint32_t RB = 2 * PW, CHUNK_MASK = RB / 16 - 1;
    const uint32_t off = row * RB + (col % PW) * 2;
    return (col / PW) * rows_per_panel * RB + (off ^ (((off >> 7) & CHUNK_MASK) << 4));
}
