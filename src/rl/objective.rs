//! VPPO's shaping of a micro-batch: TAS-scaled advantages and the TGF
//! token mask from the rollout-time visual dependency, ready for the
//! dual-clip loss (`PolicyLossConfig::evaluate`). DAPO/GRPO have no
//! dependency: plain advantages, every token kept.

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
    use super::super::loss::PolicyLossConfig;
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
        let sbar = mean_dependency(&dep, &lens);
        let range = super::super::shaping::dependency_range(&sbar);
        let shaping = Shaping::of(Some(&dep), &lens, &adv, &VppoConfig::default(), range).unwrap();
        let scales = tas_scales(&sbar, range, 0.9);
        assert_eq!(shaping.scales, scales);
        assert_eq!(shaping.kept_tokens(), 3);
        let dep_sum: f32 = dep.iter().sum();
        assert!((shaping.dependency_sum - dep_sum as f64).abs() < 1e-6);
        let evaluate =
            |s: &Shaping| loss.evaluate(&lp_old, &lp_old, &s.token_advantages, &s.mask, 5);
        let out = evaluate(&shaping);
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
        let plain = Shaping::of(None, &lens, &adv, &VppoConfig::default(), None).unwrap();
        assert_eq!((plain.kept_tokens(), plain.dependency_sum), (5, 0.0));
        let out = evaluate(&plain);
        for t in 0..5 {
            assert!((out.token_grads[t] + adv[owner[t]] / 5.0).abs() < 1e-6);
        }
    }
}
