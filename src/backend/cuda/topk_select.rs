//! Launcher of the per-response top-k mask kernel (`kernels/topk_select.cu`).
//! It keeps the C signature it launches in a comment: kernel arguments are
//! untyped.

use super::launch_util::{row_grid, to_i32, BLOCK};
use super::{CudaBackend, CudaError};
use cudarc::driver::{CudaSlice, PushKernelArg};

impl CudaBackend {
    /// Twin of `cpu::topk_select::topk_select_mask`.
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
        unsafe { launch.launch(row_grid(rows, BLOCK)) }?;
        Ok(())
    }
}
