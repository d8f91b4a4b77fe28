//! Launcher of the paged decode-attention kernel (`kernels/paged_attn.cu`).
//! It keeps the C signature it launches in a comment: kernel arguments are
//! untyped.

use super::launch_util::{need, to_i32, Elem};
use super::{CudaBackend, CudaError};
use crate::backend::desc::PagedShape;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

impl CudaBackend {
    /// Twin of `cpu::paged_attn::paged_decode_attention`, for `batch`
    /// sequences whose tables and lengths come from `backend::desc::flatten_block_tables`.
    /// Every table entry a sequence uses must name a block of the caches.
    /// With `T = bf16`, q, the caches and o are bf16 (f32 arithmetic).
    // paged_decode_attention_{f32,bf16}(const T* q, const T* k_cache,
    //     const T* v_cache, const int* block_tables, const int* seq_lens,
    //     T* o, int q_heads, int kv_heads, int head_dim, int block_size,
    //     int table_stride, float scale)
    #[allow(clippy::too_many_arguments)]
    pub fn paged_decode_attention<T: Elem>(
        &self,
        shape: &PagedShape,
        batch: usize,
        q: &CudaSlice<T>,
        k_cache: &CudaSlice<T>,
        v_cache: &CudaSlice<T>,
        block_tables: &CudaSlice<i32>,
        table_stride: usize,
        seq_lens: &CudaSlice<i32>,
        o: &mut CudaSlice<T>,
    ) -> Result<(), CudaError> {
        const K: &str = "paged_decode_attention";
        let bad = |reason: String| Err(CudaError::Unsupported { kernel: K, reason });
        if shape.head_dim == 0 || shape.head_dim > 128 {
            return bad(format!("head_dim {} (1..=128)", shape.head_dim));
        }
        if shape.kv_heads == 0 || shape.q_heads % shape.kv_heads != 0 || shape.block_size == 0 {
            return bad(format!(
                "q_heads {} / kv_heads {} / block_size {}",
                shape.q_heads, shape.kv_heads, shape.block_size
            ));
        }
        if batch > 65_535 {
            return bad(format!("batch {batch} exceeds the grid"));
        }
        let qn = batch * shape.q_heads * shape.head_dim;
        need(K, "q", q.len(), qn)?;
        need(K, "o", o.len(), qn)?;
        need(K, "block_tables", block_tables.len(), batch * table_stride)?;
        need(K, "seq_lens", seq_lens.len(), batch)?;
        if k_cache.len() != v_cache.len() {
            return bad("k and v caches differ in length".into());
        }
        if batch == 0 {
            return Ok(());
        }
        let f = self.function(
            "paged_attn",
            &format!("paged_decode_attention_{}", T::SUFFIX),
        )?;
        let hq = to_i32(K, "q_heads", shape.q_heads)?;
        let hkv = to_i32(K, "kv_heads", shape.kv_heads)?;
        let d = to_i32(K, "head_dim", shape.head_dim)?;
        let bs = to_i32(K, "block_size", shape.block_size)?;
        let stride = to_i32(K, "table_stride", table_stride)?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(q)
            .arg(k_cache)
            .arg(v_cache)
            .arg(block_tables)
            .arg(seq_lens)
            .arg(o)
            .arg(&hq)
            .arg(&hkv)
            .arg(&d)
            .arg(&bs)
            .arg(&stride)
            .arg(&shape.scale);
        let cfg = LaunchConfig {
            grid_dim: (shape.q_heads as u32, batch as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches the C signature above; q and o hold batch*q_heads*D
        // floats, the tables [batch, stride] ints naming cache blocks (caller's
        // contract), seq_lens batch ints.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }
}
