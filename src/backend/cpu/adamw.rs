//! AdamW as `torch.optim.AdamW` defines it (decoupled weight decay, bias
//! correction), on fp32 master weights with an optional bf16 copy for the
//! model, and global gradient-norm clipping as `clip_grad_norm_` does it.
//! GPU twin: none yet (multi-tensor AdamW comes with issue #8).

use half::bf16;
use rayon::prelude::*;

pub use crate::backend::desc::AdamWConfig;

/// One step (`step` counts from 1) on one tensor, in torch's operation order:
/// `p *= 1 - lr*wd; m += (g - m)(1 - b1); v = b2 v + (1 - b2) g^2;
/// p -= lr/(1 - b1^step) * m / (sqrt(v)/sqrt(1 - b2^step) + eps)`.
/// Scalars are formed in f64 and applied in f32, like torch on fp32 tensors.
/// When `model` is given it receives the updated weights rounded to bf16.
pub fn adamw_step(
    cfg: &AdamWConfig,
    step: u64,
    param: &mut [f32],
    grad: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    model: Option<&mut [bf16]>,
) {
    assert!(step >= 1, "adamw: step counts from 1");
    let n = param.len();
    assert!(
        grad.len() == n && exp_avg.len() == n && exp_avg_sq.len() == n,
        "adamw: lengths differ"
    );
    let decay = (1.0 - cfg.lr * cfg.weight_decay) as f32;
    let one_minus_b1 = (1.0 - cfg.beta1) as f32;
    let b2 = cfg.beta2 as f32;
    let one_minus_b2 = (1.0 - cfg.beta2) as f32;
    let bias1 = 1.0 - cfg.beta1.powi(step as i32);
    let bias2_sqrt = (1.0 - cfg.beta2.powi(step as i32)).sqrt();
    let step_size = (cfg.lr / bias1) as f32;
    let bias2_sqrt = bias2_sqrt as f32;
    let eps = cfg.eps as f32;
    param
        .par_iter_mut()
        .zip(exp_avg.par_iter_mut().zip(exp_avg_sq.par_iter_mut()))
        .zip(grad.par_iter())
        .for_each(|((p, (m, v)), &g)| {
            *p *= decay;
            *m += (g - *m) * one_minus_b1;
            *v = *v * b2 + one_minus_b2 * g * g;
            let denom = v.sqrt() / bias2_sqrt + eps;
            *p -= step_size * (*m / denom);
        });
    if let Some(model) = model {
        assert_eq!(model.len(), n, "adamw: model copy length");
        model
            .par_iter_mut()
            .zip(param.par_iter())
            .for_each(|(w, &p)| *w = bf16::from_f32(p));
    }
}

/// L2 norm over all gradients together, accumulated in f64.
pub fn global_grad_norm(grads: &[&[f32]]) -> f64 {
    // Fixed chunks summed in order: the same bits on every run whatever the
    // thread scheduling (rayon's `sum` combines in a scheduling-dependent
    // order), so a resumed run reproduces the norm exactly.
    const CHUNK: usize = 1 << 14;
    grads
        .iter()
        .map(|g| {
            let partial: Vec<f64> = g
                .par_chunks(CHUNK)
                .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .collect();
            partial.iter().sum::<f64>()
        })
        .sum::<f64>()
        .sqrt()
}

/// Scales all gradients by `min(1, max_norm / (norm + 1e-6))` and returns the
/// norm before clipping. A non-finite norm leaves the gradients untouched:
/// the caller should skip the step (torch would spread the NaN instead).
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f64) -> f64 {
    let norm = {
        let views: Vec<&[f32]> = grads.iter().map(|g| &**g).collect();
        global_grad_norm(&views)
    };
    if !norm.is_finite() {
        return norm;
    }
    let coef = (max_norm / (norm + 1e-6)).min(1.0) as f32;
    if coef < 1.0 {
        for g in grads.iter_mut() {
            g.par_iter_mut().for_each(|x| *x *= coef);
        }
    }
    norm
}
