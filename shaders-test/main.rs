//! GPU kernel tests: every CUDA kernel against its CPU twin on fresh random
//! inputs at several shapes (edges included), outputs poisoned with NaN
//! before each launch. Relative error `||gpu - cpu|| / ||cpu||` must stay
//! below 1e-5 for fp32 (NaN never passes); masks must match exactly.
//!
//! Without a CUDA device (or without embedded kernels) every case is reported
//! as skipped, with the reason. Runs as `cargo test --test shaders`.

mod activations;
mod adamw;
mod cast;
mod embedding;
mod flash_attn;
mod flash_attn_tc;
mod flash_attn_wgmma;
mod flash_attn_wgmma_bwd;
mod gemm;
mod generate;
mod logprob;
mod model;
mod nccl;
mod paged_attn;
mod paged_attn_tc;
mod patch_embed;
mod rmsnorm;
mod rope;
mod sampling;
mod softmax_kl;
mod topk_select;
mod train;
mod train_bf16;

use half::bf16;
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

const BF16_TOL: f64 = 1e-2;

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; v.len()];
    cpu::cast::f32_to_bf16(v, &mut out);
    out
}

fn widen(v: &[bf16]) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    cpu::cast::bf16_to_f32(v, &mut out);
    out
}

fn cuda(e: CudaError) -> String {
    e.to_string()
}

fn drv(e: cudarc::driver::DriverError) -> String {
    e.to_string()
}
fn cases() -> Vec<Case> {
    // The order fixes each case's draws from the shared generator.
    [
        rmsnorm::cases(),
        softmax_kl::cases(),
        topk_select::cases(),
        flash_attn::cases(),
        paged_attn::cases(),
        flash_attn::bf16_cases(),
        paged_attn::bf16_cases(),
        rope::cases(),
        activations::cases(),
        embedding::cases(),
        activations::bf16_cases(),
        cast::bf16_cases(),
        logprob::cases(),
        adamw::cases(),
        sampling::cases(),
        patch_embed::cases(),
        gemm::cases(),
        model::cases(),
        generate::cases(),
        train::cases(),
        rmsnorm::bf16_cases(),
        logprob::bf16_cases(),
        train_bf16::cases(),
        // New cases go last: the order fixes each case's draws.
        flash_attn_tc::cases(),
        paged_attn_tc::cases(),
        nccl::cases(),
        flash_attn_wgmma::cases(),
        flash_attn_wgmma_bwd::cases(),
    ]
    .into_iter()
    .flatten()
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
