//! bf16 mixed precision through the generic graph on the CUDA backend: the
//! device's bf16 graph against its CPU twin (`ops::cpu_bf16`, the same
//! storage rules) and both against the fp32 CPU graph, on a committed
//! fixture: the old log-probs, the mini-batch loss and every parameter
//! gradient, and the weights after one AdamW step (fp32 masters, the bf16
//! copy written by the kernel in the same pass).

use super::model::{prepared, Prepared, NO_CUBLAS};
use super::{cuda, rel_err, Case};
use half::bf16;
use vppo_engine::backend::cpu::adamw::AdamWConfig;
use vppo_engine::backend::cuda::{blas_present, CudaBackend};
use vppo_engine::model::engine::Engine;
use vppo_engine::model::params::Tensors;
use vppo_engine::ops::cpu::CpuBackend;
use vppo_engine::ops::cpu_bf16::CpuBf16Backend;
use vppo_engine::ops::{Backend, Precision};
use vppo_engine::train::optimizer::{AdamW, Policy, WeightPrecision};
use vppo_engine::train::step::{
    collect_rollouts, mini_batch_gradients_on, update_on, Algo, Prompt, Rollouts, StepConfig,
};

/// Device bf16 vs the CPU bf16 twin: the same roundings, other summation
/// orders (a rounding that flips moves a value by one bf16 step, 2^-8).
const TWIN_LOGPROB_TOL: f32 = 2e-2;
const TWIN_GRAD_TOL: f64 = 2e-2;
/// Either bf16 graph vs fp32 (as tests/bf16_twin.rs measures on the CPU).
const FP32_LOGPROB_TOL: f32 = 5e-2;
const FP32_GRAD_TOL: f64 = 5e-2;
const LR: f64 = 1e-3;

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() || a.iter().any(|v| v.is_nan()) {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Old log-probs, gradients and the weights after one AdamW step (the
/// masters, and the model's weights) of `engine`'s precision.
fn run<B: Backend>(
    engine: Engine<B>,
    rollouts: &Rollouts,
    cfg: &StepConfig,
    host: &Tensors,
) -> Result<(Vec<f32>, Tensors, f64, Tensors, Tensors), String> {
    let lp = engine
        .logprobs(&rollouts.batch)
        .map_err(|e| e.to_string())?
        .logprobs;
    let precision = match engine.precision {
        Precision::Bf16 => WeightPrecision::Bf16Model,
        Precision::Fp32 => WeightPrecision::Fp32,
    };
    let mut policy = Policy::new(engine);
    let groups = 0..rollouts.groups();
    let (grads, stats) = mini_batch_gradients_on(&mut policy.engine, rollouts, groups.clone(), cfg)
        .map_err(|e| e.to_string())?;
    let opt_cfg = AdamWConfig {
        lr: LR,
        ..AdamWConfig::default()
    };
    let mut weights = host.clone();
    let mut opt = AdamW::new(&weights, opt_cfg, Some(1.0), precision);
    update_on(&mut policy, &mut weights, &mut opt, rollouts, groups, cfg)
        .map_err(|e| e.to_string())?;
    policy
        .sync_to_host(&mut weights, &mut opt)
        .map_err(|e| e.to_string())?;
    let masters = opt.master.unwrap_or_else(|| weights.clone());
    Ok((lp, grads, stats.loss, masters, weights))
}

fn bf16_step_case(case: &'static str) -> Case {
    Case {
        name: format!("qwen2.5-vl graph bf16 step on CUDA vs CPU bf16 twin vs fp32 {case}"),
        run: Box::new(move |_gpu, _rng| {
            if !blas_present() {
                return Ok(NO_CUBLAS.into());
            }
            let Prepared {
                pipe,
                mut input,
                prompt_len,
                ..
            } = prepared(case)?;
            input.ids.truncate(prompt_len);
            let prompts: Vec<Prompt> = ["None", "42"]
                .iter()
                .map(|a| Prompt {
                    input: input.clone(),
                    answer: a.to_string(),
                    problem: String::new(),
                })
                .collect();
            let cfg = StepConfig {
                n: 3,
                max_new_tokens: 5,
                micro_batch: 3,
                dynamic_sampling: None,
                ..StepConfig::recipe(Algo::Vppo)
            };
            let mut rollouts =
                collect_rollouts(&pipe, &prompts, &cfg, 11).map_err(|e| e.to_string())?;
            for (i, a) in rollouts.advantages.iter_mut().enumerate() {
                *a = [1.2, -0.7, 0.4, -1.5][i % 4];
            }
            let host = &pipe.model.weights;
            let engine_err = |e: vppo_engine::model::ModelError| e.to_string();
            let fp32 = run(
                Engine::new(CpuBackend, &pipe.model).map_err(engine_err)?,
                &rollouts,
                &cfg,
                host,
            )?;
            let twin = run(
                Engine::with_precision(CpuBf16Backend, &pipe.model, Precision::Bf16)
                    .map_err(engine_err)?,
                &rollouts,
                &cfg,
                host,
            )?;
            let gpu = CudaBackend::new(0).map_err(cuda)?;
            let dev = run(
                Engine::with_precision(gpu, &pipe.model, Precision::Bf16).map_err(engine_err)?,
                &rollouts,
                &cfg,
                host,
            )?;
            let flat = |t: &Tensors| t.0.concat();
            let lp_twin = max_abs(&dev.0, &twin.0);
            let lp_fp32 = max_abs(&dev.0, &fp32.0).max(max_abs(&twin.0, &fp32.0));
            let g_twin = rel_err(&flat(&dev.1), &flat(&twin.1));
            let g_fp32 = rel_err(&flat(&dev.1), &flat(&fp32.1));
            let loss_twin = (dev.2 - twin.2).abs() / twin.2.abs().max(1e-12);
            if lp_twin > TWIN_LOGPROB_TOL || g_twin > TWIN_GRAD_TOL || loss_twin > TWIN_GRAD_TOL {
                return Err(format!(
                    "device bf16 vs CPU twin: log-probs max {lp_twin:e} (tol {TWIN_LOGPROB_TOL:e}), \
                     gradients {g_twin:e}, loss {loss_twin:e} (tol {TWIN_GRAD_TOL:e})"
                ));
            }
            if lp_fp32 > FP32_LOGPROB_TOL || g_fp32 > FP32_GRAD_TOL || g_fp32.is_nan() {
                return Err(format!(
                    "bf16 vs fp32: log-probs max {lp_fp32:e} (tol {FP32_LOGPROB_TOL:e}), \
                     gradients {g_fp32:e} (tol {FP32_GRAD_TOL:e})"
                ));
            }
            // Adam's first step moves a weight by at most lr: the masters of
            // the bf16 runs stay within 2 lr of the fp32 run's weights, and
            // the model's weights are the masters rounded by the kernel.
            let (m_dev, w_dev, w32) = (flat(&dev.3), flat(&dev.4), flat(&fp32.4));
            let master_gap = max_abs(&m_dev, &w32);
            let copy_ok = m_dev
                .iter()
                .zip(&w_dev)
                .all(|(m, w)| bf16::from_f32(*m).to_f32() == *w);
            let master_twin = max_abs(&m_dev, &flat(&twin.3));
            if master_gap > 2.0 * LR as f32 * 1.001
                || master_twin > 2.0 * LR as f32 * 1.001
                || !copy_ok
            {
                return Err(format!(
                    "weights after one step: masters vs fp32 {master_gap:e}, vs twin \
                     {master_twin:e} (tol {:e}); bf16 copy = rounded master: {copy_ok}",
                    2.0 * LR
                ));
            }
            Ok(format!(
                "vs twin: log-probs {lp_twin:.1e} grads {g_twin:.1e} loss {loss_twin:.1e}; \
                 vs fp32: log-probs {lp_fp32:.1e} grads {g_fp32:.1e}; masters {master_gap:.1e}"
            ))
        }),
    }
}

pub fn cases() -> Vec<Case> {
    ["single_noresize", "two_images"]
        .into_iter()
        .map(bf16_step_case)
        .collect()
}
