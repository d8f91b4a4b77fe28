//! Elementwise activations with their derivatives: SwiGLU (the Qwen2 and
//! vision MLPs) and exact (erf) GELU (the patch merger).
//! GPU twin: `kernels/activations.cu` (swiglu_{fwd,bwd}_f32, gelu_{fwd,bwd}_f32).

use super::Real;
use rayon::prelude::*;

fn sigmoid<R: Real>(a: R) -> R {
    R::one() / (R::one() + (-a).exp())
}

/// `h = silu(gate) * up`, elementwise.
pub fn swiglu_fwd<R: Real>(gate: &[R], up: &[R], h: &mut [R]) {
    assert!(
        gate.len() == up.len() && up.len() == h.len(),
        "swiglu: lengths differ"
    );
    h.par_iter_mut()
        .zip(gate.par_iter().zip(up.par_iter()))
        .for_each(|(o, (&a, &b))| {
            *o = a * sigmoid(a) * b;
        });
}

/// `dgate = dh * up * s * (1 + gate * (1 - s))`, `dup = dh * silu(gate)`, with
/// `s = sigmoid(gate)`. Both overwritten.
pub fn swiglu_bwd<R: Real>(dh: &[R], gate: &[R], up: &[R], dgate: &mut [R], dup: &mut [R]) {
    let n = dh.len();
    assert!(
        gate.len() == n && up.len() == n && dgate.len() == n && dup.len() == n,
        "swiglu: lengths differ"
    );
    dgate
        .par_iter_mut()
        .zip(dup.par_iter_mut())
        .enumerate()
        .for_each(|(i, (dg, du))| {
            let (a, b, g) = (gate[i], up[i], dh[i]);
            let s = sigmoid(a);
            *dg = g * b * s * (R::one() + a * (R::one() - s));
            *du = g * a * s;
        });
}

/// Exact GELU: `y = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`.
pub fn gelu_fwd<R: Real>(x: &[R], y: &mut [R]) {
    assert_eq!(x.len(), y.len(), "gelu: lengths differ");
    let half = R::from_f64(0.5);
    let inv_sqrt2 = R::from_f64(std::f64::consts::FRAC_1_SQRT_2);
    y.par_iter_mut().zip(x.par_iter()).for_each(|(o, &v)| {
        *o = half * v * (R::one() + (v * inv_sqrt2).erf());
    });
}

/// `dx = dy * (Phi(x) + x * phi(x))`, overwritten.
pub fn gelu_bwd<R: Real>(dy: &[R], x: &[R], dx: &mut [R]) {
    assert!(
        dy.len() == x.len() && x.len() == dx.len(),
        "gelu: lengths differ"
    );
    let half = R::from_f64(0.5);
    let inv_sqrt2 = R::from_f64(std::f64::consts::FRAC_1_SQRT_2);
    let inv_sqrt_2pi =
        R::from_f64(0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
    dx.par_iter_mut()
        .zip(dy.par_iter().zip(x.par_iter()))
        .for_each(|(o, (&g, &v))| {
            let cdf = half * (R::one() + (v * inv_sqrt2).erf());
            let pdf = inv_sqrt_2pi * (-half * v * v).exp();
            *o = g * (cdf + v * pdf);
        });
}
