//! Launcher of the tensor-core paged decode attention
//! (`kernels/paged_attn_tc.cu`, flash-decoding): bf16 q and caches, the KV
//! walk split across blocks, then a combine. The bf16 decode attention of
//! the CUDA backend; `paged_attn.rs` stays the exact-parity path (and the
//! one for groups of more than 16 query heads per kv head). It keeps the C
//! signatures it launches in comments.

use super::launch_util::{need, opt_in_smem, to_i32};
use super::{CudaBackend, CudaError};
use crate::backend::desc::PagedShape;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

/// Tokens one block scores per step (mirrors `PA_TC_CHUNK`).
const CHUNK: usize = 64;
/// Blocks a decode step aims for: a few per SM on an H100/H200 (132 SMs),
/// so enough cache reads are in flight to keep HBM busy.
const TARGET_BLOCKS: usize = 1024;

/// How one decode call splits each sequence's KV walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedTcPlan {
    pub splits: usize,
    /// Tokens per split, a multiple of 64.
    pub split_tokens: usize,
}

/// Splits so that `batch * kv_heads * splits` reaches about
/// `TARGET_BLOCKS` (never more splits than 64-token chunks): a large batch
/// keeps one split per sequence, a small batch with a long context splits it.
pub fn paged_tc_plan(batch: usize, kv_heads: usize, max_len: usize) -> PagedTcPlan {
    let chunks = max_len.div_ceil(CHUNK).max(1);
    let wanted = TARGET_BLOCKS.div_ceil((batch * kv_heads).max(1));
    let splits = wanted.clamp(1, chunks);
    let split_tokens = chunks.div_ceil(splits) * CHUNK;
    PagedTcPlan {
        splits: (max_len.div_ceil(split_tokens)).max(1),
        split_tokens,
    }
}

/// f32 scratch of one call: each split's output row and its (max, sum).
pub fn paged_tc_scratch_len(shape: &PagedShape, batch: usize, plan: &PagedTcPlan) -> usize {
    batch * shape.q_heads * plan.splits * (shape.head_dim + 2)
}

/// Whether the tensor-core decode takes this shape: head dims 16, 64, 80,
/// 128 and at most 16 query heads per kv head (one MMA tile of rows).
pub fn paged_tc_supports(shape: &PagedShape) -> bool {
    matches!(shape.head_dim, 16 | 64 | 80 | 128)
        && shape.kv_heads > 0
        && shape.q_heads % shape.kv_heads == 0
        && shape.q_heads / shape.kv_heads <= 16
        && shape.block_size > 0
}

/// Dynamic shared memory of the split kernel: 16 Q rows and two K and two V
/// chunks, rows of `head_dim + 8` bf16.
pub(super) fn split_smem_bytes(head_dim: usize) -> usize {
    (16 + 4 * CHUNK) * (head_dim + 8) * 2
}

impl CudaBackend {
    /// Tensor-core twin of `cpu::paged_attn::paged_decode_attention` on bf16
    /// storage, for `batch` sequences of at most `max_len` tokens (their
    /// tables and lengths as for `paged_decode_attention`). `scratch` holds
    /// `paged_tc_scratch_len(shape, batch, &paged_tc_plan(batch, kv_heads, max_len))` floats.
    // paged_attn_tc_split_d{16,64,80,128}(const bf16* q, const bf16* k_cache,
    //     const bf16* v_cache, const int* block_tables, const int* seq_lens,
    //     float* o_part, float* ml_part, int q_heads, int kv_heads,
    //     int block_size, int table_stride, int split_tokens, float scale)
    // paged_attn_tc_combine_bf16(const float* o_part, const float* ml_part,
    //     bf16* o, int q_heads, int head_dim, int splits)
    #[allow(clippy::too_many_arguments)]
    pub fn paged_decode_attention_tc(
        &self,
        shape: &PagedShape,
        batch: usize,
        max_len: usize,
        q: &CudaSlice<bf16>,
        k_cache: &CudaSlice<bf16>,
        v_cache: &CudaSlice<bf16>,
        block_tables: &CudaSlice<i32>,
        table_stride: usize,
        seq_lens: &CudaSlice<i32>,
        scratch: &mut CudaSlice<f32>,
        o: &mut CudaSlice<bf16>,
    ) -> Result<(), CudaError> {
        const K: &str = "paged_decode_attention_tc";
        if !paged_tc_supports(shape) {
            return Err(CudaError::Unsupported {
                kernel: K,
                reason: format!(
                    "head_dim {} (16, 64, 80, 128), q_heads {} / kv_heads {} (at most 16 per kv head), block_size {}",
                    shape.head_dim, shape.q_heads, shape.kv_heads, shape.block_size
                ),
            });
        }
        if batch > 65_535 || shape.kv_heads > 65_535 {
            return Err(CudaError::Unsupported {
                kernel: K,
                reason: format!(
                    "batch {batch} x kv_heads {} exceed the grid",
                    shape.kv_heads
                ),
            });
        }
        let d = shape.head_dim;
        let qn = batch * shape.q_heads * d;
        need(K, "q", q.len(), qn)?;
        need(K, "o", o.len(), qn)?;
        need(K, "block_tables", block_tables.len(), batch * table_stride)?;
        need(K, "seq_lens", seq_lens.len(), batch)?;
        if k_cache.len() != v_cache.len() {
            return Err(CudaError::Unsupported {
                kernel: K,
                reason: "k and v caches differ in length".into(),
            });
        }
        if batch == 0 {
            return Ok(());
        }
        let plan = paged_tc_plan(batch, shape.kv_heads, max_len);
        need(
            K,
            "scratch",
            scratch.len(),
            paged_tc_scratch_len(shape, batch, &plan),
        )?;
        let rows = batch * shape.q_heads * plan.splits;
        let hq = to_i32(K, "q_heads", shape.q_heads)?;
        let hkv = to_i32(K, "kv_heads", shape.kv_heads)?;
        let bs = to_i32(K, "block_size", shape.block_size)?;
        let stride = to_i32(K, "table_stride", table_stride)?;
        let split_tokens = to_i32(K, "split_tokens", plan.split_tokens)?;
        let splits = to_i32(K, "splits", plan.splits)?;
        let d_i = to_i32(K, "head_dim", d)?;

        let f = self.function("paged_attn_tc", &format!("paged_attn_tc_split_d{d}"))?;
        let smem = split_smem_bytes(d);
        opt_in_smem(&f, smem)?;
        {
            let (mut o_part, mut rest) = scratch.split_at_mut(rows * d);
            let mut ml_part = rest.slice_mut(0..2 * rows);
            let mut launch = self.stream.launch_builder(&f);
            launch
                .arg(q)
                .arg(k_cache)
                .arg(v_cache)
                .arg(block_tables)
                .arg(seq_lens)
                .arg(&mut o_part)
                .arg(&mut ml_part)
                .arg(&hq)
                .arg(&hkv)
                .arg(&bs)
                .arg(&stride)
                .arg(&split_tokens)
                .arg(&shape.scale);
            let cfg = LaunchConfig {
                grid_dim: (plan.splits as u32, shape.kv_heads as u32, batch as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            // SAFETY: matches the C signature above; q and o hold
            // batch*q_heads*D bf16, the tables [batch, stride] ints naming
            // cache blocks (caller's contract), seq_lens batch ints of at most
            // max_len, o_part rows*D and ml_part 2*rows floats of scratch.
            unsafe { launch.launch(cfg) }?;
        }
        let f = self.function("paged_attn_tc", "paged_attn_tc_combine_bf16")?;
        let (o_part, ml_part) = scratch.split_at(rows * d);
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(&o_part)
            .arg(&ml_part)
            .arg(o)
            .arg(&hq)
            .arg(&d_i)
            .arg(&splits);
        let cfg = LaunchConfig {
            grid_dim: (shape.q_heads as u32, batch as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches the C signature above; o_part and ml_part were
        // written by the split kernel for rows = batch*q_heads*splits.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_covers_every_token_in_64_token_chunks() {
        for (batch, kv, len) in [
            (64, 4, 4096),
            (1, 4, 4096),
            (3, 2, 1),
            (1, 1, 0),
            (8, 4, 100),
        ] {
            let p = paged_tc_plan(batch, kv, len);
            assert_eq!(p.split_tokens % 64, 0, "{p:?}");
            assert!(
                p.splits * p.split_tokens >= len,
                "{p:?} misses tokens of {len}"
            );
            assert!(
                (p.splits - 1) * p.split_tokens < len.max(1),
                "{p:?}: an empty split"
            );
        }
        // The bench case: 64 x 4 = 256 (sequence, kv head) pairs
        // split in 4 to reach 1024 blocks.
        assert_eq!(
            paged_tc_plan(64, 4, 4096),
            PagedTcPlan {
                splits: 4,
                split_tokens: 1024
            }
        );
        // One sequence: one split per 64-token chunk, up to 1024 blocks.
        assert_eq!(paged_tc_plan(1, 1, 640).splits, 10);
    }

    #[test]
    fn groups_of_more_than_16_heads_stay_on_the_fp32_path() {
        let shape = |q_heads, kv_heads, head_dim| PagedShape {
            block_size: 16,
            q_heads,
            kv_heads,
            head_dim,
            scale: 1.0,
        };
        assert!(paged_tc_supports(&shape(28, 4, 128)));
        assert!(paged_tc_supports(&shape(16, 1, 80)));
        assert!(!paged_tc_supports(&shape(17, 1, 128)));
        assert!(!paged_tc_supports(&shape(4, 4, 96)));
    }
}
