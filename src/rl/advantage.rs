//! GRPO advantages and the dynamic-sampling filter.

/// Per-response advantages of consecutive groups of `group` responses:
/// `(R - mean) / (std + 1e-6)` with the unbiased std of the group; a group
/// of one is left as its reward (mean 0, std 1), as the reference does.
pub fn group_advantages(rewards: &[f32], group: usize) -> Vec<f32> {
    assert!(
        group > 0 && rewards.len() % group == 0,
        "rewards must come in whole groups"
    );
    rewards
        .chunks(group)
        .flat_map(|g| {
            let (mean, std) = if g.len() == 1 {
                (0.0, 1.0)
            } else {
                let n = g.len() as f64;
                let mean = g.iter().map(|&r| r as f64).sum::<f64>() / n;
                let var = g.iter().map(|&r| (r as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
                (mean, var.sqrt())
            };
            g.iter()
                .map(move |&r| ((r as f64 - mean) / (std + 1e-6)) as f32)
        })
        .collect()
}

/// Dynamic sampling (online filtering): keep a group only when its mean
/// accuracy is strictly between `low` and `high` (0.01 and 0.99 in the
/// recipe): all-right or all-wrong groups carry no learning signal.
pub fn keep_group(rewards: &[f32], low: f32, high: f32) -> bool {
    if rewards.is_empty() {
        return false;
    }
    let mean = rewards.iter().sum::<f32>() / rewards.len() as f32;
    mean > low && mean < high
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_are_group_z_scores() {
        let a = group_advantages(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], 2);
        // Groups of two: [1, 0] has mean 0.5 and unbiased std sqrt(0.5).
        let z = 0.5 / (0.5f64.sqrt() + 1e-6);
        assert!((a[0] as f64 - z).abs() < 1e-6 && (a[1] as f64 + z).abs() < 1e-6);
        assert!((a[2] as f64 + z).abs() < 1e-6 && (a[3] as f64 - z).abs() < 1e-6);
        // All equal: zero advantage.
        assert_eq!(&a[4..], &[0.0, 0.0]);
        // [1, 0, 0, 0]: mean 0.25, unbiased var 0.75 / 3 = 0.25, std 0.5.
        let four = group_advantages(&[1.0, 0.0, 0.0, 0.0], 4);
        assert!(
            (four[0] as f64 - 0.75 / (0.5 + 1e-6)).abs() < 1e-5,
            "{four:?}"
        );
        assert!(
            (four[1] as f64 + 0.25 / (0.5 + 1e-6)).abs() < 1e-5,
            "{four:?}"
        );
        // A group of one: mean 0, std 1, as the reference sets them.
        assert_eq!(
            group_advantages(&[0.7], 1),
            vec![(0.7f64 / (1.0 + 1e-6)) as f32]
        );
    }

    #[test]
    fn groups_without_signal_are_dropped() {
        assert!(!keep_group(&[1.0; 8], 0.01, 0.99));
        assert!(!keep_group(&[0.0; 8], 0.01, 0.99));
        assert!(keep_group(
            &[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            0.01,
            0.99
        ));
    }
}
