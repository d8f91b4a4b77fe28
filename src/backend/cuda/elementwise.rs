//! Launchers of the elementwise and gather kernels: rotary embedding
//! (`kernels/rope.cu`), SwiGLU and GELU (`kernels/activations.cu`), the
//! embedding gather / scatter-add (`kernels/embedding.cu`) and the f32/bf16
//! casts (`kernels/cast.cu`). Each keeps the C signature it launches in a
//! comment: kernel arguments are untyped. Launchers generic over [`Elem`]
//! pick the `_f32` or `_bf16` kernel (bf16 storage, f32 compute: the twin is
//! the CPU op between `cpu::cast` conversions).

use super::launch_util::{elementwise_grid, need, row_grid, to_i32, Elem};
use super::{CudaBackend, CudaError};
use crate::backend::cpu::OpError;
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

    /// Twin of `cpu::activations::swiglu_fwd`: `h = silu(gate) * up`.
    // swiglu_fwd_{f32,bf16}(const T* gate, const T* up, T* h, long long n)
    pub fn swiglu_fwd<T: Elem>(
        &self,
        gate: &CudaSlice<T>,
        up: &CudaSlice<T>,
        n: usize,
        h: &mut CudaSlice<T>,
    ) -> Result<(), CudaError> {
        const K: &str = "swiglu_fwd";
        for (what, len) in [("gate", gate.len()), ("up", up.len()), ("h", h.len())] {
            need(K, what, len, n)?;
        }
        if n == 0 {
            return Ok(());
        }
        let f = self.function("activations", &format!("swiglu_fwd_{}", T::SUFFIX))?;
        let n_i = n as i64;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(gate).arg(up).arg(h).arg(&n_i);
        // SAFETY: matches the C signature above; all buffers hold n floats.
        unsafe { launch.launch(elementwise_grid(n)) }?;
        Ok(())
    }

    /// Twin of `cpu::activations::swiglu_bwd` (both outputs overwritten).
    // swiglu_bwd_{f32,bf16}(const T* dh, const T* gate, const T* up,
    //     T* dgate, T* dup, long long n)
    #[allow(clippy::too_many_arguments)]
    pub fn swiglu_bwd<T: Elem>(
        &self,
        dh: &CudaSlice<T>,
        gate: &CudaSlice<T>,
        up: &CudaSlice<T>,
        n: usize,
        dgate: &mut CudaSlice<T>,
        dup: &mut CudaSlice<T>,
    ) -> Result<(), CudaError> {
        const K: &str = "swiglu_bwd";
        for (what, len) in [
            ("dh", dh.len()),
            ("gate", gate.len()),
            ("up", up.len()),
            ("dgate", dgate.len()),
            ("dup", dup.len()),
        ] {
            need(K, what, len, n)?;
        }
        if n == 0 {
            return Ok(());
        }
        let f = self.function("activations", &format!("swiglu_bwd_{}", T::SUFFIX))?;
        let n_i = n as i64;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(dh)
            .arg(gate)
            .arg(up)
            .arg(dgate)
            .arg(dup)
            .arg(&n_i);
        // SAFETY: matches the C signature above; all buffers hold n floats.
        unsafe { launch.launch(elementwise_grid(n)) }?;
        Ok(())
    }

    /// Twin of `cpu::activations::gelu_fwd` (exact erf GELU).
    // gelu_fwd_{f32,bf16}(const T* x, T* y, long long n)
    pub fn gelu_fwd<T: Elem>(
        &self,
        x: &CudaSlice<T>,
        n: usize,
        y: &mut CudaSlice<T>,
    ) -> Result<(), CudaError> {
        need("gelu_fwd", "x", x.len(), n)?;
        need("gelu_fwd", "y", y.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let f = self.function("activations", &format!("gelu_fwd_{}", T::SUFFIX))?;
        let n_i = n as i64;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(x).arg(y).arg(&n_i);
        // SAFETY: matches the C signature above; both buffers hold n floats.
        unsafe { launch.launch(elementwise_grid(n)) }?;
        Ok(())
    }

    /// Twin of `cpu::activations::gelu_bwd` (`dx` overwritten).
    // gelu_bwd_{f32,bf16}(const T* dy, const T* x, T* dx, long long n)
    pub fn gelu_bwd<T: Elem>(
        &self,
        dy: &CudaSlice<T>,
        x: &CudaSlice<T>,
        n: usize,
        dx: &mut CudaSlice<T>,
    ) -> Result<(), CudaError> {
        for (what, len) in [("dy", dy.len()), ("x", x.len()), ("dx", dx.len())] {
            need("gelu_bwd", what, len, n)?;
        }
        if n == 0 {
            return Ok(());
        }
        let f = self.function("activations", &format!("gelu_bwd_{}", T::SUFFIX))?;
        let n_i = n as i64;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(dy).arg(x).arg(dx).arg(&n_i);
        // SAFETY: matches the C signature above; all buffers hold n floats.
        unsafe { launch.launch(elementwise_grid(n)) }?;
        Ok(())
    }

    /// Twin of `cpu::embedding::embedding_fwd` for device-resident ids
    /// (decode feeds back sampled ids). An id outside the vocabulary gives a
    /// NaN row instead of the CPU's error.
    // embedding_fwd_{f32,bf16}(const unsigned int* ids, const T* table, T* out,
    //     int tokens, int dim, int vocab)
    #[allow(clippy::too_many_arguments)]
    pub fn embedding_fwd<T: Elem>(
        &self,
        ids: &CudaSlice<u32>,
        tokens: usize,
        table: &CudaSlice<T>,
        vocab: usize,
        dim: usize,
        out: &mut CudaSlice<T>,
    ) -> Result<(), CudaError> {
        const K: &str = "embedding_fwd";
        need(K, "ids", ids.len(), tokens)?;
        need(K, "table", table.len(), vocab * dim)?;
        need(K, "out", out.len(), tokens * dim)?;
        if tokens * dim == 0 {
            return Ok(());
        }
        let f = self.function("embedding", &format!("embedding_fwd_{}", T::SUFFIX))?;
        let tokens_i = to_i32(K, "tokens", tokens)?;
        let dim_i = to_i32(K, "dim", dim)?;
        let vocab_i = to_i32(K, "vocab", vocab)?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(ids)
            .arg(table)
            .arg(out)
            .arg(&tokens_i)
            .arg(&dim_i)
            .arg(&vocab_i);
        // SAFETY: matches the C signature above; ids hold `tokens` u32, table
        // vocab*dim floats (ids past vocab are never read), out tokens*dim.
        unsafe { launch.launch(elementwise_grid(tokens * dim)) }?;
        Ok(())
    }

    /// Twin of `cpu::embedding::embedding_bwd`: `dtable[ids[t]] += dout[t]`,
    /// bit-identical to the CPU (each row sums its tokens in position order;
    /// no atomics). `ids` are on the host, where the token ids of a training
    /// batch live; they are grouped by id here and uploaded.
    // embedding_bwd_f32(const unsigned int* uniq_ids, const int* offsets,
    //     const int* order, const float* dout, float* dtable, int dim)
    pub fn embedding_bwd(
        &self,
        ids: &[u32],
        dout: &CudaSlice<f32>,
        dim: usize,
        dtable: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        const K: &str = "embedding_bwd";
        if dim == 0 {
            return Ok(());
        }
        let vocab = dtable.len() / dim;
        if let Some(position) = ids.iter().position(|&id| id as usize >= vocab) {
            return Err(CudaError::Unsupported {
                kernel: K,
                reason: OpError::TokenOutOfRange {
                    id: ids[position],
                    position,
                    vocab,
                }
                .to_string(),
            });
        }
        need(K, "dout", dout.len(), ids.len() * dim)?;
        if ids.is_empty() {
            return Ok(());
        }
        to_i32(K, "tokens", ids.len())?;
        let dim_i = to_i32(K, "dim", dim)?;
        let (uniq, offsets, order) = group_by_id(ids);
        let uniq_d = self.stream.clone_htod(&uniq)?;
        let offsets_d = self.stream.clone_htod(&offsets)?;
        let order_d = self.stream.clone_htod(&order)?;
        let f = self.function("embedding", "embedding_bwd_f32")?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(&uniq_d)
            .arg(&offsets_d)
            .arg(&order_d)
            .arg(dout)
            .arg(dtable)
            .arg(&dim_i);
        // SAFETY: matches the C signature above; every id is below vocab
        // (checked), offsets has uniq+1 entries delimiting `order`, whose
        // entries index rows of dout.
        unsafe { launch.launch(row_grid(uniq.len(), 256)) }?;
        Ok(())
    }
}

/// Groups token positions by id: distinct ids, offsets into `order`, and the
/// positions of each id in increasing order.
fn group_by_id(ids: &[u32]) -> (Vec<u32>, Vec<i32>, Vec<i32>) {
    let mut order: Vec<i32> = (0..ids.len() as i32).collect();
    order.sort_by_key(|&t| (ids[t as usize], t));
    let mut uniq = Vec::new();
    let mut offsets = Vec::new();
    for (k, &t) in order.iter().enumerate() {
        let id = ids[t as usize];
        if uniq.last() != Some(&id) {
            uniq.push(id);
            offsets.push(k as i32);
        }
    }
    offsets.push(order.len() as i32);
    (uniq, offsets, order)
}

#[cfg(test)]
mod tests {
    use super::group_by_id;

    #[test]
    fn tokens_group_by_id_in_position_order() {
        let (uniq, offsets, order) = group_by_id(&[5, 2, 5, 0, 2, 5]);
        assert_eq!(uniq, vec![0, 2, 5]);
        assert_eq!(offsets, vec![0, 1, 3, 6]);
        assert_eq!(order, vec![3, 1, 4, 0, 2, 5]);
    }
}
