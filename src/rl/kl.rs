//! The KL-to-reference loss term of EasyR1/verl (`use_kl_loss`): a token
//! mean over the mini-batch of an estimate of KL(policy || reference) from
//! the sampled tokens' log-probs, times `kl_coef`, added to the policy
//! loss. Its gradient w.r.t. each token's log-prob joins the policy term's
//! `token_grads`, so the model's backward is unchanged.

/// verl's `kl_penalty` estimators, `d = lp - lp_ref` per sampled token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `d` (unbiased, high variance; can be negative).
    K1,
    /// `d^2 / 2`.
    K2,
    /// `exp(-d) + d - 1`, clamped to [-10, 10] (verl's `low_var_kl`, the
    /// EasyR1 default).
    #[default]
    #[serde(alias = "low_var_kl")]
    K3,
}

/// The KL term of a micro-batch.
#[derive(Debug, Clone, PartialEq)]
pub struct KlLoss {
    /// `coef` x the micro-batch's share of the mini-batch token mean.
    pub loss: f64,
    /// d loss / d log-prob of each token, to add to the policy term's.
    pub token_grads: Vec<f32>,
    /// Sum of the per-token estimates (for the logged `kl_mean`).
    pub kl_sum: f64,
}

impl KlEstimator {
    /// The estimate for one token and its derivative w.r.t. `lp`.
    pub fn token(self, lp: f32, lp_ref: f32) -> (f64, f64) {
        let d = (lp as f64) - (lp_ref as f64);
        match self {
            Self::K1 => (d, 1.0),
            Self::K2 => (0.5 * d * d, d),
            Self::K3 => {
                // verl: kl = clamp(ref - lp, -20, 20); clamp(exp(kl) - kl - 1, -10, 10).
                let k = (-d).clamp(-20.0, 20.0);
                let v = k.exp() - k - 1.0;
                let inside_k = (-20.0..=20.0).contains(&-d);
                let grad = if inside_k && v <= 10.0 {
                    // d/dlp [exp(-d) + d - 1] = 1 - exp(-d)
                    1.0 - k.exp()
                } else {
                    0.0
                };
                (v.clamp(-10.0, 10.0), grad)
            }
        }
    }

    /// `coef` x the token mean (over `total_tokens`, the mini-batch's valid
    /// response tokens) of the estimate, on the tokens of one micro-batch.
    pub fn loss(self, lp: &[f32], lp_ref: &[f32], coef: f64, total_tokens: usize) -> KlLoss {
        assert_eq!(lp.len(), lp_ref.len(), "kl: lengths differ");
        let inv = 1.0 / total_tokens.max(1) as f64;
        let (mut sum, mut grads) = (0.0, Vec::with_capacity(lp.len()));
        for (&a, &b) in lp.iter().zip(lp_ref) {
            let (v, g) = self.token(a, b);
            sum += v;
            grads.push((coef * g * inv) as f32);
        }
        KlLoss {
            loss: coef * sum * inv,
            token_grads: grads,
            kl_sum: sum,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimators_match_their_formulas_and_vanish_on_the_reference() {
        for e in [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3] {
            assert_eq!(
                e.token(-1.3, -1.3),
                (0.0, if e == KlEstimator::K1 { 1.0 } else { 0.0 })
            );
        }
        let (lp, r) = (-0.5f32, -1.5f32); // d = 1
        assert!((KlEstimator::K1.token(lp, r).0 - 1.0).abs() < 1e-12);
        assert!((KlEstimator::K2.token(lp, r).0 - 0.5).abs() < 1e-12);
        let want = (-1.0f64).exp() + 1.0 - 1.0;
        assert!((KlEstimator::K3.token(lp, r).0 - want).abs() < 1e-7);
        // k3 is never negative, and is clamped at 10 far from the reference.
        assert_eq!(KlEstimator::K3.token(-30.0, 0.0), (10.0, 0.0));
        let parsed: KlEstimator = serde_json::from_str("\"low_var_kl\"").unwrap();
        assert_eq!(parsed, KlEstimator::K3);
    }

    /// The loss term's gradient against central differences of its value,
    /// for each estimator, on tokens above, below and at the reference.
    #[test]
    fn gradients_match_finite_differences() {
        let lp = [-0.9f32, -2.3, -0.1, -1.45, -1.2, -3.0];
        let lp_ref = [-1.0f32, -2.0, -0.1, -1.5, -0.7, -0.5];
        for e in [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3] {
            let out = e.loss(&lp, &lp_ref, 0.3, 10);
            for t in 0..lp.len() {
                let h = 1e-3f32;
                let (mut up, mut down) = (lp, lp);
                up[t] += h;
                down[t] -= h;
                let fd = (e.loss(&up, &lp_ref, 0.3, 10).loss
                    - e.loss(&down, &lp_ref, 0.3, 10).loss)
                    / (2.0 * h as f64);
                assert!(
                    (fd - out.token_grads[t] as f64).abs() < 1e-4,
                    "{e:?} token {t}: fd {fd} vs {}",
                    out.token_grads[t]
                );
            }
        }
    }
}
