//! Launcher of the rotary-embedding kernel (`kernels/rope.cu`). It keeps
//! the C signature it launches in a comment: kernel arguments are untyped.

use super::launch_util::{elementwise_grid, need, to_i32, Elem};
use super::{CudaBackend, CudaError};
use cudarc::driver::{CudaSlice, PushKernelArg};

/// Device copy of a [`crate::backend::desc::RopeFreqs`] plan.
pub struct RopeFreqsDevice {
    pub inv_freq: CudaSlice<f32>,
    pub stream: CudaSlice<i32>,
    /// Number of position streams the plan reads.
    pub streams: usize,
    pub half: usize,
}

impl CudaBackend {
    /// Uploads a rotary frequency plan once (it is the same for every layer).
    pub fn rope_freqs(
        &self,
        freqs: &crate::backend::desc::RopeFreqs,
    ) -> Result<RopeFreqsDevice, CudaError> {
        Ok(RopeFreqsDevice {
            inv_freq: self.stream.clone_htod(&freqs.inv_freq)?,
            stream: self.stream.clone_htod(&freqs.stream)?,
            streams: freqs
                .stream
                .iter()
                .map(|&s| s as usize + 1)
                .max()
                .unwrap_or(1),
            half: freqs.inv_freq.len(),
        })
    }

    /// Twin of `cpu::rope::rope_fwd` (`backward = false`) and `rope_bwd`
    /// (`backward = true`) with the table `freqs.table(positions)`:
    /// `x, y[tokens, heads, 2 * half]`, `positions[streams, tokens]`.
    // rope_{f32,bf16}(const T* x, T* y, const int* positions,
    //     const float* inv_freq, const int* stream, int tokens, int heads,
    //     int half, float sin_sign)
    #[allow(clippy::too_many_arguments)]
    pub fn rope<T: Elem>(
        &self,
        freqs: &RopeFreqsDevice,
        positions: &CudaSlice<i32>,
        tokens: usize,
        heads: usize,
        backward: bool,
        x: &CudaSlice<T>,
        y: &mut CudaSlice<T>,
    ) -> Result<(), CudaError> {
        const K: &str = "rope";
        let n = tokens * heads * 2 * freqs.half;
        need(K, "x", x.len(), n)?;
        need(K, "y", y.len(), n)?;
        need(K, "positions", positions.len(), freqs.streams * tokens)?;
        if n == 0 {
            return Ok(());
        }
        let f = self.function("rope", &format!("rope_{}", T::SUFFIX))?;
        let tokens_i = to_i32(K, "tokens", tokens)?;
        let heads_i = to_i32(K, "heads", heads)?;
        let half_i = to_i32(K, "half", freqs.half)?;
        to_i32(K, "tokens * half", tokens * freqs.half)?;
        let sign = if backward { -1.0f32 } else { 1.0 };
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(x)
            .arg(y)
            .arg(positions)
            .arg(&freqs.inv_freq)
            .arg(&freqs.stream)
            .arg(&tokens_i)
            .arg(&heads_i)
            .arg(&half_i)
            .arg(&sign);
        // SAFETY: matches the C signature above; x, y hold tokens*heads*2*half
        // floats, positions streams*tokens ints, and every stream index of the
        // plan is below `streams`.
        unsafe { launch.launch(elementwise_grid(tokens * freqs.half)) }?;
        Ok(())
    }
}
