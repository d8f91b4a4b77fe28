//! AdamW + grad-norm clipping against torch.optim.AdamW and
//! torch.nn.utils.clip_grad_norm_ (tests/fixtures/adamw, made by
//! scripts/fixtures/make_adamw_fixture.py), and bf16 model weights.

use safetensors::tensor::SafeTensors;
use vppo_engine::backend::cpu::adamw::AdamWConfig;
use vppo_engine::model::params::Tensors;
use vppo_engine::train::optimizer::{AdamW, WeightPrecision};

const NAMES: [&str; 3] = ["a", "b", "c"];

struct Fixture(Vec<u8>);

impl Fixture {
    fn load() -> Self {
        Fixture(
            std::fs::read(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/adamw/adamw.safetensors"
            ))
            .unwrap(),
        )
    }
    fn f32(&self, name: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
    fn norms(&self) -> Vec<f64> {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        st.tensor("grad_norms")
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
    fn tensors(&self, prefix: &str) -> Tensors {
        Tensors(
            NAMES
                .iter()
                .map(|n| self.f32(&format!("{prefix}.{n}")))
                .collect(),
        )
    }
}

fn config() -> AdamWConfig {
    AdamWConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    }
}

fn max_diff(a: &Tensors, b: &Tensors) -> f32 {
    a.0.iter()
        .zip(&b.0)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn four_clipped_steps_match_torch() {
    let fx = Fixture::load();
    let mut weights = fx.tensors("init");
    let mut opt = AdamW::new(&weights, config(), Some(1.0), WeightPrecision::Fp32);
    for (step, want_norm) in fx.norms().into_iter().enumerate() {
        let mut grads = fx.tensors(&format!("grad{step}"));
        let report = opt.step(&mut weights, &mut grads);
        assert!(!report.skipped);
        assert!(
            (report.grad_norm - want_norm).abs() <= 1e-5 * want_norm,
            "step {step}: norm {} vs torch {want_norm}",
            report.grad_norm
        );
    }
    let d = max_diff(&weights, &fx.tensors("final"));
    println!("max |params - torch| = {d:e}");
    assert!(d < 2e-6, "parameters differ from torch by {d}");
    assert!(max_diff(&opt.exp_avg, &fx.tensors("exp_avg")) < 1e-6);
    assert!(max_diff(&opt.exp_avg_sq, &fx.tensors("exp_avg_sq")) < 1e-5);
    assert_eq!(opt.step, 4);
}

#[test]
fn bf16_model_weights_follow_fp32_master_weights() {
    let fx = Fixture::load();
    let mut weights = fx.tensors("init");
    let mut opt = AdamW::new(&weights, config(), Some(1.0), WeightPrecision::Bf16Model);
    for step in 0..4 {
        let mut grads = fx.tensors(&format!("grad{step}"));
        opt.step(&mut weights, &mut grads);
    }
    let master = opt.master.as_ref().unwrap();
    // The master weights take exactly torch's fp32 trajectory...
    assert!(max_diff(master, &fx.tensors("final")) < 2e-6);
    // ...and the model holds them rounded to bf16.
    for (w, m) in weights.0.iter().zip(&master.0) {
        for (a, b) in w.iter().zip(m) {
            assert_eq!(*a, half::bf16::from_f32(*b).to_f32());
        }
    }
}

#[test]
fn non_finite_gradients_skip_the_step() {
    let fx = Fixture::load();
    let mut weights = fx.tensors("init");
    let before = weights.clone();
    let mut opt = AdamW::new(&weights, config(), Some(1.0), WeightPrecision::Fp32);
    let mut grads = fx.tensors("grad0");
    grads.0[1][3] = f32::NAN;
    let report = opt.step(&mut weights, &mut grads);
    assert!(report.skipped && report.grad_norm.is_nan());
    assert_eq!(opt.step, 0);
    assert_eq!(max_diff(&weights, &before), 0.0);
}
