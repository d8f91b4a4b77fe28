//! Launchers of the tensor-core flash-attention kernels
//! (`kernels/flash_attn_tc.cu`): bf16 q/k/v/o, f32 log-sum-exp, f32
//! accumulation. The bf16 attention of the CUDA backend; the CUDA-core
//! kernels of `flash_attn.rs` stay the exact-parity (fp32) path. Each
//! launcher keeps the C signature it launches in a comment.

use super::flash_attn::FlashAttnShape;
use super::launch_util::{elementwise_grid, opt_in_smem};
use super::{CudaBackend, CudaError};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

/// One forward tile configuration: `warps` warps own `16 * warps` query
/// rows; keys stream in tiles of `key_tile` (mirrors `FA_TC_FWD` in the .cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcFwdTile {
    pub warps: usize,
    pub key_tile: usize,
}

impl TcFwdTile {
    /// Query rows per block.
    pub fn rows(&self) -> usize {
        16 * self.warps
    }

    /// Dynamic shared memory: the Q tile and two K and two V tiles, rows of
    /// `head_dim + 8` bf16.
    pub fn smem_bytes(&self, head_dim: usize) -> usize {
        (self.rows() + 4 * self.key_tile) * (head_dim + 8) * 2
    }
}

/// Head dims the tensor-core kernels are built for (the text model's 128,
/// the vision tower's 80, and small test dims); others take the CUDA-core
/// kernels.
pub fn flash_tc_supports(head_dim: usize) -> bool {
    matches!(head_dim, 16 | 64 | 80 | 128)
}

/// The forward tile for a call: 64-row blocks when no sequence has more than
/// 64 queries (vision windows: a 128-row block would be half empty), else
/// 128-row blocks (twice the reuse of every K/V tile loaded).
pub fn tc_fwd_tile(shape: &FlashAttnShape) -> TcFwdTile {
    if shape.max_seqlen_q <= 64 {
        TcFwdTile {
            warps: 4,
            key_tile: 64,
        }
    } else {
        TcFwdTile {
            warps: 8,
            key_tile: 64,
        }
    }
}

/// The backward's query tile (mirrors `FA_TC_BWD` in the .cu): 32 rows at
/// head dim 128, where the dK/dV accumulators leave no registers for 64,
/// else 64. Blocks are 4 warps over 64 keys.
pub fn tc_bwd_query_tile(head_dim: usize) -> usize {
    if head_dim > 80 {
        32
    } else {
        64
    }
}

/// Keys per backward block.
pub const TC_BWD_KEYS: usize = 64;

/// Dynamic shared memory of the backward: K and V, two Q and two dO tiles
/// (rows of `head_dim + 8` bf16), dS^T (`TC_BWD_KEYS` rows of `qt + 8`
/// bf16), two lse and two delta rows (f32).
pub fn tc_bwd_smem_bytes(head_dim: usize) -> usize {
    let qt = tc_bwd_query_tile(head_dim);
    (2 * TC_BWD_KEYS + 4 * qt) * (head_dim + 8) * 2 + TC_BWD_KEYS * (qt + 8) * 2 + 4 * qt * 4
}

impl CudaBackend {
    /// Tensor-core twin of `cpu::flash_attn::attention_fwd` on bf16 storage:
    /// writes `o[Tq, q_heads, D]` (bf16) and `lse[Tq, q_heads]` (f32).
    // flash_attn_tc_fwd_d{16,64,80,128}_m{64,128}(const bf16* q, const bf16* k,
    //     const bf16* v, const int* cu_q, const int* cu_k, bf16* o, float* lse,
    //     int hq, int hkv, float scale, int causal)
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attn_tc_fwd(
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
        const K: &str = "flash_attn_tc_fwd";
        shape.check_fwd_buffers(K, q, k, v, cu_seqlens_q, cu_seqlens_k, o, lse)?;
        if shape.seqs == 0 || shape.max_seqlen_q == 0 {
            return Ok(());
        }
        let d = shape.head_dim;
        let tile = tc_fwd_tile(shape);
        let name = format!("flash_attn_tc_fwd_d{d}_m{}", tile.rows());
        let f = self.function("flash_attn_tc", &name)?;
        let smem = tile.smem_bytes(d);
        opt_in_smem(&f, smem)?;
        let (hq, hkv, causal) = shape.kernel_ints(K)?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(q)
            .arg(k)
            .arg(v)
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
                shape.max_seqlen_q.div_ceil(tile.rows()) as u32,
                shape.q_heads as u32,
                shape.seqs as u32,
            ),
            block_dim: (32 * tile.warps as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: matches the C signature above; buffer sizes were checked
        // against the shape, whose offsets the device cu_seqlens repeat; the
        // dynamic shared memory is the kernel's (BM + 4 BN) rows of D + 8 bf16.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }
}

impl CudaBackend {
    /// Tensor-core twin of `cpu::flash_attn::attention_bwd` on bf16 storage:
    /// writes `dq`, `dk`, `dv` (overwritten). Scratch: `delta` (`Tq * q_heads`
    /// f32) and `dq_acc` (`Tq * q_heads * D` f32, zeroed here: the kernel adds
    /// into it atomically, so dq may differ in the last bits between runs).
    // flash_attn_bwd_delta_bf16 (flash_attn.cu), then
    // flash_attn_tc_bwd_d{16,64,80,128}(const bf16* q, const bf16* k,
    //     const bf16* v, const bf16* dout, const float* lse, const float* delta,
    //     const int* cu_q, const int* cu_k, float* dq_acc, bf16* dk, bf16* dv,
    //     int hq, int hkv, float scale, int causal)
    // flash_attn_tc_dq_convert(const float* dq_acc, bf16* dq, size_t n)
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attn_tc_bwd(
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
        const K: &str = "flash_attn_tc_bwd";
        check_tc_bwd_buffers(
            K,
            shape,
            [q, k, v, o, dout, dq, dk, dv],
            [lse, delta, dq_acc],
            [cu_seqlens_q, cu_seqlens_k],
        )?;
        let rows = shape.total_q * shape.q_heads;
        if shape.seqs == 0 {
            return Ok(());
        }
        let d = shape.head_dim;
        let (hq, hkv, causal) = shape.kernel_ints(K)?;
        let n_q = shape.q_elems();

        self.flash_attn_bwd_delta(K, o, dout, delta, rows, d)?;
        self.stream.memset_zeros(&mut dq_acc.slice_mut(0..n_q))?;
        if shape.max_seqlen_k > 0 {
            let f = self.function("flash_attn_tc", &format!("flash_attn_tc_bwd_d{d}"))?;
            let smem = tc_bwd_smem_bytes(d);
            opt_in_smem(&f, smem)?;
            let mut launch = self.stream.launch_builder(&f);
            launch
                .arg(q)
                .arg(k)
                .arg(v)
                .arg(dout)
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
                    shape.max_seqlen_k.div_ceil(TC_BWD_KEYS) as u32,
                    shape.kv_heads as u32,
                    shape.seqs as u32,
                ),
                block_dim: (128, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            // SAFETY: matches the C signature above; sizes checked against the
            // shape; dq_acc holds Tq*q_heads*D zeroed floats.
            unsafe { launch.launch(cfg) }?;
        }
        if n_q > 0 {
            self.flash_attn_tc_dq_convert(dq_acc, dq, n_q)?;
        }
        Ok(())
    }

    /// The tc and wgmma backwards' last pass: `dq = bf16(dq_acc)` over `n_q`
    /// elements (both buffers checked to hold them).
    // flash_attn_tc_dq_convert(const float* dq_acc, bf16* dq, size_t n)
    pub(super) fn flash_attn_tc_dq_convert(
        &self,
        dq_acc: &CudaSlice<f32>,
        dq: &mut CudaSlice<bf16>,
        n_q: usize,
    ) -> Result<(), CudaError> {
        let f = self.function("flash_attn_tc", "flash_attn_tc_dq_convert")?;
        let n = n_q as u64;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(dq_acc).arg(dq).arg(&n);
        // SAFETY: matches the C signature above; dq_acc and dq hold n elements.
        unsafe { launch.launch(elementwise_grid(n_q)) }?;
        Ok(())
    }
}

/// [`FlashAttnShape::check_buffers`] for the tc and wgmma backwards' buffers:
/// `[q, k, v, o, dout, dq, dk, dv]` (bf16), `[lse, delta, dq_acc]` (f32) and
/// both `cu_seqlens`.
pub(super) fn check_tc_bwd_buffers(
    kernel: &'static str,
    shape: &FlashAttnShape,
    bf16s: [&CudaSlice<bf16>; 8],
    f32s: [&CudaSlice<f32>; 3],
    cu_seqlens: [&CudaSlice<i32>; 2],
) -> Result<(), CudaError> {
    let [q, k, v, o, dout, dq, dk, dv] = bf16s;
    let [lse, delta, dq_acc] = f32s;
    shape.check_buffers(
        kernel,
        &[
            ("q", q.len()),
            ("o", o.len()),
            ("dout", dout.len()),
            ("dq", dq.len()),
            ("dq_acc", dq_acc.len()),
        ],
        &[
            ("k", k.len()),
            ("v", v.len()),
            ("dk", dk.len()),
            ("dv", dv.len()),
        ],
        &[("lse", lse.len()), ("delta", delta.len())],
        cu_seqlens.map(|cu| cu.len()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(max_q: usize) -> FlashAttnShape {
        FlashAttnShape {
            seqs: 1,
            total_q: max_q,
            total_k: max_q,
            max_seqlen_q: max_q,
            max_seqlen_k: max_q,
            q_heads: 2,
            kv_heads: 1,
            head_dim: 128,
            causal: true,
            scale: 1.0,
        }
    }

    #[test]
    fn short_sequences_get_64_row_tiles_and_long_ones_128() {
        assert_eq!(tc_fwd_tile(&shape(1)).rows(), 64);
        assert_eq!(tc_fwd_tile(&shape(64)).rows(), 64);
        assert_eq!(tc_fwd_tile(&shape(65)).rows(), 128);
    }

    #[test]
    fn forward_shared_memory_fits_every_target() {
        // sm_80 allows 163 KiB of dynamic shared memory per block.
        for d in [16, 64, 80, 128] {
            for max_q in [64, 4096] {
                let bytes = tc_fwd_tile(&shape(max_q)).smem_bytes(d);
                assert!(bytes <= 163 * 1024, "d={d}: {bytes} bytes");
            }
        }
        // d = 128, 128-row block: (128 + 4 * 64) rows of 136 bf16.
        assert_eq!(tc_fwd_tile(&shape(4096)).smem_bytes(128), 104_448);
    }

    #[test]
    fn backward_shared_memory_fits_every_target() {
        for d in [16, 64, 80, 128] {
            assert!(tc_bwd_smem_bytes(d) <= 163 * 1024, "d={d}");
        }
        // d = 128: (128 + 4 * 32) rows of 136 bf16, 64 x 40 bf16 of dS^T, 4 x 32 floats.
        assert_eq!(tc_bwd_smem_bytes(128), 69_632 + 5_120 + 512);
    }
}
