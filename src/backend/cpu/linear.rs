//! Linear layer `y = x W^T + b` (PyTorch's `nn.Linear` layout: W is
//! `[out, in]`). GPU twin: cuBLASLt GEMM with a bias epilogue.

use super::gemm::{matmul, Trans};
use super::Real;
use rayon::prelude::*;

/// `y[T, out] = x[T, in] @ w[out, in]^T (+ bias[out])`.
pub fn linear_fwd<R: Real>(
    x: &[R],
    w: &[R],
    bias: Option<&[R]>,
    tokens: usize,
    in_features: usize,
    out_features: usize,
    y: &mut [R],
) {
    matmul(
        tokens,
        in_features,
        out_features,
        R::one(),
        x,
        Trans::No,
        w,
        Trans::Yes,
        R::zero(),
        y,
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), out_features, "linear: bias length");
        y.par_chunks_mut(out_features.max(1)).for_each(|row| {
            for (v, &bb) in row.iter_mut().zip(b) {
                *v += bb;
            }
        });
    }
}

/// Backward of [`linear_fwd`]. Writes `dx = dy @ w` when asked; ACCUMULATES
/// `dw += dy^T @ x` and `dbias += sum_t dy`.
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd<R: Real>(
    dy: &[R],
    x: &[R],
    w: &[R],
    tokens: usize,
    in_features: usize,
    out_features: usize,
    dx: Option<&mut [R]>,
    dw: &mut [R],
    dbias: Option<&mut [R]>,
) {
    if let Some(dx) = dx {
        matmul(
            tokens,
            out_features,
            in_features,
            R::one(),
            dy,
            Trans::No,
            w,
            Trans::No,
            R::zero(),
            dx,
        );
    }
    matmul(
        out_features,
        tokens,
        in_features,
        R::one(),
        dy,
        Trans::Yes,
        x,
        Trans::No,
        R::one(),
        dw,
    );
    if let Some(db) = dbias {
        assert_eq!(db.len(), out_features, "linear: bias grad length");
        db.par_iter_mut().enumerate().for_each(|(o, acc)| {
            let mut s = R::zero();
            for t in 0..tokens {
                s += dy[t * out_features + o];
            }
            *acc += s;
        });
    }
}
