//! Log-probability of the sampled token and the entropy of each row's
//! softmax: the RL loss head. GPU twin: none yet (the fused chunked lm_head
//! kernel comes with issue #8).

use super::{OpError, Real};
use rayon::prelude::*;

/// For `logits[T, vocab]` and `targets[T]`: `logp[t] = z[t, y_t] - lse_t`,
/// `entropy[t] = lse_t - sum_v p_v z_v`. Saves `lse[t]` for the backward.
pub fn token_logprob_fwd<R: Real>(
    logits: &[R],
    vocab: usize,
    targets: &[u32],
    logp: &mut [R],
    entropy: &mut [R],
    lse: &mut [R],
) -> Result<(), OpError> {
    let rows = targets.len();
    assert_eq!(
        logits.len(),
        rows * vocab,
        "logprob: logits are not [T, vocab]"
    );
    assert!(
        logp.len() == rows && entropy.len() == rows && lse.len() == rows,
        "logprob: output lengths"
    );
    if let Some(position) = targets.iter().position(|&t| t as usize >= vocab) {
        return Err(OpError::TokenOutOfRange {
            id: targets[position],
            position,
            vocab,
        });
    }
    logp.par_iter_mut()
        .zip(entropy.par_iter_mut())
        .zip(lse.par_iter_mut())
        .enumerate()
        .for_each(|(t, ((lp, h), l))| {
            let z = &logits[t * vocab..(t + 1) * vocab];
            let m = z.iter().copied().fold(R::neg_infinity(), R::max);
            let mut sum = R::zero();
            let mut weighted = R::zero();
            for &v in z {
                let e = (v - m).exp();
                sum += e;
                if e > R::zero() {
                    weighted += e * v;
                }
            }
            *l = m + sum.ln();
            *lp = z[targets[t] as usize] - *l;
            *h = *l - weighted / sum;
        });
    Ok(())
}

/// Backward: `dlogits = dlogp * (onehot(y) - p) - dentropy * p * (log p + H)`
/// (overwritten), using the forward's `lse` and `entropy`.
#[allow(clippy::too_many_arguments)]
pub fn token_logprob_bwd<R: Real>(
    logits: &[R],
    vocab: usize,
    targets: &[u32],
    lse: &[R],
    entropy: &[R],
    dlogp: &[R],
    dentropy: &[R],
    dlogits: &mut [R],
) {
    let rows = targets.len();
    assert_eq!(
        logits.len(),
        rows * vocab,
        "logprob: logits are not [T, vocab]"
    );
    assert_eq!(dlogits.len(), logits.len(), "logprob: dlogits length");
    assert!(
        lse.len() == rows && entropy.len() == rows,
        "logprob: saved lengths"
    );
    assert!(
        dlogp.len() == rows && dentropy.len() == rows,
        "logprob: grad lengths"
    );
    dlogits
        .par_chunks_mut(vocab)
        .enumerate()
        .for_each(|(t, dz)| {
            let z = &logits[t * vocab..(t + 1) * vocab];
            for (v, (o, &zv)) in dz.iter_mut().zip(z).enumerate() {
                let logp_v = zv - lse[t];
                let p = logp_v.exp();
                let onehot = if v == targets[t] as usize {
                    R::one()
                } else {
                    R::zero()
                };
                let d_ent = if p > R::zero() {
                    -p * (logp_v + entropy[t])
                } else {
                    R::zero()
                };
                *o = dlogp[t] * (onehot - p) + dentropy[t] * d_ent;
            }
        });
}
