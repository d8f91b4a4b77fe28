//! Helpers shared by the op tests: seeded random data and an f64
//! finite-difference gradient checker.
#![allow(dead_code)]

pub mod fixtures;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Uniform values in [-scale, scale).
pub fn randn(rng: &mut StdRng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// Sum of `w * y`: the scalar loss whose gradient w.r.t. `y` is `w`.
pub fn dot(w: &[f64], y: &[f64]) -> f64 {
    assert_eq!(w.len(), y.len());
    w.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// Which entries of a tensor of `n` values to probe: all of them when small,
/// a fixed random sample (always including both ends) otherwise.
pub fn probe_indices(rng: &mut StdRng, n: usize, max: usize) -> Vec<usize> {
    if n <= max {
        return (0..n).collect();
    }
    let mut idx: Vec<usize> = (0..max - 2).map(|_| rng.random_range(0..n)).collect();
    idx.push(0);
    idx.push(n - 1);
    idx
}

/// Compares `analytic` (the gradient of `loss` at `x`) with central
/// differences in f64, entry by entry. Panics naming the tensor and entry.
pub fn check_gradient(
    name: &str,
    x: &[f64],
    analytic: &[f64],
    mut loss: impl FnMut(&[f64]) -> f64,
    rng: &mut StdRng,
    max_probes: usize,
) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let mut probe = x.to_vec();
    let mut worst = 0.0f64;
    for i in probe_indices(rng, x.len(), max_probes) {
        let h = 1e-5 * x[i].abs().max(1.0);
        probe[i] = x[i] + h;
        let up = loss(&probe);
        probe[i] = x[i] - h;
        let down = loss(&probe);
        probe[i] = x[i];
        let numeric = (up - down) / (2.0 * h);
        let err = (numeric - analytic[i]).abs();
        let tol = 1e-7 + 1e-6 * numeric.abs().max(analytic[i].abs());
        worst = worst.max(err);
        assert!(
            err <= tol && analytic[i].is_finite(),
            "{name}[{i}]: analytic {} vs finite difference {numeric} (err {err:e})",
            analytic[i]
        );
    }
    assert!(worst.is_finite(), "{name}: non-finite error");
}

/// Relative error `||a - b|| / ||b||` (NaN anywhere gives infinity).
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    if a.iter().chain(b).any(|v| v.is_nan()) {
        return f64::INFINITY;
    }
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}
