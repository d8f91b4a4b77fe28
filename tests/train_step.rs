//! One RL step end to end on a fixture checkpoint: rollouts, rewards,
//! dynamic sampling, old/perturbed log-probs, objective, backward, AdamW.
//!
//! The fixture model has random weights and never boxes an answer, so the
//! reference grader scores every response of a prompt alike (1 when the
//! ground truth is "None"): all groups are uniform. VPPO/DAPO's dynamic
//! sampling must then drop them all and skip the update; GRPO keeps them,
//! with zero advantages, and the entropy penalty alone moves the weights.

mod common;

use common::fixtures::{case_dir, fixture_input};
use vppo_engine::backend::cpu::adamw::AdamWConfig;
use vppo_engine::pipeline::Pipeline;
use vppo_engine::train::optimizer::{AdamW, WeightPrecision};
use vppo_engine::train::step::{train_step, Algo, Prompt, StepConfig};

fn prompts() -> Vec<Prompt> {
    let (mut input, prompt_len) = fixture_input("single_noresize");
    input.ids.truncate(prompt_len);
    vec![
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
    ]
}

fn config(algo: Algo) -> StepConfig {
    StepConfig {
        n: 3,
        max_new_tokens: 5,
        micro_batch: 2,
        ..StepConfig::recipe(algo)
    }
}

fn optimizer(p: &Pipeline) -> AdamW {
    let cfg = AdamWConfig {
        lr: 1e-2,
        ..AdamWConfig::default()
    };
    AdamW::new(&p.model.weights, cfg, Some(1.0), WeightPrecision::Fp32)
}

#[test]
fn dynamic_sampling_drops_uniform_groups_and_skips_the_update() {
    for algo in [Algo::Vppo, Algo::Dapo] {
        let mut p = Pipeline::load(&case_dir("single_noresize")).unwrap();
        let before = p.model.weights.clone();
        let mut opt = optimizer(&p);
        let stats = train_step(&mut p, &mut opt, &prompts(), &config(algo), 1).unwrap();
        assert_eq!(stats.responses, 6);
        assert!((stats.mean_reward - 0.5).abs() < 1e-6, "{stats:?}");
        assert_eq!((stats.kept_groups, stats.dropped_groups), (0, 2));
        assert!(stats.optimizer.is_none());
        assert_eq!(p.model.weights.0, before.0);
    }
}

#[test]
fn grpo_keeps_every_group_and_steps() {
    let mut p = Pipeline::load(&case_dir("single_noresize")).unwrap();
    let before = p.model.weights.clone();
    let mut opt = optimizer(&p);
    let cfg = config(Algo::Grpo);
    let stats = train_step(&mut p, &mut opt, &prompts(), &cfg, 1).unwrap();
    assert_eq!(stats.kept_groups, 2);
    let report = stats.optimizer.expect("an update");
    assert!(!report.skipped && report.grad_norm > 0.0);
    assert_eq!(opt.step, 1);
    // Zero advantages: the loss is the entropy penalty, 0.06 * mean(-logp) > 0.
    assert!(stats.loss > 0.0 && stats.loss.is_finite(), "{stats:?}");
    assert_ne!(p.model.weights.0, before.0);
    // Deterministic: the same seed from the same weights gives the same step.
    let mut q = Pipeline::load(&case_dir("single_noresize")).unwrap();
    let mut opt_q = optimizer(&q);
    let again = train_step(&mut q, &mut opt_q, &prompts(), &cfg, 1).unwrap();
    assert_eq!(again, stats);
    assert_eq!(q.model.weights.0, p.model.weights.0);
}

#[test]
fn vppo_runs_the_perturbed_pass_when_groups_are_kept() {
    // Dynamic sampling off so the uniform groups survive: the step runs the
    // blackened-image pass, TAS and TGF, and updates the weights.
    let mut p = Pipeline::load(&case_dir("single_noresize")).unwrap();
    let before = p.model.weights.clone();
    let mut opt = optimizer(&p);
    let cfg = StepConfig {
        dynamic_sampling: None,
        recompute: true,
        ..config(Algo::Vppo)
    };
    let stats = train_step(&mut p, &mut opt, &prompts(), &cfg, 3).unwrap();
    assert_eq!(stats.kept_groups, 2);
    assert!(stats
        .optimizer
        .is_some_and(|r| !r.skipped && r.grad_norm > 0.0));
    assert!(stats.loss.is_finite());
    assert_ne!(p.model.weights.0, before.0);
}

#[test]
fn a_rollout_batch_splits_into_mini_batch_updates_on_the_same_old_log_probs() {
    use vppo_engine::train::step::{collect_rollouts, update};
    let mut p = Pipeline::load(&case_dir("single_noresize")).unwrap();
    let cfg = StepConfig {
        dynamic_sampling: None,
        ..config(Algo::Vppo)
    };
    let rollouts = collect_rollouts(&p, &prompts(), &cfg, 5).unwrap();
    assert_eq!(rollouts.groups(), 2);
    assert_eq!(rollouts.lp_old.len(), rollouts.lens.iter().sum::<usize>());
    assert_eq!(
        rollouts.dependency.as_ref().unwrap().len(),
        rollouts.lp_old.len()
    );
    let mut opt = optimizer(&p);
    let first = p.model.weights.clone();
    let a = update(&mut p, &mut opt, &rollouts, 0..1, &cfg).unwrap();
    let after_one = p.model.weights.clone();
    let b = update(&mut p, &mut opt, &rollouts, 1..2, &cfg).unwrap();
    assert!(!a.optimizer.skipped && !b.optimizer.skipped);
    assert!(a.loss.is_finite() && b.loss.is_finite());
    assert_eq!(opt.step, 2);
    assert_ne!(after_one.0, first.0);
    assert_ne!(p.model.weights.0, after_one.0);
}

/// The whole step's loss (rollout log-probs, TAS, TGF, dual-clip loss,
/// entropy penalty, token mean) differentiated by the manual backward,
/// against central finite differences of the same loss, on the entries with
/// the largest gradients of a vision, a decoder and the head tensor.
#[test]
fn end_to_end_step_gradient_matches_finite_differences() {
    use vppo_engine::train::step::{collect_rollouts, mini_batch_gradients};
    let mut p = Pipeline::load(&case_dir("single_noresize")).unwrap();
    let cfg = StepConfig {
        dynamic_sampling: None,
        micro_batch: 3,
        ..config(Algo::Vppo)
    };
    let mut rollouts = collect_rollouts(&p, &prompts(), &cfg, 11).unwrap();
    // The fixture's answers are never produced, so every reward is 0: give
    // the responses mixed advantages so the policy term is exercised.
    for (i, a) in rollouts.advantages.iter_mut().enumerate() {
        *a = [1.2, -0.7, 0.4, -1.5][i % 4];
    }
    let groups = 0..rollouts.groups();
    let (grads, stats) = mini_batch_gradients(&p.model, &rollouts, groups.clone(), &cfg).unwrap();
    assert!(stats.visual_dependency_mean.is_some() && stats.tgf_kept_frac < 1.0);
    let names = [
        "visual.blocks.0.attn.qkv.weight",
        "model.layers.1.mlp.down_proj.weight",
        "lm_head.weight",
    ];
    let layout = p.model.layout.clone();
    for name in names {
        let id = layout
            .specs
            .iter()
            .position(|s| s.name.ends_with(name))
            .unwrap_or_else(|| panic!("{name} in the layout"));
        let g = &grads.0[id];
        let j = (0..g.len())
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap();
        let eps = 1e-2f32;
        let w0 = p.model.weights.0[id][j];
        let mut loss_at = |w: f32| {
            p.model.weights.0[id][j] = w;
            let (_, s) = mini_batch_gradients(&p.model, &rollouts, groups.clone(), &cfg).unwrap();
            s.loss
        };
        let fd = (loss_at(w0 + eps) - loss_at(w0 - eps)) / (2.0 * eps as f64);
        p.model.weights.0[id][j] = w0;
        let rel = (fd - g[j] as f64).abs() / (g[j] as f64).abs();
        eprintln!(
            "{name}[{j}]: manual {:e}, finite difference {fd:e}, rel {rel:e}",
            g[j]
        );
        assert!(
            rel < 5e-3,
            "{name}[{j}]: manual {} vs finite difference {fd} (rel {rel:e})",
            g[j]
        );
    }
}

/// The same end-to-end check with the KL-to-reference term on (k3, the
/// EasyR1 default, and k2): reference log-probs away from the policy's, so
/// the term has a gradient; it flows through the same per-token
/// `d_logprob` path as the policy loss.
#[test]
fn kl_loss_step_gradient_matches_finite_differences() {
    use vppo_engine::rl::KlEstimator;
    use vppo_engine::train::step::{collect_rollouts, mini_batch_gradients};
    let mut p = Pipeline::load(&case_dir("single_noresize")).unwrap();
    for estimator in [KlEstimator::K3, KlEstimator::K2] {
        let cfg = StepConfig {
            dynamic_sampling: None,
            micro_batch: 3,
            kl: Some((estimator, 0.5)),
            ..config(Algo::Dapo)
        };
        let mut rollouts = collect_rollouts(&p, &prompts(), &cfg, 11).unwrap();
        for (i, a) in rollouts.advantages.iter_mut().enumerate() {
            *a = [1.2, -0.7, 0.4, -1.5][i % 4];
        }
        // A reference that differs from the policy token by token.
        rollouts.lp_ref = Some(
            rollouts
                .lp_old
                .iter()
                .enumerate()
                .map(|(t, lp)| lp + [0.7, -0.4, 0.2][t % 3])
                .collect(),
        );
        let groups = 0..rollouts.groups();
        let (grads, stats) =
            mini_batch_gradients(&p.model, &rollouts, groups.clone(), &cfg).unwrap();
        let kl = stats.kl_mean.expect("kl_mean with the KL loss");
        assert!(kl > 1e-3, "{estimator:?}: {kl}");
        // The KL term changes the loss by kl_coef x kl_mean.
        let without = StepConfig {
            kl: None,
            ..cfg.clone()
        };
        let (_, plain) =
            mini_batch_gradients(&p.model, &rollouts, groups.clone(), &without).unwrap();
        assert!(
            (stats.loss - plain.loss - 0.5 * kl).abs() < 1e-5,
            "{} vs {} + 0.5 x {kl}",
            stats.loss,
            plain.loss
        );
        let layout = p.model.layout.clone();
        for name in ["model.layers.1.mlp.down_proj.weight", "lm_head.weight"] {
            let id = layout
                .specs
                .iter()
                .position(|s| s.name.ends_with(name))
                .unwrap();
            let g = &grads.0[id];
            let j = (0..g.len())
                .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
                .unwrap();
            let eps = 1e-2f32;
            let w0 = p.model.weights.0[id][j];
            let mut loss_at = |w: f32| {
                p.model.weights.0[id][j] = w;
                let (_, s) =
                    mini_batch_gradients(&p.model, &rollouts, groups.clone(), &cfg).unwrap();
                s.loss
            };
            let fd = (loss_at(w0 + eps) - loss_at(w0 - eps)) / (2.0 * eps as f64);
            p.model.weights.0[id][j] = w0;
            let rel = (fd - g[j] as f64).abs() / (g[j] as f64).abs();
            assert!(
                rel < 5e-3,
                "{estimator:?} {name}[{j}]: manual {} vs finite difference {fd} (rel {rel:e})",
                g[j]
            );
        }
    }
}

/// Responses packed into one forward (the trainer's micro-batches, on
/// every backend) give the log-probs and gradients of the same responses
/// run one at a time, with activations kept or recomputed.
#[test]
fn a_packed_micro_batch_gives_the_one_response_at_a_time_gradient() {
    use vppo_engine::model::acts::Save;
    use vppo_engine::model::engine::Engine;
    use vppo_engine::model::params::Tensors;
    use vppo_engine::ops::cpu::CpuBackend;
    use vppo_engine::train::step::collect_rollouts;
    let p = Pipeline::load(&case_dir("single_noresize")).unwrap();
    let cfg = StepConfig {
        dynamic_sampling: None,
        micro_batch: 4,
        ..config(Algo::Vppo)
    };
    let rollouts = collect_rollouts(&p, &prompts(), &cfg, 5).unwrap();
    let batch = &rollouts.batch[..4];
    let mut engine = Engine::new(CpuBackend, &p.model).unwrap();
    let whole = engine.train_forward(batch, Save::Inputs).unwrap().logprobs;
    let d_lp: Vec<f32> = (0..whole.len()).map(|i| [0.9, -1.1, 0.3][i % 3]).collect();
    let d_ent: Vec<f32> = (0..whole.len())
        .map(|i| 0.05 * ((i % 5) as f32 - 2.0))
        .collect();
    engine.train_backward(&d_lp, &d_ent).unwrap();
    let mut packed = Tensors::zeros(&p.model.layout);
    engine.take_grads(&mut packed).unwrap();
    let mut at = 0;
    for seq in batch {
        let lp = engine
            .train_forward(std::slice::from_ref(seq), Save::All)
            .unwrap()
            .logprobs;
        let span = at..at + lp.len();
        for (a, b) in lp.iter().zip(&whole[span.clone()]) {
            assert!((a - b).abs() <= 1e-5, "log-prob {a} alone vs {b} packed");
        }
        engine
            .train_backward(&d_lp[span.clone()], &d_ent[span.clone()])
            .unwrap();
        at = span.end;
    }
    assert_eq!(at, whole.len());
    let mut split = Tensors::zeros(&p.model.layout);
    engine.take_grads(&mut split).unwrap();
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (a, b) in packed.0.iter().flatten().zip(split.0.iter().flatten()) {
        num += ((a - b) as f64).powi(2);
        den += (*a as f64).powi(2);
    }
    let rel = (num / den).sqrt();
    assert!(den > 0.0 && rel < 1e-5, "gradient rel err {rel:e}");
}

/// The exact-KL dependency option: `response_kl` equals the KL between the
/// full next-token distributions of the two passes computed directly from
/// whole-sequence logits, and a rollout batch carries it per token.
#[test]
fn exact_kl_dependency_matches_the_full_distributions() {
    use vppo_engine::backend::cpu::softmax_kl::softmax_kl_fwd;
    use vppo_engine::model::acts::Save;
    use vppo_engine::model::TrainSequence;
    use vppo_engine::rl::{perturb_patches, DependencyEstimator, Perturbation};
    use vppo_engine::train::step::collect_rollouts;
    let p = Pipeline::load(&case_dir("single_noresize")).unwrap();
    let prompt = &prompts()[0];
    let mut input = prompt.input.clone();
    let prompt_len = input.ids.len();
    input.ids.extend([40, 41, 42, 43]);
    let mut masked = input.clone();
    perturb_patches(
        &mut masked.pixel_values,
        &p.images,
        Perturbation::Black,
        0.5,
        3,
    );
    let seq = |input| [TrainSequence { input, prompt_len }];
    let a = p
        .model
        .train_forward(&seq(input.clone()), Save::Nothing)
        .unwrap();
    let b = p
        .model
        .train_forward(&seq(masked.clone()), Save::Nothing)
        .unwrap();
    let kl = p.model.response_kl(&a, &b).unwrap();
    let rows: Vec<usize> = (prompt_len - 1..input.ids.len() - 1).collect();
    let vocab = p.model.config.text.vocab_size;
    let la = p.model.logits(&p.model.forward(&input).unwrap(), &rows);
    let lb = p.model.logits(&p.model.forward(&masked).unwrap(), &rows);
    let mut want = vec![0.0f32; rows.len()];
    let (mut x, mut y) = (want.clone(), want.clone());
    softmax_kl_fwd(&la, &lb, vocab, &mut want, &mut x, &mut y);
    assert!(
        want.iter().any(|&k| k > 1e-6),
        "the mask changes the distribution"
    );
    for (k, w) in kl.iter().zip(&want) {
        assert!((k - w).abs() <= 1e-5 + 1e-4 * w.abs(), "{kl:?} vs {want:?}");
    }
    assert!(p
        .model
        .response_kl(&a, &a)
        .unwrap()
        .iter()
        .all(|&k| k.abs() < 1e-6));

    let cfg = StepConfig {
        dynamic_sampling: None,
        dependency: DependencyEstimator::ExactKl,
        ..config(Algo::Vppo)
    };
    let rollouts = collect_rollouts(&p, &prompts(), &cfg, 5).unwrap();
    let dep = rollouts.dependency.as_ref().unwrap();
    assert_eq!(dep.len(), rollouts.lp_old.len());
    assert!(dep.iter().all(|&d| d >= -1e-6 && d.is_finite()));
}

/// VPPO's fused dual pass (the original and its patch-blackened twin as ONE
/// packed forward, both pixel sets made by the patch-embed op from the
/// resized image bytes) against the host path: `train_forward` of the
/// original and of a copy perturbed by `perturb_images` with the same draw.
#[test]
fn the_fused_dual_pass_equals_the_host_perturbed_forward() {
    use vppo_engine::model::acts::Save;
    use vppo_engine::model::engine::{Engine, PatchProcessor};
    use vppo_engine::model::TrainSequence;
    use vppo_engine::ops::cpu::CpuBackend;
    use vppo_engine::processor::image::normalize_lut;
    use vppo_engine::rl::{perturb_images, Perturbation};
    for case in ["two_images", "resize"] {
        let dir = case_dir(case);
        let p = Pipeline::load(&dir).unwrap();
        let inp = common::fixtures::inputs(case);
        let mut prompt = String::new();
        for item in inp["messages"][0]["content"].as_array().unwrap() {
            match item["type"].as_str() {
                Some("image") => prompt.push_str("<image>"),
                _ => prompt.push_str(item["text"].as_str().unwrap_or_default()),
            }
        }
        let images: Vec<_> = inp["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| dir.join(v.as_str().unwrap()))
            .collect();
        let response = inp["response"].as_str().unwrap();
        let (input, prompt_len) = p.prepare(&images, &prompt, response).unwrap();
        assert_eq!(
            input.resized.len(),
            input.grids.len(),
            "{case}: resized bytes"
        );
        let (seed, prob) = (0x5eed_u64, 0.5);
        let mut masked = input.clone();
        let dark = perturb_images(
            &mut masked.pixel_values,
            &masked.grids,
            &p.images,
            Perturbation::Black,
            prob,
            seed,
        );
        assert!(dark > 0, "{case}: the draw blackens some patch");
        let seq = |input| TrainSequence { input, prompt_len };
        let want_a = p
            .model
            .train_forward(&[seq(input.clone())], Save::Nothing)
            .unwrap();
        let want_b = p
            .model
            .train_forward(&[seq(masked)], Save::Nothing)
            .unwrap();
        let want_kl = p.model.response_kl(&want_a, &want_b).unwrap();
        let engine = Engine::new(CpuBackend, &p.model).unwrap();
        let images = PatchProcessor {
            geometry: p.images.geometry(),
            lut: normalize_lut(&p.images),
        };
        let (a, b, kl) = engine
            .dual_logprobs(&[seq(input)], &images, &[seed], prob, true)
            .unwrap();
        let close = |x: &[f32], y: &[f32]| {
            x.len() == y.len() && x.iter().zip(y).all(|(u, v)| (u - v).abs() <= 1e-5)
        };
        assert!(close(&a.logprobs, &want_a.logprobs), "{case}: original");
        assert!(close(&b.logprobs, &want_b.logprobs), "{case}: twin");
        assert!(
            a.logprobs != b.logprobs,
            "{case}: the blackened twin changes the log-probs"
        );
        assert!(close(&kl.unwrap(), &want_kl), "{case}: exact KL");
    }
}

/// Prompts of `case` prepared by the pipeline (so they carry the resized
/// image bytes the fused dual pass needs).
fn prepared_prompts(p: &Pipeline, case: &str) -> Vec<Prompt> {
    let dir = case_dir(case);
    let inp = common::fixtures::inputs(case);
    let mut text = String::new();
    for item in inp["messages"][0]["content"].as_array().unwrap() {
        match item["type"].as_str() {
            Some("image") => text.push_str("<image>"),
            _ => text.push_str(item["text"].as_str().unwrap_or_default()),
        }
    }
    let images: Vec<_> = inp["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| dir.join(v.as_str().unwrap()))
        .collect();
    let response = inp["response"].as_str().unwrap();
    let (mut input, prompt_len) = p.prepare(&images, &text, response).unwrap();
    input.ids.truncate(prompt_len);
    ["None", "42"]
        .iter()
        .map(|answer| Prompt {
            input: input.clone(),
            answer: answer.to_string(),
            problem: String::new(),
        })
        .collect()
}

/// `max_tokens_per_micro_batch` cuts a micro-batch's packed forwards (the
/// fused dual pass, the host-perturbed pair, the update's forward and
/// backward) into smaller packed batches: a budget that packs every
/// response alone gives the old log-probs, the dependencies, the loss and
/// the gradients of one whole packed micro-batch, and TAS's mean stays
/// over the micro-batch.
#[test]
fn a_token_budget_repacks_micro_batches_without_changing_the_update() {
    use vppo_engine::rl::PerturbSpace;
    use vppo_engine::train::step::{collect_rollouts, mini_batch_gradients, token_packs};
    let p = Pipeline::load(&case_dir("single_noresize")).unwrap();
    let prompts = prepared_prompts(&p, "single_noresize");
    assert!(!prompts[0].input.resized.is_empty(), "the fused pass runs");
    for space in [PerturbSpace::Patches, PerturbSpace::Pixels] {
        let whole = StepConfig {
            dynamic_sampling: None,
            micro_batch: 6,
            perturb_space: space,
            max_tokens_per_micro_batch: 1 << 20,
            ..config(Algo::Vppo)
        };
        let alone = StepConfig {
            max_tokens_per_micro_batch: 1,
            ..whole.clone()
        };
        let a = collect_rollouts(&p, &prompts, &whole, 3).unwrap();
        let b = collect_rollouts(&p, &prompts, &alone, 3).unwrap();
        assert_eq!(a.batch.len(), 6);
        assert_eq!(token_packs(&a.batch, 0..6, 1 << 20, 2), vec![0..6]);
        assert_eq!(token_packs(&a.batch, 0..6, 1, 1).len(), 6);
        let close = |x: &[f32], y: &[f32]| {
            x.len() == y.len() && x.iter().zip(y).all(|(u, v)| (u - v).abs() <= 1e-5)
        };
        assert!(close(&a.lp_old, &b.lp_old), "{space:?}: old log-probs");
        let (da, db) = (
            a.dependency.as_ref().unwrap(),
            b.dependency.as_ref().unwrap(),
        );
        assert!(close(da, db), "{space:?}: dependencies");
        let mut rollouts = a;
        for (i, adv) in rollouts.advantages.iter_mut().enumerate() {
            *adv = [1.2, -0.7, 0.4][i % 3];
        }
        let groups = 0..rollouts.groups();
        let (g_whole, s_whole) =
            mini_batch_gradients(&p.model, &rollouts, groups.clone(), &whole).unwrap();
        let (g_alone, s_alone) = mini_batch_gradients(&p.model, &rollouts, groups, &alone).unwrap();
        assert!((s_whole.loss - s_alone.loss).abs() <= 1e-6 * s_whole.loss.abs().max(1.0));
        assert_eq!(
            (
                s_whole.adv_scale_min,
                s_whole.adv_scale_max,
                s_whole.tgf_kept_frac
            ),
            (
                s_alone.adv_scale_min,
                s_alone.adv_scale_max,
                s_alone.tgf_kept_frac
            ),
            "the shaping is the micro-batch's"
        );
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (x, y) in g_whole.0.iter().flatten().zip(g_alone.0.iter().flatten()) {
            num += ((x - y) as f64).powi(2);
            den += (*x as f64).powi(2);
        }
        let rel = (num / den).sqrt();
        assert!(
            den > 0.0 && rel < 1e-5,
            "{space:?}: gradient rel err {rel:e}"
        );
    }
}
