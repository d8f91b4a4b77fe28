// Element types of the kernels' storage: f32, or bf16 widened to f32 for
// compute and rounded to nearest-even on store (half::bf16's rounding, so a
// bf16 kernel's CPU twin is bf16 -> f32, the f32 op, f32 -> bf16 with
// src/backend/cpu/cast.rs).
#pragma once
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16_t;

__device__ __forceinline__ float elem_ld(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float elem_ld(const bf16_t* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void elem_st(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void elem_st(bf16_t* p, size_t i, float v) { p[i] = __float2bfloat16_rn(v); }
