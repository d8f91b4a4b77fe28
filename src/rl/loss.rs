//! The policy loss of the recipe and its gradient w.r.t. each response
//! token's log-prob: dual-clip PPO with asymmetric clipping, a TGF token
//! mask on the policy term, and the entropy penalty (mean negative log-prob
//! of the sampled tokens), all divided by the number of valid response
//! tokens of the whole mini-batch.

/// Loss settings; the defaults are the published VPPO 7B recipe's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyLossConfig {
    pub clip_low: f32,
    pub clip_high: f32,
    /// Dual-clip constant c for negative advantages (`None`: no dual clip).
    pub clip_dual: Option<f32>,
    /// Weight of the mean negative log-prob term.
    pub entropy_penalty: f32,
}

impl Default for PolicyLossConfig {
    fn default() -> Self {
        Self {
            clip_low: 0.2,
            clip_high: 0.28,
            clip_dual: Some(3.0),
            entropy_penalty: 0.06,
        }
    }
}

/// The loss of a micro-batch and what the backward needs.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyLoss {
    /// This micro-batch's share of the mini-batch loss.
    pub loss: f64,
    /// d loss / d log-prob of each token (feed to `train_backward`).
    pub token_grads: Vec<f32>,
    /// Fraction of tokens whose ratio was clipped (either side).
    pub clip_fraction: f32,
}

impl PolicyLossConfig {
    /// `lp_new`/`lp_old`: the tokens' log-probs under the current and the
    /// rollout policy; `advantages`: per token (already TAS-scaled);
    /// `mask`: TGF 0/1 per token; `total_tokens`: valid response tokens of
    /// the whole mini-batch (the loss is a token mean over it).
    pub fn evaluate(
        &self,
        lp_new: &[f32],
        lp_old: &[f32],
        advantages: &[f32],
        mask: &[f32],
        total_tokens: usize,
    ) -> PolicyLoss {
        let n = lp_new.len();
        assert!(
            lp_old.len() == n && advantages.len() == n && mask.len() == n,
            "policy loss: lengths differ"
        );
        let inv_total = 1.0 / total_tokens.max(1) as f64;
        let (lo, hi) = ((1.0 - self.clip_low).ln(), (1.0 + self.clip_high).ln());
        let mut loss = 0.0f64;
        let mut clipped = 0usize;
        let mut grads = Vec::with_capacity(n);
        for t in 0..n {
            let x = lp_new[t] - lp_old[t];
            let a = advantages[t];
            // ratio = exp(clamp(x, -20, 20)); the clipped ratio clamps x in
            // log space, as the reference does.
            let r = x.clamp(-20.0, 20.0).exp();
            let c = x.clamp(lo, hi).exp();
            let (l1, l2) = (-a * r, -a * c);
            let mut l = l1.max(l2);
            // Gradient flows only through the unclipped branch when it wins.
            let mut grad_active = l1 >= l2 && (-20.0..=20.0).contains(&x);
            if a < 0.0 {
                if let Some(dual) = self.clip_dual {
                    let l3 = -a * dual;
                    if l > l3 {
                        l = l3;
                        grad_active = false;
                    }
                }
            }
            if l1 != l {
                clipped += 1;
            }
            let dl = if grad_active { -a * r } else { 0.0 };
            loss += (mask[t] * l) as f64 - (self.entropy_penalty * lp_new[t]) as f64;
            grads.push(((mask[t] * dl - self.entropy_penalty) as f64 * inv_total) as f32);
        }
        PolicyLoss {
            loss: loss * inv_total,
            token_grads: grads,
            clip_fraction: clipped as f32 / n.max(1) as f32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_policy_loss_is_minus_mean_advantage_plus_penalty() {
        let cfg = PolicyLossConfig::default();
        let lp = [-1.0, -2.0, -0.5];
        let adv = [1.0, -0.5, 2.0];
        let out = cfg.evaluate(&lp, &lp, &adv, &[1.0; 3], 3);
        let want = (-(1.0 - 0.5 + 2.0) + 0.06 * 3.5) / 3.0;
        assert!((out.loss - want).abs() < 1e-6, "{}", out.loss);
        for (g, a) in out.token_grads.iter().zip(adv) {
            assert!((g - (-a - 0.06) / 3.0).abs() < 1e-6);
        }
        // Masked tokens keep only the entropy-penalty gradient; N counts them.
        let out = cfg.evaluate(&lp, &lp, &adv, &[1.0, 0.0, 0.0], 3);
        assert!((out.token_grads[1] - (-0.06 / 3.0)).abs() < 1e-7);
    }

    #[test]
    fn clipping_and_dual_clip_stop_the_gradient() {
        let cfg = PolicyLossConfig {
            entropy_penalty: 0.0,
            ..Default::default()
        };
        let old = [0.0f32; 4];
        // ratio 1.5 with A > 0: above 1 + 0.28, clipped.
        // ratio 0.5 with A > 0: below 1 - 0.2, unclipped branch wins (pessimistic).
        // ratio 5 with A < 0: beyond the dual clip c = 3.
        // ratio 0.5 with A < 0: clipped at 1 - 0.2.
        let new = [1.5f32.ln(), 0.5f32.ln(), 5f32.ln(), 0.5f32.ln()];
        let adv = [1.0, 1.0, -1.0, -1.0];
        let out = cfg.evaluate(&new, &old, &adv, &[1.0; 4], 4);
        assert_eq!(out.token_grads[0], 0.0);
        assert!((out.token_grads[1] - (-0.5 / 4.0)).abs() < 1e-6);
        assert_eq!(out.token_grads[2], 0.0);
        assert_eq!(out.token_grads[3], 0.0);
        let want = (-1.28 - 0.5 + 3.0 + 0.8) / 4.0;
        assert!((out.loss - want).abs() < 1e-5, "{} vs {want}", out.loss);
        // Without the dual clip, the large ratio keeps its gradient.
        let no_dual = PolicyLossConfig {
            clip_dual: None,
            ..cfg
        };
        let out = no_dual.evaluate(&new, &old, &adv, &[1.0; 4], 4);
        assert!((out.token_grads[2] - 5.0 / 4.0).abs() < 1e-5);
    }

    #[test]
    fn gradients_match_finite_differences_of_the_loss() {
        let cfg = PolicyLossConfig::default();
        let old = [-1.0f32, -2.0, -0.3, -1.5, -0.7, -2.2];
        let new = [-0.9f32, -2.3, -0.1, -1.45, -1.2, -2.0];
        let adv = [0.8f32, -1.2, 1.5, -0.4, 0.3, -2.0];
        let mask = [1.0, 1.0, 0.0, 1.0, 1.0, 1.0];
        let out = cfg.evaluate(&new, &old, &adv, &mask, 10);
        for t in 0..6 {
            let h = 1e-3f32;
            let mut up = new;
            up[t] += h;
            let mut down = new;
            down[t] -= h;
            let fd = (cfg.evaluate(&up, &old, &adv, &mask, 10).loss
                - cfg.evaluate(&down, &old, &adv, &mask, 10).loss)
                / (2.0 * h as f64);
            assert!(
                (fd - out.token_grads[t] as f64).abs() < 1e-3,
                "token {t}: fd {fd} vs {}",
                out.token_grads[t]
            );
        }
    }
}
