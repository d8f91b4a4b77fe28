//! Launcher of the Hopper flash-attention backward
//! (`kernels/flash_attn_wgmma_bwd.cu`: TMA, warp specialisation, wgmma; the
//! FlashAttention-3 structure) and `attention_bwd`'s choice between it and
//! the FA2 tensor-core backward. Same contract and scratch as
//! `flash_attn_tc_bwd`: the delta pre-pass and the dq convert pass are the
//! FA2 path's kernels; only the main kernel differs.
//!
//! The kernel reads q, k, v and dO through TMA tensor maps built here (boxes
//! of `QUERY_TILE` rows for q/dO and `KEY_BLOCK` rows for k/v, one panel of
//! head-dim columns wide), so the shapes and the shared-memory layout below
//! must match the .cu's `FaWbLayout`.

use super::flash_attn::FlashAttnShape;
use super::flash_attn_tc::check_tc_bwd_buffers;
use super::flash_attn_wgmma::{check_wgmma_head_dim, tensor_map};
use super::launch_util::opt_in_smem;
use super::{CudaBackend, CudaError};
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use half::bf16;

const MODULE: &str = "flash_attn_wgmma_bwd";

/// Keys per block (two consumer warpgroups of 64 keys) and query rows per
/// tile of the Q/dO ring, and the ring's stages (mirror the .cu).
pub const WGMMA_BWD_KEYS: usize = 128;
const QUERY_TILE: usize = 64;
const STAGES: usize = 2;
/// Producer warpgroup + two consumer warpgroups.
const THREADS: u32 = 384;

/// Dynamic shared memory of the kernel (`FaWbLayout<D>::SMEM_BYTES`): K and
/// V tiles, two stages of Q and dO tiles, two warpgroups' dS^T tiles (64 x
/// 64 bf16), two stages of lse and delta rows, 64 bytes of barriers and
/// 1024 bytes to align the window to the swizzle period.
pub fn wgmma_bwd_smem_bytes(head_dim: usize) -> usize {
    let kv = WGMMA_BWD_KEYS * head_dim * 2;
    let qt = QUERY_TILE * head_dim * 2;
    let ds = 64 * QUERY_TILE * 2;
    2 * kv + 2 * STAGES * qt + 2 * ds + STAGES * 2 * QUERY_TILE * 4 + 64 + 1024
}

impl CudaBackend {
    /// `attention_bwd`'s choice for a bf16 call: the forward's conditions
    /// ([`Self::wgmma_chosen`]) on the backward's module.
    pub fn wgmma_bwd_chosen(&self, shape: &FlashAttnShape) -> bool {
        self.wgmma_chosen(MODULE, shape)
    }

    /// The Hopper twin of `flash_attn_tc_bwd` (same buffers, same results at
    /// bf16 tolerance): writes `dq`, `dk`, `dv` (overwritten). Scratch:
    /// `delta` (`Tq * q_heads` f32) and `dq_acc` (`Tq * q_heads * D` f32,
    /// zeroed here; the kernel adds into it with reductions, so dq may differ
    /// in the last bits between runs). Calls without keys go to the FA2
    /// backward (a tensor map needs a non-empty tensor).
    // flash_attn_bwd_delta_bf16 (flash_attn.cu), then
    // flash_attn_wgmma_bwd_d{64,80,128}(const __grid_constant__ CUtensorMap tm_q,
    //     tm_k, tm_v, tm_do, const float* lse, const float* delta,
    //     const int* cu_q, const int* cu_k, float* dq_acc, bf16* dk, bf16* dv,
    //     int hq, int hkv, float scale, int causal)
    // flash_attn_tc_dq_convert(const float* dq_acc, bf16* dq, size_t n)
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attn_wgmma_bwd(
        &self,
        shape: &FlashAttnShape,
        q: &CudaSlice<bf16>,
        k: &CudaSlice<bf16>,
        v: &CudaSlice<bf16>,
        o: &CudaSlice<bf16>,
        lse: &CudaSlice<f32>,
        dout: &CudaSlice<bf16>,
        cu_seqlens_q: &CudaSlice<i32>,
        cu_seqlens_k: &CudaSlice<i32>,
        delta: &mut CudaSlice<f32>,
        dq_acc: &mut CudaSlice<f32>,
        dq: &mut CudaSlice<bf16>,
        dk: &mut CudaSlice<bf16>,
        dv: &mut CudaSlice<bf16>,
    ) -> Result<(), CudaError> {
        const K: &str = "flash_attn_wgmma_bwd";
        check_tc_bwd_buffers(
            K,
            shape,
            [q, k, v, o, dout, dq, dk, dv],
            [lse, delta, dq_acc],
            [cu_seqlens_q, cu_seqlens_k],
        )?;
        let d = shape.head_dim;
        check_wgmma_head_dim(K, d)?;
        if shape.seqs == 0 {
            return Ok(());
        }
        if shape.total_k == 0 || shape.total_q == 0 {
            return self.flash_attn_tc_bwd(
                shape,
                q,
                k,
                v,
                o,
                lse,
                dout,
                cu_seqlens_q,
                cu_seqlens_k,
                delta,
                dq_acc,
                dq,
                dk,
                dv,
            );
        }
        let rows = shape.total_q * shape.q_heads;
        let (hq, hkv, causal) = shape.kernel_ints(K)?;
        let n_q = shape.q_elems();

        self.flash_attn_bwd_delta(K, o, dout, delta, rows, d)?;
        self.stream.memset_zeros(&mut dq_acc.slice_mut(0..n_q))?;
        if shape.max_seqlen_k > 0 {
            let f = self.function(MODULE, &format!("flash_attn_wgmma_bwd_d{d}"))?;
            let smem = wgmma_bwd_smem_bytes(d);
            opt_in_smem(&f, smem)?;
            // The guards order the kernel's reads of q/k/v/dO (through the
            // tensor maps, invisible to cudarc) after their writers.
            let (q_ptr, _q_sync) = q.device_ptr(&self.stream);
            let (k_ptr, _k_sync) = k.device_ptr(&self.stream);
            let (v_ptr, _v_sync) = v.device_ptr(&self.stream);
            let (do_ptr, _do_sync) = dout.device_ptr(&self.stream);
            let tm_q = tensor_map(q_ptr, shape.total_q, shape.q_heads, d, QUERY_TILE)?;
            let tm_k = tensor_map(k_ptr, shape.total_k, shape.kv_heads, d, WGMMA_BWD_KEYS)?;
            let tm_v = tensor_map(v_ptr, shape.total_k, shape.kv_heads, d, WGMMA_BWD_KEYS)?;
            let tm_do = tensor_map(do_ptr, shape.total_q, shape.q_heads, d, QUERY_TILE)?;
            let mut launch = self.stream.launch_builder(&f);
            launch
                .arg(&tm_q)
                .arg(&tm_k)
                .arg(&tm_v)
                .arg(&tm_do)
                .arg(lse)
                .arg(&*delta)
                .arg(cu_seqlens_q)
                .arg(cu_seqlens_k)
                .arg(&mut *dq_acc)
                .arg(dk)
                .arg(dv)
                .arg(&hq)
                .arg(&hkv)
                .arg(&shape.scale)
                .arg(&causal);
            let cfg = LaunchConfig {
                grid_dim: (
                    shape.max_seqlen_k.div_ceil(WGMMA_BWD_KEYS) as u32,
                    shape.kv_heads as u32,
                    shape.seqs as u32,
                ),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            // SAFETY: matches the C signature above; the tensor maps cover
            // exactly total_q (total_k) tokens of the checked q and dout (k,
            // v) buffers, which outlive the launch on this stream, and TMA
            // zero-fills reads past them; lse, delta, dq_acc, dk and dv were
            // checked against the shape, whose offsets the device cu_seqlens
            // repeat, and dq_acc holds Tq*q_heads*D zeroed floats; the dynamic
            // shared memory is the kernel's FaWbLayout<D>::SMEM_BYTES.
            unsafe { launch.launch(cfg) }?;
        }
        self.flash_attn_tc_dq_convert(dq_acc, dq, n_q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_mirrors_the_kernel_layout_and_fits_sm90() {
        // d = 128: K, V 32 KiB each; Q, dO 16 KiB per stage x 2; dS^T 2 x 8
        // KiB; lse + delta 2 x 512 bytes; barriers; alignment.
        assert_eq!(
            wgmma_bwd_smem_bytes(128),
            2 * 32_768 + 4 * 16_384 + 16_384 + 1024 + 64 + 1024
        );
        // The host emulation (scripts/check_wgmma_bwd.py) prints the same
        // totals from its transcription of FaWbLayout.
        assert_eq!(wgmma_bwd_smem_bytes(128), 149_568);
        assert_eq!(
            wgmma_bwd_smem_bytes(80),
            2 * 20_480 + 4 * 10_240 + 16_384 + 1024 + 64 + 1024
        );
        for d in [64, 80, 128] {
            // sm_90's opt-in limit per block: 227 KiB.
            assert!(wgmma_bwd_smem_bytes(d) <= 227 * 1024, "d={d}");
        }
    }

    #[test]
    fn the_key_block_is_two_warpgroups_of_64_keys() {
        assert_eq!(WGMMA_BWD_KEYS, 2 * 64);
        assert_eq!(THREADS as usize, 3 * 128);
        assert_eq!(QUERY_TILE % 16, 0);
    }
}
