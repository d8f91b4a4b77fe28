//! One micro-batch's VPPO objective, composed from the pieces: visual
//! dependency from the two rollout-time log-probs, TAS-scaled advantages,
//! the TGF token mask, and the dual-clip loss. DAPO/GRPO are the same call
//! without the perturbed log-probs (no shaping, no filtering).

use super::loss::{PolicyLoss, PolicyLossConfig};
use super::shaping::{tas_scales, tgf_mask};
use crate::backend::cpu::OpError;

/// The VPPO-specific settings (the published recipe's values by default).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VppoConfig {
    /// TAS lower scale beta_min (the upper one is dynamic).
    pub beta_min: f32,
    /// TGF: fraction of each response's tokens that keep their policy gradient.
    pub tgf_ratio: f32,
}

impl Default for VppoConfig {
    fn default() -> Self {
        Self {
            beta_min: 0.9,
            tgf_ratio: 0.4,
        }
    }
}

/// Mean dependency of each response (tokens concatenated, `lens` per response).
pub fn mean_dependency(dependency: &[f32], lens: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(lens.len());
    let mut at = 0;
    for &len in lens {
        let s: f32 = dependency[at..at + len].iter().sum();
        out.push(s / len.max(1) as f32);
        at += len;
    }
    out
}

/// Inputs of one micro-batch, tokens of its responses concatenated.
pub struct MicroBatch<'a> {
    pub lp_new: &'a [f32],
    pub lp_old: &'a [f32],
    /// Each token's visual dependency, from the rollout-time original and
    /// perturbed-image passes (`None`: DAPO/GRPO).
    pub dependency: Option<&'a [f32]>,
    pub response_lens: &'a [usize],
    /// One GRPO advantage per response.
    pub advantages: &'a [f32],
}

/// A micro-batch's loss with what the shaping did (for the run's metrics).
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    pub policy: PolicyLoss,
    /// TAS scale of each response (all 1 without the perturbed pass).
    pub scales: Vec<f32>,
    /// Tokens whose policy gradient TGF kept.
    pub kept_tokens: usize,
    /// Sum of the token visual dependencies (0 without the perturbed pass).
    pub dependency_sum: f64,
}

/// The loss and per-token gradients of a micro-batch. `dependency_range`
/// is the min/max mean dependency over the whole update mini-batch;
/// `total_tokens` its valid response tokens.
pub fn micro_batch_objective(
    mb: &MicroBatch,
    vppo: &VppoConfig,
    loss: &PolicyLossConfig,
    dependency_range: Option<(f32, f32)>,
    total_tokens: usize,
) -> Result<Objective, OpError> {
    let n: usize = mb.response_lens.iter().sum();
    assert_eq!(mb.lp_new.len(), n, "objective: token count");
    let shaping = Shaping::of(
        mb.dependency,
        mb.response_lens,
        mb.advantages,
        vppo,
        dependency_range,
    )?;
    Ok(Objective {
        policy: loss.evaluate(
            mb.lp_new,
            mb.lp_old,
            &shaping.token_advantages,
            &shaping.mask,
            total_tokens,
        ),
        kept_tokens: shaping.kept_tokens(),
        scales: shaping.scales,
        dependency_sum: shaping.dependency_sum,
    })
}

/// What VPPO's shaping makes of a micro-batch before any log-prob of the
/// policy being updated is known: TAS scales (whose dynamic upper bound
/// averages over the micro-batch, as the reference does), the TGF mask
/// and the shaped per-token advantages. The loss itself is per token, so
/// a micro-batch's responses may then be evaluated one at a time.
#[derive(Debug, Clone, PartialEq)]
pub struct Shaping {
    pub scales: Vec<f32>,
    pub mask: Vec<f32>,
    pub token_advantages: Vec<f32>,
    pub dependency_sum: f64,
}

impl Shaping {
    pub fn of(
        dependency: Option<&[f32]>,
        response_lens: &[usize],
        advantages: &[f32],
        vppo: &VppoConfig,
        dependency_range: Option<(f32, f32)>,
    ) -> Result<Self, OpError> {
        let n: usize = response_lens.iter().sum();
        assert_eq!(
            advantages.len(),
            response_lens.len(),
            "objective: one advantage per response"
        );
        let mut dependency_sum = 0.0;
        let (scales, mask) = match dependency {
            Some(dep) => {
                dependency_sum = dep.iter().map(|&d| d as f64).sum();
                let scales = tas_scales(
                    &mean_dependency(dep, response_lens),
                    dependency_range,
                    vppo.beta_min,
                );
                let mut cu = vec![0i32];
                for &l in response_lens {
                    cu.push(cu.last().unwrap() + l as i32);
                }
                (scales, tgf_mask(dep, &cu, vppo.tgf_ratio)?)
            }
            None => (vec![1.0; response_lens.len()], vec![1.0; n]),
        };
        let token_advantages = response_lens
            .iter()
            .zip(advantages.iter().zip(&scales))
            .flat_map(|(&len, (&a, &s))| std::iter::repeat_n(a * s, len))
            .collect();
        Ok(Self {
            scales,
            mask,
            token_advantages,
            dependency_sum,
        })
    }

    /// Tokens whose policy gradient TGF kept.
    pub fn kept_tokens(&self) -> usize {
        self.mask.iter().filter(|&&m| m > 0.0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vppo_scales_advantages_and_filters_tokens() {
        let lp_old = [-1.0f32, -1.0, -1.0, -2.0, -2.0];
        // Response 0 (3 tokens) depends on the image at token 1; response 1 at both tokens.
        let lp_mask = [-1.0f32, -3.0, -1.0, -2.5, -1.0];
        let lens = [3usize, 2];
        let adv = [1.0f32, -1.0];
        let dep = super::super::shaping::visual_dependency(&lp_old, &lp_mask);
        let loss = PolicyLossConfig {
            entropy_penalty: 0.0,
            ..Default::default()
        };
        let mb = MicroBatch {
            lp_new: &lp_old,
            lp_old: &lp_old,
            dependency: Some(&dep),
            response_lens: &lens,
            advantages: &adv,
        };
        let sbar = mean_dependency(&dep, &lens);
        let range = super::super::shaping::dependency_range(&sbar);
        let out = micro_batch_objective(&mb, &VppoConfig::default(), &loss, range, 5).unwrap();
        let scales = tas_scales(&sbar, range, 0.9);
        assert_eq!(out.scales, scales);
        assert_eq!(out.kept_tokens, 3);
        let dep_sum: f32 = dep.iter().sum();
        assert!((out.dependency_sum - dep_sum as f64).abs() < 1e-6);
        let out = out.policy;
        // TGF keeps ceil(0.4*3)=2 of response 0 (token 1 and the earlier tie),
        // ceil(0.4*2)=1 of response 1 (the larger shift, token 4).
        let kept = [true, true, false, false, true];
        let owner = [0, 0, 0, 1, 1];
        for t in 0..5 {
            let want = if kept[t] {
                -adv[owner[t]] * scales[owner[t]] / 5.0
            } else {
                0.0
            };
            assert!(
                (out.token_grads[t] - want).abs() < 1e-6,
                "token {t}: {} vs {want}",
                out.token_grads[t]
            );
        }
        // Without the perturbed pass: plain advantages, every token.
        let plain = MicroBatch {
            dependency: None,
            ..mb
        };
        let out = micro_batch_objective(&plain, &VppoConfig::default(), &loss, None, 5).unwrap();
        assert_eq!((out.kept_tokens, out.dependency_sum), (5, 0.0));
        let out = out.policy;
        for t in 0..5 {
            assert!((out.token_grads[t] + adv[owner[t]] / 5.0).abs() < 1e-6);
        }
    }
}
