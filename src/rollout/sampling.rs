//! Next-token sampling: temperature (0 = greedy), top-k, top-p, from a
//! seeded per-sample RNG; the returned log-prob is always the model's own at
//! temperature 1 (what `score` computes), whatever the sampling settings.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use crate::backend::cpu::sampling::{pick_with_uniform, sample_token_with_uniform};
pub use crate::backend::desc::SamplingParams;

/// A reproducible stream for sample `sample` of prompt `prompt`: the same
/// tokens come out whatever else shares the batch.
pub fn sample_rng(seed: u64, prompt: usize, sample: usize) -> StdRng {
    let mut z = seed
        ^ (prompt as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (sample as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    // splitmix64 finaliser, so nearby indices give unrelated seeds.
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(z ^ (z >> 31))
}

/// Picks the next token from one row of logits; returns it with its
/// temperature-1 log-probability.
pub fn sample_token(logits: &[f32], params: &SamplingParams, rng: &mut StdRng) -> (u32, f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&z| (z - max).exp()).sum::<f32>().ln();
    let token = if params.temperature <= 0.0 {
        // First maximum, as torch.argmax does.
        logits.iter().position(|&z| z == max).unwrap_or(0)
    } else {
        pick(logits, params, rng)
    };
    (token as u32, logits[token] - lse)
}

fn pick(logits: &[f32], params: &SamplingParams, rng: &mut StdRng) -> usize {
    pick_with_uniform(logits, params, rng.random::<f32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uniform_contract_is_the_rng_path() {
        let logits: Vec<f32> = (0..300)
            .map(|i| ((i * 37 % 101) as f32 * 0.13).sin() * 4.0)
            .collect();
        for params in [
            SamplingParams::default(),
            SamplingParams {
                temperature: 0.7,
                top_p: 1.0,
                top_k: 0,
            },
            SamplingParams {
                temperature: 1.3,
                top_p: 0.5,
                top_k: 20,
            },
            SamplingParams {
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
            },
        ] {
            let mut a = sample_rng(9, 1, 2);
            let mut b = sample_rng(9, 1, 2);
            for _ in 0..50 {
                let want = sample_token(&logits, &params, &mut a);
                let u = if params.temperature > 0.0 {
                    b.random::<f32>()
                } else {
                    0.0
                };
                assert_eq!(sample_token_with_uniform(&logits, &params, u), want);
            }
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum_and_reports_the_log_prob() {
        let logits = [1.0, 3.0, 3.0, -2.0];
        let mut rng = sample_rng(0, 0, 0);
        let greedy = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        let (tok, lp) = sample_token(&logits, &greedy, &mut rng);
        assert_eq!(tok, 1);
        let lse = logits.iter().map(|z: &f32| z.exp()).sum::<f32>().ln();
        assert!((lp - (3.0 - lse)).abs() < 1e-6);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let logits = [0.0, 5.0, 4.9, -1.0, 4.8];
        let top2 = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 2,
        };
        let tight_p = SamplingParams {
            temperature: 1.0,
            top_p: 0.3,
            top_k: 0,
        };
        let mut rng = sample_rng(5, 1, 2);
        for _ in 0..200 {
            let (t, _) = sample_token(&logits, &top2, &mut rng);
            assert!(t == 1 || t == 2);
            let (t, lp) = sample_token(&logits, &tight_p, &mut rng);
            assert_eq!(t, 1);
            assert!(lp < 0.0);
        }
    }

    #[test]
    fn sampling_follows_the_distribution_and_is_reproducible() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = 0.25, 0.75
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
        };
        let draw = |seed| {
            let mut rng = sample_rng(seed, 0, 0);
            (0..4000)
                .filter(|_| sample_token(&logits, &p, &mut rng).0 == 1)
                .count()
        };
        let ones = draw(11);
        assert!(
            (2850..3150).contains(&ones),
            "{ones} of 4000 draws were token 1"
        );
        assert_eq!(draw(11), ones);
        assert_ne!(draw(12), ones);
    }
}
