//! GPU kernel tests: every CUDA kernel against its CPU twin on fresh random
//! inputs at several shapes (edges included), outputs poisoned with NaN
//! before each launch. Relative error `||gpu - cpu|| / ||cpu||` must stay
//! below 1e-5 for fp32 (NaN never passes); masks must match exactly.
//!
//! Without a CUDA device (or without embedded kernels) every case is reported
//! as skipped, with the reason. Runs as `cargo test --test shaders`.

mod adamw;
mod attention;
mod elementwise;
mod generate;
mod logprob;
mod model;
mod patch_embed;
mod sampling;
mod train;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vppo_engine::backend::cpu;
use vppo_engine::backend::cuda::{CudaBackend, CudaError};

const FP32_TOL: f64 = 1e-5;

type CaseResult = Result<String, String>;
type CaseFn = Box<dyn Fn(&CudaBackend, &mut StdRng) -> CaseResult>;

struct Case {
    name: String,
    run: CaseFn,
}

fn rel_err(gpu: &[f32], cpu: &[f32]) -> f64 {
    if gpu.len() != cpu.len() || gpu.iter().any(|v| v.is_nan()) {
        return f64::INFINITY;
    }
    let num: f64 = gpu
        .iter()
        .zip(cpu)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = cpu.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

/// `||a - truth|| / ||truth||` against an f64 oracle (absolute when the truth is 0).
fn rel_err_truth(a: &[f32], truth: &[f64]) -> f64 {
    if a.len() != truth.len() || a.iter().any(|v| v.is_nan()) {
        return f64::INFINITY;
    }
    let num = a
        .iter()
        .zip(truth)
        .map(|(x, t)| (*x as f64 - t).powi(2))
        .sum::<f64>()
        .sqrt();
    let den = truth.iter().map(|t| t * t).sum::<f64>().sqrt();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// For outputs that are long f32 reductions or differences of nearly equal
/// terms (KL over 152k logits, entropy, RMSNorm's dx at dim 1, attention's
/// dq with one key, where the exact value is ~0): the kernel is compared
/// with the CPU twin run in f64, and passes when its error is within
/// `FP32_TOL` or within 4x the error of the CPU twin run in f32 (the
/// rounding any f32 implementation pays), never when NaN.
fn check_truth(what: &str, gpu: &[f32], cpu32: &[f32], truth: &[f64]) -> Result<f64, String> {
    let e = rel_err_truth(gpu, truth);
    let e_cpu = rel_err_truth(cpu32, truth);
    let tol = FP32_TOL.max(4.0 * e_cpu);
    if e <= tol {
        Ok(e)
    } else {
        Err(format!(
            "{what}: rel err vs f64 {e:e} > {tol:e} (the f32 CPU twin's: {e_cpu:e})"
        ))
    }
}

fn check(what: &str, gpu: &[f32], cpu: &[f32], tol: f64) -> Result<f64, String> {
    let e = rel_err(gpu, cpu);
    if e <= tol {
        Ok(e)
    } else {
        Err(format!("{what}: rel err {e:e} > {tol:e}"))
    }
}

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn cuda(e: CudaError) -> String {
    e.to_string()
}

fn drv(e: cudarc::driver::DriverError) -> String {
    e.to_string()
}

fn rmsnorm_case(rows: usize, dim: usize) -> Case {
    Case {
        name: format!("rmsnorm fwd+bwd rows={rows} dim={dim}"),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let x = random(rng, rows * dim, 3.0);
            let w = random(rng, dim, 1.0);
            let dy = random(rng, rows * dim, 1.0);
            let dw0 = random(rng, dim, 1.0);
            let eps = 1e-6f32;
            let (mut y_ref, mut rstd_ref) = (vec![0.0; rows * dim], vec![0.0; rows]);
            cpu::rmsnorm::rmsnorm_fwd(&x, &w, dim, eps, &mut y_ref, &mut rstd_ref);
            let mut dx_ref = vec![0.0; rows * dim];
            let mut dw_ref = dw0.clone();
            cpu::rmsnorm::rmsnorm_bwd(&dy, &x, &w, &rstd_ref, dim, &mut dx_ref, &mut dw_ref);
            let (x64, w64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&dy));
            let (mut y64, mut rstd64) = (vec![0.0; rows * dim], vec![0.0; rows]);
            cpu::rmsnorm::rmsnorm_fwd(&x64, &w64, dim, eps as f64, &mut y64, &mut rstd64);
            let (mut dx64, mut dw64) = (vec![0.0; rows * dim], to_f64(&dw0));
            cpu::rmsnorm::rmsnorm_bwd(&dy64, &x64, &w64, &rstd64, dim, &mut dx64, &mut dw64);

            let (x_d, w_d, dy_d) = (
                s.clone_htod(&x).map_err(drv)?,
                s.clone_htod(&w).map_err(drv)?,
                s.clone_htod(&dy).map_err(drv)?,
            );
            let mut y_d = s.clone_htod(&vec![f32::NAN; rows * dim]).map_err(drv)?;
            let mut rstd_d = s.clone_htod(&vec![f32::NAN; rows]).map_err(drv)?;
            gpu.rmsnorm_fwd(&x_d, &w_d, rows, dim, eps, &mut y_d, &mut rstd_d)
                .map_err(cuda)?;
            let mut dx_d = s.clone_htod(&vec![f32::NAN; rows * dim]).map_err(drv)?;
            let mut dw_d = s.clone_htod(&dw0).map_err(drv)?;
            gpu.rmsnorm_bwd(&dy_d, &x_d, &w_d, &rstd_d, rows, dim, &mut dx_d, &mut dw_d)
                .map_err(cuda)?;
            let e_y = check("y", &s.clone_dtoh(&y_d).map_err(drv)?, &y_ref, FP32_TOL)?;
            let e_r = check(
                "rstd",
                &s.clone_dtoh(&rstd_d).map_err(drv)?,
                &rstd_ref,
                FP32_TOL,
            )?;
            let e_dx = check_truth("dx", &s.clone_dtoh(&dx_d).map_err(drv)?, &dx_ref, &dx64)?;
            let e_dw = check_truth("dw", &s.clone_dtoh(&dw_d).map_err(drv)?, &dw_ref, &dw64)?;
            Ok(format!(
                "y {e_y:.1e} rstd {e_r:.1e} dx {e_dx:.1e} dw {e_dw:.1e}"
            ))
        }),
    }
}

fn softmax_kl_case(rows: usize, vocab: usize, masked: bool) -> Case {
    Case {
        name: format!(
            "softmax_kl rows={rows} vocab={vocab}{}",
            if masked { " masked" } else { "" }
        ),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let mut zp = random(rng, rows * vocab, 8.0);
            let mut zq = random(rng, rows * vocab, 8.0);
            if masked {
                // Every third token impossible under both distributions.
                for i in (0..rows * vocab).step_by(3) {
                    zp[i] = f32::NEG_INFINITY;
                    zq[i] = f32::NEG_INFINITY;
                }
            }
            let (mut kl_ref, mut lp_ref, mut lq_ref) =
                (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows]);
            cpu::softmax_kl::softmax_kl_fwd(&zp, &zq, vocab, &mut kl_ref, &mut lp_ref, &mut lq_ref);
            let (zp_d, zq_d) = (
                s.clone_htod(&zp).map_err(drv)?,
                s.clone_htod(&zq).map_err(drv)?,
            );
            let poison = vec![f32::NAN; rows];
            let mut kl_d = s.clone_htod(&poison).map_err(drv)?;
            let mut lp_d = s.clone_htod(&poison).map_err(drv)?;
            let mut lq_d = s.clone_htod(&poison).map_err(drv)?;
            gpu.softmax_kl_fwd(&zp_d, &zq_d, rows, vocab, &mut kl_d, &mut lp_d, &mut lq_d)
                .map_err(cuda)?;
            // KL is a sum over the vocabulary: judged against the f64 twin.
            let (mut kl64, mut lp64, mut lq64) =
                (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows]);
            cpu::softmax_kl::softmax_kl_fwd(
                &to_f64(&zp),
                &to_f64(&zq),
                vocab,
                &mut kl64,
                &mut lp64,
                &mut lq64,
            );
            let kl = s.clone_dtoh(&kl_d).map_err(drv)?;
            let abs_err = check_truth("kl", &kl, &kl_ref, &kl64)?;
            let e_lp = check(
                "lse_p",
                &s.clone_dtoh(&lp_d).map_err(drv)?,
                &lp_ref,
                FP32_TOL,
            )?;
            let e_lq = check(
                "lse_q",
                &s.clone_dtoh(&lq_d).map_err(drv)?,
                &lq_ref,
                FP32_TOL,
            )?;
            Ok(format!(
                "kl {abs_err:.1e} lse_p {e_lp:.1e} lse_q {e_lq:.1e}"
            ))
        }),
    }
}

fn k3_case(n: usize) -> Case {
    Case {
        name: format!("dependency_k3 n={n}"),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let a = random(rng, n, 30.0);
            let b = random(rng, n, 30.0);
            let mut want = vec![0.0; n];
            cpu::softmax_kl::dependency_k3(&a, &b, &mut want);
            let (a_d, b_d) = (
                s.clone_htod(&a).map_err(drv)?,
                s.clone_htod(&b).map_err(drv)?,
            );
            let mut out = s.clone_htod(&vec![f32::NAN; n]).map_err(drv)?;
            gpu.dependency_k3(&a_d, &b_d, n, &mut out).map_err(cuda)?;
            let e = check("score", &s.clone_dtoh(&out).map_err(drv)?, &want, FP32_TOL)?;
            Ok(format!("score {e:.1e}"))
        }),
    }
}

fn topk_case(lens: Vec<usize>, ratio: f32, ties: bool) -> Case {
    Case {
        name: format!(
            "topk_select lens={lens:?} ratio={ratio}{}",
            if ties { " ties+NaN" } else { "" }
        ),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let total: usize = lens.iter().sum();
            let mut scores: Vec<f32> = if ties {
                (0..total).map(|_| rng.random_range(0..4) as f32).collect()
            } else {
                random(rng, total, 10.0)
            };
            if ties && total > 2 {
                scores[total / 2] = f32::NAN;
            }
            let mut cu = vec![0i32];
            for &l in &lens {
                cu.push(cu.last().unwrap() + l as i32);
            }
            let mut want = vec![0.0f32; total];
            cpu::topk_select::topk_select_mask(&scores, &cu, ratio, &mut want)
                .map_err(|e| e.to_string())?;
            let (sc_d, cu_d) = (
                s.clone_htod(&scores).map_err(drv)?,
                s.clone_htod(&cu).map_err(drv)?,
            );
            let mut mask_d = s.clone_htod(&vec![f32::NAN; total]).map_err(drv)?;
            gpu.topk_select_mask(&sc_d, &cu_d, lens.len(), ratio, &mut mask_d)
                .map_err(cuda)?;
            let got = s.clone_dtoh(&mask_d).map_err(drv)?;
            match got.iter().zip(&want).position(|(a, b)| a != b) {
                None => Ok(format!(
                    "{} of {total} selected, exact",
                    want.iter().filter(|&&v| v == 1.0).count()
                )),
                Some(i) => Err(format!(
                    "mask differs at {i}: gpu {} cpu {}",
                    got[i], want[i]
                )),
            }
        }),
    }
}

fn cases() -> Vec<Case> {
    vec![
        rmsnorm_case(1, 1),
        rmsnorm_case(3, 7),
        rmsnorm_case(65, 1280),
        rmsnorm_case(257, 3584),
        rmsnorm_case(33, 8192),
        softmax_kl_case(1, 1, false),
        softmax_kl_case(3, 100, false),
        softmax_kl_case(4, 1000, true),
        softmax_kl_case(7, 151_936, false),
        k3_case(1),
        k3_case(100_003),
        topk_case(vec![1], 0.4, false),
        topk_case(vec![1, 5, 1023, 1024, 1025], 0.4, false),
        topk_case(vec![2048, 4097, 3], 0.4, true),
        topk_case(vec![50, 25, 7], 0.3, true),
    ]
    .into_iter()
    .chain(attention::cases())
    .chain(attention::bf16_cases())
    .chain(elementwise::cases())
    .chain(elementwise::bf16_cases())
    .chain(logprob::cases())
    .chain(adamw::cases())
    .chain(sampling::cases())
    .chain(patch_embed::cases())
    .chain(model::cases())
    .chain(generate::cases())
    .chain(train::cases())
    .collect()
}

fn main() {
    // Optional arguments keep only the cases whose name contains one of them
    // (`shaders flash_attn paged`); cargo's own flags are ignored.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let cases: Vec<Case> = cases()
        .into_iter()
        .filter(|c| filters.is_empty() || filters.iter().any(|f| c.name.contains(f.as_str())))
        .collect();
    let backend = match CudaBackend::new(0) {
        Ok(b) => b,
        Err(e) => {
            println!(
                "shaders: SKIPPING all {} GPU kernel cases: {e}",
                cases.len()
            );
            println!("shaders: 0 passed, 0 failed, {} skipped", cases.len());
            return;
        }
    };
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let (mut passed, mut failed) = (0, 0);
    for case in &cases {
        // A panicking case (a shape assert, say) fails alone.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            (case.run)(&backend, &mut rng)
        }))
        .unwrap_or_else(|p| {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("panicked: {what}"))
        });
        match outcome {
            Ok(detail) => {
                passed += 1;
                println!("ok    {:<50} {detail}", case.name);
            }
            Err(why) => {
                failed += 1;
                println!("FAIL  {:<50} {why}", case.name);
            }
        }
    }
    println!("shaders: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
