//! Launchers of the softmax-KL and k3 dependency kernels
//! (`kernels/softmax_kl.cu`). Each keeps the C signature it launches in a
//! comment: kernel arguments are untyped.

use super::launch_util::{elementwise_grid, row_grid, to_i32, BLOCK};
use super::{CudaBackend, CudaError};
use cudarc::driver::{CudaSlice, PushKernelArg};

impl CudaBackend {
    /// Twin of `cpu::softmax_kl::softmax_kl_fwd`.
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
        unsafe { launch.launch(row_grid(rows, BLOCK)) }?;
        Ok(())
    }

    /// Twin of `cpu::softmax_kl::dependency_k3`.
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
}
