//! Launchers of the RMSNorm kernels (`kernels/rmsnorm.cu`). Each keeps the
//! C signature it launches in a comment: kernel arguments are untyped, so an
//! `i32` must meet an `int` and a `f32` a `float`, or the launch silently
//! reads garbage.

use super::launch_util::{elementwise_grid, need, row_grid, to_i32, Elem, BLOCK};
use super::{CudaBackend, CudaError};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// Rows each block of the RMSNorm backward walks (sets the dw partial count).
const RMSNORM_BWD_ROWS_PER_BLOCK: usize = 32;

/// Floats of scratch [`CudaBackend::rmsnorm_bwd_with`] needs for `rows` x `dim`.
pub fn rmsnorm_bwd_scratch_len(rows: usize, dim: usize) -> usize {
    rows.div_ceil(RMSNORM_BWD_ROWS_PER_BLOCK) * dim
}
/// Dynamic shared memory available without opting in.
const DEFAULT_SMEM_LIMIT: usize = 48 * 1024;

impl CudaBackend {
    /// Twin of `cpu::rmsnorm::rmsnorm_fwd` (with `T = bf16`: x, weight and
    /// y bf16, rstd and the arithmetic f32).
    // rmsnorm_fwd_{f32,bf16}(const T* x, const T* weight, T* y,
    //                 float* rstd, int rows, int dim, float eps)
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_fwd<T: Elem>(
        &self,
        x: &CudaSlice<T>,
        weight: &CudaSlice<T>,
        rows: usize,
        dim: usize,
        eps: f32,
        y: &mut CudaSlice<T>,
        rstd: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let f = self.function("rmsnorm", &format!("rmsnorm_fwd_{}", T::SUFFIX))?;
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
        unsafe { launch.launch(row_grid(rows, BLOCK)) }?;
        Ok(())
    }

    /// Twin of `cpu::rmsnorm::rmsnorm_bwd`: writes `dx`, accumulates `dw`.
    // rmsnorm_bwd_f32(const float* dy, const float* x, const float* weight,
    //                 const float* rstd, float* dx, float* dw_partial,
    //                 int rows, int dim, int rows_per_block)
    // rmsnorm_dw_reduce_f32(const float* dw_partial, float* dw,
    //                       int partial_rows, int dim)
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_bwd<T: Elem>(
        &self,
        dy: &CudaSlice<T>,
        x: &CudaSlice<T>,
        weight: &CudaSlice<T>,
        rstd: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
        dx: &mut CudaSlice<T>,
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
    pub fn rmsnorm_bwd_with<T: Elem>(
        &self,
        dy: &CudaSlice<T>,
        x: &CudaSlice<T>,
        weight: &CudaSlice<T>,
        rstd: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
        dx: &mut CudaSlice<T>,
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
        let bwd = self.function("rmsnorm", &format!("rmsnorm_bwd_{}", T::SUFFIX))?;
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
            ..row_grid(partial_rows, BLOCK)
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
}
