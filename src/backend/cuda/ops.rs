//! Kernel launchers. Each keeps the C signature it launches in a comment:
//! kernel arguments are untyped, so an `i32` must meet an `int` and a `f32` a
//! `float`, or the launch silently reads garbage.

use super::launch_util::need;
use super::{CudaBackend, CudaError};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

const BLOCK: u32 = 256;
/// Rows each block of the RMSNorm backward walks (sets the dw partial count).
const RMSNORM_BWD_ROWS_PER_BLOCK: usize = 32;

/// Floats of scratch [`CudaBackend::rmsnorm_bwd_with`] needs for `rows` x `dim`.
pub fn rmsnorm_bwd_scratch_len(rows: usize, dim: usize) -> usize {
    rows.div_ceil(RMSNORM_BWD_ROWS_PER_BLOCK) * dim
}
/// Dynamic shared memory available without opting in.
const DEFAULT_SMEM_LIMIT: usize = 48 * 1024;

fn to_i32(kernel: &'static str, what: &str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::Unsupported {
        kernel,
        reason: format!("{what} = {v} exceeds i32"),
    })
}

/// One thread per element.
fn elementwise_grid(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK as usize).max(1) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn row_grid(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    /// Twin of `cpu::rmsnorm::rmsnorm_fwd`.
    // rmsnorm_fwd_f32(const float* x, const float* weight, float* y,
    //                 float* rstd, int rows, int dim, float eps)
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_fwd(
        &self,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
        y: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let f = self.function("rmsnorm", "rmsnorm_fwd_f32")?;
        let (rows_i, dim_i) = (
            to_i32("rmsnorm_fwd", "rows", rows)?,
            to_i32("rmsnorm_fwd", "dim", dim)?,
        );
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(x)
            .arg(weight)
            .arg(y)
            .arg(rstd)
            .arg(&rows_i)
            .arg(&dim_i)
            .arg(&eps);
        // SAFETY: argument types and order match the C signature above, and
        // the buffers hold rows*dim (x, y), dim (weight) and rows (rstd) floats
        // as the CPU twin's contract requires.
        unsafe { launch.launch(row_grid(rows)) }?;
        Ok(())
    }

    /// Twin of `cpu::rmsnorm::rmsnorm_bwd`: writes `dx`, accumulates `dw`.
    // rmsnorm_bwd_f32(const float* dy, const float* x, const float* weight,
    //                 const float* rstd, float* dx, float* dw_partial,
    //                 int rows, int dim, int rows_per_block)
    // rmsnorm_dw_reduce_f32(const float* dw_partial, float* dw,
    //                       int partial_rows, int dim)
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_bwd(
        &self,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
        dx: &mut CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let mut partial = self
            .stream
            .alloc_zeros::<f32>(rmsnorm_bwd_scratch_len(rows, dim))?;
        self.rmsnorm_bwd_with(dy, x, weight, rstd, rows, dim, dx, dw, &mut partial)
    }

    /// [`Self::rmsnorm_bwd`] with the caller's scratch for the per-block
    /// weight-gradient partials (at least [`rmsnorm_bwd_scratch_len`]
    /// floats): no allocation, for per-layer loops.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_bwd_with(
        &self,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
        dx: &mut CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
        partial: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let smem = dim * std::mem::size_of::<f32>();
        if smem > DEFAULT_SMEM_LIMIT {
            return Err(CudaError::Unsupported {
                kernel: "rmsnorm_bwd",
                reason: format!(
                    "dim {dim} needs {smem} bytes of shared memory (limit {DEFAULT_SMEM_LIMIT})"
                ),
            });
        }
        need(
            "rmsnorm_bwd",
            "partial",
            partial.len(),
            rmsnorm_bwd_scratch_len(rows, dim),
        )?;
        let partial_rows = rows.div_ceil(RMSNORM_BWD_ROWS_PER_BLOCK);
        let bwd = self.function("rmsnorm", "rmsnorm_bwd_f32")?;
        let reduce = self.function("rmsnorm", "rmsnorm_dw_reduce_f32")?;
        let rows_i = to_i32("rmsnorm_bwd", "rows", rows)?;
        let dim_i = to_i32("rmsnorm_bwd", "dim", dim)?;
        let per_block = RMSNORM_BWD_ROWS_PER_BLOCK as i32;
        let partial_i = partial_rows as i32;
        let mut launch = self.stream.launch_builder(&bwd);
        launch
            .arg(dy)
            .arg(x)
            .arg(weight)
            .arg(rstd)
            .arg(dx)
            .arg(&mut *partial)
            .arg(&rows_i)
            .arg(&dim_i)
            .arg(&per_block);
        let cfg = LaunchConfig {
            shared_mem_bytes: smem as u32,
            ..row_grid(partial_rows)
        };
        // SAFETY: matches the C signature above; `partial` holds
        // partial_rows*dim floats, one row per block, and dynamic shared
        // memory holds `dim` floats as the kernel expects.
        unsafe { launch.launch(cfg) }?;
        let mut launch = self.stream.launch_builder(&reduce);
        launch.arg(&*partial).arg(dw).arg(&partial_i).arg(&dim_i);
        // SAFETY: matches the C signature above; one thread per column of dw.
        unsafe { launch.launch(elementwise_grid(dim)) }?;
        Ok(())
    }

    /// Twin of `cpu::kl::softmax_kl_fwd`.
    // softmax_kl_fwd_f32(const float* logits_p, const float* logits_q,
    //                    float* kl, float* lse_p, float* lse_q, int rows, int vocab)
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_kl_fwd(
        &self,
        logits_p: &CudaSlice<f32>,
        logits_q: &CudaSlice<f32>,
        rows: usize,
        vocab: usize,
        kl: &mut CudaSlice<f32>,
        lse_p: &mut CudaSlice<f32>,
        lse_q: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let f = self.function("softmax_kl", "softmax_kl_fwd_f32")?;
        let rows_i = to_i32("softmax_kl_fwd", "rows", rows)?;
        let vocab_i = to_i32("softmax_kl_fwd", "vocab", vocab)?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(logits_p)
            .arg(logits_q)
            .arg(kl)
            .arg(lse_p)
            .arg(lse_q)
            .arg(&rows_i)
            .arg(&vocab_i);
        // SAFETY: matches the C signature above; logits hold rows*vocab floats,
        // the outputs `rows` floats; the block size is a multiple of 32.
        unsafe { launch.launch(row_grid(rows)) }?;
        Ok(())
    }

    /// Twin of `cpu::kl::dependency_k3`.
    // dependency_k3_f32(const float* lp_orig, const float* lp_mask, float* score, int n)
    pub fn dependency_k3(
        &self,
        lp_orig: &CudaSlice<f32>,
        lp_mask: &CudaSlice<f32>,
        n: usize,
        score: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        let f = self.function("softmax_kl", "dependency_k3_f32")?;
        let n_i = to_i32("dependency_k3", "n", n)?;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(lp_orig).arg(lp_mask).arg(score).arg(&n_i);
        // SAFETY: matches the C signature above; all three buffers hold n floats.
        unsafe { launch.launch(elementwise_grid(n)) }?;
        Ok(())
    }

    /// Twin of `cpu::topk::topk_select_mask`.
    // topk_select_mask_f32(const float* scores, const int* cu_seqlens,
    //                      float* mask, int rows, float ratio)
    pub fn topk_select_mask(
        &self,
        scores: &CudaSlice<f32>,
        cu_seqlens: &CudaSlice<i32>,
        rows: usize,
        ratio: f32,
        mask: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let f = self.function("topk_select", "topk_select_mask_f32")?;
        let rows_i = to_i32("topk_select_mask", "rows", rows)?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(scores)
            .arg(cu_seqlens)
            .arg(mask)
            .arg(&rows_i)
            .arg(&ratio);
        // SAFETY: matches the C signature above; cu_seqlens holds rows+1
        // offsets into scores and mask, validated by the caller.
        unsafe { launch.launch(row_grid(rows)) }?;
        Ok(())
    }
}
