//! Launchers of `kernels/rows.cu`: residual add, bias add, row gather and
//! scatter (the row copies of the model graph). Each keeps the C signature
//! it launches in a comment: kernel arguments are untyped. They take views,
//! so sub-slices of arena buffers and weights can be passed.

use super::launch_util::{elementwise_grid, need, to_i32, Elem};
use super::{CudaBackend, CudaError};
use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};

impl CudaBackend {
    /// Twin of `cpu::rows::add_inplace`: `x[..n] += y[..n]`.
    // add_inplace_{f32,bf16}(T* x, const T* y, long long n)
    pub fn add_inplace<T: Elem>(
        &self,
        x: &mut CudaViewMut<'_, T>,
        y: &CudaView<'_, T>,
        n: usize,
    ) -> Result<(), CudaError> {
        need("add_inplace", "x", x.len(), n)?;
        need("add_inplace", "y", y.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let f = self.function("rows", &format!("add_inplace_{}", T::SUFFIX))?;
        let n_i = n as i64;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(x).arg(y).arg(&n_i);
        // SAFETY: matches the C signature above; both views hold n elements.
        unsafe { launch.launch(elementwise_grid(n)) }?;
        Ok(())
    }

    /// The bias loop of `cpu::linear::linear_fwd`: `y[r, c] += bias[c]`.
    // add_bias_rows_{f32,bf16}(T* y, const T* bias, int rows, int cols)
    pub fn add_bias_rows<T: Elem>(
        &self,
        y: &mut CudaViewMut<'_, T>,
        bias: &CudaView<'_, T>,
        rows: usize,
        cols: usize,
    ) -> Result<(), CudaError> {
        const K: &str = "add_bias_rows";
        need(K, "y", y.len(), rows * cols)?;
        need(K, "bias", bias.len(), cols)?;
        if rows * cols == 0 {
            return Ok(());
        }
        let f = self.function("rows", &format!("add_bias_rows_{}", T::SUFFIX))?;
        let (rows_i, cols_i) = (to_i32(K, "rows", rows)?, to_i32(K, "cols", cols)?);
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(y).arg(bias).arg(&rows_i).arg(&cols_i);
        // SAFETY: matches the C signature above; y holds rows*cols elements,
        // bias cols.
        unsafe { launch.launch(elementwise_grid(rows * cols)) }?;
        Ok(())
    }

    /// `dst[i, :] = src[idx[i], :]` for `i < rows`. Every index must name a
    /// row of `src` (the caller's host layout guarantees it).
    // gather_rows_{f32,bf16}(const T* src, const int* idx, T* dst, int rows, int dim)
    pub fn gather_rows<T: Elem>(
        &self,
        src: &CudaView<'_, T>,
        idx: &CudaView<'_, i32>,
        rows: usize,
        dim: usize,
        dst: &mut CudaViewMut<'_, T>,
    ) -> Result<(), CudaError> {
        self.move_rows("gather_rows", src, idx, rows, dim, dst)
    }

    /// `dst[idx[i], :] = src[i, :]` for `i < rows`. Every index must name a
    /// row of `dst`, and no two the same row.
    // scatter_rows_{f32,bf16}(const T* src, const int* idx, T* dst, int rows, int dim)
    pub fn scatter_rows<T: Elem>(
        &self,
        src: &CudaView<'_, T>,
        idx: &CudaView<'_, i32>,
        rows: usize,
        dim: usize,
        dst: &mut CudaViewMut<'_, T>,
    ) -> Result<(), CudaError> {
        self.move_rows("scatter_rows", src, idx, rows, dim, dst)
    }

    fn move_rows<T: Elem>(
        &self,
        kernel: &'static str,
        src: &CudaView<'_, T>,
        idx: &CudaView<'_, i32>,
        rows: usize,
        dim: usize,
        dst: &mut CudaViewMut<'_, T>,
    ) -> Result<(), CudaError> {
        need(kernel, "idx", idx.len(), rows)?;
        // The gathered side holds `rows` rows; the indexed side at least as
        // many (its bound is the caller's contract).
        let (dense, what) = if kernel == "gather_rows" {
            (dst.len(), "dst")
        } else {
            (src.len(), "src")
        };
        need(kernel, what, dense, rows * dim)?;
        if rows * dim == 0 {
            return Ok(());
        }
        let f = self.function("rows", &format!("{kernel}_{}", T::SUFFIX))?;
        let (rows_i, dim_i) = (to_i32(kernel, "rows", rows)?, to_i32(kernel, "dim", dim)?);
        to_i32(kernel, "src rows * dim", src.len())?;
        to_i32(kernel, "dst rows * dim", dst.len())?;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(src).arg(idx).arg(dst).arg(&rows_i).arg(&dim_i);
        // SAFETY: matches the C signature above; idx holds `rows` ints, the
        // dense side rows*dim elements, and every index names a row of the
        // indexed side (caller's contract, from the host layouts).
        unsafe { launch.launch(elementwise_grid(rows * dim)) }?;
        Ok(())
    }
}
