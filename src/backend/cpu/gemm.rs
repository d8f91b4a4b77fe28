//! Matrix multiply on the CPU: `matrixmultiply`'s packed micro-kernels, split
//! across rayon threads by rows (or by columns when C is short and wide).
//! GPU twin: cuBLAS / cuBLASLt GEMMs (no kernel of ours).

use super::{Real, SharedMut};
use rayon::prelude::*;

/// Whether an operand is used as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trans {
    No,
    Yes,
}

/// A strided matrix inside a slice: element `(i, j)` lives at
/// `offset + i * row_stride + j * col_stride`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatView {
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl MatView {
    /// A dense row-major `[rows, cols]` matrix at offset 0.
    pub fn row_major(rows: usize, cols: usize) -> Self {
        Self {
            offset: 0,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The same storage read as the transposed matrix.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    pub fn at(self, offset: usize) -> Self {
        Self { offset, ..self }
    }

    /// A row-major operand `[rows, cols]`, or the transpose of a stored `[cols, rows]`.
    fn operand(rows: usize, cols: usize, trans: Trans) -> Self {
        match trans {
            Trans::No => Self::row_major(rows, cols),
            Trans::Yes => Self::row_major(cols, rows).t(),
        }
    }

    /// One past the largest element index the view touches (its offset when empty).
    fn end(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            self.offset
        } else {
            self.offset + (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
        }
    }
}

/// Serial `C = alpha * A B + beta * C` on strided views. Panics on a shape or
/// bounds mismatch (a programming error, never user input).
#[allow(clippy::too_many_arguments)]
pub fn gemm_view<R: Real>(
    alpha: R,
    a: &[R],
    av: MatView,
    b: &[R],
    bv: MatView,
    beta: R,
    c: &mut [R],
    cv: MatView,
) {
    assert_eq!(av.cols, bv.rows, "gemm: inner dimensions differ");
    assert_eq!((av.rows, bv.cols), (cv.rows, cv.cols), "gemm: output shape");
    assert!(
        av.end() <= a.len() && bv.end() <= b.len() && cv.end() <= c.len(),
        "gemm: view out of bounds"
    );
    // SAFETY: the asserts above keep every addressed element inside its
    // slice, and `c` is a unique borrow so it cannot alias `a` or `b`.
    unsafe {
        gemm_ptr(
            alpha,
            a.as_ptr(),
            av,
            b.as_ptr(),
            bv,
            beta,
            c.as_mut_ptr(),
            cv,
        )
    }
}

/// # Safety
/// All elements addressed by the views must be in bounds of their pointers;
/// the C view must not overlap A, B, or any C view written concurrently.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_ptr<R: Real>(
    alpha: R,
    a: *const R,
    av: MatView,
    b: *const R,
    bv: MatView,
    beta: R,
    c: *mut R,
    cv: MatView,
) {
    if cv.rows == 0 || cv.cols == 0 {
        return;
    }
    if av.cols == 0 {
        // Empty inner dimension: C = beta * C.
        for i in 0..cv.rows {
            for j in 0..cv.cols {
                // SAFETY: (i, j) is inside the C view, in bounds by contract.
                let p = unsafe { c.add(cv.offset + i * cv.row_stride + j * cv.col_stride) };
                // SAFETY: as above.
                unsafe {
                    *p = if beta == R::zero() {
                        R::zero()
                    } else {
                        beta * *p
                    }
                };
            }
        }
        return;
    }
    // SAFETY: in bounds by the caller's contract; strides fit isize because
    // they index allocations.
    unsafe {
        R::gemm_raw(
            av.rows,
            av.cols,
            bv.cols,
            alpha,
            a.add(av.offset),
            av.row_stride as isize,
            av.col_stride as isize,
            b.add(bv.offset),
            bv.row_stride as isize,
            bv.col_stride as isize,
            beta,
            c.add(cv.offset),
            cv.row_stride as isize,
            cv.col_stride as isize,
        )
    }
}

/// Below this many multiply-adds a GEMM runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// Row-major `C[m, n] = alpha * op(A) op(B) + beta * C`, parallel.
/// `op(A)` is `[m, k]`: A stored `[m, k]` (`Trans::No`) or `[k, m]` (`Trans::Yes`);
/// likewise `op(B)` is `[k, n]` from B stored `[k, n]` or `[n, k]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul<R: Real>(
    m: usize,
    k: usize,
    n: usize,
    alpha: R,
    a: &[R],
    ta: Trans,
    b: &[R],
    tb: Trans,
    beta: R,
    c: &mut [R],
) {
    assert_eq!(
        a.len(),
        m * k,
        "matmul: A has {} elements, expected {m}x{k}",
        a.len()
    );
    assert_eq!(
        b.len(),
        k * n,
        "matmul: B has {} elements, expected {k}x{n}",
        b.len()
    );
    assert_eq!(
        c.len(),
        m * n,
        "matmul: C has {} elements, expected {m}x{n}",
        c.len()
    );
    let av = MatView::operand(m, k, ta);
    let bv = MatView::operand(k, n, tb);
    let cv = MatView::row_major(m, n);
    let threads = rayon::current_num_threads();
    if threads == 1 || m * n * k < PARALLEL_MIN_WORK {
        gemm_view(alpha, a, av, b, bv, beta, c, cv);
        return;
    }
    // Every task packs its own copy of the operand the tasks share (all of
    // B under a row split, all of A under a column split): split the output
    // along the side whose shared operand is the smaller.
    let tasks = threads * 2;
    if m >= n {
        let rows_per = m.div_ceil(tasks).max(8);
        c.par_chunks_mut(rows_per * n)
            .enumerate()
            .for_each(|(t, c_rows)| {
                let r0 = t * rows_per;
                let rows = c_rows.len() / n;
                let a_block = MatView {
                    rows,
                    offset: r0 * av.row_stride,
                    ..av
                };
                gemm_view(
                    alpha,
                    a,
                    a_block,
                    b,
                    bv,
                    beta,
                    c_rows,
                    MatView::row_major(rows, n),
                );
            });
    } else {
        let cols_per = n.div_ceil(tasks).max(32);
        let c_ptr = SharedMut(c.as_mut_ptr());
        (0..n.div_ceil(cols_per)).into_par_iter().for_each(|t| {
            let c0 = t * cols_per;
            let cols = cols_per.min(n - c0);
            let b_block = MatView {
                cols,
                offset: c0 * bv.col_stride,
                ..bv
            };
            let c_block = MatView {
                cols,
                offset: c0,
                ..cv
            };
            // SAFETY: the views lie inside a, b and c (checked by the length
            // asserts above), and column blocks [c0, c0 + cols) are disjoint
            // across tasks, so no two tasks write the same element of C.
            unsafe {
                gemm_ptr(
                    alpha,
                    a.as_ptr(),
                    av,
                    b.as_ptr(),
                    b_block,
                    beta,
                    c_ptr.get(),
                    c_block,
                )
            }
        });
    }
}
