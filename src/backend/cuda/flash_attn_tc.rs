//! Launchers of the tensor-core flash-attention kernels
//! (`kernels/flash_attn_tc.cu`): bf16 q/k/v/o, f32 log-sum-exp, f32
//! accumulation. The bf16 attention of the CUDA backend; the CUDA-core
//! kernels of `flash_attn.rs` stay the exact-parity (fp32) path. Each
//! launcher keeps the C signature it launches in a comment.

use super::flash_attn::FlashAttnShape;
use super::launch_util::{need, opt_in_smem, to_i32};
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
        shape.check(K)?;
        need(K, "q", q.len(), shape.q_elems())?;
        need(K, "o", o.len(), shape.q_elems())?;
        need(K, "k", k.len(), shape.k_elems())?;
        need(K, "v", v.len(), shape.k_elems())?;
        need(K, "lse", lse.len(), shape.total_q * shape.q_heads)?;
        need(K, "cu_seqlens_q", cu_seqlens_q.len(), shape.seqs + 1)?;
        need(K, "cu_seqlens_k", cu_seqlens_k.len(), shape.seqs + 1)?;
        if shape.seqs == 0 || shape.max_seqlen_q == 0 {
            return Ok(());
        }
        let d = shape.head_dim;
        let tile = tc_fwd_tile(shape);
        let name = format!("flash_attn_tc_fwd_d{d}_m{}", tile.rows());
        let f = self.function("flash_attn_tc", &name)?;
        let smem = tile.smem_bytes(d);
        opt_in_smem(&f, smem)?;
        let hq = to_i32(K, "q_heads", shape.q_heads)?;
        let hkv = to_i32(K, "kv_heads", shape.kv_heads)?;
        let causal = i32::from(shape.causal);
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
}
