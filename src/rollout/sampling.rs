//! Next-token sampling: temperature (0 = greedy), top-k, top-p, from a
//! seeded per-sample RNG; the returned log-prob is always the model's own at
//! temperature 1 (what `score` computes), whatever the sampling settings.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings; the defaults are the VPPO recipe's rollout settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus mass kept (1.0 = off).
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 0.99,
            top_k: 0,
        }
    }
}

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

/// [`sample_token`] with the uniform draw given instead of a generator (used
/// only when `temperature > 0`): the contract of the GPU sampling kernel.
pub fn sample_token_with_uniform(logits: &[f32], params: &SamplingParams, u: f32) -> (u32, f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&z| (z - max).exp()).sum::<f32>().ln();
    let token = if params.temperature <= 0.0 {
        logits.iter().position(|&z| z == max).unwrap_or(0)
    } else {
        pick_with_uniform(logits, params, u)
    };
    (token as u32, logits[token] - lse)
}

fn pick(logits: &[f32], params: &SamplingParams, rng: &mut StdRng) -> usize {
    pick_with_uniform(logits, params, rng.random::<f32>())
}

/// The non-greedy pick of [`sample_token`] with its uniform draw `u` in
/// `[0, 1)` given: temperature, then top-k, then top-p over the candidates in
/// descending-logit order (ties by index), then the first candidate whose
/// cumulative probability exceeds `u` times the kept mass. The GPU sampling
/// kernel (`kernels/sampling.cu`) has this contract, one `u` per row.
pub fn pick_with_uniform(logits: &[f32], params: &SamplingParams, u: f32) -> usize {
    let inv_t = 1.0 / params.temperature;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    if params.top_k > 0 || params.top_p < 1.0 {
        // Descending by logit, ties by index: a deterministic candidate
        // order (a total order, so the unstable sort is deterministic too).
        order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    }
    if params.top_k > 0 {
        order.truncate(params.top_k);
    }
    let m = order
        .iter()
        .map(|&i| logits[i])
        .fold(f32::NEG_INFINITY, f32::max)
        * inv_t;
    let mut probs: Vec<f32> = order
        .iter()
        .map(|&i| (logits[i] * inv_t - m).exp())
        .collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if params.top_p < 1.0 {
        // Smallest prefix whose mass reaches top_p (at least one token).
        let mut mass = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            mass += p;
            if mass >= params.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
    }
    let total: f32 = probs.iter().sum();
    let mut u = u * total;
    for (i, p) in probs.iter().enumerate() {
        if u < *p {
            return order[i];
        }
        u -= p;
    }
    order[probs.len() - 1]
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
