//! Visual dependency of a token: KL between the next-token distributions
//! with the original and the perturbed image, exactly over the full
//! vocabulary, or by the k3 estimator from the two sampled-token log-probs.
//! GPU twin: kernels/softmax_kl.cu (softmax_kl_fwd_f32, dependency_k3_f32).

use super::Real;
use rayon::prelude::*;

fn row_lse<R: Real>(z: &[R]) -> R {
    let m = z.iter().copied().fold(R::neg_infinity(), R::max);
    m + z.iter().map(|&v| (v - m).exp()).sum::<R>().ln()
}

/// `kl[t] = sum_v p_v (log p_v - log q_v)` with `p = softmax(logits_p[t])`,
/// `q = softmax(logits_q[t])`. Saves `lse_p[t]`, `lse_q[t]`. Entries with
/// `p_v = 0` contribute nothing (so masked `-inf` logits in both are fine).
pub fn softmax_kl_fwd<R: Real>(
    logits_p: &[R],
    logits_q: &[R],
    vocab: usize,
    kl: &mut [R],
    lse_p: &mut [R],
    lse_q: &mut [R],
) {
    let rows = kl.len();
    assert!(
        logits_p.len() == rows * vocab && logits_q.len() == rows * vocab,
        "kl: logits are not [T, vocab]"
    );
    assert!(
        lse_p.len() == rows && lse_q.len() == rows,
        "kl: saved lengths"
    );
    kl.par_iter_mut()
        .zip(lse_p.par_iter_mut().zip(lse_q.par_iter_mut()))
        .enumerate()
        .for_each(|(t, (out, (lp, lq)))| {
            let zp = &logits_p[t * vocab..(t + 1) * vocab];
            let zq = &logits_q[t * vocab..(t + 1) * vocab];
            *lp = row_lse(zp);
            *lq = row_lse(zq);
            let mut acc = R::zero();
            for (&a, &b) in zp.iter().zip(zq) {
                let log_p = a - *lp;
                let p = log_p.exp();
                if p > R::zero() {
                    acc += p * (log_p - (b - *lq));
                }
            }
            *out = acc;
        });
}

/// Backward of [`softmax_kl_fwd`] for an upstream `dkl[t]`:
/// `dlogits_p = dkl * p * (log p - log q - kl)`, `dlogits_q = dkl * (q - p)`.
#[allow(clippy::too_many_arguments)]
pub fn softmax_kl_bwd<R: Real>(
    logits_p: &[R],
    logits_q: &[R],
    vocab: usize,
    lse_p: &[R],
    lse_q: &[R],
    kl: &[R],
    dkl: &[R],
    dlogits_p: &mut [R],
    dlogits_q: &mut [R],
) {
    let rows = kl.len();
    assert!(
        dlogits_p.len() == rows * vocab && dlogits_q.len() == rows * vocab,
        "kl: grad lengths"
    );
    assert!(
        lse_p.len() == rows && lse_q.len() == rows && dkl.len() == rows,
        "kl: saved lengths"
    );
    dlogits_p
        .par_chunks_mut(vocab)
        .zip(dlogits_q.par_chunks_mut(vocab))
        .enumerate()
        .for_each(|(t, (dp, dq))| {
            for v in 0..vocab {
                let log_p = logits_p[t * vocab + v] - lse_p[t];
                let log_q = logits_q[t * vocab + v] - lse_q[t];
                let (p, q) = (log_p.exp(), log_q.exp());
                dp[v] = if p > R::zero() {
                    dkl[t] * p * (log_p - log_q - kl[t])
                } else {
                    R::zero()
                };
                dq[v] = dkl[t] * (q - p);
            }
        });
}

/// VPPO's token visual dependency from the gathered log-probs (k3 estimator):
/// `d = clamp(lp_mask - lp_orig, -20, 20)`, `S = clamp(exp(d) - d - 1, 0, 10)`.
/// Not differentiated: the dependency only weights the loss.
pub fn dependency_k3<R: Real>(lp_orig: &[R], lp_mask: &[R], score: &mut [R]) {
    assert!(
        lp_orig.len() == lp_mask.len() && lp_mask.len() == score.len(),
        "k3: lengths differ"
    );
    let (lo, hi) = (R::from_f64(-20.0), R::from_f64(20.0));
    let cap = R::from_f64(10.0);
    score.par_iter_mut().enumerate().for_each(|(i, s)| {
        let d = (lp_mask[i] - lp_orig[i]).max(lo).min(hi);
        *s = (d.exp() - d - R::one()).max(R::zero()).min(cap);
    });
}
