//! RMSNorm: `y = x / sqrt(mean(x^2) + eps) * w`, per row of `dim` values.
//! GPU twin: kernels/rmsnorm.cu (rmsnorm_fwd_f32, rmsnorm_bwd_f32 +
//! rmsnorm_dw_reduce_f32).

use super::Real;
use rayon::prelude::*;

/// Forward. Saves `rstd[row] = 1/sqrt(mean(x^2) + eps)` for the backward.
pub fn rmsnorm_fwd<R: Real>(x: &[R], w: &[R], dim: usize, eps: R, y: &mut [R], rstd: &mut [R]) {
    let rows = check_shapes(x.len(), w.len(), dim, rstd.len());
    assert_eq!(y.len(), rows * dim, "rmsnorm: output length");
    y.par_chunks_mut(dim)
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(dim))
        .for_each(|((yr, r), xr)| {
            let mean_sq = xr.iter().map(|&v| v * v).sum::<R>() / R::from_f64(dim as f64);
            *r = R::one() / (mean_sq + eps).sqrt();
            for ((o, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
                *o = xv * *r * wv;
            }
        });
}

/// Backward. With `xh = x * r` and `u = dy * w`:
/// `dx = r * (u - xh * mean(u * xh))` (overwritten), `dw += sum_rows dy * xh`.
pub fn rmsnorm_bwd<R: Real>(
    dy: &[R],
    x: &[R],
    w: &[R],
    rstd: &[R],
    dim: usize,
    dx: &mut [R],
    dw: &mut [R],
) {
    let rows = check_shapes(x.len(), w.len(), dim, rstd.len());
    assert_eq!(dy.len(), rows * dim, "rmsnorm: dy length");
    assert_eq!(dx.len(), rows * dim, "rmsnorm: dx length");
    assert_eq!(dw.len(), dim, "rmsnorm: dw length");
    let inv_dim = R::from_f64(1.0 / dim as f64);
    dx.par_chunks_mut(dim)
        .zip(dy.par_chunks(dim).zip(x.par_chunks(dim)))
        .zip(rstd.par_iter())
        .for_each(|((dxr, (dyr, xr)), &r)| {
            let mean: R = dyr
                .iter()
                .zip(xr)
                .zip(w)
                .map(|((&g, &xv), &wv)| g * wv * xv * r)
                .sum::<R>()
                * inv_dim;
            for (((o, &g), &xv), &wv) in dxr.iter_mut().zip(dyr).zip(xr).zip(w) {
                *o = r * (g * wv - xv * r * mean);
            }
        });
    // dw is a column reduction: parallel over columns, rows in order.
    dw.par_iter_mut().enumerate().for_each(|(i, acc)| {
        let mut s = R::zero();
        for row in 0..rows {
            s += dy[row * dim + i] * x[row * dim + i] * rstd[row];
        }
        *acc += s;
    });
}

fn check_shapes(x_len: usize, w_len: usize, dim: usize, rstd_len: usize) -> usize {
    assert!(dim > 0, "rmsnorm: dim must be positive");
    assert_eq!(w_len, dim, "rmsnorm: weight length");
    assert_eq!(
        x_len % dim,
        0,
        "rmsnorm: input length not a multiple of dim"
    );
    let rows = x_len / dim;
    assert_eq!(rstd_len, rows, "rmsnorm: rstd length");
    rows
}
