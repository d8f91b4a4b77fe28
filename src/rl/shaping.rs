//! VPPO's use of visual dependency: per-token scores from the original and
//! perturbed-image log-probs, trajectory-level advantage shaping (TAS) and
//! token-level gradient filtering (TGF).

use crate::backend::cpu::softmax_kl::dependency_k3;
use crate::backend::cpu::topk_select::topk_select_mask;
use crate::backend::cpu::OpError;

/// How a token's visual dependency is measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DependencyEstimator {
    /// The reference's k3 estimator from the two log-probs of the sampled
    /// token ([`visual_dependency`]).
    #[default]
    K3,
    /// KL(original || perturbed) over the full vocabulary.
    ExactKl,
}

/// `S_t = clamp(exp(d) - d - 1, 0, 10)`, `d = clamp(lp_mask - lp_orig, -20, 20)`.
pub fn visual_dependency(lp_orig: &[f32], lp_mask: &[f32]) -> Vec<f32> {
    let mut s = vec![0.0; lp_orig.len()];
    dependency_k3(lp_orig, lp_mask, &mut s);
    s
}

/// TAS scales for the responses of one micro-batch. `mean_dependency[i]` is
/// response i's mean `S_t`; `lo`/`hi` are the min and max of that mean over
/// the whole update mini-batch (`None` when it has fewer than two
/// responses). `alpha_i = beta_min + (1 - beta_min) * n_i / (mean(n) + 1e-8)`
/// with `n_i = clamp((Sbar_i - lo) / (hi - lo), 0, 1)`, mean over the
/// micro-batch; all ones when `hi - lo <= 1e-6`.
pub fn tas_scales(mean_dependency: &[f32], range: Option<(f32, f32)>, beta_min: f32) -> Vec<f32> {
    let Some((lo, hi)) = range.filter(|(lo, hi)| hi - lo > 1e-6) else {
        return vec![1.0; mean_dependency.len()];
    };
    let norm: Vec<f32> = mean_dependency
        .iter()
        .map(|&s| ((s - lo) / (hi - lo)).clamp(0.0, 1.0))
        .collect();
    let mu = norm.iter().sum::<f32>() / norm.len().max(1) as f32;
    let beta_max = beta_min + (1.0 - beta_min) / (mu + 1e-8);
    norm.iter()
        .map(|&n| beta_min + n * (beta_max - beta_min))
        .collect()
}

/// Min and max of the responses' mean dependency over an update mini-batch,
/// or `None` with fewer than two responses.
pub fn dependency_range(mean_dependency: &[f32]) -> Option<(f32, f32)> {
    if mean_dependency.len() < 2 {
        return None;
    }
    let lo = mean_dependency
        .iter()
        .copied()
        .fold(f32::INFINITY, f32::min);
    let hi = mean_dependency
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    Some((lo, hi))
}

/// TGF: 1 for the `ceil(ratio * len)` highest-dependency tokens of each
/// packed response (`cu_seqlens`), 0 elsewhere.
pub fn tgf_mask(dependency: &[f32], cu_seqlens: &[i32], ratio: f32) -> Result<Vec<f32>, OpError> {
    let mut mask = vec![0.0; dependency.len()];
    topk_select_mask(dependency, cu_seqlens, ratio, &mut mask)?;
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tas_maps_dependency_to_scales_averaging_one() {
        let sbar = [0.0, 1.0, 2.0, 3.0];
        let scales = tas_scales(&sbar, dependency_range(&sbar), 0.9);
        // n = [0, 1/3, 2/3, 1], mean 0.5, beta_max = 0.9 + 0.1 / 0.5 = 1.1.
        let want = [0.9, 0.9 + 0.2 / 3.0, 0.9 + 0.4 / 3.0, 1.1];
        for (a, b) in scales.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{scales:?}");
        }
        assert!((scales.iter().sum::<f32>() / 4.0 - 1.0).abs() < 1e-5);
        // A flat mini-batch, or a single response: no shaping.
        assert_eq!(
            tas_scales(&[2.0, 2.0], dependency_range(&[2.0, 2.0]), 0.9),
            vec![1.0, 1.0]
        );
        assert_eq!(tas_scales(&[5.0], dependency_range(&[5.0]), 0.9), vec![1.0]);
        // A micro-batch scaled with the wider mini-batch range.
        let micro = tas_scales(&[1.0, 3.0], Some((0.0, 4.0)), 0.9);
        assert!(
            (micro[0] - (0.9 + 0.25 * 0.1 / 0.5)).abs() < 1e-5
                && (micro[1] - (0.9 + 0.75 * 0.1 / 0.5)).abs() < 1e-5
        );
    }

    #[test]
    fn tgf_keeps_the_most_dependent_tokens() {
        let dep = visual_dependency(&[0.0, 0.0, 0.0, 0.0, 0.0], &[0.0, -2.0, 0.5, 0.0, -0.1]);
        assert_eq!(dep[0], 0.0);
        let mask = tgf_mask(&dep, &[0, 5], 0.4).unwrap();
        // ceil(0.4 * 5) = 2: the -2.0 and +0.5 shifts.
        assert_eq!(mask, vec![0.0, 1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn tgf_counts_ceil_of_the_ratio_per_response_and_breaks_ties_by_position() {
        // Three responses of 1, 3 and 6 tokens: k = ceil(0.4 n) = 1, 2, 3.
        let dep = [
            0.0, // lone token: always kept
            0.2, 0.2, 0.2, // all tied: the first two
            0.1, 0.5, 0.5, 0.0, 0.5, 0.3, // three tied at the top: all three
        ];
        let mask = tgf_mask(&dep, &[0, 1, 4, 10], 0.4).unwrap();
        assert_eq!(mask, vec![1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]);
        // Ratio 1 keeps everything; ratio 0 keeps nothing.
        assert!(tgf_mask(&dep, &[0, 1, 4, 10], 1.0)
            .unwrap()
            .iter()
            .all(|&m| m == 1.0));
        assert!(tgf_mask(&dep, &[0, 1, 4, 10], 0.0)
            .unwrap()
            .iter()
            .all(|&m| m == 0.0));
    }
}
