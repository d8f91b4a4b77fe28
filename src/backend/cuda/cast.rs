//! Launchers of the f32/bf16 cast kernels (`kernels/cast.cu`). Each keeps
//! the C signature it launches in a comment: kernel arguments are untyped.

use super::launch_util::{elementwise_grid, need};
use super::{CudaBackend, CudaError};
use cudarc::driver::{CudaSlice, PushKernelArg};

impl CudaBackend {
    /// Twin of `cpu::cast::f32_to_bf16` (nearest, ties to even).
    // cast_f32_to_bf16(const float* src, bf16* dst, long long n)
    pub fn cast_f32_to_bf16(
        &self,
        src: &CudaSlice<f32>,
        n: usize,
        dst: &mut CudaSlice<half::bf16>,
    ) -> Result<(), CudaError> {
        need("cast_f32_to_bf16", "src", src.len(), n)?;
        need("cast_f32_to_bf16", "dst", dst.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let f = self.function("cast", "cast_f32_to_bf16")?;
        let n_i = n as i64;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(src).arg(dst).arg(&n_i);
        // SAFETY: matches the C signature above; both buffers hold n elements.
        unsafe { launch.launch(elementwise_grid(n)) }?;
        Ok(())
    }

    /// Twin of `cpu::cast::bf16_to_f32` (exact).
    // cast_bf16_to_f32(const bf16* src, float* dst, long long n)
    pub fn cast_bf16_to_f32(
        &self,
        src: &CudaSlice<half::bf16>,
        n: usize,
        dst: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        need("cast_bf16_to_f32", "src", src.len(), n)?;
        need("cast_bf16_to_f32", "dst", dst.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let f = self.function("cast", "cast_bf16_to_f32")?;
        let n_i = n as i64;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(src).arg(dst).arg(&n_i);
        // SAFETY: matches the C signature above; both buffers hold n elements.
        unsafe { launch.launch(elementwise_grid(n)) }?;
        Ok(())
    }
}
