//! Picking a token from a row of logits with a given uniform draw: the
//! contract of the GPU sampling kernel (`kernels/sampling.cu`). The seeded
//! generators that produce the draws live in `rollout::sampling`.

use crate::backend::desc::SamplingParams;

/// `rollout::sampling::sample_token` with the uniform draw given instead of a generator (used
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

/// The non-greedy pick of `rollout::sampling::sample_token` with its uniform draw `u` in
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
