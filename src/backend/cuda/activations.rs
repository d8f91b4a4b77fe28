//! Launchers of the SwiGLU and GELU kernels (`kernels/activations.cu`).
//! Each keeps the C signature it launches in a comment: kernel arguments
//! are untyped. Generic over [`Elem`]: the `_f32` or `_bf16` kernel (bf16
//! storage, f32 compute: the twin is the CPU op between `cpu::cast`
//! conversions).

use super::launch_util::{elementwise_grid, need, Elem};
use super::{CudaBackend, CudaError};
use cudarc::driver::{CudaSlice, PushKernelArg};

impl CudaBackend {
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
}
