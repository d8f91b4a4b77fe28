//! The manual backward through the whole Qwen2.5-VL graph against torch
//! autograd (fixtures' grads.safetensors: d sum(response_logprobs) / d every
//! parameter), with and without activation recomputation, plus central
//! finite differences on the largest entries.

mod common;

use common::fixtures::{case_dir, fixture_input, Reference, CASES};
use vppo_engine::model::acts::Save;
use vppo_engine::model::params::Tensors;
use vppo_engine::model::{Qwen25Vl, SequenceInput, TrainSequence};

fn fixture_batch(case: &str) -> Vec<TrainSequence> {
    let (input, prompt_len) = fixture_input(case);
    vec![TrainSequence { input, prompt_len }]
}

/// Gradient of sum(response log-probs) w.r.t. every parameter.
fn grad_of_logprob_sum(model: &Qwen25Vl, batch: &[TrainSequence], save: Save) -> (f64, Tensors) {
    let fwd = model.train_forward(batch, save).unwrap();
    let n = fwd.logprobs.len();
    let mut grads = Tensors::zeros(&model.layout);
    model
        .train_backward(&fwd, &vec![1.0; n], &vec![0.0; n], &mut grads)
        .unwrap();
    (fwd.logprobs.iter().map(|&v| v as f64).sum(), grads)
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

#[test]
fn every_parameter_gradient_matches_torch_autograd() {
    for case in CASES {
        let model = Qwen25Vl::load(&case_dir(case)).unwrap();
        let reference = Reference::open(case, "grads.safetensors");
        let batch = fixture_batch(case);
        for save in [Save::All, Save::Inputs] {
            let (_, grads) = grad_of_logprob_sum(&model, &batch, save);
            let mut worst = (0.0f64, String::new());
            for (i, spec) in model.layout.specs.iter().enumerate() {
                let name = model.names.file_name(&spec.name);
                let (shape, want) = reference.f32(&name);
                assert_eq!(shape, spec.shape, "{case}: {name} shape");
                let e = rel(&grads.0[i], &want);
                if e > worst.0 {
                    worst = (e, name.clone());
                }
                assert!(
                    e < 1e-4,
                    "{case} ({save:?}): gradient of {name} differs, rel err {e:.2e}"
                );
            }
            println!(
                "{case} ({save:?}): {} tensors, worst rel err {:.2e} ({})",
                model.layout.specs.len(),
                worst.0,
                worst.1
            );
        }
    }
}

#[test]
fn recomputation_gives_the_same_gradients() {
    let case = "two_images";
    let model = Qwen25Vl::load(&case_dir(case)).unwrap();
    let batch = fixture_batch(case);
    let (_, a) = grad_of_logprob_sum(&model, &batch, Save::All);
    let (_, b) = grad_of_logprob_sum(&model, &batch, Save::Inputs);
    for (x, y) in a.0.iter().zip(&b.0) {
        assert_eq!(
            x, y,
            "recomputed activations must reproduce the same arithmetic"
        );
    }
}

#[test]
fn finite_differences_agree_on_the_largest_entries() {
    let case = "partial_windows";
    let mut model = Qwen25Vl::load(&case_dir(case)).unwrap();
    let batch = fixture_batch(case);
    let (_, grads) = grad_of_logprob_sum(&model, &batch, Save::All);
    // Probe the largest-gradient entry of a few tensors across the graph.
    let names = [
        "visual.patch_embed.proj.weight",
        "visual.blocks.0.attn.qkv.weight",
        "visual.merger.mlp.0.bias",
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.norm.weight",
    ];
    for name in names {
        let id = model
            .layout
            .specs
            .iter()
            .position(|s| s.name == name)
            .unwrap();
        let g = &grads.0[id];
        let (j, &analytic) = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        let h = 1e-2f32;
        let orig = model.weights.0[id][j];
        let eval = |v: f32, m: &mut Qwen25Vl| {
            m.weights.0[id][j] = v;
            let f = m.train_forward(&batch, Save::Nothing).unwrap();
            f.logprobs.iter().map(|&x| x as f64).sum::<f64>()
        };
        let up = eval(orig + h, &mut model);
        let down = eval(orig - h, &mut model);
        model.weights.0[id][j] = orig;
        let numeric = (up - down) / (2.0 * h as f64);
        let err = (numeric - analytic as f64).abs() / (analytic.abs() as f64).max(1e-3);
        println!(
            "{name}[{j}]: analytic {analytic:.5} finite difference {numeric:.5} (rel {err:.1e})"
        );
        assert!(
            err < 2e-2,
            "{name}[{j}]: analytic {analytic} vs finite difference {numeric}"
        );
    }
}

#[test]
fn packed_sequences_give_the_sum_of_their_separate_gradients() {
    // Two sequences of different lengths (one with images, one text only)
    // packed into one batch, with per-token loss weights on log-probs and
    // entropies: gradients and log-probs equal those of separate runs.
    let case = "two_images";
    let model = Qwen25Vl::load(&case_dir(case)).unwrap();
    let with_images = fixture_batch(case).remove(0);
    let text_ids: Vec<u32> = with_images
        .input
        .ids
        .iter()
        .copied()
        .filter(|&t| t < 360)
        .take(40)
        .collect();
    let text_only = TrainSequence {
        input: SequenceInput {
            ids: text_ids,
            ..Default::default()
        },
        prompt_len: 25,
    };
    let weights = |n: usize, salt: f32| -> (Vec<f32>, Vec<f32>) {
        (
            (0..n).map(|i| (i as f32 * 0.37 + salt).sin()).collect(),
            (0..n)
                .map(|i| ((i as f32 * 0.11 - salt).cos()) * 0.1)
                .collect(),
        )
    };
    let run = |batch: &[TrainSequence], salt: f32, grads: &mut Tensors| -> Vec<f32> {
        let fwd = model.train_forward(batch, Save::All).unwrap();
        let (d_lp, d_ent) = weights(fwd.logprobs.len(), salt);
        model.train_backward(&fwd, &d_lp, &d_ent, grads).unwrap();
        fwd.logprobs
    };
    let mut separate = Tensors::zeros(&model.layout);
    let mut lp_a = run(std::slice::from_ref(&with_images), 0.0, &mut separate);
    let lp_b = run(std::slice::from_ref(&text_only), 1.0, &mut separate);
    let mut packed = Tensors::zeros(&model.layout);
    let fwd = model
        .train_forward(&[with_images.clone(), text_only.clone()], Save::All)
        .unwrap();
    assert_eq!(fwd.response_lens, vec![lp_a.len(), lp_b.len()]);
    let (mut d_lp, mut d_ent) = weights(lp_a.len(), 0.0);
    let (d_lp_b, d_ent_b) = weights(lp_b.len(), 1.0);
    d_lp.extend(d_lp_b);
    d_ent.extend(d_ent_b);
    model
        .train_backward(&fwd, &d_lp, &d_ent, &mut packed)
        .unwrap();
    lp_a.extend(lp_b);
    let d = lp_a
        .iter()
        .zip(&fwd.logprobs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(d < 1e-5, "packed log-probs differ by {d}");
    for (i, spec) in model.layout.specs.iter().enumerate() {
        let e = rel(&packed.0[i], &separate.0[i]);
        assert!(
            e < 1e-5,
            "{}: packed vs separate gradient rel err {e:.2e}",
            spec.name
        );
    }
}
