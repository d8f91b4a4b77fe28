//! One VPPO training step through the generic graph on the CUDA backend
//! against the same step on the CPU backend, on a committed fixture: the mini-batch loss, every parameter
//! gradient, and the weights after one AdamW step.

use super::model::{prepared, Prepared, NO_CUBLAS};
use super::{check, cuda, rel_err, Case};
use vppo_engine::backend::cpu::adamw::AdamWConfig;
use vppo_engine::backend::cuda::{blas_present, CudaBackend};
use vppo_engine::model::acts::Save;
use vppo_engine::model::engine::{Engine, PatchProcessor};
use vppo_engine::model::TrainSequence;
use vppo_engine::pipeline::Pipeline;
use vppo_engine::processor::image::normalize_lut;
use vppo_engine::rl::{perturb_images, Perturbation};
use vppo_engine::train::optimizer::{AdamW, Policy, WeightPrecision};
use vppo_engine::train::step::{
    collect_rollouts, mini_batch_gradients, mini_batch_gradients_on, update_on, Algo, Prompt,
    StepConfig,
};

/// fp32 on both sides: the loss and the gradients differ only by summation
/// order.
const LOSS_TOL: f64 = 1e-4;
const GRAD_TOL: f64 = 1e-4;
/// One tensor's own relative error may be larger where its gradient is
/// tiny (cancellation), but not by much.
const TENSOR_TOL: f64 = 1e-2;
/// fp32 forward parity (as the device forward cases).
const MODEL_TOL: f64 = 1e-4;

fn step_case(case: &'static str) -> Case {
    Case {
        name: format!("qwen2.5-vl graph training step on CUDA fixture {case} f32"),
        run: Box::new(move |_gpu, _rng| {
            if !blas_present() {
                return Ok(NO_CUBLAS.into());
            }
            let Prepared {
                dir,
                pipe,
                mut input,
                prompt_len,
                ..
            } = prepared(case)?;
            input.ids.truncate(prompt_len);
            let prompts = vec![
                Prompt {
                    input: input.clone(),
                    answer: "None".into(),
                    problem: String::new(),
                },
                Prompt {
                    input,
                    answer: "42".into(),
                    problem: String::new(),
                },
            ];
            let cfg = StepConfig {
                n: 3,
                max_new_tokens: 5,
                micro_batch: 3,
                dynamic_sampling: None,
                ..StepConfig::recipe(Algo::Vppo)
            };
            let mut rollouts =
                collect_rollouts(&pipe, &prompts, &cfg, 11).map_err(|e| e.to_string())?;
            // Mixed advantages so the policy term (not only the entropy
            // penalty) drives the gradient.
            for (i, a) in rollouts.advantages.iter_mut().enumerate() {
                *a = [1.2, -0.7, 0.4, -1.5][i % 4];
            }
            let groups = 0..rollouts.groups();
            let (g_cpu, s_cpu) = mini_batch_gradients(&pipe.model, &rollouts, groups.clone(), &cfg)
                .map_err(|e| e.to_string())?;
            let gpu = CudaBackend::new(0).map_err(cuda)?;
            let mut dev = Engine::new(gpu, &pipe.model).map_err(|e| e.to_string())?;
            let (g_dev, s_dev) = mini_batch_gradients_on(&mut dev, &rollouts, groups, &cfg)
                .map_err(|e| e.to_string())?;

            let loss_err = (s_dev.loss - s_cpu.loss).abs() / s_cpu.loss.abs().max(1e-12);
            if loss_err.is_nan() || loss_err > LOSS_TOL {
                return Err(format!(
                    "loss: device {} vs cpu {} (rel {loss_err:e} > {LOSS_TOL:e})",
                    s_dev.loss, s_cpu.loss
                ));
            }
            let flat = |g: &[Vec<f32>]| g.concat();
            let grad_err = rel_err(&flat(&g_dev.0), &flat(&g_cpu.0));
            let (worst, worst_name) = g_dev
                .0
                .iter()
                .zip(&g_cpu.0)
                .zip(&pipe.model.layout.specs)
                .map(|((d, c), spec)| (rel_err(d, c), spec.name.clone()))
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .unwrap_or((0.0, String::new()));
            if grad_err.is_nan() || grad_err > GRAD_TOL || worst > TENSOR_TOL {
                return Err(format!(
                    "gradients: all {grad_err:e} (tol {GRAD_TOL:e}), worst tensor {worst_name} \
                     {worst:e} (tol {TENSOR_TOL:e})"
                ));
            }

            // One AdamW step from each side's gradients on the host...
            let opt_cfg = AdamWConfig {
                lr: 1e-2,
                ..AdamWConfig::default()
            };
            let mut after = Vec::new();
            let mut cpu_opt = None;
            for mut grads in [g_cpu, g_dev] {
                let mut weights = pipe.model.weights.clone();
                let mut opt = AdamW::new(&weights, opt_cfg, Some(1.0), WeightPrecision::Fp32);
                let report = opt.step(&mut weights, &mut grads);
                after.push(flat(&weights.0));
                cpu_opt.get_or_insert((opt, report));
            }
            let w_err = rel_err(&after[1], &after[0]);
            if w_err.is_nan() || w_err > GRAD_TOL {
                return Err(format!(
                    "weights after AdamW: rel err {w_err:e} > {GRAD_TOL:e}"
                ));
            }
            // ...and the whole update on the device (gradients, clipping and
            // AdamW there, then copied back), as `train --device cuda` does.
            let (cpu_opt, cpu_report) = cpu_opt.expect("two steps ran");
            let mut pipe_dev = Pipeline::load(&dir).map_err(|e| e.to_string())?;
            let gpu = CudaBackend::new(0).map_err(cuda)?;
            let dev = Engine::new(gpu, &pipe_dev.model).map_err(|e| e.to_string())?;
            let mut policy = Policy::new(dev);
            let mut dev_opt = AdamW::new(
                &pipe_dev.model.weights,
                opt_cfg,
                Some(1.0),
                WeightPrecision::Fp32,
            );
            let u = update_on(
                &mut policy,
                &mut pipe_dev.model.weights,
                &mut dev_opt,
                &rollouts,
                0..rollouts.groups(),
                &cfg,
            )
            .map_err(|e| e.to_string())?;
            policy
                .sync_to_host(&mut pipe_dev.model.weights, &mut dev_opt)
                .map_err(|e| e.to_string())?;
            let dw_err = rel_err(&flat(&pipe_dev.model.weights.0), &after[0]);
            let m_err = rel_err(&flat(&dev_opt.exp_avg.0), &flat(&cpu_opt.exp_avg.0));
            let v_err = rel_err(&flat(&dev_opt.exp_avg_sq.0), &flat(&cpu_opt.exp_avg_sq.0));
            let norm_err = (u.optimizer.grad_norm - cpu_report.grad_norm).abs()
                / cpu_report.grad_norm.max(1e-12);
            let worst_opt = dw_err.max(m_err).max(v_err).max(norm_err);
            if worst_opt.is_nan() || worst_opt > GRAD_TOL || dev_opt.step != 1 {
                return Err(format!(
                    "device optimizer: weights {dw_err:e}, exp_avg {m_err:e}, exp_avg_sq {v_err:e}, \
                     grad norm {norm_err:e} (tol {GRAD_TOL:e}), step {}",
                    dev_opt.step
                ));
            }
            Ok(format!(
                "loss {:.6} vs {:.6} (rel {loss_err:.1e}), grads {grad_err:.1e} (worst {worst_name} \
                 {worst:.1e}), weights after AdamW {w_err:.1e}; device AdamW weights {dw_err:.1e} \
                 moments {:.1e} norm {norm_err:.1e}, {} responses",
                s_dev.loss,
                s_cpu.loss,
                m_err.max(v_err),
                rollouts.batch.len()
            ))
        }),
    }
}

/// The packed forward (three sequences in one pass) and the fused dual
/// pass (the original and its patch-blackened twin in one pass, pixels
/// from the patch-embed kernel) against the CPU's `train_forward` of the
/// same sequences, the twin perturbed on the host.
fn dual_case(case: &'static str) -> Case {
    Case {
        name: format!("qwen2.5-vl graph packed + fused dual pass on CUDA fixture {case} f32"),
        run: Box::new(move |_gpu, _rng| {
            if !blas_present() {
                return Ok(NO_CUBLAS.into());
            }
            let Prepared {
                pipe,
                input,
                prompt_len,
                ..
            } = prepared(case)?;
            if input.resized.len() != input.grids.len() {
                return Err("the prepared input has no resized image bytes".into());
            }
            let (seed, p) = (0x5eed_u64, 0.5);
            let mut masked = input.clone();
            let dark = perturb_images(
                &mut masked.pixel_values,
                &masked.grids,
                &pipe.images,
                Perturbation::Black,
                p,
                seed,
            );
            let mut short = input.clone();
            short.ids.truncate(prompt_len + 2);
            let seqs = [
                TrainSequence {
                    input: input.clone(),
                    prompt_len,
                },
                TrainSequence {
                    input: short,
                    prompt_len,
                },
                TrainSequence {
                    input: masked,
                    prompt_len,
                },
            ];
            let cpu = pipe
                .model
                .train_forward(&seqs, Save::Nothing)
                .map_err(|e| e.to_string())?;
            let gpu = CudaBackend::new(0).map_err(cuda)?;
            let dev = Engine::new(gpu, &pipe.model).map_err(|e| e.to_string())?;
            let packed = dev.logprobs(&seqs).map_err(|e| e.to_string())?;
            let e_packed = check(
                "packed logprobs",
                &packed.logprobs,
                &cpu.logprobs,
                MODEL_TOL,
            )?;
            let e_ent = check("packed entropy", &packed.entropy, &cpu.entropy, MODEL_TOL)?;
            let images = PatchProcessor {
                geometry: pipe.images.geometry(),
                lut: normalize_lut(&pipe.images),
            };
            let (orig, twin, _) = dev
                .dual_logprobs(&seqs[..1], &images, &[seed], p, false)
                .map_err(|e| e.to_string())?;
            let dual = [orig.logprobs, twin.logprobs].concat();
            let r = cpu.response_lens[0];
            let want: Vec<f32> =
                [&cpu.logprobs[..r], &cpu.logprobs[cpu.logprobs.len() - r..]].concat();
            let e_dual = check("dual logprobs", &dual, &want, MODEL_TOL)?;
            if dark == 0 {
                return Err("the mask blackened no patch: nothing was checked".into());
            }
            Ok(format!(
                "packed (3 seqs) logprobs {e_packed:.1e} entropy {e_ent:.1e}; dual (original + twin, \
                 {dark} patches black) {e_dual:.1e}"
            ))
        }),
    }
}

pub fn cases() -> Vec<Case> {
    ["single_noresize", "partial_windows", "two_images"]
        .into_iter()
        .map(step_case)
        .chain(["two_images", "resize"].into_iter().map(dual_case))
        .collect()
}
