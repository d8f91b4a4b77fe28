//! The sampling kernel against `rollout::sampling::sample_token_with_uniform`.

use crate::{cuda, drv, random, Case};
use rand::Rng;
use vppo_engine::rollout::sampling::{sample_token_with_uniform, SamplingParams};

/// Whether `got` is what exact (f64) arithmetic picks for the draw `u` to
/// within `eps` of probability: the token's interval of cumulative mass, in
/// the CPU's candidate order, must come within `eps` of `u`, and it must be
/// inside the top-p cut moved by `eps`. Sums in another order round
/// differently, and over a large flat vocabulary that moves the pick by a
/// few candidates.
fn near_boundary(row: &[f32], params: &SamplingParams, u: f32, got: usize, eps: f64) -> bool {
    let inv_t = 1.0 / params.temperature as f64;
    let mut order: Vec<usize> = (0..row.len()).collect();
    let sorted = params.top_k > 0 || params.top_p < 1.0;
    if sorted {
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    }
    if params.top_k > 0 {
        order.truncate(params.top_k);
    }
    let m = order
        .iter()
        .map(|&i| row[i] as f64)
        .fold(f64::NEG_INFINITY, f64::max)
        * inv_t;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| (row[i] as f64 * inv_t - m).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    let Some(pos) = order.iter().position(|&i| i == got) else {
        return false;
    };
    let mut kept = probs.len();
    if params.top_p < 1.0 {
        let mut mass = 0.0;
        for (i, p) in probs.iter().enumerate() {
            mass += p;
            if mass >= params.top_p as f64 - eps {
                kept = i + 1;
                break;
            }
        }
        let mut loose = probs.len();
        let mut mass = 0.0;
        for (i, p) in probs.iter().enumerate() {
            mass += p;
            if mass >= params.top_p as f64 + eps {
                loose = i + 1;
                break;
            }
        }
        if pos >= loose {
            return false;
        }
        kept = kept.max(pos + 1);
    }
    let kept_total: f64 = probs[..kept].iter().sum();
    let before: f64 = probs[..pos].iter().sum::<f64>() / kept_total;
    let after = before + probs[pos] / kept_total;
    let u = u as f64;
    before <= u + eps && after >= u - eps
}

/// Diagnostics: (mass before `tok` in the candidate order, its own mass,
/// kept mass), all in f64, normalised over the whole candidate list.
fn mass_before(row: &[f32], params: &SamplingParams, tok: usize) -> Option<(f64, f64, usize)> {
    let inv_t = 1.0 / params.temperature as f64;
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    let m = row[order[0]] as f64 * inv_t;
    let probs: Vec<f64> = order
        .iter()
        .map(|&i| (row[i] as f64 * inv_t - m).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    let pos = order.iter().position(|&i| i == tok)?;
    let before = probs[..pos].iter().sum::<f64>() / total;
    Some((before, probs[pos] / total, pos))
}

/// `rows` rows with fresh draws; `ties` rounds logits to multiples of 1/8 so
/// many share a value (the index tie-break matters). A token that differs
/// from the CPU's passes only when [`near_boundary`] (1e-4) accepts it.
pub fn sample_case(rows: usize, vocab: usize, params: SamplingParams, ties: bool) -> Case {
    Case {
        name: format!(
            "sample rows={rows} vocab={vocab} t={} top_p={} top_k={}{}",
            params.temperature,
            params.top_p,
            params.top_k,
            if ties { " ties" } else { "" }
        ),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let mut logits = random(rng, rows * vocab, 6.0);
            if ties {
                logits
                    .iter_mut()
                    .for_each(|z| *z = (*z * 8.0).round() / 8.0);
            }
            let uniforms: Vec<f32> = (0..rows).map(|_| rng.random::<f32>()).collect();
            let logits_d = s.clone_htod(&logits).map_err(drv)?;
            let u_d = s.clone_htod(&uniforms).map_err(drv)?;
            let mut tok_d = s.clone_htod(&vec![-1i32; rows]).map_err(drv)?;
            let mut lp_d = s.clone_htod(&vec![f32::NAN; rows]).map_err(drv)?;
            gpu.sample(&logits_d, rows, vocab, &params, &u_d, &mut tok_d, &mut lp_d)
                .map_err(cuda)?;
            let toks = s.clone_dtoh(&tok_d).map_err(drv)?;
            let lps = s.clone_dtoh(&lp_d).map_err(drv)?;
            let (mut exact, mut boundary) = (0, 0);
            let mut worst_lp = 0.0f32;
            for r in 0..rows {
                let row = &logits[r * vocab..(r + 1) * vocab];
                let (want, want_lp) = sample_token_with_uniform(row, &params, uniforms[r]);
                let got = toks[r];
                if got < 0 || got as usize >= vocab {
                    return Err(format!("row {r}: token {got} out of range"));
                }
                if got as u32 == want {
                    exact += 1;
                    // log p = z - logsumexp over the whole vocabulary: judged
                    // against f64, within 4x the f32 CPU twin's own error.
                    let m = row.iter().fold(f64::NEG_INFINITY, |a, &z| a.max(z as f64));
                    let lse = m + row.iter().map(|&z| (z as f64 - m).exp()).sum::<f64>().ln();
                    let truth = row[want as usize] as f64 - lse;
                    let e = (lps[r] as f64 - truth).abs() / truth.abs().max(1.0);
                    let e_cpu = (want_lp as f64 - truth).abs() / truth.abs().max(1.0);
                    if e.is_nan() || e > 1e-5f64.max(4.0 * e_cpu) {
                        return Err(format!(
                            "row {r}: logprob gpu {} cpu {want_lp} f64 {truth}",
                            lps[r]
                        ));
                    }
                    worst_lp = worst_lp.max(e as f32);
                    continue;
                }
                if params.temperature <= 0.0
                    || !near_boundary(row, &params, uniforms[r], got as usize, 1e-4)
                {
                    let at = |tok: usize| mass_before(row, &params, tok);
                    return Err(format!(
                        "row {r}: token gpu {got} cpu {want}; u {} f64 mass before gpu {:?} cpu {:?}",
                        uniforms[r],
                        at(got as usize),
                        at(want as usize)
                    ));
                }
                boundary += 1;
            }
            Ok(format!(
                "{exact} exact, {boundary} at a boundary; logprob {worst_lp:.1e}"
            ))
        }),
    }
}

pub fn cases() -> Vec<Case> {
    let p = |temperature, top_p, top_k| SamplingParams {
        temperature,
        top_p,
        top_k,
    };
    vec![
        sample_case(1, 1, p(1.0, 1.0, 0), false),
        sample_case(64, 1000, p(0.0, 1.0, 0), true),
        sample_case(64, 5000, p(1.0, 1.0, 0), false),
        sample_case(64, 151_936, p(1.0, 0.99, 0), false),
        sample_case(64, 32_000, p(0.7, 0.9, 50), true),
        sample_case(32, 3000, p(1.3, 1.0, 1), false),
        sample_case(32, 3000, p(1.0, 0.5, 3000), true),
        sample_case(32, 777, p(1.0, 0.3, 20), false),
    ]
}
