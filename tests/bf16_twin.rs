//! The CPU twin of bf16 mixed precision (`ops::cpu_bf16`) against the fp32
//! graph on a fixture checkpoint: log-probs, gradients and the weights after
//! one AdamW step agree to bf16's precision (tolerances below), the bf16
//! run really rounds (its results differ from fp32, and every weight and
//! logit it stores is a bf16 value), and with fp32 weights the twin is the
//! fp32 CPU backend exactly.

mod common;

use common::fixtures::{case_dir, fixture_input};
use half::bf16;
use vppo_engine::backend::cpu::adamw::AdamWConfig;
use vppo_engine::model::acts::Save;
use vppo_engine::model::engine::Engine;
use vppo_engine::model::params::Tensors;
use vppo_engine::model::TrainSequence;
use vppo_engine::ops::cpu::CpuBackend;
use vppo_engine::ops::cpu_bf16::CpuBf16Backend;
use vppo_engine::ops::{Backend, Buffer, DType, Precision};
use vppo_engine::pipeline::Pipeline;
use vppo_engine::train::optimizer::{AdamW, Policy, WeightPrecision};
use vppo_engine::train::step::{collect_rollouts, Algo, Prompt, StepConfig};

/// bf16 keeps 8 significant bits (relative step 2^-8 = 3.9e-3); a forward
/// through a few layers compounds a few of those (measured: 2.4e-2).
const LOGPROB_TOL: f32 = 5e-2;
/// Relative L2 error of the whole gradient, bf16 vs fp32 (measured: 1.2e-2).
const GRAD_REL_TOL: f64 = 3e-2;

fn setup() -> (Pipeline, Vec<TrainSequence>) {
    let p = Pipeline::load(&case_dir("single_noresize")).unwrap();
    let (mut input, prompt_len) = fixture_input("single_noresize");
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
        n: 2,
        max_new_tokens: 5,
        dynamic_sampling: None,
        ..StepConfig::recipe(Algo::Vppo)
    };
    let batch = collect_rollouts(&p, &prompts, &cfg, 7).unwrap().batch;
    (p, batch)
}

fn is_bf16(x: f32) -> bool {
    bf16::from_f32(x).to_f32() == x
}

fn rel_l2(a: &Tensors, b: &Tensors) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.0.iter().flatten().zip(b.0.iter().flatten()) {
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    assert!(den > 0.0, "a zero gradient compares nothing");
    (num / den).sqrt()
}

/// Log-probs and gradients of `batch` under fixed token gradients.
fn forward_backward<B: Backend>(
    engine: &mut Engine<B>,
    batch: &[TrainSequence],
) -> (Vec<f32>, Tensors) {
    let lp = engine.train_forward(batch, Save::All).unwrap().logprobs;
    let d_lp: Vec<f32> = (0..lp.len()).map(|i| [0.9, -1.1, 0.3][i % 3]).collect();
    let d_ent: Vec<f32> = (0..lp.len())
        .map(|i| 0.05 * ((i % 5) as f32 - 2.0))
        .collect();
    engine.train_backward(&d_lp, &d_ent).unwrap();
    let mut grads = Tensors::zeros(&engine.layout);
    engine.take_grads(&mut grads).unwrap();
    (lp, grads)
}

#[test]
fn with_fp32_weights_the_twin_is_the_fp32_backend_exactly() {
    let (p, batch) = setup();
    let (lp32, g32) = forward_backward(&mut Engine::new(CpuBackend, &p.model).unwrap(), &batch);
    let (lp, g) = forward_backward(&mut Engine::new(CpuBf16Backend, &p.model).unwrap(), &batch);
    assert_eq!(lp, lp32);
    assert_eq!(g.0, g32.0);
}

#[test]
fn bf16_log_probs_and_gradients_match_fp32_within_bf16_tolerance() {
    let (p, batch) = setup();
    let (lp32, g32) = forward_backward(&mut Engine::new(CpuBackend, &p.model).unwrap(), &batch);
    let mut engine = Engine::with_precision(CpuBf16Backend, &p.model, Precision::Bf16).unwrap();
    assert!(engine.weights.iter().all(|w| w.dtype() == DType::Bf16));
    let (lp, g) = forward_backward(&mut engine, &batch);
    assert_eq!(lp.len(), lp32.len());
    let worst = lp
        .iter()
        .zip(&lp32)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= LOGPROB_TOL,
        "log-prob max |bf16 - fp32| = {worst:e}"
    );
    assert!(worst > 0.0, "bf16 storage changes the log-probs");
    let rel = rel_l2(&g, &g32);
    assert!(rel <= GRAD_REL_TOL, "gradient rel L2 err {rel:e}");
    assert!(rel > 0.0, "bf16 storage changes the gradients");
    // Gradients accumulate in fp32: they are not all bf16 values.
    let grads = engine.grads.as_ref().unwrap();
    assert!(grads.iter().all(|g| g.dtype() == DType::F32));
    assert!(g.0.iter().flatten().any(|&x| !is_bf16(x)));
}

#[test]
fn every_stored_weight_and_logit_of_the_bf16_twin_is_a_bf16_value() {
    let (p, batch) = setup();
    assert!(
        p.model.weights.0.iter().flatten().any(|&x| !is_bf16(x)),
        "the fixture has fp32 weights to round"
    );
    let engine = Engine::with_precision(CpuBf16Backend, &p.model, Precision::Bf16).unwrap();
    for w in &engine.weights {
        assert!(engine.be.download(w).unwrap().into_iter().all(is_bf16));
    }
    let (_, logits) = engine.response_logits(&batch[0]).unwrap();
    assert!(!logits.is_empty() && logits.iter().copied().all(is_bf16));
    let fp32 = Engine::new(CpuBackend, &p.model).unwrap();
    let (_, logits32) = fp32.response_logits(&batch[0]).unwrap();
    assert!(logits32.iter().copied().any(|x| !is_bf16(x)));
}

/// One AdamW step on each: the fp32 masters of the bf16 run stay within
/// twice the learning rate of the fp32 run's weights (Adam's first step
/// moves every weight by at most lr, whatever the gradient's scale), the
/// bf16 weights are the masters rounded, and most weights move the same way.
#[test]
fn weights_after_one_bf16_step_match_fp32_and_are_their_masters_rounded() {
    let (p, batch) = setup();
    let lr = 1e-3;
    let cfg = AdamWConfig {
        lr,
        ..AdamWConfig::default()
    };
    let step = |mut policy: Policy<_>, precision| {
        let mut opt = AdamW::new(&p.model.weights, cfg, Some(1.0), precision);
        let mut host = p.model.weights.clone();
        forward_backward_keep(&mut policy.engine, &batch);
        let report = policy.optimizer_step(&mut opt, &mut host).unwrap();
        assert!(!report.skipped && report.grad_norm > 0.0);
        policy.sync_to_host(&mut host, &mut opt).unwrap();
        (host, opt)
    };
    let (w32, _) = step(
        Policy::new(Engine::new(CpuBf16Backend, &p.model).unwrap()),
        WeightPrecision::Fp32,
    );
    let (w16, opt16) = step(
        Policy::new(Engine::with_precision(CpuBf16Backend, &p.model, Precision::Bf16).unwrap()),
        WeightPrecision::Bf16Model,
    );
    let masters = opt16.master.expect("the bf16 run keeps fp32 masters");
    let (mut same_way, mut moved) = (0usize, 0usize);
    for ((m, w), (w0, x32)) in masters.0.iter().flatten().zip(w16.0.iter().flatten()).zip(
        p.model
            .weights
            .0
            .iter()
            .flatten()
            .zip(w32.0.iter().flatten()),
    ) {
        assert!(
            (m - x32).abs() <= 2.0 * lr as f32 * 1.001 + 1e-7,
            "master {m} vs fp32 {x32}"
        );
        assert_eq!(
            *w,
            bf16::from_f32(*m).to_f32(),
            "the bf16 copy of the master"
        );
        if x32 != w0 {
            moved += 1;
            same_way += usize::from((x32 - w0).signum() == (m - w0).signum());
        }
    }
    assert!(moved > 0);
    let agree = same_way as f64 / moved as f64;
    // Measured: 0.995.
    assert!(agree >= 0.9, "{agree:.3} of the updates go the same way");
}

fn forward_backward_keep<B: Backend>(engine: &mut Engine<B>, batch: &[TrainSequence]) {
    let lp = engine.train_forward(batch, Save::All).unwrap().logprobs;
    let d_lp: Vec<f32> = (0..lp.len()).map(|i| [0.9, -1.1, 0.3][i % 3]).collect();
    let d_ent = vec![0.0; lp.len()];
    engine.train_backward(&d_lp, &d_ent).unwrap();
}

/// Generation on the bf16 twin (bf16 KV cache, decode attention in bf16)
/// against scoring the same tokens with one packed bf16 forward: the two
/// paths round at different places (the cache holds bf16 keys either way,
/// the prefill and decode attention sum in other orders), so they agree to
/// bf16's tolerance rather than fp32's.
#[test]
fn bf16_generation_log_probs_match_scoring_the_same_tokens() {
    use vppo_engine::rollout::generate::{eos_ids, Generator};
    use vppo_engine::rollout::sampling::SamplingParams;
    let case = "two_images";
    let p = Pipeline::load(&case_dir(case)).unwrap();
    let (mut prompt, prompt_len) = fixture_input(case);
    prompt.ids.truncate(prompt_len);
    let engine = Engine::with_precision(CpuBf16Backend, &p.model, Precision::Bf16).unwrap();
    let mut generator = Generator::new(&engine, eos_ids(&case_dir(case)));
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        top_k: 50,
    };
    let samples = generator
        .generate(std::slice::from_ref(&prompt), 2, &params, 8, 3)
        .unwrap();
    let batch: Vec<TrainSequence> = samples
        .iter()
        .map(|s| {
            let mut input = prompt.clone();
            input.ids.extend(&s.token_ids);
            TrainSequence { input, prompt_len }
        })
        .collect();
    let scored = engine.logprobs(&batch).unwrap().logprobs;
    let generated: Vec<f32> = samples.iter().flat_map(|s| s.logprobs.clone()).collect();
    assert_eq!(generated.len(), scored.len());
    let worst = generated
        .iter()
        .zip(&scored)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= LOGPROB_TOL, "generate vs score (bf16): {worst:e}");
}
