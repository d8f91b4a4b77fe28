//! Checkpoints: the Hub-layout save reloads to the same weights and logits
//! (sharded, both dtypes, from either name layout); training checkpoints
//! restore optimizer and state exactly; a process killed in the middle of a
//! save leaves the previous checkpoint intact and `latest` pointing at it.

mod common;

use common::fixtures::{case_dir, fixture_input};
use std::path::{Path, PathBuf};
use std::process::Command;
use vppo_engine::backend::cpu::adamw::AdamWConfig;
use vppo_engine::model::checkpoint::{Checkpoint, NameLayout};
use vppo_engine::model::params::Tensors;
use vppo_engine::model::{Qwen25Vl, SequenceInput};
use vppo_engine::train::checkpoint::{
    latest_checkpoint, load_training_checkpoint, save_hub_checkpoint, save_training_checkpoint,
    SaveDtype, TrainingState,
};
use vppo_engine::train::optimizer::{AdamW, WeightPrecision};

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vppo-ckpt-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn last_logits(model: &Qwen25Vl, input: &SequenceInput) -> Vec<f32> {
    let out = model.forward(input).unwrap();
    model.logits(&out, &[input.ids.len() - 1])
}

#[test]
fn hub_save_reloads_to_the_same_model() {
    // The resize case uses the newer `model.language_model.*` names; the
    // save is always in the Hub layout.
    for case in ["resize", "partial_windows"] {
        let model = Qwen25Vl::load(&case_dir(case)).unwrap();
        let input = fixture_input(case).0;
        let want = last_logits(&model, &input);
        let root = scratch(case);
        let dest = root.join("saved");
        save_hub_checkpoint(&model, &dest, SaveDtype::F32, 300_000).unwrap();
        let index: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dest.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let shards: std::collections::BTreeSet<&str> = index["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            shards.len() > 1,
            "{case}: expected several shards, got {shards:?}"
        );
        for f in [
            "config.json",
            "tokenizer.json",
            "preprocessor_config.json",
            "chat_template.json",
        ] {
            assert!(dest.join(f).is_file(), "{case}: {f} not copied");
        }
        let ckpt = Checkpoint::open(&dest).unwrap();
        assert_eq!(ckpt.layout, NameLayout::Hub);
        assert!(ckpt
            .tensor_names()
            .all(|n| n.starts_with("visual.") || n.starts_with("model.") || n == "lm_head.weight"));
        let reloaded = Qwen25Vl::load(&dest).unwrap();
        assert_eq!(
            reloaded.weights.0, model.weights.0,
            "{case}: weights changed"
        );
        assert_eq!(
            last_logits(&reloaded, &input),
            want,
            "{case}: logits changed"
        );
        // bf16: every weight is the bf16 rounding of the original.
        let dest16 = root.join("saved-bf16");
        save_hub_checkpoint(&model, &dest16, SaveDtype::Bf16, 1 << 30).unwrap();
        assert!(dest16.join("model.safetensors").is_file());
        let m16 = Qwen25Vl::load(&dest16).unwrap();
        for (a, b) in m16
            .weights
            .0
            .iter()
            .flatten()
            .zip(model.weights.0.iter().flatten())
        {
            assert_eq!(*a, half::bf16::from_f32(*b).to_f32());
        }
        // Saving over an existing checkpoint replaces it whole.
        save_hub_checkpoint(&m16, &dest, SaveDtype::F32, 1 << 30).unwrap();
        assert!(!dest.join("model.safetensors.index.json").exists());
        assert_eq!(Qwen25Vl::load(&dest).unwrap().weights.0, m16.weights.0);
        std::fs::remove_dir_all(&root).unwrap();
    }
}

fn pseudo_grads(model: &Qwen25Vl, salt: u32) -> Tensors {
    let mut g = Tensors::zeros(&model.layout);
    for (i, t) in g.0.iter_mut().enumerate() {
        for (j, v) in t.iter_mut().enumerate() {
            let h = (j as u32).wrapping_mul(2_654_435_761) ^ (i as u32).wrapping_mul(40_503) ^ salt;
            *v = (h % 2001) as f32 / 1000.0 - 1.0;
        }
    }
    g
}

fn optimizer(model: &Qwen25Vl, precision: WeightPrecision) -> AdamW {
    let cfg = AdamWConfig {
        lr: 1e-3,
        ..AdamWConfig::default()
    };
    AdamW::new(&model.weights, cfg, Some(1.0), precision)
}

#[test]
fn training_checkpoints_resume_exactly() {
    for precision in [WeightPrecision::Fp32, WeightPrecision::Bf16Model] {
        let mut model = Qwen25Vl::load(&case_dir("single_noresize")).unwrap();
        let mut opt = optimizer(&model, precision);
        for salt in 0..2 {
            let mut g = pseudo_grads(&model, salt);
            opt.step(&mut model.weights, &mut g);
        }
        let run = scratch(&format!("resume-{precision:?}"));
        let state = TrainingState {
            step: 2,
            seed: 17,
            data_position: 40,
            extra: serde_json::json!({"note": "test"}),
        };
        let dir = save_training_checkpoint(&run, &model, &opt, &state, &mut |_| {}).unwrap();
        assert_eq!(latest_checkpoint(&run).unwrap(), Some(dir.clone()));
        let (mut model2, mut opt2, state2) = load_training_checkpoint(&dir).unwrap();
        assert_eq!(state2, state);
        assert_eq!(opt2.step, 2);
        assert_eq!(opt2.precision(), precision);
        // One more step on both: identical results.
        let (mut g, mut g2) = (pseudo_grads(&model, 9), pseudo_grads(&model2, 9));
        opt.step(&mut model.weights, &mut g);
        opt2.step(&mut model2.weights, &mut g2);
        assert_eq!(
            model.weights.0, model2.weights.0,
            "{precision:?}: resumed run diverged"
        );
        std::fs::remove_dir_all(&run).unwrap();
    }
}

/// Runs in a child process (see the next test): saves step 1 completely,
/// then dies (SIGABRT) after writing two files of the step-2 checkpoint.
#[test]
#[ignore = "the child process of a_save_killed_midway_leaves_the_previous_checkpoint_intact"]
fn crash_child() {
    let run = std::env::var("VPPO_CRASH_RUN_DIR")
        .expect("run by the crash test, which sets VPPO_CRASH_RUN_DIR");
    let run = Path::new(&run);
    let model = Qwen25Vl::load(&case_dir("single_noresize")).unwrap();
    let opt = optimizer(&model, WeightPrecision::Fp32);
    let state = |step| TrainingState {
        step,
        seed: 1,
        data_position: step * 8,
        extra: serde_json::Value::Null,
    };
    save_training_checkpoint(run, &model, &opt, &state(1), &mut |_| {}).unwrap();
    let mut written = 0;
    let _ = save_training_checkpoint(run, &model, &opt, &state(2), &mut |_| {
        written += 1;
        if written == 2 {
            std::process::abort();
        }
    });
    unreachable!("the second save should have been killed");
}

#[test]
fn a_save_killed_midway_leaves_the_previous_checkpoint_intact() {
    let run = scratch("crash");
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--ignored", "--test-threads", "1"])
        .env("VPPO_CRASH_RUN_DIR", &run)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the child should have been killed");
    let latest = latest_checkpoint(&run).unwrap().expect("latest must exist");
    assert!(
        latest.ends_with("checkpoint-00000001"),
        "{}",
        latest.display()
    );
    assert!(
        !run.join("checkpoint-00000002").exists(),
        "a partial checkpoint was left in place"
    );
    let (model, opt, state) = load_training_checkpoint(&latest).unwrap();
    assert_eq!(state.step, 1);
    assert_eq!(opt.step, 0);
    assert_eq!(
        model.weights.0,
        Qwen25Vl::load(&case_dir("single_noresize"))
            .unwrap()
            .weights
            .0
    );
    std::fs::remove_dir_all(&run).unwrap();
}

/// A diverged model (or optimizer state) is never written: the previous
/// checkpoint stays the latest, and no folder is left behind.
#[test]
fn non_finite_weights_or_moments_are_never_saved() {
    let model = Qwen25Vl::load(&case_dir("single_noresize")).unwrap();
    let state = TrainingState {
        step: 1,
        seed: 1,
        data_position: 0,
        extra: serde_json::Value::Null,
    };
    let run = scratch("non-finite");
    let good = save_training_checkpoint(
        &run,
        &model,
        &optimizer(&model, WeightPrecision::Fp32),
        &state,
        &mut |_| {},
    )
    .unwrap();
    for poison_moment in [false, true] {
        let mut bad = Qwen25Vl::load(&case_dir("single_noresize")).unwrap();
        let mut opt = optimizer(&bad, WeightPrecision::Fp32);
        if poison_moment {
            opt.exp_avg_sq.0[3][0] = f32::INFINITY;
        } else {
            bad.weights.0[3][5] = f32::NAN;
        }
        let next = TrainingState {
            step: 2,
            ..state.clone()
        };
        let err = save_training_checkpoint(&run, &bad, &opt, &next, &mut |_| {})
            .unwrap_err()
            .to_string();
        let name = &bad.layout.specs[3].name;
        assert!(
            err.contains("non-finite") && err.contains(name.as_str()),
            "{err}"
        );
        assert_eq!(latest_checkpoint(&run).unwrap(), Some(good.clone()));
        let entries: Vec<_> = std::fs::read_dir(&run).unwrap().flatten().collect();
        assert_eq!(entries.len(), 2, "only checkpoint-00000001 and latest");
    }
    // A missing trainer_state.json is a read error, named as such.
    std::fs::remove_file(good.join("trainer_state.json")).unwrap();
    let err = load_training_checkpoint(&good).err().unwrap().to_string();
    assert!(
        err.contains("cannot read") && err.contains("trainer_state.json"),
        "{err}"
    );
    std::fs::remove_dir_all(&run).unwrap();
}
