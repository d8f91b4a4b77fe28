//! Launcher of the sampling kernel (`kernels/sampling.cu`). It keeps the C
//! signature it launches in a comment: kernel arguments are untyped.

use super::launch_util::{need, row_grid, to_i32};
use super::{CudaBackend, CudaError};
use crate::backend::desc::SamplingParams;
use cudarc::driver::{CudaSlice, PushKernelArg};

impl CudaBackend {
    /// Twin of `rollout::sampling::sample_token_with_uniform` on each of
    /// `rows` rows of `logits[rows, vocab]` with the draw `uniforms[row]`:
    /// writes the token and its temperature-1 log-prob.
    // sample_f32(const float* logits, const float* uniforms, int* token,
    //     float* logprob, int rows, int vocab, float temperature, float top_p,
    //     int top_k)
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        logits: &CudaSlice<f32>,
        rows: usize,
        vocab: usize,
        params: &SamplingParams,
        uniforms: &CudaSlice<f32>,
        token: &mut CudaSlice<i32>,
        logprob: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        const K: &str = "sample";
        if vocab == 0 {
            return Err(CudaError::Unsupported {
                kernel: K,
                reason: "empty vocabulary".into(),
            });
        }
        need(K, "logits", logits.len(), rows * vocab)?;
        need(K, "uniforms", uniforms.len(), rows)?;
        need(K, "token", token.len(), rows)?;
        need(K, "logprob", logprob.len(), rows)?;
        if rows == 0 {
            return Ok(());
        }
        let rows_i = to_i32(K, "rows", rows)?;
        let vocab_i = to_i32(K, "vocab", vocab)?;
        let top_k = to_i32(K, "top_k", params.top_k.min(vocab))?;
        let f = self.function("sampling", "sample_f32")?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(logits)
            .arg(uniforms)
            .arg(token)
            .arg(logprob)
            .arg(&rows_i)
            .arg(&vocab_i)
            .arg(&params.temperature)
            .arg(&params.top_p)
            .arg(&top_k);
        // SAFETY: matches the C signature above; logits hold rows*vocab floats,
        // the per-row buffers `rows` elements; the kernel needs 1024 threads.
        unsafe { launch.launch(row_grid(rows, 1024)) }?;
        Ok(())
    }
}
