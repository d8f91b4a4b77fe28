//! Small helpers shared by the layer backwards.

use crate::backend::cpu::linear::linear_bwd;

/// `acc += delta`, elementwise.
pub fn add_into(acc: &mut [f32], delta: &[f32]) {
    assert_eq!(acc.len(), delta.len(), "add_into: lengths differ");
    for (a, b) in acc.iter_mut().zip(delta) {
        *a += b;
    }
}

/// Linear backward that ACCUMULATES the input gradient into `dx_acc`
/// (`linear_bwd` overwrites it), for inputs feeding several linears.
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd_acc(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    tokens: usize,
    in_features: usize,
    out_features: usize,
    dx_acc: &mut [f32],
    dw: &mut [f32],
    dbias: Option<&mut [f32]>,
) {
    let mut dx = vec![0.0; tokens * in_features];
    linear_bwd(
        dy,
        x,
        w,
        tokens,
        in_features,
        out_features,
        Some(&mut dx),
        dw,
        dbias,
    );
    add_into(dx_acc, &dx);
}
