//! Launcher of the Hopper flash-attention forward
//! (`kernels/flash_attn_wgmma.cu`: TMA, warp specialisation, wgmma; the
//! FlashAttention-3 structure) and the choice between it and the FA2
//! tensor-core kernel of `flash_attn_tc.rs`. Same contract as
//! `flash_attn_tc_fwd`: bf16 q/k/v/o, f32 natural-log lse.
//!
//! The kernel reads q, k and v through TMA tensor maps built here (one per
//! tensor, encoded by the driver with `cuTensorMapEncodeTiled` and passed by
//! value as `__grid_constant__` parameters), so their shapes and the
//! shared-memory panel layout below must match the .cu's `FaWgLayout`.

use super::flash_attn::FlashAttnShape;
use super::launch_util::opt_in_smem;
use super::{CudaBackend, CudaError};
use cudarc::driver::sys::{
    self, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave,
    CUtensorMapL2promotion, CUtensorMapSwizzle,
};
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

const MODULE: &str = "flash_attn_wgmma";

/// Query rows per block (two consumer warpgroups of 64 rows).
pub const WGMMA_QUERY_ROWS: usize = 128;
/// Keys per K/V tile and stages of the K/V ring (mirror the .cu).
const KEY_TILE: usize = 128;
const STAGES: usize = 2;
/// Producer warpgroup + two consumer warpgroups.
const THREADS: u32 = 384;

/// Sequences up to this many queries stay on the FA2 kernel (vision windows
/// of 64 patches: a 128-row block would be half empty, and FA2's 64-row
/// blocks already fit them).
pub const WGMMA_MIN_SEQLEN_Q: usize = 64;

/// Head dims the wgmma kernel is built for.
pub fn flash_wgmma_supports(head_dim: usize) -> bool {
    matches!(head_dim, 64 | 80 | 128)
}

/// The error of a wgmma launcher (`kernel`) called at a head dim it is not
/// built for.
pub(super) fn check_wgmma_head_dim(kernel: &'static str, d: usize) -> Result<(), CudaError> {
    if flash_wgmma_supports(d) {
        Ok(())
    } else {
        Err(CudaError::Unsupported {
            kernel,
            reason: format!("head_dim {d} (instantiated: 64, 80, 128)"),
        })
    }
}

/// Columns per shared-memory panel (one TMA box wide): 64 with the 128-byte
/// swizzle for head dims 64 and 128, 16 with the 32-byte swizzle for 80
/// (see the .cu: 80 = 5 x 16, no padding).
fn panel_cols(head_dim: usize) -> usize {
    if head_dim % 64 == 0 {
        64
    } else {
        16
    }
}

/// Dynamic shared memory of the kernel (`FaWgLayout<D>::SMEM_BYTES`): the Q
/// tile, two stages of K and V, 64 bytes of barriers and 1024 bytes to align
/// the window to the swizzle period.
pub fn wgmma_fwd_smem_bytes(head_dim: usize) -> usize {
    let row_bytes = 2 * panel_cols(head_dim);
    let panels = head_dim / panel_cols(head_dim);
    let q = panels * WGMMA_QUERY_ROWS * row_bytes;
    let kv = panels * KEY_TILE * row_bytes;
    q + 2 * STAGES * kv + 64 + 1024
}

/// The driver's `CUtensorMap` as a kernel argument (128 opaque bytes passed
/// by value; the kernel declares it `const __grid_constant__`).
#[repr(transparent)]
#[derive(Clone, Copy)]
pub(super) struct TensorMap(sys::CUtensorMap);

// SAFETY: plain bytes with the layout of the kernel parameter (`FaTmap`, 128
// bytes); cudarc passes a pointer to it and the driver copies the bytes.
unsafe impl DeviceRepr for TensorMap {}

/// A 3-D tiled tensor map over a packed `[tokens, heads, head_dim]` bf16
/// tensor at `ptr`: dims (head_dim, heads, tokens), box (panel columns, 1
/// head, `rows`), the panel's swizzle; reads outside the dims are zero.
pub(super) fn tensor_map(
    ptr: sys::CUdeviceptr,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    rows: usize,
) -> Result<TensorMap, CudaError> {
    let cols = panel_cols(head_dim);
    let dims: [u64; 3] = [head_dim as u64, heads as u64, tokens as u64];
    // Byte strides of dims 1 and 2 (dim 0 is contiguous).
    let strides: [u64; 2] = [2 * head_dim as u64, 2 * (heads * head_dim) as u64];
    let boxes: [u32; 3] = [cols as u32, 1, rows as u32];
    let element_strides: [u32; 3] = [1, 1, 1];
    let swizzle = if cols == 64 {
        CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B
    } else {
        CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_32B
    };
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every pointer is to a live local array of the rank the call
    // names (3 dims, 2 strides, 3 box dims, 3 element strides); `map` is
    // writable; the driver only encodes the address, it does not read it.
    unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            3,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()?;
    }
    // SAFETY: the encode call succeeded and wrote the whole map (and it was
    // zeroed before).
    Ok(TensorMap(unsafe { map.assume_init() }))
}

/// `VPPO_ATTN_WGMMA=0` (or `false`/`off`) keeps `attention_fwd` and
/// `attention_bwd` on the FA2 kernels, for debugging and benching that
/// path. Read once: every attention call asks.
pub fn wgmma_disabled_by_env() -> bool {
    static DISABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DISABLED.get_or_init(|| {
        std::env::var("VPPO_ATTN_WGMMA").is_ok_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "0" | "false" | "off"
            )
        })
    })
}

impl CudaBackend {
    /// Whether attention takes the wgmma kernels of `module` for `shape`:
    /// Hopper (the backend loads sm_90a modules on compute capability 9.0
    /// only), a built head dim, long sequences (text, full-image vision:
    /// more than `WGMMA_MIN_SEQLEN_Q` queries), keys to map, and not
    /// `VPPO_ATTN_WGMMA=0`; the FA2 tensor-core kernels otherwise.
    pub(super) fn wgmma_chosen(&self, module: &'static str, shape: &FlashAttnShape) -> bool {
        shape.max_seqlen_q > WGMMA_MIN_SEQLEN_Q
            && shape.total_k > 0
            && flash_wgmma_supports(shape.head_dim)
            && !wgmma_disabled_by_env()
            && self.has_module(module)
    }

    /// `attention_fwd`'s choice for a bf16 call ([`Self::wgmma_chosen`]).
    pub fn wgmma_fwd_chosen(&self, shape: &FlashAttnShape) -> bool {
        self.wgmma_chosen(MODULE, shape)
    }

    /// The Hopper twin of `flash_attn_tc_fwd` (same buffers, same results
    /// at bf16 tolerance): writes `o[Tq, q_heads, D]` (bf16) and
    /// `lse[Tq, q_heads]` (f32). Errors on a device or build without the
    /// sm_90a kernel; calls without keys at all go to the FA2 kernel (a
    /// tensor map needs a non-empty tensor).
    // flash_attn_wgmma_fwd_d{64,80,128}(const __grid_constant__ CUtensorMap tm_q,
    //     const __grid_constant__ CUtensorMap tm_k, const __grid_constant__ CUtensorMap tm_v,
    //     const int* cu_q, const int* cu_k, bf16* o, float* lse, int hq, int hkv,
    //     float scale, int causal)
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attn_wgmma_fwd(
        &self,
        shape: &FlashAttnShape,
        q: &CudaSlice<bf16>,
        k: &CudaSlice<bf16>,
        v: &CudaSlice<bf16>,
        cu_seqlens_q: &CudaSlice<i32>,
        cu_seqlens_k: &CudaSlice<i32>,
        o: &mut CudaSlice<bf16>,
        lse: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        const K: &str = "flash_attn_wgmma_fwd";
        shape.check_fwd_buffers(K, q, k, v, cu_seqlens_q, cu_seqlens_k, o, lse)?;
        let d = shape.head_dim;
        check_wgmma_head_dim(K, d)?;
        if shape.seqs == 0 || shape.max_seqlen_q == 0 {
            return Ok(());
        }
        if shape.total_k == 0 {
            return self.flash_attn_tc_fwd(shape, q, k, v, cu_seqlens_q, cu_seqlens_k, o, lse);
        }
        let f = self.function(MODULE, &format!("flash_attn_wgmma_fwd_d{d}"))?;
        let smem = wgmma_fwd_smem_bytes(d);
        opt_in_smem(&f, smem)?;
        let (hq, hkv, causal) = shape.kernel_ints(K)?;
        // The guards order the kernel's reads of q/k/v (through the tensor
        // maps, invisible to cudarc) after their writers on other streams.
        let (q_ptr, _q_sync) = q.device_ptr(&self.stream);
        let (k_ptr, _k_sync) = k.device_ptr(&self.stream);
        let (v_ptr, _v_sync) = v.device_ptr(&self.stream);
        let tm_q = tensor_map(q_ptr, shape.total_q, shape.q_heads, d, WGMMA_QUERY_ROWS)?;
        let tm_k = tensor_map(k_ptr, shape.total_k, shape.kv_heads, d, KEY_TILE)?;
        let tm_v = tensor_map(v_ptr, shape.total_k, shape.kv_heads, d, KEY_TILE)?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(&tm_q)
            .arg(&tm_k)
            .arg(&tm_v)
            .arg(cu_seqlens_q)
            .arg(cu_seqlens_k)
            .arg(o)
            .arg(lse)
            .arg(&hq)
            .arg(&hkv)
            .arg(&shape.scale)
            .arg(&causal);
        let cfg = LaunchConfig {
            grid_dim: (
                shape.max_seqlen_q.div_ceil(WGMMA_QUERY_ROWS) as u32,
                shape.q_heads as u32,
                shape.seqs as u32,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: matches the C signature above; the tensor maps cover
        // exactly total_q (total_k) tokens of the checked q (k, v) buffers,
        // which outlive the launch on this stream, and TMA zero-fills reads
        // past them; o and lse were checked against the shape, whose offsets
        // the device cu_seqlens repeat; the dynamic shared memory is the
        // kernel's FaWgLayout<D>::SMEM_BYTES.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_mirrors_the_kernel_layout_and_fits_sm90() {
        // d = 128: two 64-column panels of 128-byte rows: Q 128 rows, K and V
        // 128 keys in two stages: 5 x 32 KiB + barriers + alignment.
        assert_eq!(wgmma_fwd_smem_bytes(128), 5 * 32_768 + 64 + 1024);
        // d = 80: five 16-column panels of 32-byte rows, no padding.
        assert_eq!(wgmma_fwd_smem_bytes(80), 5 * 128 * 160 + 64 + 1024);
        assert_eq!(wgmma_fwd_smem_bytes(64), 5 * 16_384 + 64 + 1024);
        for d in [64, 80, 128] {
            // sm_90's opt-in limit per block: 227 KiB.
            assert!(wgmma_fwd_smem_bytes(d) <= 227 * 1024, "d={d}");
        }
    }

    #[test]
    fn only_the_built_head_dims_are_supported() {
        for d in [64, 80, 128] {
            assert!(flash_wgmma_supports(d));
        }
        for d in [16, 32, 96, 256] {
            assert!(!flash_wgmma_supports(d));
        }
    }

    #[test]
    fn panels_are_whole_swizzle_atoms() {
        // Every head dim splits into whole panels (no partial TMA box); the
        // panel row is the swizzle span (128 or 32 bytes).
        for d in [64, 80, 128] {
            let cols = panel_cols(d);
            assert_eq!(d % cols, 0, "d={d}");
            assert!(matches!(2 * cols, 128 | 32), "d={d}");
        }
    }
}
