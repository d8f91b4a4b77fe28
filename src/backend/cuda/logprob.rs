//! Launchers of the loss-head kernels: token log-prob + entropy over a
//! chunked lm_head (`kernels/logprob.cu`). Each keeps the C signature it
//! launches in a comment: kernel arguments are untyped.

use super::launch_util::{elementwise_grid, need, row_grid, to_i32, Elem};
use super::{CudaBackend, CudaError};
use cudarc::driver::{CudaSlice, PushKernelArg};

/// One vocabulary chunk of lm_head logits: rows of `chunk_len` values
/// (vocabulary ids `vocab_offset..vocab_offset + chunk_len`), row `t`
/// starting at element `t * ld` of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogitChunk {
    pub rows: usize,
    pub chunk_len: usize,
    pub ld: usize,
    pub vocab_offset: usize,
}

impl LogitChunk {
    fn check(&self, kernel: &'static str, len: usize) -> Result<(i32, i32, i32, i32), CudaError> {
        if self.ld < self.chunk_len {
            return Err(CudaError::Unsupported {
                kernel,
                reason: format!("ld {} < chunk_len {}", self.ld, self.chunk_len),
            });
        }
        if self.rows > 0 {
            need(
                kernel,
                "logits",
                len,
                (self.rows - 1) * self.ld + self.chunk_len,
            )?;
        }
        to_i32(
            kernel,
            "vocab_offset + chunk_len",
            self.vocab_offset + self.chunk_len,
        )?;
        to_i32(kernel, "rows * ld", self.rows * self.ld)?;
        Ok((
            to_i32(kernel, "ld", self.ld)?,
            to_i32(kernel, "rows", self.rows)?,
            to_i32(kernel, "chunk_len", self.chunk_len)?,
            to_i32(kernel, "vocab_offset", self.vocab_offset)?,
        ))
    }
}

/// Floats of per-row state the chunked forward carries between chunks.
pub const LOGPROB_STATE_PER_ROW: usize = 4;

impl CudaBackend {
    /// Folds one chunk of logits into `state[rows, 4]`; `first` starts a new
    /// pass. After the last chunk, [`Self::logprob_finish`] gives the twin of
    /// `cpu::logprob::token_logprob_fwd` over the whole vocabulary.
    /// With `T = bf16` the logits are bf16 (the state and arithmetic f32).
    // logprob_chunk_{f32,bf16}(const T* logits, int ld, int rows, int chunk_len,
    //     int vocab_offset, const unsigned int* targets, float* state, int first)
    pub fn logprob_chunk<T: Elem>(
        &self,
        chunk: &LogitChunk,
        logits: &CudaSlice<T>,
        targets: &CudaSlice<u32>,
        first: bool,
        state: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        const K: &str = "logprob_chunk";
        let (ld, rows, len, off) = chunk.check(K, logits.len())?;
        need(K, "targets", targets.len(), chunk.rows)?;
        need(K, "state", state.len(), chunk.rows * LOGPROB_STATE_PER_ROW)?;
        if chunk.rows == 0 {
            return Ok(());
        }
        let f = self.function("logprob", &format!("logprob_chunk_{}", T::SUFFIX))?;
        let first_i = i32::from(first);
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(logits)
            .arg(&ld)
            .arg(&rows)
            .arg(&len)
            .arg(&off)
            .arg(targets)
            .arg(state)
            .arg(&first_i);
        // SAFETY: matches the C signature above; logits cover rows of ld
        // floats (checked), targets `rows` ids, state rows*4 floats; the
        // block size is a multiple of 32.
        unsafe { launch.launch(row_grid(chunk.rows, 256)) }?;
        Ok(())
    }

    /// `logp`, `entropy` and `lse` (each `rows` floats) from the state.
    // logprob_finish_f32(const float* state, float* logp, float* entropy,
    //     float* lse, int rows)
    pub fn logprob_finish(
        &self,
        state: &CudaSlice<f32>,
        rows: usize,
        logp: &mut CudaSlice<f32>,
        entropy: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        const K: &str = "logprob_finish";
        need(K, "state", state.len(), rows * LOGPROB_STATE_PER_ROW)?;
        for (what, len) in [
            ("logp", logp.len()),
            ("entropy", entropy.len()),
            ("lse", lse.len()),
        ] {
            need(K, what, len, rows)?;
        }
        if rows == 0 {
            return Ok(());
        }
        let f = self.function("logprob", "logprob_finish_f32")?;
        let rows_i = to_i32(K, "rows", rows)?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(state)
            .arg(logp)
            .arg(entropy)
            .arg(lse)
            .arg(&rows_i);
        // SAFETY: matches the C signature above; one thread per row.
        unsafe { launch.launch(elementwise_grid(rows)) }?;
        Ok(())
    }

    /// Twin of `cpu::logprob::token_logprob_bwd` restricted to one chunk:
    /// writes `dlogits` for the chunk's columns (same layout as `logits`;
    /// with `T = bf16` both bf16, the arithmetic f32).
    // logprob_bwd_chunk_{f32,bf16}(const T* logits, int ld, int rows, int chunk_len,
    //     int vocab_offset, const unsigned int* targets, const float* lse,
    //     const float* entropy, const float* dlogp, const float* dentropy,
    //     T* dlogits)
    #[allow(clippy::too_many_arguments)]
    pub fn logprob_bwd_chunk<T: Elem>(
        &self,
        chunk: &LogitChunk,
        logits: &CudaSlice<T>,
        targets: &CudaSlice<u32>,
        lse: &CudaSlice<f32>,
        entropy: &CudaSlice<f32>,
        dlogp: &CudaSlice<f32>,
        dentropy: &CudaSlice<f32>,
        dlogits: &mut CudaSlice<T>,
    ) -> Result<(), CudaError> {
        const K: &str = "logprob_bwd_chunk";
        let (ld, rows, len, off) = chunk.check(K, logits.len())?;
        chunk.check(K, dlogits.len())?;
        for (what, n) in [
            ("targets", targets.len()),
            ("lse", lse.len()),
            ("entropy", entropy.len()),
            ("dlogp", dlogp.len()),
            ("dentropy", dentropy.len()),
        ] {
            need(K, what, n, chunk.rows)?;
        }
        if chunk.rows * chunk.chunk_len == 0 {
            return Ok(());
        }
        let f = self.function("logprob", &format!("logprob_bwd_chunk_{}", T::SUFFIX))?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(logits)
            .arg(&ld)
            .arg(&rows)
            .arg(&len)
            .arg(&off)
            .arg(targets)
            .arg(lse)
            .arg(entropy)
            .arg(dlogp)
            .arg(dentropy)
            .arg(dlogits);
        // SAFETY: matches the C signature above; logits and dlogits cover the
        // chunk (checked), the per-row buffers `rows` elements.
        unsafe { launch.launch(elementwise_grid(chunk.rows * chunk.chunk_len)) }?;
        Ok(())
    }
}
