//! Token log-prob + entropy over a chunked lm_head against `cpu::logprob`.

use crate::{
    check, check_truth, cuda, drv, random, to_bf16, to_f64, widen, Case, BF16_TOL, FP32_TOL,
};
use half::bf16;
use rand::Rng;
use vppo_engine::backend::cpu;
use vppo_engine::backend::cuda::{LogitChunk, LOGPROB_STATE_PER_ROW};

/// The forward folds the logits chunk by chunk (`chunk` columns at a time,
/// the last one shorter), the backward writes each chunk's gradient; both
/// against the CPU op on the whole [T, V] matrix.
pub fn logprob_case(rows: usize, vocab: usize, chunk: usize, masked: bool) -> Case {
    Case {
        name: format!(
            "logprob chunked fwd+bwd rows={rows} vocab={vocab} chunk={chunk}{}",
            if masked { " masked" } else { "" }
        ),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let mut logits = random(rng, rows * vocab, 8.0);
            if masked {
                for (i, z) in logits.iter_mut().enumerate() {
                    if i % 5 == 1 {
                        *z = f32::NEG_INFINITY;
                    }
                }
            }
            let targets: Vec<u32> = (0..rows)
                .map(|t| {
                    // A finite-logit target (masked runs avoid -inf ones).
                    let mut y = rng.random_range(0..vocab as u32);
                    while logits[t * vocab + y as usize] == f32::NEG_INFINITY {
                        y = (y + 1) % vocab as u32;
                    }
                    y
                })
                .collect();
            let (dlogp, dent) = (random(rng, rows, 1.0), random(rng, rows, 1.0));
            let CpuRefs {
                lp: lp_ref,
                h: h_ref,
                lse: lse_ref,
                h64,
                lse64,
                dz: dz_ref,
            } = cpu_refs(&logits, vocab, &targets, &dlogp, &dent)?;

            let targets_d = s.clone_htod(&targets).map_err(drv)?;
            let mut state = s
                .clone_htod(&vec![f32::NAN; rows * LOGPROB_STATE_PER_ROW])
                .map_err(drv)?;
            // Chunks as the lm_head GEMM would write them: contiguous [T, len].
            let chunks: Vec<(usize, usize)> = (0..vocab)
                .step_by(chunk)
                .map(|v0| (v0, chunk.min(vocab - v0)))
                .collect();
            let mut chunk_bufs = Vec::new();
            for (i, &(v0, len)) in chunks.iter().enumerate() {
                let host: Vec<f32> = (0..rows)
                    .flat_map(|t| logits[t * vocab + v0..t * vocab + v0 + len].to_vec())
                    .collect();
                let d = s.clone_htod(&host).map_err(drv)?;
                let c = LogitChunk {
                    rows,
                    chunk_len: len,
                    ld: len,
                    vocab_offset: v0,
                };
                gpu.logprob_chunk(&c, &d, &targets_d, i == 0, &mut state)
                    .map_err(cuda)?;
                chunk_bufs.push((c, d));
            }
            let poison = vec![f32::NAN; rows];
            let mut lp_d = s.clone_htod(&poison).map_err(drv)?;
            let mut h_d = s.clone_htod(&poison).map_err(drv)?;
            let mut lse_d = s.clone_htod(&poison).map_err(drv)?;
            gpu.logprob_finish(&state, rows, &mut lp_d, &mut h_d, &mut lse_d)
                .map_err(cuda)?;
            let dlogp_d = s.clone_htod(&dlogp).map_err(drv)?;
            let dent_d = s.clone_htod(&dent).map_err(drv)?;
            let mut dz = vec![f32::NAN; rows * vocab];
            for (c, d) in &chunk_bufs {
                let mut dz_d = s
                    .clone_htod(&vec![f32::NAN; rows * c.chunk_len])
                    .map_err(drv)?;
                gpu.logprob_bwd_chunk(c, d, &targets_d, &lse_d, &h_d, &dlogp_d, &dent_d, &mut dz_d)
                    .map_err(cuda)?;
                let host = s.clone_dtoh(&dz_d).map_err(drv)?;
                for t in 0..rows {
                    let at = t * vocab + c.vocab_offset;
                    dz[at..at + c.chunk_len]
                        .copy_from_slice(&host[t * c.chunk_len..(t + 1) * c.chunk_len]);
                }
            }
            let e_lp = check(
                "logp",
                &s.clone_dtoh(&lp_d).map_err(drv)?,
                &lp_ref,
                FP32_TOL,
            )?;
            let e_h = check_truth("entropy", &s.clone_dtoh(&h_d).map_err(drv)?, &h_ref, &h64)?;
            let e_l = check(
                "lse",
                &s.clone_dtoh(&lse_d).map_err(drv)?,
                &lse_ref,
                FP32_TOL,
            )?;
            let mut dz64 = vec![0.0; rows * vocab];
            cpu::logprob::token_logprob_bwd(
                &to_f64(&logits),
                vocab,
                &targets,
                &lse64,
                &h64,
                &to_f64(&dlogp),
                &to_f64(&dent),
                &mut dz64,
            );
            let e_dz = check_truth("dlogits", &dz, &dz_ref, &dz64)?;
            Ok(format!(
                "{} chunks: logp {e_lp:.1e} entropy {e_h:.1e} lse {e_l:.1e} dlogits {e_dz:.1e}",
                chunks.len()
            ))
        }),
    }
}

pub fn cases() -> Vec<Case> {
    vec![
        logprob_case(1, 1, 1, false),
        logprob_case(3, 1000, 1000, false),
        logprob_case(5, 1000, 300, true),
        logprob_case(17, 151_936, 32_768, false),
        logprob_case(2, 50_000, 7, false),
    ]
}

/// bf16 logits in one whole-vocabulary chunk (as the graph's loss head
/// reads them): log-prob, entropy and lse in f32 against the f32 twin on
/// the same (widened) values; dlogits written in bf16 against the twin's
/// rounded to bf16 (`ops::cpu_bf16`).
fn logprob_bf16_case(rows: usize, vocab: usize) -> Case {
    Case {
        name: format!("logprob bf16 fwd+bwd rows={rows} vocab={vocab}"),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let logits = to_bf16(&random(rng, rows * vocab, 8.0));
            let wide = widen(&logits);
            let targets: Vec<u32> = (0..rows)
                .map(|_| rng.random_range(0..vocab as u32))
                .collect();
            let (dlogp, dent) = (random(rng, rows, 1.0), random(rng, rows, 1.0));
            let CpuRefs {
                lp: lp_ref,
                h: h_ref,
                lse: lse_ref,
                h64,
                dz: dz_ref,
                ..
            } = cpu_refs(&wide, vocab, &targets, &dlogp, &dent)?;
            let dz_ref = widen(&to_bf16(&dz_ref));

            let c = LogitChunk {
                rows,
                chunk_len: vocab,
                ld: vocab,
                vocab_offset: 0,
            };
            let logits_d = s.clone_htod(&logits).map_err(drv)?;
            let targets_d = s.clone_htod(&targets).map_err(drv)?;
            let mut state = s
                .clone_htod(&vec![f32::NAN; rows * LOGPROB_STATE_PER_ROW])
                .map_err(drv)?;
            gpu.logprob_chunk(&c, &logits_d, &targets_d, true, &mut state)
                .map_err(cuda)?;
            let poison = vec![f32::NAN; rows];
            let mut lp_d = s.clone_htod(&poison).map_err(drv)?;
            let mut h_d = s.clone_htod(&poison).map_err(drv)?;
            let mut lse_d = s.clone_htod(&poison).map_err(drv)?;
            gpu.logprob_finish(&state, rows, &mut lp_d, &mut h_d, &mut lse_d)
                .map_err(cuda)?;
            let (dlogp_d, dent_d) = (
                s.clone_htod(&dlogp).map_err(drv)?,
                s.clone_htod(&dent).map_err(drv)?,
            );
            let mut dz_d = s.clone_htod(&vec![bf16::NAN; rows * vocab]).map_err(drv)?;
            gpu.logprob_bwd_chunk(
                &c, &logits_d, &targets_d, &lse_d, &h_d, &dlogp_d, &dent_d, &mut dz_d,
            )
            .map_err(cuda)?;
            let e_lp = check(
                "logp",
                &s.clone_dtoh(&lp_d).map_err(drv)?,
                &lp_ref,
                FP32_TOL,
            )?;
            let e_h = check_truth("entropy", &s.clone_dtoh(&h_d).map_err(drv)?, &h_ref, &h64)?;
            let e_l = check(
                "lse",
                &s.clone_dtoh(&lse_d).map_err(drv)?,
                &lse_ref,
                FP32_TOL,
            )?;
            let dz = widen(&s.clone_dtoh(&dz_d).map_err(drv)?);
            let e_dz = check("dlogits", &dz, &dz_ref, BF16_TOL)?;
            Ok(format!(
                "logp {e_lp:.1e} entropy {e_h:.1e} lse {e_l:.1e} dlogits {e_dz:.1e}"
            ))
        }),
    }
}

pub fn bf16_cases() -> Vec<Case> {
    vec![logprob_bf16_case(3, 1000), logprob_bf16_case(65, 151_936)]
}

/// The CPU twin's forward (f32, and f64 for the entropy: a sum over the
/// vocabulary) and backward of `logits`: what the kernels are judged against.
struct CpuRefs {
    lp: Vec<f32>,
    h: Vec<f32>,
    lse: Vec<f32>,
    h64: Vec<f64>,
    lse64: Vec<f64>,
    dz: Vec<f32>,
}

fn cpu_refs(
    logits: &[f32],
    vocab: usize,
    targets: &[u32],
    dlogp: &[f32],
    dent: &[f32],
) -> Result<CpuRefs, String> {
    let rows = targets.len();
    let (mut lp, mut h, mut lse) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows]);
    cpu::logprob::token_logprob_fwd(logits, vocab, targets, &mut lp, &mut h, &mut lse)
        .map_err(|e| e.to_string())?;
    let (mut lp64, mut h64, mut lse64) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows]);
    cpu::logprob::token_logprob_fwd(
        &to_f64(logits),
        vocab,
        targets,
        &mut lp64,
        &mut h64,
        &mut lse64,
    )
    .map_err(|e| e.to_string())?;
    let mut dz = vec![0.0; rows * vocab];
    cpu::logprob::token_logprob_bwd(logits, vocab, targets, &lse, &h, dlogp, dent, &mut dz);
    Ok(CpuRefs {
        lp,
        h,
        lse,
        h64,
        lse64,
        dz,
    })
}
